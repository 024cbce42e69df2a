"""memlens against a baseline written like the paper's code (benchmarks/baseline.py), same model, same data, same run.

    .venv/bin/python benchmarks/bench.py [--quick] [--model smollm2-135m] [--out docs/performance.md]

Measured, each as memlens / baseline:
  (a) scoring tokens/s: memlens.scoring.score (length-sorted batches, head on target positions only, bf16 where the
      CPU has it) vs one sample at a time (`model(ids, labels=ids).loss`, float32);
  (b) extraction continuations/s: memlens.extraction.extract (batched, KV cache, bf16) vs one `generate` per prefix;
  (c) LoRA training tokens/s: memlens.finetune.train_loop (its defaults: random batches packed into one row each,
      bf16 autocast) vs the Hugging Face Trainer (random padded batches, float32) at the same hyperparameters, two
      seeds each; the fit of both (mean NLL on the training texts and on held-out texts) beside the seed spread,
      and (--full-fit) the same at the full-PHEE configuration;
  (d) wall time of the paper-table-3.1 quick study: memlens's runs against the same runs made of the baseline pieces
      (--quick: its first run; otherwise all 15);
  (e) the effect of bf16 on the audit: every attack's AUC in bf16 against its float32 value and that value's 95%
      Hanley-McNeil interval, on the adapter trained in (c);
and the achieved GFLOP/s against the GEMM roof measured now (fp32 and bf16 matrix products). Ends with one JSON line
and writes the same numbers to docs/performance.md. Numbers depend on the machine and its load: run it on an idle
machine (nothing else using the cores).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))
SKIP = 3  # untimed warm-up steps of each training loop
PHEE = os.environ.get("MEMLENS_PHEE_DIR") or str(ROOT.parent / "shared" / "data" / "phee")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def gemm_roof(dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e9


def flops_per_token(model) -> float:
    """Forward FLOPs per token ~ 2 x parameters used in matrix products (embedding lookup excluded, LM head in)."""
    n = sum(p.numel() for name, p in model.named_parameters() if "embed_tokens" not in name and "wte" not in name)
    if getattr(model.config, "tie_word_embeddings", False):
        n += model.get_input_embeddings().weight.numel()
    return 2.0 * n


def records(n: int, seed: int = 0) -> tuple[list[str], str]:
    from memlens.config import DataConfig
    from memlens.data import load_corpus

    if Path(PHEE, "train.json").is_file():
        corpus = load_corpus(DataConfig(source="phee", path=PHEE))
        pool = corpus.splits["train"] + corpus.splits["test"]
        source = "PHEE train+test"
    else:
        corpus = load_corpus(DataConfig(source="synthetic"))
        pool = [r for s in corpus.splits.values() for r in s]
        source = "synthetic"
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(pool), size=min(n, len(pool)), replace=False)
    return [pool[i].text for i in idx], source


def phee_train_heldout() -> tuple[list[str], list[str]]:
    """Every PHEE train sentence, and the test split as held-out texts."""
    from memlens.config import DataConfig
    from memlens.data import load_corpus

    corpus = load_corpus(DataConfig(source="phee", path=PHEE))
    return [r.text for r in corpus.splits["train"]], [r.text for r in corpus.splits["test"]]


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


# ------------------------------------------------------------------------------------------------------ (a) scoring


def bench_scoring(lm, seqs, precision: str, roof: dict, fpt: float) -> dict:
    from memlens.models import at_precision
    from memlens.scoring import length_sorted_batches, score

    n_base = max(8, len(seqs) // 4)  # the baseline is slow: time a subset, report tokens/s
    pos = list(range(0, len(seqs), len(seqs) // n_base))[:n_base]  # every k-th: the same length mix as the whole
    base_seqs = [seqs[i] for i in pos]

    def baseline():
        out = []
        with torch.inference_mode():
            for s in base_seqs:
                ids = torch.tensor([s])
                out.append(float(lm.model(input_ids=ids, labels=ids).loss))
        return out

    fast = at_precision(lm.model, precision)
    for m in (lm.model, fast):  # one-off costs (kernel selection, allocator) out of the timings
        score(m, seqs[:4], batch_size=4)
    base_nll, t_base = timed(baseline)
    ours32, t32 = timed(lambda: score(lm.model, seqs, batch_size=64, pad_id=lm.pad_id))
    ours, t_ours = timed(lambda: score(fast, seqs, batch_size=64, pad_id=lm.pad_id))
    _, t_full = timed(lambda: score(fast, seqs, batch_size=64, pad_id=lm.pad_id, ks=(0.05, 0.1, 0.2, 0.3, 0.5),
                                    min_k_pp=True))
    tokens = sum(len(s) - 1 for s in seqs)
    base_tok_s = sum(len(s) - 1 for s in base_seqs) / t_base
    padded = sum(len(b) * max(len(seqs[i]) for i in b) for b in length_sorted_batches([len(s) for s in seqs], 64))
    out = {"baseline_tok_s": base_tok_s, "memlens_tok_s": tokens / t_ours, "ratio": tokens / t_ours / base_tok_s,
           "precision": precision, "memlens_fp32_tok_s": tokens / t32, "fp32_ratio": tokens / t32 / base_tok_s,
           "memlens_all_stats_tok_s": tokens / t_full,
           "max_abs_nll_diff_fp32": float(np.max(np.abs(np.array(base_nll) - ours32.mean_nll[pos]))),
           "max_abs_nll_diff": float(np.max(np.abs(np.array(base_nll) - ours.mean_nll[pos]))),
           "padding_share": 1 - sum(len(s) for s in seqs) / padded, "tokens": tokens, "baseline_samples": n_base}
    out["mean_nll_shift"] = float(np.mean(ours.mean_nll - ours32.mean_nll))
    out["profile"] = profile_scoring(fast, seqs, lm.pad_id, tokens * fpt)
    out["memlens_gflops"] = out["memlens_tok_s"] * fpt / 1e9
    out["share_of_roof"] = out["memlens_gflops"] / roof[precision]
    out["memlens_fp32_share_of_roof"] = out["memlens_fp32_tok_s"] * fpt / 1e9 / roof["float32"]
    return out


PROFILE_GROUPS = {"matrix products": ("aten::mm", "aten::addmm", "aten::bmm"),
                  "attention": ("aten::_scaled_dot_product_flash_attention_for_cpu",
                                "aten::_scaled_dot_product_attention_math", "aten::_efficient_attention_forward",
                                "aten::_flash_attention_forward"),
                  "float log-softmax (cast, max, exp, sum)": ("aten::copy_", "aten::sub", "aten::exp_", "aten::exp",
                                                              "aten::amax", "aten::logsumexp", "aten::log")}


def profile_scoring(model, seqs, pad_id: int, flops: float) -> dict:
    """Where memlens's scoring spends its time (torch.profiler, self CPU time by operator group), and the GFLOP/s
    the matrix products reach on their own."""
    from torch.profiler import ProfilerActivity, profile

    from memlens.scoring import score

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        score(model, seqs, batch_size=64, pad_id=pad_id)
    times = {e.key: e.self_cpu_time_total / 1e6 for e in prof.key_averages()}
    total = sum(times.values())
    shares = {g: sum(times.get(k, 0.0) for k in keys) / total for g, keys in PROFILE_GROUPS.items()}
    shares["everything else (norms, activations, rotary, indexing, Python)"] = 1 - sum(shares.values())
    mm_s = sum(times.get(k, 0.0) for k in PROFILE_GROUPS["matrix products"])
    return {"shares": shares, "matmul_gflops": flops / mm_s / 1e9, "profiled_s": total}


# --------------------------------------------------------------------------------------------------- (b) extraction


def bench_extraction(lm, seqs, precision: str) -> dict:
    from memlens.extraction import Decoding, extract, split_point
    from memlens.models import at_precision

    n_base = max(4, len(seqs) // 8)
    pad = lm.pad_id

    def baseline():
        outs = []
        with torch.inference_mode():
            for s in seqs[:n_base]:
                k = split_point(len(s))
                g = lm.model.generate(input_ids=torch.tensor([s[:k]]), max_new_tokens=len(s) - k, do_sample=False,
                                      temperature=None, top_p=None, top_k=None, pad_token_id=pad)
                outs.append(g[0, k:].tolist())
        return outs

    def ours(model, subset):
        rows = extract(model, subset, [True] * len(subset), [Decoding(None)], pad_id=pad, eos_id=None, batch_size=32)
        return [r.continuation for r in sorted(rows, key=lambda r: r.index)]

    fast = at_precision(lm.model, precision)
    base, t_base = timed(baseline)
    conts, t_ours = timed(lambda: ours(fast, seqs))
    same32 = sum(a == b for a, b in zip(ours(lm.model, seqs[:n_base]), base))
    same = sum(a == b for a, b in zip(conts[:n_base], base))
    return {"baseline_cont_s": n_base / t_base, "memlens_cont_s": len(seqs) / t_ours,
            "ratio": len(seqs) / t_ours / (n_base / t_base), "precision": precision,
            "greedy_identical_fp32": f"{same32}/{n_base}", "greedy_identical": f"{same}/{n_base}",
            "prompts": len(seqs), "baseline_prompts": n_base}


# ----------------------------------------------------------------------------------------------------- (c) training


def bench_training(model_name: str, texts: list[str], heldout: list[str], steps: int | None = None,
                   epochs: float | None = None, seeds: tuple[int, ...] = (0, 1)) -> tuple[dict, object, object]:
    """LoRA r8 on q, k, v, o, batch 16, lr 1e-3: memlens's loop (its defaults) against the Hugging Face Trainer
    (float32, random batches), each with every seed of ``seeds``: speed, and the fit (mean NLL on the training texts
    and on held-out texts, scored in float32) with the spread between seeds."""
    from baseline import trainer_loop

    from memlens.config import LoraConfig, TrainConfig
    from memlens.finetune import apply_lora, train_loop
    from memlens.models import load_model
    from memlens.scoring import score

    lcfg = LoraConfig(targets=["q", "k", "v", "o"], rank=8)
    hp = dict(max_steps=steps, epochs=epochs or 3.0, batch_size=16, grad_accum=1, lr=1e-3,
              warmup_steps=min(20, (steps or 80) // 4))

    def run(loop, seed: int, **settings):
        lm = load_model(model_name)
        seqs = lm.encode(texts)
        model, _ = apply_lora(lm, lcfg, seed=seed)
        cfg = TrainConfig(**hp, seed=seed, **settings)
        kwargs = {"tokenizer": lm.tokenizer} if loop is trainer_loop else {"progress": False}
        rows = loop(model, seqs, cfg, lm.pad_id, **kwargs)
        # the first steps pay one-off costs (kernel selection, allocator warm-up): time steps SKIP+1.. for both
        seconds = rows[-1]["elapsed_s"] - rows[SKIP - 1]["elapsed_s"]
        fed = sum(r["tokens"] + r["sequences"] for r in rows[SKIP:])  # targets + the BOS of each sequence
        nll = {"train": score(model, seqs, pad_id=lm.pad_id).corpus_mean_nll(),
               "heldout": score(model, lm.encode(heldout), pad_id=lm.pad_id).corpus_mean_nll()}
        return {"tok_s": fed / seconds, "steps": len(rows), "seconds": rows[-1]["elapsed_s"],
                "last5_loss": float(np.mean([r["loss"] for r in rows[-5:]])), **nll}, model, lm

    runs: dict[str, list[dict]] = {"baseline": [], "memlens": []}
    model = lm = None
    for seed in seeds:
        log(f"training: the Trainer (float32, random batches), seed {seed}")
        runs["baseline"].append(run(trainer_loop, seed, precision="float32", batching="random")[0])
        log(f"training: memlens (defaults), seed {seed}")
        r, m, l_ = run(train_loop, seed)
        runs["memlens"].append(r)
        if model is None:
            model, lm = m, l_

    def fit(rows: list[dict]) -> dict:
        return {k: {"mean": float(np.mean([r[k] for r in rows])), "spread": float(np.ptp([r[k] for r in rows]))}
                for k in ("train", "heldout")}

    ours, base = fit(runs["memlens"]), fit(runs["baseline"])
    tok = {k: float(np.mean([r["tok_s"] for r in v])) for k, v in runs.items()}
    out = {"baseline_tok_s": tok["baseline"], "memlens_tok_s": tok["memlens"], "ratio": tok["memlens"] / tok["baseline"],
           "steps": runs["memlens"][0]["steps"], "timed_steps": runs["memlens"][0]["steps"] - SKIP, "seeds": list(seeds),
           "runs": runs, "fit": {"memlens": ours, "baseline": base}}
    for k in ("train", "heldout"):  # memlens minus the Trainer, against the larger of the two seed spreads
        out[f"{k}_nll_diff"] = ours[k]["mean"] - base[k]["mean"]
        out[f"{k}_seed_spread"] = max(ours[k]["spread"], base[k]["spread"])
        out[f"{k}_within_spread"] = abs(out[f"{k}_nll_diff"]) <= out[f"{k}_seed_spread"]
    return out, model, lm


# ------------------------------------------------------------------------------------------- (e) bf16 and the AUCs


def bench_precision(lm, model, members: list[str], nonmembers: list[str], precision: str) -> dict:
    """Every attack's AUC with the audit in ``precision`` against float32, on the adapter trained in (c)."""
    from memlens import metrics as M
    from memlens.attacks import attack_scores
    from memlens.models import at_precision
    from memlens.scoring import score, zlib_length

    seqs = lm.encode(members + nonmembers)
    y = np.array([1] * len(members) + [0] * len(nonmembers))
    zl = np.array([zlib_length(t) for t in members + nonmembers], dtype=float)
    ks = (0.05, 0.1, 0.2, 0.3, 0.5)
    aucs = {}
    for prec in ("float32", precision):
        ft = score(at_precision(model, prec), seqs, pad_id=lm.pad_id, ks=ks, min_k_pp=True)
        with model.disable_adapter():
            base = score(at_precision(model, prec), seqs, pad_id=lm.pad_id, ks=ks, min_k_pp=True)
        aucs[prec] = {a: M.auc(y, s) for a, s in attack_scores(ft, base, zl).items()}
    rows = {}
    for a, v32 in aucs["float32"].items():
        lo, hi = M.hanley_mcneil_ci(v32, len(members), len(nonmembers))
        v = aucs[precision][a]
        rows[a] = {"float32": v32, precision: v, "lo": lo, "hi": hi, "within": bool(lo <= v <= hi)}
    return {"precision": precision, "members": len(members), "nonmembers": len(nonmembers), "attacks": rows,
            "all_within": all(r["within"] for r in rows.values())}


