"""memlens against a baseline written like the paper's code, on the same model and data, in the same run.

    .venv/bin/python benchmarks/bench.py [--quick] [--model smollm2-135m] [--out docs/performance.md]

Measured, each as memlens / baseline:
  (a) scoring tokens/s: memlens.scoring.score (length-sorted batches) vs one sample at a time (`model(ids,
      labels=ids).loss`, the authors' MIA loop);
  (b) extraction continuations/s: memlens.extraction.extract (batched, KV cache) vs one `generate` per prefix;
  (c) LoRA training tokens/s: memlens.finetune.train_loop vs the Hugging Face Trainer, same hyperparameters, with
      the final loss of both;
and the achieved GFLOP/s against the GEMM roof measured now (fp32 and bf16 matrix products). Ends with one JSON line
and writes the same numbers to docs/performance.md. Numbers depend on the machine and its load: rerun on an idle
machine to compare.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import sys
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SKIP = 3  # untimed warm-up steps of each training loop


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


def records(n: int, seed: int = 0) -> list[str]:
    from memlens.config import DataConfig
    from memlens.data import load_corpus

    phee = os.environ.get("MEMLENS_PHEE_DIR") or str(ROOT.parent / "shared" / "data" / "phee")
    if Path(phee, "train.json").is_file():
        corpus = load_corpus(DataConfig(source="phee", path=phee))
        pool = corpus.splits["train"] + corpus.splits["test"]
        source = "PHEE train+test"
    else:
        corpus = load_corpus(DataConfig(source="synthetic"))
        pool = [r for s in corpus.splits.values() for r in s]
        source = "synthetic"
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(pool), size=min(n, len(pool)), replace=False)
    return [pool[i].text for i in idx], source


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def bench_scoring(lm, seqs, batch_size: int) -> dict:
    from memlens.scoring import score

    tokens = sum(len(s) - 1 for s in seqs)
    n_base = max(8, len(seqs) // 4)  # the baseline is slow: time a subset, report tokens/s

    def baseline():
        out = []
        with torch.inference_mode():
            for s in seqs[:n_base]:
                ids = torch.tensor([s])
                out.append(float(lm.model(input_ids=ids, labels=ids).loss))
        return out

    base_losses, t_base = timed(baseline)
    stats, t_ours = timed(lambda: score(lm.model, seqs, batch_size=batch_size, pad_id=lm.tokenizer.pad_token_id))
    base_tokens = sum(len(s) - 1 for s in seqs[:n_base])
    agree = float(np.max(np.abs(np.array(base_losses) - stats.mean_nll[:n_base])))
    padded = 0
    from memlens.scoring import length_sorted_batches

    for b in length_sorted_batches([len(s) for s in seqs], batch_size):
        padded += len(b) * max(len(seqs[i]) for i in b)
    return {"baseline_tok_s": base_tokens / t_base, "memlens_tok_s": tokens / t_ours,
            "ratio": (tokens / t_ours) / (base_tokens / t_base), "max_abs_nll_diff": agree,
            "padding_share": 1 - sum(len(s) for s in seqs) / padded, "tokens": tokens}


def bench_extraction(lm, seqs, batch_size: int) -> dict:
    from memlens.extraction import Decoding, extract, split_point

    n_base = max(4, len(seqs) // 8)
    pad = lm.tokenizer.pad_token_id

    def baseline():
        outs = []
        with torch.inference_mode():
            for s in seqs[:n_base]:
                k = split_point(len(s))
                g = lm.model.generate(input_ids=torch.tensor([s[:k]]), max_new_tokens=len(s) - k, do_sample=False,
                                      temperature=None, top_p=None, top_k=None, pad_token_id=pad)
                outs.append(g[0, k:].tolist())
        return outs

    base, t_base = timed(baseline)
    rows, t_ours = timed(lambda: extract(lm.model, seqs, [True] * len(seqs), [Decoding(None)], pad_id=pad,
                                         eos_id=None, batch_size=batch_size))
    same = sum(r.continuation == b for r, b in zip(sorted(rows, key=lambda r: r.index)[:n_base], base))
    return {"baseline_cont_s": n_base / t_base, "memlens_cont_s": len(seqs) / t_ours,
            "ratio": (len(seqs) / t_ours) / (n_base / t_base), "greedy_identical": f"{same}/{n_base}"}


def bench_training(model_name: str, texts: list[str], steps: int) -> dict:
    """LoRA r8 on q, k, v, o, batch 16, lr 1e-3: memlens's loop against the Hugging Face Trainer."""
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    from memlens.config import LoraConfig, TrainConfig
    from memlens.finetune import apply_lora, train_loop
    from memlens.models import load_model

    warmup = min(20, steps // 4)
    lcfg = LoraConfig(targets=["q", "k", "v", "o"], rank=8)

    lm = load_model(model_name)
    seqs = lm.encode(texts)
    model, _ = apply_lora(lm, lcfg, seed=0)
    tcfg = TrainConfig(max_steps=steps, batch_size=16, grad_accum=1, lr=1e-3, warmup_steps=warmup, seed=0)
    rows = train_loop(model, seqs, tcfg, lm.tokenizer.pad_token_id, progress=False)
    # the first steps pay one-off costs (kernel selection, allocator warm-up): time steps SKIP+1.. for both loops
    t_ours = rows[-1]["elapsed_s"] - rows[SKIP - 1]["elapsed_s"]
    ours_tokens = sum(r["tokens"] + 16 for r in rows[SKIP:])  # targets + the BOS of each sequence = tokens fed
    ours_final = float(np.mean([r["loss"] for r in rows[-5:]]))

    # the paper's training: Trainer + DataCollatorForLanguageModeling(mlm=False), pad = eos
    lm = load_model(model_name)
    model, _ = apply_lora(lm, lcfg, seed=0)
    tok = lm.tokenizer
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    from transformers import TrainerCallback

    collator = DataCollatorForLanguageModeling(tok, mlm=False)
    fed: list[int] = []
    stamps: list[float] = []

    def counting(features):
        batch = collator(features)
        fed.append(int(batch["attention_mask"].sum()))
        return batch

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **k):
            stamps.append(time.perf_counter())

    targs = TrainingArguments(output_dir="/tmp/memlens-bench-trainer", per_device_train_batch_size=16,
                              gradient_accumulation_steps=1, learning_rate=1e-3, warmup_steps=warmup,
                              max_steps=steps, logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True,
                              use_cpu=not torch.cuda.is_available(), seed=0, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=targs, train_dataset=[{"input_ids": s} for s in seqs], data_collator=counting,
                      callbacks=[Clock()])
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    base_final = float(np.mean(losses[-5:]))
    base_tok_s = sum(fed[SKIP:steps]) / (stamps[steps - 1] - stamps[SKIP - 1])
    return {"baseline_tok_s": base_tok_s, "memlens_tok_s": ours_tokens / t_ours,
            "ratio": (ours_tokens / t_ours) / base_tok_s, "final_loss_memlens": ours_final,
            "final_loss_baseline": base_final, "steps": steps, "timed_steps": steps - SKIP}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer records and steps (minutes)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", default=str(ROOT / "docs" / "performance.md"))
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from memlens.models import load_model

    n_score, n_extract, steps = (256, 64, 20) if args.quick else (1280, 256, 60)
    texts, source = records(max(n_score, 256))
    roof32, roof16 = gemm_roof(torch.float32), gemm_roof(torch.bfloat16)
    lm = load_model(args.model)
    fpt = flops_per_token(lm.model)
    seqs = lm.encode(texts[:n_score])
    res = {"date": dt.date.today().isoformat(), "machine": f"{platform.machine()} {os.cpu_count()} cores "
           f"({platform.processor() or 'cpu'}), torch {torch.__version__}, threads {torch.get_num_threads()}",
           "model": args.model, "data": source, "gemm_roof_gflops": {"float32": roof32, "bfloat16": roof16}}
    sc = bench_scoring(lm, seqs, batch_size=32)
    sc["memlens_gflops"] = sc["memlens_tok_s"] * fpt / 1e9
    sc["share_of_fp32_roof"] = sc["memlens_gflops"] / roof32
    res["scoring"] = sc
    res["extraction"] = bench_extraction(lm, seqs[:n_extract], batch_size=32)
    res["training"] = bench_training(args.model, texts[:256], steps)
    res["training"]["memlens_gflops"] = res["training"]["memlens_tok_s"] * 3 * fpt / 1e9  # fwd + bwd ~ 3 x fwd
    write_markdown(res, Path(args.out))
    print(json.dumps(res))


