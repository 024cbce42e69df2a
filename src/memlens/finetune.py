"""LoRA (or full) fine-tuning: a plain PyTorch loop, and the ``memlens finetune`` recipe around it.

The loop follows the paper's set-up (the Hugging Face Trainer defaults it ran under): AdamW (betas 0.9/0.999, eps
1e-8), linear warm-up from 0 then linear decay, gradient clipping at 1.0, causal-LM loss on every token after the
BOS, averaged over the tokens of each optimizer step.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from memlens.config import LoraConfig, RunConfig, TrainConfig, dump_yaml
from memlens.errors import MemlensError
from memlens.models import LoadedModel, module_shape, resolve_targets
from memlens.training_state import Position, TrainingState, discard

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------------------ LoRA


def apply_lora(lm: LoadedModel, cfg: LoraConfig, seed: int):
    """Wrap the base model with a fresh LoRA adapter on the modules of ``cfg.targets``.

    Returns the peft model and the resolved {logical target: [module names]}. The same seed gives the same
    initial weights. ``bias="none"`` keeps the disabled adapter identical to the base model.
    """
    import torch
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    target_map = resolve_targets(lm.model, list(cfg.targets))
    names = [n for t in cfg.targets for n in target_map[t]]
    fan_in_fan_out = getattr(lm.model.config, "model_type", "") == "gpt2"  # Conv1D stores (in, out)
    peft_cfg = PeftLoraConfig(
        r=cfg.rank, lora_alpha=cfg.effective_alpha, lora_dropout=cfg.dropout, target_modules=names, bias="none",
        use_rslora=cfg.alpha_rule == "rslora", task_type="CAUSAL_LM", fan_in_fan_out=fan_in_fan_out,
    )
    torch.manual_seed(seed)
    model = get_peft_model(lm.model, peft_cfg)
    return model, target_map


def trainable_by_target(model: Any, target_map: dict[str, list[str]]) -> dict[str, int]:
    """Trainable parameters of each logical target, counted from the adapter's tensors."""
    params = dict(model.named_parameters())
    out = {}
    for t, names in target_map.items():
        out[t] = sum(p.numel() for n, p in params.items() if p.requires_grad and any(
            n.startswith(f"base_model.model.{m}.lora_") for m in names))
    return out


def adapter_changed(model: Any) -> bool:
    """Whether any LoRA B matrix is non-zero (a fresh adapter's are zero: it is then the base model)."""
    return any(float(p.detach().abs().max()) > 0 for n, p in model.named_parameters() if "lora_B" in n)


def expected_lora_params(base_model: Any, target_map: dict[str, list[str]], rank: int) -> dict[str, int]:
    """r * (in + out) summed over the modules of each target: the count a LoRA adapter must have."""
    return {t: sum(rank * sum(module_shape(base_model, n)) for n in names) for t, names in target_map.items()}


def lora_scalings(model: Any) -> set[float]:
    """The distinct LoRA scaling factors applied in the model's adapted layers."""
    from peft.tuners.lora import LoraLayer

    return {float(m.scaling["default"]) for m in model.modules() if isinstance(m, LoraLayer) and m.scaling}


# -------------------------------------------------------------------------------------------------------- training


