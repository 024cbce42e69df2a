"""Trajectories: utility and the membership signal at checkpoints during training, and the threshold past which
more training buys little utility but more leakage.

At each checkpoint (``audit.checkpoints``: every N optimizer steps, or at fractions of training; the last step
always) the audited records are scored under the model as it is then, in the audit's precision, and the series
keeps: the step and epoch, the training loss (token-weighted mean over the steps since the previous checkpoint),
the held-out (non-member) mean NLL and perplexity, the members' mean NLL, and for every attack of ``audit.attacks``
(not the reference-adapter attacks, which are scored after training only) its AUC (Hanley-McNeil 95% interval) and
TPR at 1% FPR (bootstrap 95% interval). Step 0 is the model before training:
a fresh LoRA adapter (B = 0) leaves the base model unchanged, so its statistics are the base model's, at no cost.
Canaries are left out of the metrics, as in the final audit. With ``checkpoints.extraction`` each checkpoint after
step 0 also runs greedy extraction on the records the final audit's extraction samples (n-gram share and exact
match of members and non-members, and their difference with its 95% interval, as in extraction.summarize). A
checkpoint costs one scoring pass over the audited records (plus the extraction when asked); it leaves the training's random state as it found
it, so the training (and the final adapter) is the same with or without checkpoints.

**The threshold** (:func:`threshold`). With held-out NLL h_0..h_n and signal s_0..s_n (an attack's AUC) at the
checkpoints: the threshold is the first checkpoint i < n such that no later checkpoint improves held-out NLL by
``tolerance`` or more (min over j > i of h_j > h_i - tolerance) while the signal still rises after it
(s_n > s_i). The leakage gained past it is the final checkpoint's AUC and TPR at 1% FPR minus checkpoint i's, on
the same records, with a paired bootstrap 95% interval (:func:`memlens.metrics.paired_difference`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from memlens import metrics as M

TPR_AT = 0.01


def checkpoint_steps(total: int, every: int | None = None, at: Sequence[float] | None = None) -> list[int]:
    """Optimizer steps (1..total) at which to score: every ``every`` steps or at the fractions ``at`` of ``total``
    (rounded up, at least step 1); the last step always."""
    if total < 1:
        return []
    steps = {total}
    if every is not None:
        steps.update(range(every, total + 1, every))
    for f in at or ():
        steps.add(min(total, max(1, math.ceil(f * total - 1e-9))))
    return sorted(steps)


def threshold(heldout_nll: Sequence[float], signal: Sequence[float], tolerance: float) -> int | None:
    """The index of the threshold checkpoint (see the module docstring), or None where no checkpoint is one."""
    h, s = np.asarray(heldout_nll, dtype=float), np.asarray(signal, dtype=float)
    if h.shape != s.shape:
        raise ValueError("heldout_nll and signal must have one value per checkpoint")
    n = len(h)
    for i in range(n - 1):
        if np.min(h[i + 1:]) > h[i] - tolerance and s[-1] > s[i]:
            return i
    return None


@dataclass
class Checkpoint:
    step: int
    epoch: float
    train_loss: float | None
    heldout_nll: float
    members_nll: float
    attacks: dict[str, dict[str, float]]  # attack -> auc, auc_lo, auc_hi, tpr, tpr_lo, tpr_hi
    scores: dict[str, np.ndarray] = field(repr=False, default_factory=dict)  # kept in memory, never stored

    @property
    def heldout_ppl(self) -> float:
        return float(np.exp(self.heldout_nll))


def _token_mean(stats: Any, sel: np.ndarray) -> float:
    return float(stats.sum_nll[sel].sum() / max(stats.n_tokens[sel].sum(), 1))


class Trajectory:
    """A training hook (see :func:`memlens.finetune.run_hooks`) that scores the audited records at checkpoints.

    ``seqs``, ``base``, ``zlib_bytes``, ``member`` and ``keep`` describe the audited records in the audit's order
    (``keep`` is False for canaries); ``cfg`` is the run's :class:`memlens.config.AuditConfig`.
    """

    def __init__(self, seqs: list[list[int]], base: Any, zlib_bytes: np.ndarray, member: np.ndarray,
                 keep: np.ndarray, cfg: Any, pad_id: int, progress: bool = False, eos_id: int | None = None):
        self.seqs, self.base, self.zl, self.pad_id, self.cfg = seqs, base, zlib_bytes, pad_id, cfg
        self.eos_id = eos_id
        self.extracted: dict[int, list[dict[str, Any]]] = {}  # step -> extraction summary (checkpoints.extraction)
        self.y = np.asarray(member).astype(int)
        self.keep = np.asarray(keep, dtype=bool)
        self.attacks = tuple(cfg.attacks)  # the base-calibrated attacks (the reference attacks need references)
        self.spec = cfg.checkpoints
        self.progress = progress
        self.points: list[Checkpoint] = [self._measure(0, 0.0, None, base)]
        self._steps: list[int] | None = None
        self._seen_rows = 0

    def due(self, step: int, total: int) -> bool:
        if self._steps is None or self._steps[-1] != total:
            self._steps = checkpoint_steps(total, self.spec.every, self.spec.at)
        return step in self._steps

    def __call__(self, model: Any, step: int, epoch: float, rows: list[dict]) -> bool:
        from memlens.models import at_precision, resolve_precision
        from memlens.scoring import score

        recent = [r for r in rows[self._seen_rows:] if r["tokens"] and r["loss"] is not None]  # (an empty DP step)
        self._seen_rows = len(rows)
        tokens = sum(r["tokens"] for r in recent)
        loss = sum(r["loss"] * r["tokens"] for r in recent) / tokens if tokens else None
        scorer = at_precision(model, resolve_precision(self.cfg.precision, next(model.parameters()).device))
        ft = score(scorer, self.seqs, batch_size=self.cfg.batch_size, pad_id=self.pad_id, ks=(self.cfg.min_k,),
                   min_k_pp=True, progress=f"checkpoint {step}" if self.progress else None)
        self.points.append(self._measure(step, epoch, loss, ft))
        if self.spec.extraction:
            self.extracted[step] = self._extract(scorer)
        return False

    def _extract(self, model: Any) -> list[dict[str, Any]]:
        """Greedy extraction on the records the final audit's extraction samples (canaries left out)."""
        import random

        from memlens.extraction import Decoding, extract, summarize

        ex = self.cfg.extraction
        rng = random.Random(ex.seed)
        pick = []
        for flag in (1, 0):
            idx = [i for i in range(len(self.seqs)) if self.y[i] == flag and self.keep[i]]
            pick += idx if ex.n is None or ex.n >= len(idx) else sorted(rng.sample(idx, ex.n))
        import torch

        device = next(model.parameters()).device
        # generation seeds torch's generator: fork it, so that training's dropout draws go on unchanged
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            rows = extract(model, [self.seqs[i] for i in pick], [bool(self.y[i]) for i in pick], [Decoding(None)],
                           pad_id=self.pad_id, eos_id=self.eos_id, rule=ex.prefix, fraction=ex.prefix_fraction,
                           length=ex.prefix_length, batch_size=ex.batch_size, seed=ex.seed)
        return [s for s in summarize(rows) if s["measure"] in ("ngram_share", "exact")]

    def _measure(self, step: int, epoch: float, loss: float | None, ft: Any) -> Checkpoint:
        from memlens.attacks import attack_scores

        y, keep = self.y[self.keep], self.keep
        scores = {a: s[keep] for a, s in attack_scores(ft, self.base, self.zl, k=self.cfg.min_k,
                                                       attacks=self.attacks).items()}
        out = {}
        n_pos, n_neg = int(y.sum()), int((1 - y).sum())
        for a, s in scores.items():
            auc = M.auc(y, s)
            lo, hi = M.hanley_mcneil_ci(auc, n_pos, n_neg)
            tpr = M.tpr_at_fpr(y, s, TPR_AT).tpr
            tlo, thi = M.bootstrap_tpr_ci(y, s, TPR_AT, n_boot=self.cfg.bootstrap) if self.cfg.bootstrap else (
                None, None)
            out[a] = {"auc": auc, "auc_lo": lo, "auc_hi": hi, "tpr": tpr, "tpr_lo": tlo, "tpr_hi": thi}
        heldout = self.y == 0
        members = (self.y == 1) & self.keep
        return Checkpoint(step, round(epoch, 6), loss, _token_mean(ft, heldout), _token_mean(ft, members), out,
                          scores)

    # ------------------------------------------------------------------------------------------------- results

    def rows(self) -> list[tuple]:
        """Rows ``(step, epoch, name, subject, value, lo, hi)`` for the store's checkpoints table."""
        out = []
        for p in self.points:
            out.append((p.step, p.epoch, "heldout_nll", "", p.heldout_nll, None, None))
            out.append((p.step, p.epoch, "heldout_ppl", "", p.heldout_ppl, None, None))
            out.append((p.step, p.epoch, "members_nll", "", p.members_nll, None, None))
            if p.train_loss is not None:
                out.append((p.step, p.epoch, "train_loss", "", p.train_loss, None, None))
            for a, m in p.attacks.items():
                out.append((p.step, p.epoch, "auc", a, m["auc"], m["auc_lo"], m["auc_hi"]))
                out.append((p.step, p.epoch, f"tpr@{TPR_AT:g}", a, m["tpr"], m["tpr_lo"], m["tpr_hi"]))
            for s in self.extracted.get(p.step, []):  # the member - non-member difference with its interval
                out.append((p.step, p.epoch, f"extraction:{s['measure']}", "members", s["members"], None, None))
                out.append((p.step, p.epoch, f"extraction:{s['measure']}", "nonmembers", s["nonmembers"], None, None))
                out.append((p.step, p.epoch, f"extraction:{s['measure']}", "difference", s["difference"],
                            s["difference_lo"], s["difference_hi"]))
        return out

    def threshold_summary(self, attack: str) -> dict[str, Any]:
        """The threshold of :func:`threshold` on ``attack``'s AUC, and the leakage gained past it."""
        tol = self.spec.tolerance
        if attack not in self.attacks:
            return {"attack": attack, "tolerance": tol, "found": False, "why": "attack not scored at checkpoints"}
        h = [p.heldout_nll for p in self.points]
        s = [p.attacks[attack]["auc"] for p in self.points]
        i = threshold(h, s, tol)
        base = {"attack": attack, "tolerance": tol, "checkpoints": len(self.points),
                "definition": "first checkpoint after which held-out NLL improves by less than the tolerance while "
                              "the attack's AUC still rises by the last checkpoint"}
        if i is None:
            return {**base, "found": False}
        p, last = self.points[i], self.points[-1]
        y = self.y[self.keep]
        gained = {}
        for metric in ("auc", f"tpr@{TPR_AT:g}"):
            d = M.paired_difference(y, last.scores[attack], p.scores[attack], metric,
                                    n_boot=max(self.cfg.bootstrap, 200))
            gained[metric] = {"at_threshold": d.b, "final": d.a, "diff": d.diff, "lo": d.lo, "hi": d.hi}
        return {**base, "found": True, "index": i, "step": p.step, "epoch": p.epoch, "final_step": last.step,
                "heldout_nll_at": p.heldout_nll, "heldout_nll_best_after": min(h[i + 1:]),
                "heldout_nll_final": last.heldout_nll, "gained": gained}
