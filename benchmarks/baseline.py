"""The baseline pieces, written like the paper's code: what memlens is measured against.

* scoring: one sample at a time, full logits over the vocabulary, float32 (the authors' MIA loop);
* extraction: one ``generate`` call per prefix;
* LoRA training: the Hugging Face Trainer with DataCollatorForLanguageModeling(mlm=False), random batches, float32.

:func:`baseline_engine` swaps these pieces into memlens's own run (``memlens.audit.compute_run``), so that a study
made of baseline pieces computes the same records, attacks and metrics, only the way the paper's code did.
"""

from __future__ import annotations

import contextlib
import functools
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch


def per_sample_stats(model: Any, seqs: list[list[int]], *, ks=(), min_k_pp: bool = False, starts=None, **_):
    """memlens.scoring.score's statistics, one sequence at a time through the full model (full logits)."""
    from memlens.scoring import SampleStats, _lowest_mean, token_stats

    n = len(seqs)
    starts = [1] * n if starts is None else list(starts)
    n_tokens, sum_nll = np.zeros(n, dtype=np.int64), np.zeros(n)
    mk = {k: np.zeros(n) for k in ks}
    mkpp = {k: np.zeros(n) for k in ks} if min_k_pp else {}
    model.eval()
    with torch.inference_mode():
        for i, s in enumerate(seqs):
            ids = torch.tensor([s])
            logits = model(input_ids=ids).logits[0, starts[i] - 1 : -1]
            lp, z = token_stats(logits, ids[0, starts[i]:], min_k_pp)
            lp = lp.double().numpy()
            n_tokens[i], sum_nll[i] = lp.size, -lp.sum()
            for k in ks:
                mk[k][i] = _lowest_mean(lp, k)
                if min_k_pp:
                    mkpp[k][i] = _lowest_mean(z.double().numpy(), k)
    return SampleStats(n_tokens, sum_nll, mk, mkpp)


