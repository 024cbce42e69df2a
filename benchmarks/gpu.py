"""GPU throughput of memlens against the paper-style baselines, with random-initialised weights of real
architectures (the same FLOPs as the real weights; nothing is downloaded).

    python benchmarks/gpu.py [--arch smollm2-135m llama-2-7b] [--quick]

Measures, per architecture, in bf16: scoring tokens/s (one sample at a time vs memlens's length-sorted batches),
greedy extraction continuations/s (one generate per prefix vs batched), LoRA training tokens/s (the Hugging Face
Trainer vs memlens's loop, both batch 16), each with model-FLOPs utilisation against the bf16 GEMM roof measured at
the start (training counts 3 x forward FLOPs, the usual MFU convention).
Prints one JSON line. Everything it needs is in the repository: run it from the repo root on the GPU machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

ARCHS = {
    # SmolLM2-135M: Llama, 30 layers, hidden 576, 9 heads / 3 KV heads, MLP 1536, vocab 49,152, tied embeddings
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
                         max_position_embeddings=2048),
    # Llama-2-7B: 32 layers, hidden 4096, 32 heads, MLP 11008, vocab 32,000
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False,
                       max_position_embeddings=4096),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False, max_position_embeddings=512),
}


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def roof(dtype, device, n=8192, reps=20) -> float:
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    a @ b
    sync()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    return 2 * n**3 * reps / (time.perf_counter() - t)


def phee_like_lengths(n: int, seed: int = 0) -> list[int]:
    """Lengths like PHEE's (mean about 31 tokens with BOS, long tail): a lognormal clipped to 8..128."""
    g = torch.Generator().manual_seed(seed)
    x = torch.exp(torch.randn(n, generator=g) * 0.45 + 3.35)
    return [int(min(128, max(8, v))) for v in x.tolist()]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", nargs="+", default=["smollm2-135m", "llama-2-7b"])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    from memlens.config import LoraConfig, TrainConfig
    from memlens.extraction import Decoding, generate, split_point
    from memlens.finetune import train_loop
    from memlens.scoring import score

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16
    out = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
           "bf16_roof_tflops": roof(dtype, device, n=8192 if device == "cuda" else 1024, reps=20 if device == "cuda"
                                    else 2) / 1e12}
    for arch in args.arch:
        cfg = LlamaConfig(**ARCHS[arch])
        torch.manual_seed(0)
        with torch.device(device):
            model = LlamaForCausalLM(cfg).to(dtype).eval()
        n_params = sum(p.numel() for p in model.parameters())
        fpt = 2.0 * (n_params - (0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size))
        n = 256 if args.quick else 2048
        g = torch.Generator().manual_seed(1)
        seqs = [torch.randint(3, cfg.vocab_size, (L,), generator=g).tolist() for L in phee_like_lengths(n)]
        res: dict = {"params": n_params, "flops_per_token": fpt}
        # scoring
        n1 = 32
        sync()
        t = time.perf_counter()
        with torch.inference_mode():
            for s in seqs[:n1]:
                ids = torch.tensor([s], device=device)
                model(input_ids=ids, labels=ids).loss.item()
        sync()
        base = sum(len(s) for s in seqs[:n1]) / (time.perf_counter() - t)
        bs = 512 if device == "cuda" else 32
        score(model, seqs[:bs], batch_size=bs)  # warm-up
        sync()
        t = time.perf_counter()
        score(model, seqs, batch_size=bs)
        sync()
        ours = sum(len(s) for s in seqs) / (time.perf_counter() - t)
        res["scoring"] = {"baseline_tok_s": base, "memlens_tok_s": ours, "ratio": ours / base,
                          "mfu": ours * fpt / (out["bf16_roof_tflops"] * 1e12)}
        # extraction
        prompts = [s[: split_point(len(s))] for s in seqs[:128]]
        new = [len(s) - len(p) for s, p in zip(seqs[:128], prompts)]
        t = time.perf_counter()
        with torch.inference_mode():
            for p, m in list(zip(prompts, new))[:8]:
                model.generate(input_ids=torch.tensor([p], device=device), max_new_tokens=m, do_sample=False,
                               pad_token_id=0)
        sync()
        base = 8 / (time.perf_counter() - t)
        t = time.perf_counter()
        generate(model, prompts, new, Decoding(None), pad_id=0, eos_id=None, batch_size=128)
        sync()
        ours = len(prompts) / (time.perf_counter() - t)
        res["extraction"] = {"baseline_cont_s": base, "memlens_cont_s": ours, "ratio": ours / base}
        # LoRA training (q, k, v, o, r=8), batch 16: the Trainer (random batches) against memlens's loop (grouped)
        from baseline import trainer_loop

        from memlens.finetune import apply_lora
        from memlens.models import LoadedModel

        train_seqs = seqs[:512]
        steps = 6 if args.quick else 20
        for label, loop, batching in (("baseline", trainer_loop, "random"), ("memlens", train_loop, "grouped")):
            pm, _ = apply_lora(LoadedModel(arch, model, None, 0), LoraConfig(targets=["q", "k", "v", "o"], rank=8),
                               seed=0)
            tc = TrainConfig(max_steps=steps, batch_size=16, lr=1e-4, warmup_steps=0, seed=0, batching=batching)
            rows = loop(pm, train_seqs, tc, 0) if loop is trainer_loop else loop(pm, train_seqs, tc, 0, False)
            sync()
            timed_rows = rows[2:]  # the first two steps pay one-off costs
            seconds = rows[-1]["elapsed_s"] - rows[1]["elapsed_s"]
            tok = sum(r["tokens"] + r["sequences"] for r in timed_rows) / seconds
            res[f"training_{label}"] = {"tok_s": tok, "mfu": tok * 3 * fpt / (out["bf16_roof_tflops"] * 1e12)}
            model = pm.unload()  # the base model without the adapter, for the next loop
        res["training_ratio"] = res["training_memlens"]["tok_s"] / res["training_baseline"]["tok_s"]
        out[arch] = res
        del model, pm
        if device == "cuda":
            torch.cuda.empty_cache()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
