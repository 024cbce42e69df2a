"""Differentially private LoRA fine-tuning: DP-SGD on the adapter's weights only, with Opacus.

What a run with ``train.dp`` does, step by step:

- **Sampling.** Each optimizer step takes every training sequence independently with probability
  q = batch_size / N (Poisson sampling: the sampling the accountant assumes), drawn from its own generator seeded
  by ``train.seed``. A step's batch has a random size (possibly zero: then the step adds noise only); it is run in
  pieces of at most ``batch_size`` sequences, padded (not packed: a per-sample gradient needs one sequence a row).
  Steps: ``max_steps``, else ceil(epochs x N / batch_size), so an "epoch" is N / batch_size steps on average.
- **Per-sample gradients** of the trainable (LoRA) weights by Opacus's ``GradSampleModule`` (hooks on the
  adapter's linear layers; the frozen base has none). A sequence's loss is its mean token NLL; its gradient is
  clipped to L2 norm ``max_grad_norm`` over all adapter weights together; the clipped sum gets Gaussian noise of
  standard deviation noise_multiplier x max_grad_norm and is divided by the expected batch size
  (``DPOptimizer``); AdamW then steps on it, with the run's learning-rate schedule. The global gradient clipping of
  ``train.max_grad_norm`` does not apply (the per-sample clipping replaces it).
- **The noise multiplier** is found from the target (epsilon, delta) for q and the step count by Opacus's
  ``get_noise_multiplier`` with the chosen accountant (RDP by default), or given directly.
- **The epsilon spent** is the accountant's epsilon at delta after the steps actually taken (fewer where early
  stopping ends training early); it is stored with the run beside the target.
- **Checked after training**: the adapter's weights must have moved. Opacus with peft has failed silently, leaving
  LoRA weights unchanged (opacus #820, peft #3409); a DP run whose adapter did not change is an error, not a result.
- **Precision**: float32 (per-sample gradients under bf16 autocast are not supported); the noise comes from
  torch's generator seeded by ``train.seed + 1``, the sampling's by ``train.seed`` (reproducible; not Opacus's
  secure mode, which resists floating-point attacks on the noise but cannot be replayed).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import warnings
from typing import Any, Sequence

from memlens.errors import MemlensError

log = logging.getLogger(__name__)


def planned_steps(n_examples: int, cfg: Any) -> int:
    """Optimizer steps of a DP run: ``max_steps``, else ceil(epochs x N / batch_size)."""
    if cfg.max_steps is not None:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * n_examples / cfg.batch_size))


def noise_multiplier(n_examples: int, cfg: Any) -> float:
    """The noise multiplier of a DP run: given, or Opacus's for the target epsilon at delta, q and the steps."""
    from opacus.accountants.utils import get_noise_multiplier

    dp = cfg.dp
    if dp.noise_multiplier is not None:
        return float(dp.noise_multiplier)
    with warnings.catch_warnings():  # the search tries noise levels far above the answer, whose bound warns
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return float(get_noise_multiplier(target_epsilon=dp.epsilon, target_delta=dp.delta,
                                          sample_rate=cfg.batch_size / n_examples,
                                          steps=planned_steps(n_examples, cfg), accountant=dp.accountant))


def epsilon_spent(sigma: float, sample_rate: float, steps: int, delta: float, accountant: str) -> float:
    """The accountant's epsilon at ``delta`` after ``steps`` steps of the subsampled Gaussian mechanism."""
    from opacus.accountants import create_accountant

    acc = create_accountant(accountant)
    acc.history = [(sigma, sample_rate, steps)] if steps else []
    return float(acc.get_epsilon(delta)) if steps else 0.0


def check_dp(n_examples: int, cfg: Any) -> None:
    """What can be checked of a DP run before the model loads: Opacus is installed, delta is below 1/N."""
    import importlib.util

    if importlib.util.find_spec("opacus") is None:
        raise MemlensError("train.dp needs Opacus, which is not installed (pip install opacus)")
    if cfg.batch_size > n_examples:
        raise MemlensError(f"train.dp: batch_size {cfg.batch_size} exceeds the {n_examples} training sequences; the "
                           "sampling rate batch_size / N must be at most 1")
    if cfg.dp.delta >= 1.0 / n_examples:
        raise MemlensError(f"train.dp.delta: {cfg.dp.delta:g} is not below 1/N = {1 / n_examples:.3g} (N = "
                           f"{n_examples} training sequences): at that delta a mechanism may publish a whole record")


def check_grad_samples(params: list[Any], batch: int) -> None:
    """On the first batch: every trainable weight has per-sample gradients, one per sequence, that add up to its
    ordinary gradient, and not all are zero. Hooks on the wrong modules (or on copies of them) fail here, before
    any noise hides them."""
    import torch

    for p in params:
        g = getattr(p, "grad_sample", None)
        if g is None or p.grad is None:
            raise MemlensError("DP training: a trainable weight got no per-sample gradient (Opacus's hooks are not on "
                               "the adapter's layers); the run is not a result")
        g = g if isinstance(g, torch.Tensor) else torch.cat(g)
        if g.shape[0] != batch or not torch.allclose(g.sum(0), p.grad, rtol=1e-3,
                                                      atol=1e-5 * float(p.grad.abs().max()) + 1e-8):
            raise MemlensError("DP training: the per-sample gradients do not add up to the batch's gradient; the run "
                               "is not a result")
    if all(float(p.grad_sample.abs().max()) == 0 for p in params if isinstance(p.grad_sample, torch.Tensor)):
        raise MemlensError("DP training: every per-sample gradient is zero; the run is not a result")