# -------------------------------------------------------------------------------------------------------- (d) study


def bench_study(model: str, cells: int | None, out_dir: Path) -> dict:
    """paper-table-3.1 quick: memlens's runs vs the same runs made of the baseline pieces."""
    import memlens.audit as A
    from baseline import BASELINE_SETTINGS, baseline_engine

    from memlens.study import load_study, plan

    study = load_study("paper-table-3.1")
    data = [f"model={model}"] + ([f"data.path={PHEE}"] if Path(PHEE, "train.json").is_file() else
                                 ["data.source=synthetic"])
    ours = plan(study, "quick", data, output_dir=str(out_dir / "memlens"))[:cells]
    base = plan(study, "quick", data + BASELINE_SETTINGS, output_dir=str(out_dir / "baseline"))[:cells]
    saved = A.cache_dir
    A.cache_dir = lambda: out_dir / "cache"  # base statistics start empty: memlens pays for them once, as a study
    try:
        t_ours, t_base, auc = 0.0, 0.0, []
        for r_ours, r_base in zip(ours, base):
            log(f"study run {r_ours.label}: memlens")
            rec, t = timed(lambda: A.compute_run(r_ours.config, progress=False, study="bench"))
            t_ours += t
            log(f"study run {r_base.label}: baseline pieces")
            with baseline_engine():
                rec_b, t = timed(lambda: A.compute_run(r_base.config, progress=False, study="bench"))
            t_base += t
            get = lambda r: r["run"]["summary"]["attacks"]["ref_ratio"]["auc"]  # noqa: E731
            auc.append({"run": r_ours.label, "memlens": get(rec), "baseline": get(rec_b),
                        "memlens_s": rec["run"]["timings"], "baseline_s": rec_b["run"]["timings"]})
    finally:
        A.cache_dir = saved
    return {"runs": len(ours), "of": len(plan(study, "quick", data)), "memlens_s": t_ours, "baseline_s": t_base,
            "ratio": t_base / t_ours, "per_run": auc}


