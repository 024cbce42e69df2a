"""Early stopping on a validation split disjoint from every audited record (``train.early_stopping``).

A training hook (see :func:`memlens.finetune.run_hooks`): at each evaluation (every ``every`` optimizer steps, or
once an epoch) the validation records are scored in the audit's precision and their token-weighted mean NLL
compared with the best so far. An improvement of more than ``min_delta`` nats keeps a copy of the trainable
weights; ``patience`` evaluations in a row without one stop training. After training the trainable weights of the
best evaluation are put back (:meth:`EarlyStopping.restore`), so the audited model is the one early stopping
chose. Scoring draws no random numbers: until it stops, training is the same as without it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


class EarlyStopping:
    def __init__(self, seqs: list[list[int]], spec: Any, steps_per_epoch: float, precision: str, batch_size: int,
                 pad_id: int, progress: bool = False):
        self.seqs, self.spec, self.precision, self.batch_size, self.pad_id = seqs, spec, precision, batch_size, pad_id
        self.every = spec.every or max(1, math.ceil(steps_per_epoch))
        self.progress = progress
        self.history: list[dict[str, float]] = []
        self.best: float = math.inf
        self.best_step: int | None = None
        self.best_state: list[Any] | None = None
        self.bad = 0
        self.stopped_at: int | None = None

    def due(self, step: int, total: int) -> bool:
        return step % self.every == 0 or step == total

    def __call__(self, model: Any, step: int, epoch: float, rows: list[dict]) -> bool:
        from memlens.models import at_precision, resolve_precision
        from memlens.scoring import score

        scorer = at_precision(model, resolve_precision(self.precision, next(model.parameters()).device))
        st = score(scorer, self.seqs, batch_size=self.batch_size, pad_id=self.pad_id,
                   progress=f"validation {step}" if self.progress else None)
        nll = float(np.sum(st.sum_nll) / max(int(np.sum(st.n_tokens)), 1))
        self.history.append({"step": step, "epoch": round(epoch, 6), "validation_nll": nll})
        if nll < self.best - self.spec.min_delta:
            self.best, self.best_step, self.bad = nll, step, 0
            self.best_state = [p.detach().clone() for p in model.parameters() if p.requires_grad]
            return False
        self.bad += 1
        if self.bad >= self.spec.patience:
            self.stopped_at = step
            return True
        return False

    def restore(self, model: Any) -> None:
        """Put back the trainable weights of the best evaluation (nothing to do when it was the last)."""
        import torch

        if self.best_state is None or self.best_step == (self.history[-1]["step"] if self.history else None):
            return
        with torch.no_grad():
            for p, best in zip([p for p in model.parameters() if p.requires_grad], self.best_state):
                p.copy_(best)

    def summary(self) -> dict[str, Any]:
        return {"evaluations": self.history, "best_step": self.best_step, "best_validation_nll": self.best,
                "stopped_at": self.stopped_at, "patience": self.spec.patience, "every": self.every,
                "validation_records": len(self.seqs)}