def write_markdown(res: dict, path: Path) -> None:
    sc, ex, tr = res["scoring"], res["extraction"], res["training"]
    lines = [
        "# Performance", "",
        f"Measured {res['date']} on {res['machine']}; model {res['model']}; data {res['data']}. "
        "Produced by `benchmarks/bench.py` (`make bench`, `make bench-quick`); each ratio compares memlens with a "
        "baseline written like the paper's code, in the same run.", "",
        f"GEMM roof now: fp32 {res['gemm_roof_gflops']['float32']:.0f} GFLOP/s, "
        f"bf16 {res['gemm_roof_gflops']['bfloat16']:.0f} GFLOP/s.", "",
        "| measure | baseline | memlens | ratio | notes |", "|---|---|---|---|---|",
        f"| scoring, tokens/s | {sc['baseline_tok_s']:.0f} | {sc['memlens_tok_s']:.0f} | {sc['ratio']:.1f}x | "
        f"{sc['memlens_gflops']:.0f} GFLOP/s = {100 * sc['share_of_fp32_roof']:.0f}% of the fp32 roof; padding "
        f"{100 * sc['padding_share']:.1f}% of tokens; max NLL difference {sc['max_abs_nll_diff']:.1e} |",
        f"| extraction, continuations/s | {ex['baseline_cont_s']:.2f} | {ex['memlens_cont_s']:.2f} | "
        f"{ex['ratio']:.1f}x | greedy continuations identical: {ex['greedy_identical']} |",
        f"| LoRA training, tokens/s | {tr['baseline_tok_s']:.0f} | {tr['memlens_tok_s']:.0f} | {tr['ratio']:.2f}x | "
        f"final loss {tr['final_loss_memlens']:.3f} (memlens) vs {tr['final_loss_baseline']:.3f} (Trainer), "
        f"{tr['steps']} steps |", "",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