# ----------------------------------------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer records and steps, one study run (minutes)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", default=str(ROOT / "docs" / "performance.md"))
    ap.add_argument("--full-fit", action="store_true", help="also train at the full-PHEE configuration (all 2,898 "
                    "train sentences, 3 epochs; held-out: the test split), memlens and the Trainer, 2 seeds each "
                    "(hours on 2 cores)")
    args = ap.parse_args()
    from memlens.models import load_model, resolve_precision
    from memlens.provenance import processor

    n_score, n_extract, steps, cells = (256, 64, 20, 1) if args.quick else (1280, 256, 60, None)
    texts, source = records(max(n_score, 512))
    precision = resolve_precision("auto", "cpu")
    t0 = time.perf_counter()
    # without AVX512-BF16 or AMX, bf16 products are emulated (about 1 GFLOP/s on an AVX2 EPYC: minutes for the
    # 2048-cube), and memlens computes in float32: a small product shows the gap
    native = precision == "bfloat16"  # auto picks bf16 exactly where it is native
    roof = {"float32": gemm_roof(torch.float32),
            "bfloat16": gemm_roof(torch.bfloat16) if native else gemm_roof(torch.bfloat16, n=512, reps=1)}
    lm = load_model(args.model)
    fpt = flops_per_token(lm.model)
    seqs = lm.encode(texts[:n_score])
    cpu = processor()
    res = {"date": dt.date.today().isoformat(), "machine": f"{platform.machine()} {os.cpu_count()} cores "
           f"({cpu['model']}, family/model {cpu['family_model']}, {' '.join(cpu['isa']) or 'no AVX'}), "
           f"torch {torch.__version__}, threads {torch.get_num_threads()}",
           "processor": cpu,
           "device": "cpu", "model": args.model, "data": source, "quick": args.quick,
           "gemm_roof_gflops": roof, "bf16_native": native, "gflop_per_token": fpt / 1e9}
    log("scoring")
    res["scoring"] = bench_scoring(lm, seqs, precision, roof, fpt)
    log("extraction")
    res["extraction"] = bench_extraction(lm, seqs[:n_extract], precision)
    res["training"], model, tlm = bench_training(args.model, texts[:256], texts[256:512], steps)
    res["training"]["memlens_gflops"] = res["training"]["memlens_tok_s"] * 2 * fpt / 1e9  # fwd + input grads
    res["training"]["share_of_roof"] = res["training"]["memlens_gflops"] / roof[precision]
    if args.full_fit:
        log("training at the full-PHEE configuration (every train sentence, 3 epochs)")
        train, held = phee_train_heldout()
        res["training_full"], _, _ = bench_training(args.model, train, held, epochs=3.0, seeds=(0, 1))
        res["training_full"]["memlens_gflops"] = res["training_full"]["memlens_tok_s"] * 2 * fpt / 1e9
        res["training_full"]["share_of_roof"] = res["training_full"]["memlens_gflops"] / roof[precision]
    log("bf16 against float32 on the AUCs" if precision != "float32" else "(e) skipped: float32 here")
    res["precision_check"] = (bench_precision(tlm, model, texts[:256], texts[256:512], precision)
                              if precision != "float32" else None)  # float32 against itself tells nothing
    with tempfile.TemporaryDirectory(prefix="memlens-bench-") as tmp:
        res["study"] = bench_study(args.model, cells, Path(tmp))
    res["wall_s"] = time.perf_counter() - t0
    res["goals"] = {"scoring_10x": res["scoring"]["ratio"] >= 10, "scoring_60pct_roof":
                    res["scoring"]["share_of_roof"] >= 0.6, "extraction_10x": res["extraction"]["ratio"] >= 10,
                    "training_2x": res["training"]["ratio"] >= 2, "study_3x": res["study"]["ratio"] >= 3,
                    "training_40pct_roof": res["training"]["share_of_roof"] >= 0.4}
    write_markdown(res, Path(args.out))
    print(json.dumps(res))


