"""Peak memory of scoring and extraction at 1x and 10x PHEE's size: bounded, not growing with the corpus.

    python benchmarks/memory.py [--model tiny|smollm2-135m] [--sizes 1 10] [--extract 0.1]

Each measurement runs in a fresh process: load the model, tokenize N records (PHEE's 4,827 sentences repeated
to N = size x 4,827), score them all (Min-K%++ included), generate greedy continuations for a share of them, and
report the peak resident memory (ru_maxrss) after loading, after scoring and after extraction. What grows with N is
the corpus itself (token ids and per-record results); the model's working memory is set by the batch, not by N.
Prints one line per size and a JSON line with the slope in MB per 1,000 records.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

PHEE = Path(os.environ.get("MEMLENS_PHEE_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data" / "phee")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(model: str, size: float, extract_share: float) -> None:
    import time

    from memlens.data.phee import read_split
    from memlens.extraction import Decoding, extract
    from memlens.models import at_precision, load_model, resolve_precision
    from memlens.scoring import score

    texts = [r.text for s in ("train", "dev", "test") for r in read_split(PHEE / f"{s}.json", s)]
    n = int(round(size * len(texts)))
    texts = (texts * (n // len(texts) + 1))[:n]
    lm = load_model(model)
    m = at_precision(lm.model, resolve_precision("auto", "cpu"))
    base = _peak_mb()
    t = time.perf_counter()
    seqs = lm.encode(texts)
    stats = score(m, seqs, batch_size=64, pad_id=lm.pad_id, ks=(0.05, 0.1, 0.2, 0.3, 0.5), min_k_pp=True)
    scored = _peak_mb()
    k = max(1, int(extract_share * n))
    rows = extract(m, seqs[:k], [True] * k, [Decoding(None)], pad_id=lm.pad_id, eos_id=lm.tokenizer.eos_token_id,
                   batch_size=32)
    print(json.dumps({"records": n, "extracted": len(rows), "loaded_mb": base, "scored_mb": scored,
                      "extracted_mb": _peak_mb(), "seconds": time.perf_counter() - t,
                      "mean_nll": float(stats.mean_nll.mean())}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--sizes", type=float, nargs="+", default=[1.0, 10.0])
    ap.add_argument("--extract", type=float, default=0.1, help="share of the records extracted from")
    ap.add_argument("--child", type=float, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child is not None:
        child(a.model, a.child, a.extract)
        return
    out = []
    for size in a.sizes:
        p = subprocess.run([sys.executable, __file__, "--model", a.model, "--extract", str(a.extract), "--child",
                            str(size)], capture_output=True, text=True, check=True)
        r = json.loads(p.stdout.strip().splitlines()[-1])
        out.append(r)
        print(f"{size:g}x PHEE ({r['records']:,} records, {r['extracted']:,} extracted): peak RSS after loading "
              f"{r['loaded_mb']:.0f} MB, after scoring {r['scored_mb']:.0f} MB, after extraction "
              f"{r['extracted_mb']:.0f} MB ({r['seconds']:.0f} s)")
    if len(out) >= 2:
        a0, a1 = out[0], out[-1]
        slope = (a1["extracted_mb"] - a0["extracted_mb"]) / ((a1["records"] - a0["records"]) / 1000)
        print(json.dumps({"model": a.model, "sizes": [r["records"] for r in out],
                          "peak_mb": [round(r["extracted_mb"]) for r in out],
                          "mb_per_1000_records": round(slope, 2)}))


if __name__ == "__main__":
    main()