def lr_lambda(warmup: int, total: int, schedule: str):
    """Multiplier of the peak learning rate at each step, as in transformers' schedulers."""

    def f(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if schedule == "cosine":
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
        return max(0.0, 1.0 - progress)

    return f


def plan_steps(n_examples: int, cfg: TrainConfig) -> tuple[int, int]:
    """(micro-batches per epoch, optimizer steps in total)."""
    micro = math.ceil(n_examples / cfg.batch_size)
    steps_per_epoch = math.ceil(micro / cfg.grad_accum)
    total = cfg.max_steps if cfg.max_steps is not None else max(1, math.ceil(cfg.epochs * steps_per_epoch))
    return micro, total


def epoch_batches(lengths: list[int], batch_size: int, batching: str, gen: Any) -> list[list[int]]:
    """One epoch's micro-batches of indices, every sequence once.

    ``random``: a shuffled order cut into batches (the paper's Trainer default; padded, about half of the tokens of
    a PHEE batch would be padding, which packing removes). ``grouped``: the shuffled order is cut into mega-batches
    of 50 batches, each sorted by length jittered by a random factor in [e^-0.1, e^0.1] (so that batches differ from
    epoch to epoch, as with random batches) and cut into batches, whose order is then shuffled: padding falls to
    10-20% on PHEE.
    """
    import torch

    order = torch.randperm(len(lengths), generator=gen).tolist()
    if batching == "random":
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    jitter = torch.empty(len(lengths)).uniform_(-0.1, 0.1, generator=gen).exp().tolist()
    mega = 50 * batch_size
    batches = []
    for m in range(0, len(order), mega):
        group = sorted(order[m : m + mega], key=lambda i: -lengths[i] * jitter[i])
        batches += [group[i : i + batch_size] for i in range(0, len(group), batch_size)]
    return [batches[j] for j in torch.randperm(len(batches), generator=gen).tolist()]


def autocast(model: Any, precision: str) -> Any:
    """bf16 autocast for the forward pass when ``precision`` resolves to bfloat16 and the weights are float32."""
    import contextlib

    import torch

    from memlens.models import resolve_precision, weights_dtype

    device = next(model.parameters()).device
    if resolve_precision(precision, device) == "bfloat16" and weights_dtype(model) == torch.float32:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def frozen_linears_at(model: Any, precision: str):
    """Within: under bf16 autocast, the frozen ``nn.Linear`` weights held in bfloat16, so that autocast does not cast
    them again at every step (it caches casts only of weights that require grad); restored to the very float32
    tensors after. The products are the same bf16 products autocast computes: the losses and the adapter come out
    bit for bit the same. Weights shared with an embedding (a tied output head) and trainable ones are left alone.

    Yields a context manager that puts the float32 weights back for a while (a checkpoint's scoring sees the model
    as loaded)."""
    import torch

    if not isinstance(autocast(model, precision), torch.autocast):
        yield contextlib.nullcontext
        return
    shared = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    saved = []
    for m in model.modules():
        w = getattr(m, "weight", None)
        if (type(m) is torch.nn.Linear and w is not None and not w.requires_grad and w.dtype == torch.float32
                and id(w) not in shared):
            saved.append((m, w, torch.nn.Parameter(w.detach().to(torch.bfloat16), requires_grad=False)))

    def put(original: bool) -> None:
        for m, w, half in saved:
            m.weight = w if original else half

    @contextlib.contextmanager
    def as_loaded():
        put(True)
        try:
            yield
        finally:
            put(False)

    put(False)
    try:
        yield as_loaded
    finally:
        put(True)


def packing_works(model: Any, seqs: list[list[int]], pad_id: int) -> bool:
    """Whether this model keeps attention within each sequence of a packed row (see ``scoring.pack_batch``): the
    logits of the first training sequences packed against padded, in eval mode, agree. An architecture whose
    attention ignores the restarting positions fails, and its batches are padded instead (logged)."""
    import torch

    from memlens.scoring import pack_batch, pad_batch

    # the three longest of the first eight, longest first: the order pack_batch lays them out in
    sample = [s[:24] for s in sorted(seqs[:8], key=len, reverse=True)[:3]]
    if len(sample) < 2:
        return True
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with torch.no_grad():
        ids, pos, _ = pack_batch(sample, pad_id, row_length=10**9)  # one row: attention must stay within each
        flat = model(input_ids=ids.to(device), position_ids=pos.to(device), use_cache=False).logits[0].float()
        ids, mask, _ = pad_batch(sample, pad_id)
        padded = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits.float()
    model.train(was_training)
    rows = torch.cat([padded[i, : len(s)] for i, s in enumerate(sample)])
    ok = bool(torch.allclose(flat, rows, rtol=1e-2, atol=1e-2 * float(rows.abs().max()) + 1e-4))
    if not ok:
        log.warning("train.packing: this architecture attends across packed sequences; batches are padded instead")
    return ok


def run_hooks(hooks: Sequence[Any], model: Any, step: int, total: int, epoch: float, rows: list[dict],
              as_loaded: Any = contextlib.nullcontext) -> bool:
    """Call each hook due after optimizer step ``step`` of ``total`` (a checkpoint's scoring, early stopping), with
    the model in eval mode and its weights as loaded; True when one of them asks training to stop."""
    due = [h for h in hooks if h.due(step, total)]
    if not due:
        return False
    model.eval()
    try:
        with as_loaded():
            return any([bool(h(model, step, epoch, rows)) for h in due])
    finally:
        model.train()


def train_loop(model: Any, seqs: list[list[int]], cfg: TrainConfig, pad_id: int, progress: bool = True,
               hooks: Sequence[Any] = (), state: Any = None) -> list[dict]:
    """Train ``model`` in place on the token sequences; returns one log row per optimizer step.

    ``hooks``: objects with ``due(step, total)`` and ``__call__(model, step, epoch, rows) -> stop`` (see
    :func:`run_hooks`); they run after the steps they are due at, and do not touch the training's random state.
    ``state``: a :class:`memlens.training_state.TrainingState` to go on from and to save into (not with hooks)."""
    import torch

    from memlens.progress import progress_bar
    from memlens.scoring import gpu_attention, pack_batch, pad_batch, to_device

    device = next(model.parameters()).device
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    params = list(named.values())
    if not params:
        raise MemlensError("nothing to train: the model has no trainable parameters")
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.weight_decay)
    micro, total = plan_steps(len(seqs), cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.warmup_steps, total, cfg.schedule))
    gen = torch.Generator().manual_seed(cfg.seed)
    packed = cfg.packing and packing_works(model, seqs, pad_id)
    if state is not None and hooks:
        raise ValueError("a training with hooks cannot be saved and continued: their state is not in the file")
    model.train()
    rows: list[dict] = []
    step, epoch, first_group, t0 = 0, 0, 0, time.perf_counter()
    at = state.restore(seqs, named, opt, sched, gen, total, device) if state is not None else None
    if at is not None:
        step, epoch, first_group, rows = at.step, at.epoch, at.group, at.rows
        t0 -= at.elapsed_s
    with progress_bar("train", total, enabled=progress, unit="steps", completed=step,
                      fields={"loss": "-", "tok/s": "-"}) as advance, gpu_attention(device), \
            frozen_linears_at(model, cfg.precision) as as_loaded:

        def finish(row: dict) -> None:
            """Read a step's loss and gradient norm off the device. On a GPU this runs one step late, so a step's
            time there is when the host got to read it (late by up to one step's host time when the host is the
            bottleneck): benchmarks time a whole loop instead."""
            row["loss"] = float(row["loss"])
            row["grad_norm"] = None if row["grad_norm"] is None else float(row["grad_norm"])
            row["elapsed_s"] = round(time.perf_counter() - t0, 4)
            rows.append(row)
            tps = sum(r["tokens"] for r in rows) / max(row["elapsed_s"], 1e-9)
            advance(1, **{"loss": f"{row['loss']:.4f}", "tok/s": f"{tps:,.0f}"})

        pending = None  # on a GPU, the step before: read once this step's work is queued, so the GPU never waits
        while step < total:
            epoch_rng = gen.get_state()  # what a saved state restores to redraw this epoch's batches
            batches = epoch_batches([len(s) for s in seqs], cfg.batch_size, cfg.batching, gen)
            # the loss's divisor: the step's own target count, or the epoch's mean per step (every token the same
            # weight whatever the length of its batch's sequences)
            per_step = sum(len(seqs[i]) - 1 for b in batches for i in b) / math.ceil(len(batches) / cfg.grad_accum)
            for g in range(first_group, len(batches), cfg.grad_accum):
                if step >= total:
                    break
                group = batches[g : g + cfg.grad_accum]
                n_tokens = sum(len(seqs[i]) - 1 for b in group for i in b)  # targets: every token after the BOS
                divisor = n_tokens if cfg.loss_average == "step" else per_step
                loss_sum = 0.0
                for b in group:
                    if packed:
                        ids, pos, targets = to_device(pack_batch([seqs[i] for i in b], pad_id), device)
                        with autocast(model, cfg.precision):
                            logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits
                        logits = logits.reshape(-1, logits.shape[-1])
                    else:
                        ids, mask, labels = to_device(pad_batch([seqs[i] for i in b], pad_id), device)
                        targets = labels[:, 1:].reshape(-1)
                        with autocast(model, cfg.precision):
                            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]
                        logits = logits.reshape(-1, logits.shape[-1])
                    nll = torch.nn.functional.cross_entropy(logits.float(), targets, ignore_index=-100,
                                                            reduction="sum")
                    (nll / divisor).backward()
                    loss_sum = loss_sum + nll.detach()
                grad_norm = None
                if cfg.max_grad_norm is not None:
                    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                lr = sched.get_last_lr()[0]
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                row = {"step": step, "epoch": epoch + (g + len(group)) / len(batches), "loss": loss_sum / n_tokens,
                       "lr": lr, "grad_norm": grad_norm, "tokens": n_tokens, "sequences": sum(len(b) for b in group)}
                if pending is not None:
                    finish(pending)
                pending = row
                if device.type != "cuda" or any(h.due(step, total) for h in hooks):
                    finish(pending)  # on a CPU the host computed the step itself: its time is now
                    pending = None
                if run_hooks(hooks, model, step, total, row["epoch"], rows, as_loaded):
                    log.info("training stopped after step %d of %d", step, total)
                    total = step
                if state is not None and (state.due() or step == total):
                    if pending is not None:
                        finish(pending)
                        pending = None
                    state.save(seqs, named, opt, sched, epoch_rng, total, device,
                               Position(step, epoch, g + cfg.grad_accum, rows, rows[-1]["elapsed_s"]))
            epoch, first_group = epoch + 1, 0
        if pending is not None:
            finish(pending)
    model.eval()
    return rows