def fit_table(res: dict) -> list[str]:
    rows = ["| configuration | set | memlens | Trainer | difference | within the seed spread |", "|---|---|---|---|---|---|"]
    for key, label in (("training", "bench: 256 texts, {steps} steps"),
                       ("training_full", "full PHEE: 2,898 sentences, 3 epochs ({steps} steps)")):
        tr = res.get(key)
        if not tr:
            continue
        for k in ("train", "heldout"):
            m, b = tr["fit"]["memlens"][k], tr["fit"]["baseline"][k]
            rows.append(f"| {label.format(steps=tr['steps'])} | {k} | {m['mean']:.4f} ({m['spread']:.4f}) | "
                        f"{b['mean']:.4f} ({b['spread']:.4f}) | {tr[k + '_nll_diff']:+.4f} | "
                        f"{'yes' if tr[k + '_within_spread'] else 'no'} |")
    return rows


def precision_lines(pc: dict | None, p: str) -> list[str]:
    """(e): the audit's AUCs at ``p`` against float32 (none where memlens computes in float32)."""
    if pc is None:
        return ["(e) not measured: memlens computes in float32 on this processor, as the baseline does.", ""]
    return [
        f"(e) {p} against float32, every attack's AUC on the adapter of (c) ({pc['members']} members vs "
        f"{pc['nonmembers']} held-out): " + ("all within" if pc["all_within"] else "NOT all within")
        + " the float32 value's 95% Hanley-McNeil interval.", "",
        f"| attack | AUC float32 (95% interval) | AUC {p} | within |", "|---|---|---|---|",
        *[f"| {a} | {r['float32']:.4f} ({r['lo']:.3f}-{r['hi']:.3f}) | {r[p]:.4f} | {'yes' if r['within'] else 'NO'} |"
          for a, r in pc["attacks"].items()], ""]