@contextlib.contextmanager
def _hooks_off(gsm: Any):
    """Opacus's hooks removed for a while (a checkpoint's scoring copies the model)."""
    gsm.remove_hooks()
    try:
        yield
    finally:
        gsm.add_hooks(loss_reduction=gsm.loss_reduction, batch_first=gsm.batch_first)


def dp_train_loop(model: Any, seqs: list[list[int]], cfg: Any, pad_id: int, progress: bool = True,
                  hooks: Sequence[Any] = ()) -> tuple[list[dict], dict[str, Any]]:
    """Train the adapter of ``model`` in place with DP-SGD (see the module docstring); returns one log row per
    optimizer step and the privacy facts of the run (noise multiplier, sampling rate, steps, epsilon spent)."""
    import torch
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    from memlens.finetune import lr_lambda, run_hooks
    from memlens.progress import progress_bar
    from memlens.scoring import pad_batch, to_device

    dp = cfg.dp
    device = next(model.parameters()).device
    n = len(seqs)
    check_dp(n, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise MemlensError("nothing to train: the model has no trainable parameters")
    before = [p.detach().clone() for p in params]
    q = min(1.0, cfg.batch_size / n)
    total = planned_steps(n, cfg)
    sigma = noise_multiplier(n, cfg)
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    opt = DPOptimizer(torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8,
                                        weight_decay=cfg.weight_decay),
                      noise_multiplier=sigma, max_grad_norm=dp.max_grad_norm, expected_batch_size=cfg.batch_size,
                      loss_reduction="mean", generator=torch.Generator(device=device).manual_seed(cfg.seed + 1))
    sched = torch.optim.lr_scheduler.LambdaLR(opt.original_optimizer, lr_lambda(cfg.warmup_steps, total,
                                                                                 cfg.schedule))
    sampler = torch.Generator().manual_seed(cfg.seed)
    rows: list[dict] = []
    t0 = time.perf_counter()
    gsm.train()
    step = 0
    checked = False
    try:
        with progress_bar("train (DP)", total, enabled=progress, unit="steps", fields={"loss": "-"}) as advance, \
                warnings.catch_warnings():
            # the adapter's first layers see inputs that need no gradient (the frozen embeddings): torch says so on
            # every backward pass; their per-sample gradients come from the outputs' gradients, as intended
            warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed "
                                    "with respect to module outputs")
            while step < total:
                chosen = torch.nonzero(torch.rand(n, generator=sampler) < q).flatten().tolist()
                pieces = [chosen[i : i + cfg.batch_size] for i in range(0, len(chosen), cfg.batch_size)] or [[]]
                nll_sum, n_tokens = 0.0, 0
                for j, piece in enumerate(pieces):
                    if j < len(pieces) - 1:
                        opt.signal_skip_step(True)  # clip and add up this piece; noise once, at the step's end
                    if piece:
                        ids, mask, labels = to_device(pad_batch([seqs[i] for i in piece], pad_id), device)
                        logits = gsm(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
                        targets = labels[:, 1:]
                        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                                targets.reshape(-1), ignore_index=-100,
                                                                reduction="none").view(len(piece), -1)
                        counts = (targets != -100).sum(1)
                        (nll.sum(1) / counts).sum().backward()  # each sequence's mean token NLL, summed
                        nll_sum += float(nll.detach().sum())
                        n_tokens += int(counts.sum())
                        if not checked:
                            check_grad_samples(params, len(piece))
                            checked = True
                    else:  # an empty Poisson batch: the step is noise alone
                        for p in params:
                            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
                    lr = sched.get_last_lr()[0]
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                sched.step()
                step += 1
                row = {"step": step, "epoch": step * q, "loss": nll_sum / n_tokens if n_tokens else None,
                       "lr": lr, "grad_norm": None, "tokens": n_tokens, "sequences": len(chosen),
                       "elapsed_s": round(time.perf_counter() - t0, 4)}
                rows.append(row)
                advance(1, loss="-" if row["loss"] is None else f"{row['loss']:.4f}")
                if any(h.due(step, total) for h in hooks):
                    with _hooks_off(gsm):
                        if run_hooks(hooks, model, step, total, row["epoch"], rows):
                            log.info("training stopped after step %d of %d", step, total)
                            total = step
    finally:
        gsm.cleanup()  # hooks and the attributes Opacus put on the parameters
    model.eval()
    # the model's own trainable weights now (not the optimizer's references to them, which a wrapper may have
    # replaced): they must have moved wherever a step had a learning rate above 0
    after = [p.detach() for p in model.parameters() if p.requires_grad]
    moved = len(after) == len(before) and any(not torch.equal(b, a) for b, a in zip(before, after))
    if not moved and any(r["lr"] > 0 for r in rows):
        raise MemlensError("DP training left the adapter's weights unchanged (a known silent failure of Opacus with "
                           "peft: opacus #820); the run is not a result")
    spent = epsilon_spent(sigma, q, step, dp.delta, dp.accountant)
    facts = {"noise_multiplier": sigma, "sample_rate": q, "steps": step, "sampling": "poisson",
             "max_grad_norm": dp.max_grad_norm, "delta": dp.delta, "accountant": dp.accountant,
             "epsilon_target": dp.epsilon, "epsilon_spent": spent, "adapter_moved": moved}
    return rows, facts