# ---------------------------------------------------------------------------------------------------------- recipe


@dataclass
class FinetuneResult:
    run_dir: Path
    summary: dict[str, Any]


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MemlensError(f"train.device: {device!r} asked for, but no CUDA device is available")
    return device


def run_name(cfg: RunConfig) -> str:
    if cfg.name:
        return cfg.name
    model = Path(cfg.model).name if Path(cfg.model).is_dir() else cfg.model.replace("/", "_")
    what = "full" if cfg.train.method == "full" else f"{'+'.join(cfg.lora.targets)}-r{cfg.lora.rank}"
    return f"{model}-{what}-{cfg.config_hash()[:8]}"


@dataclass
class Prepared:
    """The data, the base model and the token ids a run works on."""

    split: Any
    lm: LoadedModel
    train_ids: list[list[int]]
    pad_id: int
    timings: dict[str, float]
    corpus: Any = None
    valid_ids: list[list[int]] | None = None  # early stopping's validation records, tokenized


@dataclass
class Trained:
    model: Any  # the peft model (LoRA) or the base model itself (full fine-tuning)
    rows: list[dict]  # one per optimizer step
    trainable: dict[str, int]
    scalings: list[float]
    modules: dict[str, list[str]]
    changed: bool | None
    seconds: float
    base: dict[str, Any] | None = None  # the base model an adapter was trained on (memlens_base.json)
    dp: dict[str, Any] | None = None  # the privacy facts of a DP run (memlens.dp)
    early_stopping: dict[str, Any] | None = None
    reused_from: dict[str, Any] | None = None  # the earlier run whose adapter this is (memlens.reuse)
    resumed_from_step: int | None = None  # the step an interrupted training went on from (memlens.training_state)


