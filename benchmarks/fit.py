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
Trainer run).
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
    from memlens.finetune import apply_lora, train_loop
    from memlens.models import load_model
    from memlens.scoring import score

    full = sys.argv[1] == "full"
    steps, runs = (None if full else int(sys.argv[1])), sys.argv[2:]
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
        if name == "trainer":
            rows = trainer_loop(model, seqs, cfg, lm.pad_id, tokenizer=lm.tokenizer)
        else:
            rows = train_loop(model, seqs, cfg, lm.pad_id, progress=False)
        fed = sum(r["tokens"] + r["sequences"] for r in rows[bench.SKIP:])  # as bench.py counts: after SKIP steps
        tok_s = fed / (rows[-1]["elapsed_s"] - rows[bench.SKIP - 1]["elapsed_s"])
        print(json.dumps({"settings": name, "seed": int(seed), "steps": len(rows), "train_s": time.perf_counter() - t,
                          "tok_s": tok_s,
                          "train": score(model, seqs, pad_id=lm.pad_id).corpus_mean_nll(),
                          "heldout": score(model, lm.encode(held), pad_id=lm.pad_id).corpus_mean_nll()}), flush=True)


if __name__ == "__main__":
    main()
