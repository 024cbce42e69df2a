"""Where a LoRA training step's time goes on this CPU: torch.profiler over memlens's training loop, self CPU time by
operator, and the achieved GFLOP/s (forward + backward through the frozen base = 2 x forward per token).

    .venv/bin/python benchmarks/profile_training.py [TARGETS] [STEPS]     e.g. q 10, or q,k,v,o 8

smollm2-135m, LoRA rank 1 (alpha 16, dropout 0.05) on TARGETS (default q), batch 16 of 256 PHEE texts
(benchmarks/bench.py's draw), memlens's defaults (packed random batches, the precision `auto` picks here); a few
untimed steps first. Run it on an idle machine.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))


def main() -> None:
    import torch

    import bench
    from memlens.config import LoraConfig, TrainConfig
    from memlens.finetune import apply_lora, train_loop
    from memlens.models import load_model, resolve_precision
    from memlens.provenance import processor

    targets = sys.argv[1].split(",") if len(sys.argv) > 1 else ["q"]
    steps = int(sys.argv[2]) if len(sys.argv) > 2 else 10
    texts, _ = bench.records(512)
    lm = load_model("smollm2-135m")
    fpt = bench.flops_per_token(lm.model)
    seqs = lm.encode(texts[:256])
    model, _ = apply_lora(lm, LoraConfig(targets=targets, rank=1, alpha=16, dropout=0.05), seed=0)
    train_loop(model, seqs, TrainConfig(max_steps=3, batch_size=16, warmup_steps=1, seed=0), lm.pad_id,
               progress=False)  # one-off costs out of the profile
    cfg = TrainConfig(max_steps=steps, batch_size=16, lr=1e-3, warmup_steps=2, seed=1)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        rows = train_loop(model, seqs, cfg, lm.pad_id, progress=False)
        dt = time.perf_counter() - t
    tok = sum(r["tokens"] + r["sequences"] for r in rows)  # as bench.py counts
    cpu = processor()
    print(f"{cpu['model']} ({cpu['family_model']}; {' '.join(cpu['isa'])}), {torch.get_num_threads()} threads, "
          f"{resolve_precision('auto', 'cpu')}: {tok} tokens in {dt:.1f} s = {tok / dt:.0f} tokens/s "
          f"(under the profiler) = {tok / dt * 2 * fpt / 1e9:.0f} GFLOP/s")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=44))


if __name__ == "__main__":
    main()