def prepare(cfg: RunConfig) -> Prepared:
    """Read the corpus, draw the split, load the base model and tokenize the training list."""
    from memlens.data import load_corpus, make_split
    from memlens.models import load_model

    timings: dict[str, float] = {}
    t = time.perf_counter()
    corpus = load_corpus(cfg.data)
    split = make_split(corpus, cfg.data)
    if cfg.train.dp is not None:  # before the model loads: a delta too large for N, Opacus missing
        from memlens.dp import check_dp

        check_dp(len(split.train), cfg.train)
    valid = None
    if cfg.train.early_stopping is not None:
        from memlens.data.splits import validation_records

        valid = validation_records(corpus, cfg.data, split, cfg.train.early_stopping.split)
    timings["data_s"] = time.perf_counter() - t
    t = time.perf_counter()
    lm = load_model(cfg.model, dtype=cfg.train.dtype, device=resolve_device(cfg.train.device),
                    trust_remote_code=cfg.trust_remote_code, allow_download=cfg.allow_download)
    if cfg.train.method == "lora":
        resolve_targets(lm.model, list(cfg.lora.targets))  # a target the architecture lacks: refused before any work
    train_ids = lm.encode([r.text for r in split.train], cfg.train.add_bos, cfg.train.max_length, cfg.train.too_long,
                          "training")
    if any(len(s) < 2 for s in train_ids):
        raise MemlensError("a training text has fewer than 2 tokens (nothing to predict); check the data")
    valid_ids = None
    if valid is not None:
        valid_ids = lm.encode([r.text for r in valid], cfg.train.add_bos, cfg.train.max_length, cfg.train.too_long,
                              "validation")
    timings["model_s"] = time.perf_counter() - t
    return Prepared(split, lm, train_ids, lm.pad_id, timings, corpus, valid_ids)


def training_state(cfg: RunConfig, key: str, path: Path, hooked: bool = False) -> TrainingState | None:
    """The state file a LoRA training is saved into and continued from (``cfg.training_state_minutes``), None for
    a training that is not saved (off, full fine-tuning, DP, or one with hooks)."""
    if (cfg.training_state_minutes <= 0 or cfg.train.method != "lora" or cfg.train.dp is not None or hooked
            or cfg.train.early_stopping is not None):
        return None
    return TrainingState(path, key, cfg.training_state_minutes * 60)


