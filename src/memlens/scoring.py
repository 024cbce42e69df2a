"""Token log-probabilities in batches, reduced on the fly to per-sample statistics.

Conventions: each sequence starts with the BOS, which is never a target; the targets are tokens 1..L-1, each
predicted from the tokens before it (or, with ``starts``, only tokens from position ``start`` on, e.g. a generated
continuation after its prompt); padding is masked. Perplexity = exp(mean NLL over the targets), in nats.

Per-sample statistics:
* ``n_tokens``, ``sum_nll``, ``mean_nll`` and ``perplexity``;
* ``min_k[k]``: mean of the lowest ``ceil(k * n)`` token log-probs (Shi et al. 2024, Min-K% Prob);
* ``min_k_pp[k]``: the same over standardised log-probs (log p(x_t) - mu_t) / sigma_t, where mu_t and sigma_t are
  the mean and standard deviation of log p over the vocabulary under p at position t (Zhang et al. 2024,
  Min-K%++).

Memory stays bounded by one batch of logits, whatever the corpus size: no logits are kept across batches.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np


def pad_batch(seqs: list[list[int]], pad_id: int = 0):
    """Right-pad token id lists: (input_ids, attention_mask, labels) with labels -100 on padding."""
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Indices in batches of similar length (longest first, so memory peaks early), each of at most batch_size."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    for i in range(0, len(order), batch_size):
        yield order[i : i + batch_size]


def zlib_length(text: str) -> int:
    """Bytes of the zlib-compressed UTF-8 text (level 9), the 'zlib entropy' of Carlini et al. 2021."""
    return len(zlib.compress(text.encode("utf-8"), 9))


@dataclass
class SampleStats:
    n_tokens: np.ndarray  # targets per sample
    sum_nll: np.ndarray  # summed NLL, nats
    min_k: dict[float, np.ndarray] = field(default_factory=dict)
    min_k_pp: dict[float, np.ndarray] = field(default_factory=dict)

    @property
    def mean_nll(self) -> np.ndarray:
        return self.sum_nll / np.maximum(self.n_tokens, 1)

    @property
    def perplexity(self) -> np.ndarray:
        return np.exp(self.mean_nll)

    def corpus_mean_nll(self) -> float:
        """Token-weighted mean NLL over all samples."""
        return float(self.sum_nll.sum() / max(int(self.n_tokens.sum()), 1))

    def subset(self, idx) -> SampleStats:
        idx = np.asarray(idx)
        return SampleStats(self.n_tokens[idx], self.sum_nll[idx], {k: v[idx] for k, v in self.min_k.items()},
                           {k: v[idx] for k, v in self.min_k_pp.items()})

    def to_arrays(self) -> dict[str, np.ndarray]:
        out = {"n_tokens": self.n_tokens, "sum_nll": self.sum_nll}
        out.update({f"min_k:{k}": v for k, v in self.min_k.items()})
        out.update({f"min_k_pp:{k}": v for k, v in self.min_k_pp.items()})
        return out

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> SampleStats:
        mk = {float(n.split(":")[1]): v for n, v in arrays.items() if n.startswith("min_k:")}
        mkpp = {float(n.split(":")[1]): v for n, v in arrays.items() if n.startswith("min_k_pp:")}
        return cls(np.asarray(arrays["n_tokens"]), np.asarray(arrays["sum_nll"]), mk, mkpp)


def _lowest_mean(values: np.ndarray, k: float) -> float:
    m = max(1, math.ceil(k * values.size))
    return float(np.partition(values, m - 1)[:m].mean())


def score(
    model: Any,
    seqs: list[list[int]],
    *,
    batch_size: int = 32,
    pad_id: int = 0,
    ks: Sequence[float] = (),
    min_k_pp: bool = False,
    starts: Sequence[int] | None = None,
    progress: str | None = None,
) -> SampleStats:
    """Per-sample statistics of token sequences under ``model`` (see the module docstring).

    ``starts[i]`` (default 1) is the position of the first target of sequence i; earlier tokens are context only.
    ``progress``: a description to show a progress bar under, or None for none.
    """
    import torch

    from memlens.progress import progress_bar

    device = next(model.parameters()).device
    n = len(seqs)
    starts = [1] * n if starts is None else list(starts)
    n_tokens = np.zeros(n, dtype=np.int64)
    sum_nll = np.zeros(n, dtype=np.float64)
    mk = {k: np.zeros(n) for k in ks}
    mkpp = {k: np.zeros(n) for k in ks} if min_k_pp else {}
    was_training = model.training
    model.eval()
    with torch.inference_mode(), progress_bar(progress or "", n, enabled=progress is not None) as advance:
        for batch in length_sorted_batches([len(s) for s in seqs], batch_size):
            advance(len(batch))
            ids, mask, _ = pad_batch([seqs[i] for i in batch], pad_id)
            ids, mask = ids.to(device), mask.to(device)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()  # (B, T-1, V)
            logp = torch.log_softmax(logits, dim=-1)
            del logits
            target_lp = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)  # (B, T-1)
            if min_k_pp:
                p = logp.exp()
                mu = (p * logp).sum(-1)
                sigma = (p * (logp - mu[..., None]).square()).sum(-1).clamp_min(1e-24).sqrt()  # stable two-pass
                z = ((target_lp - mu) / sigma).double().cpu().numpy()
                del p
            del logp
            lp = target_lp.double().cpu().numpy()
            for row, i in enumerate(batch):
                a, b = starts[i] - 1, len(seqs[i]) - 1  # target positions [a, b) in the shifted frame
                if b <= a:
                    raise ValueError(f"sequence {i} has no target (length {len(seqs[i])}, start {starts[i]})")
                t = lp[row, a:b]
                n_tokens[i], sum_nll[i] = b - a, -t.sum()
                for k in ks:
                    mk[k][i] = _lowest_mean(t, k)
                    if min_k_pp:
                        mkpp[k][i] = _lowest_mean(z[row, a:b], k)
    model.train(was_training)
    return SampleStats(n_tokens, sum_nll, mk, mkpp)