def write_markdown(res: dict, path: Path) -> None:
    sc, ex, tr, pc, st = (res[k] for k in ("scoring", "extraction", "training", "precision_check", "study"))
    roof = res["gemm_roof_gflops"]
    p = sc["precision"]
    lines = [
        f"Measured {res['date']} on {res['machine']}; model {res['model']}; data {res['data']}; "
        f"{'`make bench-quick`' if res['quick'] else '`make bench`'} in {res['wall_s'] / 60:.1f} min. Produced by "
        "`benchmarks/bench.py`: each ratio compares memlens with a baseline written like the paper's code "
        "(`benchmarks/baseline.py`), in the same run.", "",
        f"GEMM roof now: fp32 {roof['float32']:.0f} GFLOP/s, bf16 {roof['bfloat16']:.0f} GFLOP/s"
        + ("" if res["bf16_native"] else " (emulated: this processor has neither AVX512-BF16 nor AMX; a 512-cube "
           "product)") + "; "
        f"{res['gflop_per_token']:.3f} GFLOP per token forward. memlens computes in {p} here.", "",
        "| measure | baseline | memlens | ratio | goal | notes |", "|---|---|---|---|---|---|",
        f"| (a) scoring, tokens/s | {sc['baseline_tok_s']:.0f} | {sc['memlens_tok_s']:.0f} | {sc['ratio']:.1f}x | "
        f"10x: {'met' if res['goals']['scoring_10x'] else 'not met'} | {sc['memlens_gflops']:.0f} GFLOP/s = "
        f"{100 * sc['share_of_roof']:.0f}% of the {p} roof (goal 60%: "
        f"{'met' if res['goals']['scoring_60pct_roof'] else 'not met'})"
        + ("" if p == "float32" else  # where memlens computes in float32, the float32 figures are the line's own
           f"; float32 batched: {sc['memlens_fp32_tok_s']:.0f} tokens/s ({sc['fp32_ratio']:.1f}x, "
           f"{100 * sc['memlens_fp32_share_of_roof']:.0f}% of the fp32 roof)")
        + f"; with every statistic (Min-K%, Min-K%++): {sc['memlens_all_stats_tok_s']:.0f} tokens/s; padding "
        f"{100 * sc['padding_share']:.1f}%; max NLL difference to the baseline {sc['max_abs_nll_diff_fp32']:.1e} "
        + ("" if p == "float32" else f"(fp32), {sc['max_abs_nll_diff']:.1e} ({p}); mean NLL shift {p} - fp32 "
           f"{sc['mean_nll_shift']:+.3f} nats") + " |",
        f"| (b) extraction, continuations/s | {ex['baseline_cont_s']:.2f} | {ex['memlens_cont_s']:.2f} | "
        f"{ex['ratio']:.1f}x | 10x: {'met' if res['goals']['extraction_10x'] else 'not met'} | greedy continuations "
        f"identical to the baseline's: {ex['greedy_identical_fp32']} in fp32, {ex['greedy_identical']} in {p} |",
        f"| (c) LoRA training, tokens/s | {tr['baseline_tok_s']:.0f} | {tr['memlens_tok_s']:.0f} | "
        f"{tr['ratio']:.2f}x | 2x: {'met' if res['goals']['training_2x'] else 'not met'} | {tr['steps']} steps "
        f"(first {SKIP} untimed), mean of seeds {', '.join(map(str, tr['seeds']))}; {tr['memlens_gflops']:.0f} "
        f"GFLOP/s = {100 * tr['share_of_roof']:.0f}% of the {p} roof (goal 40%: "
        f"{'met' if res['goals']['training_40pct_roof'] else 'not met'}); fit below |",
        f"| (d) paper-table-3.1 quick, wall s | {st['baseline_s']:.0f} | {st['memlens_s']:.0f} | {st['ratio']:.1f}x "
        f"| 3x: {'met' if res['goals']['study_3x'] else 'not met'} | {st['runs']} of {st['of']} runs; ref_ratio "
        "AUC " + ", ".join(f"{r['memlens']:.3f} (memlens) / {r['baseline']:.3f} (baseline)" for r in st["per_run"])
        + " |", "",
        f"Where (a)'s time goes in memlens ({p}, torch.profiler, self time by operator): "
        + "; ".join(f"{g} {100 * v:.0f}%" for g, v in sc["profile"]["shares"].items())
        + f". The matrix products alone run at {sc['profile']['matmul_gflops']:.0f} GFLOP/s "
        f"({100 * sc['profile']['matmul_gflops'] / roof[p]:.0f}% of the {p} roof). For scale: 10x the baseline "
        f"would be {10 * sc['baseline_tok_s']:.0f} tokens/s = {10 * sc['baseline_tok_s'] * res['gflop_per_token']:.0f} "
        f"GFLOP/s, {100 * 10 * sc['baseline_tok_s'] * res['gflop_per_token'] / roof[p]:.0f}% of the {p} roof.", "",
        "(c)'s fit: mean NLL (nats per token, scored in float32) after training, mean over the seeds (their "
        "spread, max - min); memlens's defaults against the Trainer:", "",
        *fit_table(res), "",
        *precision_lines(pc, p),
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(place_block(path.read_text() if path.is_file() else "# Performance\n", lines))


def place_block(page: str, lines: list[str]) -> str:
    """``page`` with the benchmark's lines between its markers; the rest of the page (memory, GPU) as it was."""
    block = "\n".join([BEGIN, *lines, END])
    if BEGIN in page and END in page:
        return page[: page.index(BEGIN)] + block + page[page.index(END) + len(END):]
    return page.rstrip("\n") + "\n\n" + block + "\n"


BEGIN, END = "<!-- bench.py writes from here -->", "<!-- bench.py writes up to here -->"


if __name__ == "__main__":
    main()
