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
import os
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
    ap.add_argument("--e2e", metavar="ARCH", help="also run `memlens run` end to end (fine-tune, references, audit, "
                    "extraction) on a random-init model of this architecture, train.device=cuda where there is one")
    ap.add_argument("--out", type=Path, help="write the JSON here too (and the e2e run's folder beside it)")
    ap.add_argument("--attention", metavar="ARCH", help="only: scoring's first and second pass over fresh shapes "
                    "with cuDNN attention on and off (is the first pass slow for per-shape attention plans?)")
    ap.add_argument("--profile", action="store_true", help="also profile 8 steps of memlens's training (batch 16) "
                    "per architecture with torch.profiler; the tables go beside --out")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16
    out = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
           "bf16_roof_tflops": roof(dtype, device, n=8192 if device == "cuda" else 1024, reps=20 if device == "cuda"
                                    else 2) / 1e12}
    if args.attention:
        out["attention"] = attention_passes(args.attention, device, dtype)
        _emit(out, args.out)
        return
    for arch in args.arch:
        try:
            out[arch] = measure(arch, device, dtype, args.quick, out["bf16_roof_tflops"],
                                profile_to=(args.out.parent if args.out else Path("/tmp")) if args.profile else None)
        except Exception as e:  # one architecture's failure (memory, an API) must not lose the others' figures
            out[arch] = {"error": f"{type(e).__name__}: {e}"[:2000]}
        if device == "cuda":
            torch.cuda.empty_cache()
        _emit(out, args.out)
    if args.e2e:
        out["e2e"] = end_to_end(args.e2e, device, args.quick, args.out.parent if args.out else Path("/tmp"))
    _emit(out, args.out)