def trainer_loop(model: Any, seqs: list[list[int]], cfg: Any, pad_id: int, progress: bool = False,
                 tokenizer: Any = None, hooks: Any = (), state: Any = None, checkpoints: Path | None = None,
                 save_steps: int = 50) -> list[dict]:
    """Train with the Hugging Face Trainer at the hyperparameters of ``cfg`` (a memlens TrainConfig); returns
    memlens-style log rows (step, loss, tokens = targets, sequences, elapsed_s). ``hooks`` (memlens's
    checkpoints, early stopping) and a saved ``state`` (memlens.training_state) are not supported: the baseline's
    runs have none (BASELINE_SETTINGS turn the saving off).

    ``checkpoints``: a folder for the Trainer's own checkpoints (every ``save_steps`` steps and at the last step, the
    newest one kept), for a long run that must survive an interruption (benchmarks/fit.py). A rerun with the same
    folder goes on from its newest complete checkpoint (``Trainer.train(resume_from_checkpoint=...)``: weights,
    optimizer, scheduler, random states, and the batches of the current epoch skipped); the rows are then those of
    this try only, their first step after the checkpoint's, their clock from this try's start. A checkpoint of the
    last step (a run killed after training) gives the trained adapter and no rows. Give a folder for one training:
    the caller checks that a checkpoint there is this training's."""
    if hooks or state is not None:
        raise ValueError("the Trainer baseline runs no memlens training hooks and saves no training state")
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainerCallback, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    from memlens.finetune import plan_steps

    _, total = plan_steps(len(seqs), cfg)
    last = newest_checkpoint(Path(checkpoints)) if checkpoints is not None else None
    if last is not None and json.loads((last / "trainer_state.json").read_text())["global_step"] >= total:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(model, load_file(str(last / "adapter_model.safetensors")))
        model.eval()
        return []  # trained to the end by an earlier try
    if tokenizer is not None:
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    else:  # the same batches: right padding, labels = ids with padding masked
        from memlens.scoring import pad_batch

        def collator(features):
            ids, mask, labels = pad_batch([f["input_ids"] for f in features], pad_id)
            return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    # what each step trained on, counted as the model sees it (the data loader fetches a batch ahead, and an epoch's
    # last step may have fewer than grad_accum micro-batches): (tokens, sequences) per forward, step ends in `ends`
    fed: list[tuple[int, int]] = []
    ends: list[int] = []
    stamps: list[float] = []

    def seen(module, args, kwargs):
        if module.training:
            mask = kwargs["attention_mask"]
            fed.append((int(mask.sum()), int(mask.shape[0])))

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **k):
            stamps.append(time.perf_counter())
            ends.append(len(fed))

    saving = ({"save_strategy": "steps", "save_steps": save_steps, "save_total_limit": 1} if checkpoints is not None
              else {"save_strategy": "no"})
    args = TrainingArguments(
        output_dir=str(checkpoints or "/tmp/memlens-bench-trainer"), per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.lr, warmup_steps=cfg.warmup_steps,
        lr_scheduler_type={"constant": "constant_with_warmup"}.get(cfg.schedule, cfg.schedule), weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm or 0.0,
        max_steps=total, logging_steps=1, report_to=[], disable_tqdm=True, **saving,
        use_cpu=not torch.cuda.is_available(), seed=cfg.seed, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=[{"input_ids": s} for s in seqs], data_collator=collator,
                      callbacks=[Clock()])
    trainer.remove_callback(PrinterCallback)  # keep stdout for the benchmark's JSON line
    hook = model.register_forward_pre_hook(seen, with_kwargs=True)
    t0 = time.perf_counter()
    try:
        trainer.train(resume_from_checkpoint=str(last) if last is not None else None)
    finally:
        hook.remove()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    first = total - len(stamps)  # the steps an earlier try made (0 without a checkpoint)
    if len(losses) != total or (ends and ends[-1] != len(fed)):
        raise RuntimeError(f"the Trainer logged {len(losses)} losses in {len(stamps)} steps of {total} (and "
                           f"{len(fed)} forwards): its log does not match the steps")
    rows = []
    for i, step in enumerate(range(first, total)):
        micro = fed[(ends[i - 1] if i else 0) : ends[i]]
        n_fed, n_seq = sum(m[0] for m in micro), sum(m[1] for m in micro)
        rows.append({"step": step + 1, "loss": losses[step], "tokens": n_fed - n_seq, "sequences": n_seq,
                     "elapsed_s": stamps[i] - t0})
    model.eval()
    return rows


def newest_checkpoint(folder: Path) -> Path | None:
    """The Trainer's newest complete checkpoint in ``folder`` (``checkpoint-N`` with its ``trainer_state.json``, which
    the Trainer writes last): a save cut short by a kill is passed over."""
    done = [p for p in folder.glob("checkpoint-*") if p.name[11:].isdigit() and (p / "trainer_state.json").is_file()]
    return max(done, key=lambda p: int(p.name[11:]), default=None)


def one_prefix_at_a_time(extract_fn):
    """memlens.extraction.extract with batches of one prompt: one ``generate`` call per prefix."""

    @functools.wraps(extract_fn)
    def wrapped(*args, **kwargs):
        kwargs["batch_size"] = 1
        return extract_fn(*args, **kwargs)

    return wrapped


@contextlib.contextmanager
def baseline_engine():
    """Within: memlens's runs train with the Trainer, score one sample at a time (no cache of base statistics
    across runs) and generate one prefix at a time. Pair with train.precision=float32, train.batching=random,
    audit.precision=float32."""
    import memlens.audit as A
    import memlens.finetune as F

    saved = (A.cached_score, A.score, A.extract, F.train_loop)

    def base_stats(lm, model, seqs, cfg, pad_id, progress=False):
        return per_sample_stats(model, seqs, ks=cfg.ks, min_k_pp=True)

    A.cached_score, A.score = base_stats, per_sample_stats
    A.extract = one_prefix_at_a_time(A.extract)
    F.train_loop = trainer_loop
    try:
        yield
    finally:
        A.cached_score, A.score, A.extract, F.train_loop = saved


BASELINE_SETTINGS = ["train.precision=float32", "train.batching=random", "audit.precision=float32",
                     "training_state_minutes=0"]
