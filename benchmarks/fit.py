"""How well a training set-up fits: memlens's loop under chosen settings against the Hugging Face Trainer.

    .venv/bin/python benchmarks/fit.py 60 trainer:0 trainer:1 default:0 default:1 bfloat16-grouped-step-padded:0
    .venv/bin/python benchmarks/fit.py full trainer:0 default:0 trainer:1 default:1

Each argument after the step count is SETTINGS:SEED, where SETTINGS is ``trainer`` (float32, random padded batches,
the baseline of benchmarks/baseline.py), ``default`` (memlens's defaults), or PRECISION-BATCHING-AVERAGE[-padded]
(train.precision, train.batching, train.loss_average; ``-padded`` sets train.packing=false). The set-up is the
benchmark's (c): 256 PHEE texts (benchmarks/bench.py's draw), LoRA r8 on q, k, v, o, batch 16, lr 1e-3, warm-up
min(20, steps / 4). With ``full`` instead of a step count: the full-PHEE configuration of ``bench.py --full-fit``
(every PHEE train sentence for 3 epochs, the test split held out; warm-up 20 steps). Prints one JSON line per run:
the mean NLL (nats per token, scored in float32) on the training texts and on the held-out texts after training,
and the training's tokens per second. Slow in float32 (minutes a run on 2 cores; ``full``: about half an hour a
Trainer run on an AMX Xeon, longer in float32 on an AVX2 EPYC).

``--state DIR`` makes each run survive an interruption: memlens's runs save their state there
(memlens.training_state, every 10 minutes and at the end), the Trainer's runs their own checkpoints (every 50 steps
and at the end, the newest kept, in a folder of their own with the set-up they were made under); a rerun with the same
DIR goes on from them (from scratch if the code, versions or set-up changed in between), and a finished run removes
what it saved once its line is out. A run that went on from an earlier try says so (``resumed_at_step``); its
``tok_s`` counts this try's steps only (null when it made no more than bench.SKIP steps, as after a kill between the
end of training and the line), ``train_s`` this process's time; both include the saves' cost.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

SAVE_STEPS = 50  # the Trainer's checkpoints under --state (memlens's own runs save every 10 minutes)


def settings(name: str) -> dict:
    if name == "trainer":
        return {"precision": "float32", "batching": "random"}
    if name == "default":
        return {}
    precision, batching, average, *rest = name.split("-")
    return {"precision": precision, "batching": batching, "loss_average": average, "packing": rest != ["padded"]}


def main() -> None:
    import bench
    from baseline import trainer_loop

    from memlens.config import LoraConfig, TrainConfig
    from memlens.finetune import apply_lora, plan_steps, train_loop
    from memlens.models import load_model
    from memlens.provenance import json_hash
    from memlens.scoring import score
    from memlens.training_state import TrainingState, discard

    parser = argparse.ArgumentParser(description="memlens's training loop against the Trainer: how well each fits")
    parser.add_argument("steps", help="a step count, or 'full' for the full-PHEE configuration")
    parser.add_argument("runs", nargs="+", metavar="SETTINGS:SEED")
    parser.add_argument("--state", type=Path, metavar="DIR", help="save each run as it trains, go on from there")
    a = parser.parse_args()
    full = a.steps == "full"
    if not full and not a.steps.isdigit():
        parser.error(f"steps: {a.steps!r} is neither a step count nor 'full'")
    steps, runs, state_dir = (None if full else int(a.steps)), a.runs, a.state
    if state_dir is not None:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    if full:
        train, held = bench.phee_train_heldout()
    else:
        texts, _ = bench.records(512)
        train, held = texts[:256], texts[256:512]
    for run in runs:
        name, seed = run.rsplit(":", 1)
        lm = load_model("smollm2-135m")
        seqs = lm.encode(train)
        lora = LoraConfig(targets=["q", "k", "v", "o"], rank=8)
        model, _ = apply_lora(lm, lora, seed=int(seed))
        cfg = TrainConfig(max_steps=steps, epochs=3.0, batch_size=16, lr=1e-3,
                          warmup_steps=20 if full else min(20, steps // 4), seed=int(seed), **settings(name))
        t = time.perf_counter()
        tag = f"{name}-seed{seed}-{a.steps}"
        setup = {"model": "smollm2-135m", "lora": lora.model_dump(mode="json"), "train": cfg.model_dump(mode="json")}
        if name == "trainer":
            folder = None if state_dir is None else checkpoint_folder(state_dir / tag, seqs, setup)
            rows = trainer_loop(model, seqs, cfg, lm.pad_id, tokenizer=lm.tokenizer, checkpoints=folder,
                                save_steps=SAVE_STEPS)
            resumed = rows[0]["step"] - 1 if rows else plan_steps(len(seqs), cfg)[1]  # none: its last checkpoint's
        else:
            key = f"{tag}-{json_hash(setup)[:16]}"  # the state is taken only under the same set-up
            state = None if state_dir is None else TrainingState(state_dir / f".{tag}.safetensors", key, 600)
            rows = train_loop(model, seqs, cfg, lm.pad_id, progress=False, state=state)
            resumed = (state.resumed_from if state is not None else None) or 0
            rows = [r for r in rows if r["step"] > resumed]  # this try's
        fed = sum(r["tokens"] + r["sequences"] for r in rows[bench.SKIP:])  # as bench.py counts: after SKIP steps
        tok_s = fed / (rows[-1]["elapsed_s"] - rows[bench.SKIP - 1]["elapsed_s"]) if len(rows) > bench.SKIP else None
        print(json.dumps({"settings": name, "seed": int(seed), "steps": resumed + len(rows),
                          "train_s": time.perf_counter() - t, "tok_s": tok_s,
                          "train": score(model, seqs, pad_id=lm.pad_id).corpus_mean_nll(),
                          "heldout": score(model, lm.encode(held), pad_id=lm.pad_id).corpus_mean_nll(),
                          **({"resumed_at_step": resumed} if resumed else {})}), flush=True)
        if state_dir is not None:  # what this run saved, now that its line is out
            if name == "trainer":
                forget_checkpoints(state_dir / tag)
            else:
                discard(state.path, key)


def checkpoint_folder(folder: Path, seqs: list[list[int]], setup: dict) -> Path:
    """``folder`` for a Trainer run's checkpoints, after checking that those in it (if any) were made by this
    training: the same sequences, set-up (model, LoRA, training settings), save cadence, code, versions, device and
    threads (memlens.training_state.stamp; a commit between two tries starts the run over, as memlens's own state
    does). fit.py's own checkpoints of another set-up are removed and the run starts over; a folder that fit.py
    did not make (no ``fit-identity.json``, and not empty) stops the benchmark, naming it, untouched."""
    import torch

    from memlens.provenance import json_hash
    from memlens.training_state import stamp

    ident = {"sequences": json_hash(seqs), **setup, "save_steps": SAVE_STEPS,
             "stamp": stamp("cuda" if torch.cuda.is_available() else "cpu")}
    mark = folder / "fit-identity.json"
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()) or (
            folder.is_dir() and not mark.is_file() and any(folder.iterdir())):
        sys.exit(f"fit.py: {folder} is not a folder of fit.py's checkpoints: give another --state or remove it")
    if mark.is_file():
        try:
            same = json.loads(mark.read_text()) == ident
        except ValueError:  # cut short by a kill
            same = False
        if not same:
            print(f"fit.py: the checkpoints in {folder} were made under another set-up; this run starts over",
                  file=sys.stderr)
            forget_checkpoints(folder)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    mark.write_text(json.dumps(ident))
    return folder


def forget_checkpoints(folder: Path) -> None:
    """Remove what :func:`checkpoint_folder` and the Trainer wrote in ``folder`` (its checkpoint-N folders and the
    identity file); the folder itself only if nothing else is left in it."""
    import shutil

    for sub in folder.glob("checkpoint-*"):
        if sub.is_dir() and not sub.is_symlink():
            shutil.rmtree(sub)
    (folder / "fit-identity.json").unlink(missing_ok=True)
    if not any(folder.iterdir()):
        folder.rmdir()


if __name__ == "__main__":
    main()
