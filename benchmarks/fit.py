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
Trainer run on an AMX Xeon, about an hour on an AVX2 EPYC).

``--state DIR`` (first, before the step count) makes each run survive an interruption: memlens's runs save their
state there (memlens.training_state, every 10 minutes), the Trainer's runs their own checkpoints (every 50 steps, the
last kept, in a folder of their own with the set-up they were made under); a rerun with the same DIR goes on from
them, and a finished run removes what it saved. A run that went on from an earlier try says so
(``resumed_at_step``); its ``tok_s`` counts this try's steps only, ``train_s`` this process's time.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))


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
    from memlens.scoring import score
    from memlens.training_state import TrainingState, discard

    argv = sys.argv[1:]
    state_dir = None
    if argv[:1] == ["--state"]:
        state_dir, argv = Path(argv[1]), argv[2:]
        state_dir.mkdir(parents=True, exist_ok=True)
    full = argv[0] == "full"
    steps, runs = (None if full else int(argv[0])), argv[1:]
    if full:
        train, held = bench.phee_train_heldout()
    else:
        texts, _ = bench.records(512)
        train, held = texts[:256], texts[256:512]
    for run in runs:
        name, seed = run.rsplit(":", 1)
        lm = load_model("smollm2-135m")
        seqs = lm.encode(train)
        model, _ = apply_lora(lm, LoraConfig(targets=["q", "k", "v", "o"], rank=8), seed=int(seed))
        cfg = TrainConfig(max_steps=steps, epochs=3.0, batch_size=16, lr=1e-3,
                          warmup_steps=20 if full else min(20, steps // 4), seed=int(seed), **settings(name))
        t = time.perf_counter()
        tag = f"{name}-seed{seed}-{argv[0]}"
        if name == "trainer":
            folder = None if state_dir is None else checkpoint_folder(state_dir / tag, seqs, cfg)
            rows = trainer_loop(model, seqs, cfg, lm.pad_id, tokenizer=lm.tokenizer, checkpoints=folder)
            resumed = rows[0]["step"] - 1 if rows else plan_steps(len(seqs), cfg)[1]  # none: its last checkpoint's
        else:
            state = None if state_dir is None else TrainingState(state_dir / f".{tag}.safetensors", tag, 600)
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
                discard(state_dir / f".{tag}.safetensors", tag)


def checkpoint_folder(folder: Path, seqs: list[list[int]], cfg) -> Path:
    """``folder`` for a Trainer run's checkpoints, after checking that those in it (if any) were made by this
    training: the same sequences, settings, code and versions (memlens.training_state.stamp). fit.py's own
    checkpoints of another set-up are removed (the run starts over, as memlens's own state would); a folder that
    fit.py did not make stops the benchmark, naming it, untouched."""
    from memlens.provenance import json_hash
    from memlens.training_state import stamp

    ident = {"sequences": json_hash(seqs), "train": cfg.model_dump(mode="json"), "stamp": stamp("cpu")}
    mark = folder / "fit-identity.json"
    if folder.exists() and not mark.is_file():
        sys.exit(f"fit.py: {folder} is not a folder of fit.py's checkpoints: give another --state or remove it")
    if mark.is_file() and json.loads(mark.read_text()) != ident:
        print(f"fit.py: the checkpoints in {folder} were made under another set-up; this run starts over",
              file=sys.stderr)
        forget_checkpoints(folder)
    folder.mkdir(parents=True, exist_ok=True)
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