def state_path(cfg: RunConfig) -> Path:
    """Where the training of run ``cfg`` is saved while it trains: a dot-file in OUTPUT_DIR named by the run id."""
    return Path(cfg.output_dir) / f".memlens-training-{cfg.config_hash()[:16]}.safetensors"


def train(cfg: RunConfig, prep: Prepared, progress: bool = True, hooks: Sequence[Any] = (),
          state: TrainingState | None = None) -> Trained:
    """Attach a fresh adapter (or unfreeze every weight) and train on the training list (``hooks``: see
    :func:`train_loop`; ``state``: see :func:`training_state`)."""
    import torch

    base = None
    if cfg.train.method == "lora":
        from memlens.models import base_record

        base = base_record(prep.lm, resolve_targets(prep.lm.model, list(cfg.lora.targets)))
        model, target_map = apply_lora(prep.lm, cfg.lora, cfg.train.seed)
        trainable = trainable_by_target(model, target_map)
        scalings = sorted(lora_scalings(model))
        modules = dict(target_map)
    else:
        torch.manual_seed(cfg.train.seed)
        model = prep.lm.model
        model.requires_grad_(True)
        trainable, scalings, modules = {"all": sum(p.numel() for p in model.parameters())}, [], {}
    stopper = None
    hooks = list(hooks)
    if cfg.train.early_stopping is not None:
        from memlens.early_stopping import EarlyStopping

        per_epoch = (len(prep.train_ids) / cfg.train.batch_size if cfg.train.dp is not None
                     else math.ceil(plan_steps(len(prep.train_ids), cfg.train)[0] / cfg.train.grad_accum))
        stopper = EarlyStopping(prep.valid_ids, cfg.train.early_stopping, per_epoch, cfg.audit.precision,
                                cfg.audit.batch_size, prep.pad_id, progress)
        hooks.append(stopper)
    t = time.perf_counter()
    dp = None
    if cfg.train.dp is not None:
        from memlens.dp import dp_train_loop

        rows, dp = dp_train_loop(model, prep.train_ids, cfg.train, prep.pad_id, progress, hooks)
    else:
        rows = train_loop(model, prep.train_ids, cfg.train, prep.pad_id, progress, hooks=hooks, state=state)
    if stopper is not None:
        stopper.restore(model)
    seconds = time.perf_counter() - t + (state.earlier_s if state is not None else 0.0)
    changed = None
    if cfg.train.method == "lora":
        changed = adapter_changed(model)
        if not changed:
            log.warning("the adapter's B matrices are still zero after training: it is identical to the base model")
    return Trained(model, rows, trainable, scalings, modules, changed, seconds, base, dp,
                   stopper.summary() if stopper is not None else None,
                   resumed_from_step=state.resumed_from if state is not None else None)


def train_summary(cfg: RunConfig, prep: Prepared, tr: Trained) -> dict[str, Any]:
    """Provenance and training facts of a run (stored in summary.json and in the results store)."""
    from memlens.provenance import versions

    tokens = sum(r["tokens"] for r in tr.rows)
    return {
        "config_hash": cfg.config_hash(),
        "manifest_hash": prep.split.manifest["hash"],
        "seed": cfg.train.seed,
        "data_seed": cfg.data.seed,
        "versions": versions(),
        "model": prep.lm.info,
        "bos_token_id": prep.lm.bos_id,
        "method": cfg.train.method,
        "trainable_params": tr.trainable,
        "trainable_total": sum(tr.trainable.values()),
        "lora_scaling": tr.scalings,
        "target_modules": tr.modules,
        "adapter_changed": tr.changed,
        "steps": len(tr.rows),
        "train_tokens": tokens,
        "train_tokens_per_s": tokens / max(tr.seconds, 1e-9),
        "counts": prep.split.manifest["counts"],
        "first_loss": next((r["loss"] for r in tr.rows if r["loss"] is not None), None),
        "last_loss": next((r["loss"] for r in reversed(tr.rows) if r["loss"] is not None), None),
        **({"dp": tr.dp} if tr.dp is not None else {}),
        **({"early_stopping": tr.early_stopping} if tr.early_stopping is not None else {}),
        **({"resumed_training_at_step": tr.resumed_from_step} if tr.resumed_from_step is not None else {}),
    }