def measure(arch: str, device: str, dtype, quick: bool, roof_tflops: float, profile_to: Path | None = None) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from memlens.config import LoraConfig, TrainConfig
    from memlens.extraction import Decoding, generate, split_point
    from memlens.finetune import train_loop
    from memlens.scoring import score

    out = {"bf16_roof_tflops": roof_tflops}
    cfg = LlamaConfig(**ARCHS[arch])
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    n_params = sum(p.numel() for p in model.parameters())
    fpt = 2.0 * (n_params - (0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size))
    n = 256 if quick else 2048
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
    if device == "cuda":  # larger batches
        t = time.perf_counter()
        score(model, seqs, batch_size=2048)
        sync()
        res["scoring"]["memlens_batch_2048_tok_s"] = sum(len(s) for s in seqs) / (time.perf_counter() - t)
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
    # LoRA training (q, k, v, o, r=8), batch 16: the Trainer (random batches) against memlens's loop (its defaults:
    # random batches, packed)
    from baseline import trainer_loop

    from memlens.finetune import apply_lora
    from memlens.models import LoadedModel

    train_seqs = seqs[:512]
    steps = 6 if quick else 20
    loops = [("baseline", trainer_loop, "random", 16), ("memlens", train_loop, "random", 16)]
    if device == "cuda":
        loops.append(("memlens_batch64", train_loop, "random", 64))
    for label, loop, batching, batch in loops:
        pm, _ = apply_lora(LoadedModel(arch, model, None, 0), LoraConfig(targets=["q", "k", "v", "o"], rank=8),
                           seed=0)
        tc = TrainConfig(max_steps=steps, batch_size=batch, lr=1e-4, warmup_steps=0, seed=0, batching=batching)
        if loop is trainer_loop:
            rows = loop(pm, train_seqs, tc, 0)
            sync()
            timed_rows = rows[2:]  # the first two steps pay one-off costs
            seconds = rows[-1]["elapsed_s"] - rows[1]["elapsed_s"]
        else:  # a GPU step's logged time is when the host read it: time a whole loop after a warm one instead
            loop(pm, train_seqs, tc.model_copy(update={"max_steps": 3}), 0, False)
            sync()
            t = time.perf_counter()
            timed_rows = loop(pm, train_seqs, tc, 0, False)
            sync()
            seconds = time.perf_counter() - t
        tok = sum(r["tokens"] + r["sequences"] for r in timed_rows) / seconds
        res[f"training_{label}"] = {"tok_s": tok, "mfu": tok * 3 * fpt / (out["bf16_roof_tflops"] * 1e12)}
        model = pm.unload()  # the base model without the adapter, for the next loop
    res["training_ratio"] = res["training_memlens"]["tok_s"] / res["training_baseline"]["tok_s"]
    if profile_to is not None:
        from torch.profiler import ProfilerActivity, profile

        pm, _ = apply_lora(LoadedModel(arch, model, None, 0), LoraConfig(targets=["q", "k", "v", "o"], rank=8), seed=0)
        tc = TrainConfig(max_steps=8, batch_size=16, lr=1e-4, warmup_steps=0, seed=0)
        train_loop(pm, train_seqs, tc, 0, False)  # warm
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        with profile(activities=activities) as prof:
            t = time.perf_counter()
            train_loop(pm, train_seqs, tc, 0, False)
            sync()
            res["profile_wall_s_8_steps"] = time.perf_counter() - t
        key = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
        (profile_to / f"profile-{arch}.txt").write_text(
            prof.key_averages().table(sort_by=key, row_limit=30) + "\n\n"
            + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
        model = pm.unload()
    del model, pm
    return res


def attention_passes(arch: str, device: str, dtype) -> dict:
    """tokens/s of two passes of score() over the same fresh set, cuDNN attention off then on (each with its own
    set of sequences, so each first pass meets new shapes)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from memlens.scoring import score

    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**ARCHS[arch])).to(dtype).eval()
    res = {}
    for seed, cudnn in ((11, False), (12, True)):
        if device == "cuda":
            torch.backends.cuda.enable_cudnn_sdp(cudnn)
        g = torch.Generator().manual_seed(seed)
        seqs = [torch.randint(3, min(1000, ARCHS[arch]["vocab_size"]), (L,), generator=g).tolist() for L in phee_like_lengths(2048, seed)]
        passes = []
        for _ in range(2):
            sync()
            t = time.perf_counter()
            score(model, seqs, batch_size=512)
            sync()
            passes.append(sum(len(s) for s in seqs) / (time.perf_counter() - t))
        res[f"cudnn_{'on' if cudnn else 'off'}_tok_s"] = passes
    return res


def _emit(out: dict, path: Path | None) -> None:
    print(json.dumps(out), flush=True)
    if path is not None:
        path.write_text(json.dumps(out, indent=1))


def end_to_end(arch: str, device: str, quick: bool, work: Path) -> dict:
    """``memlens run`` through its CLI on a random-init ``arch`` saved as a local safetensors folder (the tiny
    byte-level tokenizer; the full-size vocabulary and output head): the paths a user's run takes on ``device``."""
    import subprocess

    from transformers import LlamaConfig, LlamaForCausalLM

    from memlens.data import synthetic
    from memlens.models import build_tokenizer

    folder = work / f"random-{arch}"
    tok = build_tokenizer([r.text for r in synthetic.generate(400, seed=1)])
    cfg = LlamaConfig(**ARCHS[arch], bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    n = 128 if quick else 1024
    config = work / "e2e.yaml"
    config.write_text(
        f"model: {folder}\n"
        f"data: {{source: synthetic, synthetic_size: {10 * n}, members: {{split: train, n: {n}}}, "
        f"nonmembers: {{split: test, n: {n}}}, canary: {{repeats: 4, count: 2}}}}\n"
        "lora: {targets: [q, v], rank: 8}\n"
        f"train: {{epochs: 1, batch_size: 16, lr: 1.0e-3, warmup_steps: 5, device: {device}}}\n"
        f"audit: {{references: {{count: 2, holdout: {n // 4}, tune_records: {n // 4}}}, "
        "extraction: {n: 64, temperatures: [1.0]}}\n")
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "memlens", "run", str(config), f"output_dir={work / 'e2e-runs'}",
                           "--quiet"], capture_output=True, text=True, env={**os.environ,
                           "PYTHONPATH": os.pathsep.join(
                           [str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]), "MEMLENS_CACHE": str(work / "cache")})
    res: dict = {"arch": arch, "records": n, "wall_s": time.perf_counter() - t, "rc": proc.returncode,
                 "stderr_tail": proc.stderr[-2000:]}
    summaries = sorted((work / "e2e-runs").glob("*/summary.json"))
    if summaries:
        summary = json.loads(summaries[-1].read_text())
        import yaml

        resolved = yaml.safe_load((summaries[-1].parent / "config.yaml").read_text())
        res["resolved_train"] = {k: resolved["train"].get(k) for k in ("device", "precision", "dtype")}
        res["timings_s"] = summary.get("timings_s")
        res["train_tokens_per_s"] = summary.get("train_tokens_per_s")
        res["steps"] = summary.get("steps")
        res["attacks_auc"] = {k: round(v["auc"], 4) for k, v in (summary.get("attacks") or {}).items()
                              if isinstance(v, dict) and "auc" in v}
    return res


if __name__ == "__main__":
    main()