def folder_run_id(run_dir: Path) -> str | None:
    """The config hash of the run a memlens run folder holds (from its summary.json), None for anything else."""
    try:
        return json.loads((run_dir / "summary.json").read_text())["config_hash"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_run_folder(run_dir: Path, run_id: str, overwrite: bool) -> None:
    """Before any compute: a folder at ``run_dir`` may be replaced only if it is this same run's folder (same config
    hash) and ``overwrite`` is set; anything else there is the user's and is refused, untouched."""
    if run_dir.is_symlink() or (run_dir.exists() and not run_dir.is_dir()):
        raise MemlensError(f"{run_dir}: exists and is not a run folder; memlens never replaces it (set name=... or "
                           "output_dir=...)")
    if not run_dir.exists():
        return
    if folder_run_id(run_dir) != run_id:
        raise MemlensError(f"{run_dir}: exists and is not the folder of this run ({run_id[:12]}); memlens never "
                           "replaces it (set name=... or output_dir=...)")
    if not overwrite:
        raise MemlensError(f"{run_dir}: this run's folder exists (pass --overwrite to redo it)")


def finetune(cfg: RunConfig, *, overwrite: bool = False, progress: bool = True) -> FinetuneResult:
    """Read the data, draw the split, load the model, train, and write the run folder (all or nothing)."""
    from memlens.scoring import score

    from memlens.paths import cache_dir
    from memlens.preflight import check_writable

    if cfg.reuse_training:
        raise MemlensError("reuse_training: memlens finetune always trains; reuse applies to memlens run and study")
    run_dir = Path(cfg.output_dir) / run_name(cfg)
    check_run_folder(run_dir, cfg.config_hash(), overwrite)
    check_writable(Path(cfg.output_dir), "output_dir")
    check_writable(cache_dir(), "cache")
    prep = prepare(cfg)
    timings = prep.timings
    members = prep.lm.encode([r.text for r in prep.split.members], cfg.train.add_bos, cfg.train.max_length,
                             cfg.train.too_long)

    def member_nll(model) -> float | None:
        if not cfg.train.eval_members:
            return None
        return score(model, members, batch_size=cfg.train.batch_size, pad_id=prep.pad_id).corpus_mean_nll()

    t = time.perf_counter()
    before = member_nll(prep.lm.model)
    timings["eval_before_s"] = time.perf_counter() - t
    tr = train(cfg, prep, progress, state=training_state(cfg, cfg.config_hash(), state_path(cfg)))
    timings["train_s"] = tr.seconds
    t = time.perf_counter()
    after = member_nll(tr.model)
    timings["eval_after_s"] = time.perf_counter() - t
    summary = {"run": run_dir.name, **train_summary(cfg, prep, tr), "member_nll_before": before,
               "member_nll_after": after, "timings_s": {k: round(v, 3) for k, v in timings.items()}}
    write_run_folder(run_dir, cfg, prep, tr, summary, overwrite)
    discard(state_path(cfg), cfg.config_hash())  # its saved training, now kept
    return FinetuneResult(run_dir, summary)


def write_run_folder(run_dir: Path, cfg: RunConfig, prep: Prepared, tr: Trained, summary: dict,
                     overwrite: bool) -> None:
    """Write everything into a temporary folder, then move it into place: an interrupted run leaves nothing.

    An existing folder is replaced only when it is this same run's folder and ``overwrite`` is set (checked again
    here, as before the compute); it is moved aside first and removed only once the new folder is in place."""
    check_run_folder(run_dir, cfg.config_hash(), overwrite)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=run_dir.parent, prefix=f".{run_dir.name}.tmp-"))
    try:
        (tmp / "config.yaml").write_text(dump_yaml(cfg))
        (tmp / "manifest.json").write_text(json.dumps(prep.split.manifest, indent=1))
        (tmp / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in tr.rows))
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2))
        if cfg.train.method == "lora":
            tr.model.save_pretrained(tmp / "adapter", safe_serialization=True)
            (tmp / "adapter" / "memlens_base.json").write_text(json.dumps(tr.base, indent=1))
        else:
            tr.model.save_pretrained(tmp / "model", safe_serialization=True)
            prep.lm.tokenizer.save_pretrained(tmp / "model")
        old = None
        if run_dir.exists():
            old = Path(tempfile.mkdtemp(dir=run_dir.parent, prefix=f".{run_dir.name}.old-"))
            os.replace(run_dir, old / run_dir.name)
        os.replace(tmp, run_dir)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
