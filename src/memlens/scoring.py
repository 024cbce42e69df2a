"""Token log-probabilities in batches, reduced on the fly to per-sample statistics.

Conventions: each sequence starts with the BOS, which is never a target; the targets are tokens 1..L-1, each
predicted from the tokens before it; padding is masked. Perplexity = exp(mean NLL over the targets).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator

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


def length_sorted_batches(lengths: list[int], batch_size: int) -> Iterator[list[int]]:
    """Indices in batches of similar length (longest first, so memory peaks early), each of at most batch_size."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    for i in range(0, len(order), batch_size):
        yield order[i : i + batch_size]


def token_nll(model: Any, ids, mask):
    """Per-token NLL of each target (shape (B, T-1)), zero where the target is padding."""
    import torch
    import torch.nn.functional as F

    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]  # (B, T-1, V)
    targets = ids[:, 1:]
    nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return nll.view(targets.shape) * mask[:, 1:].to(nll.dtype)


@dataclass
class NLLStats:
    n_tokens: np.ndarray  # targets per sample (BOS excluded)
    sum_nll: np.ndarray  # summed NLL in nats

    @property
    def mean_nll(self) -> np.ndarray:
        return self.sum_nll / np.maximum(self.n_tokens, 1)

    @property
    def perplexity(self) -> np.ndarray:
        return np.exp(self.mean_nll)

    def corpus_mean_nll(self) -> float:
        """Token-weighted mean NLL over all samples."""
        return float(self.sum_nll.sum() / max(int(self.n_tokens.sum()), 1))


def score_nll(model: Any, seqs: list[list[int]], batch_size: int = 32, pad_id: int = 0) -> NLLStats:
    """Summed NLL and number of targets per sequence, computed in length-sorted batches without gradients."""
    import torch

    device = next(model.parameters()).device
    n_tokens = np.zeros(len(seqs), dtype=np.int64)
    sum_nll = np.zeros(len(seqs), dtype=np.float64)
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for batch in length_sorted_batches([len(s) for s in seqs], batch_size):
            ids, mask, _ = pad_batch([seqs[i] for i in batch], pad_id)
            nll = token_nll(model, ids.to(device), mask.to(device))
            n = mask[:, 1:].sum(1).numpy()
            s = nll.double().sum(1).cpu().numpy()
            n_tokens[batch] = n
            sum_nll[batch] = s
    model.train(was_training)
    return NLLStats(n_tokens, sum_nll)


def perplexity(mean_nll: float) -> float:
    return math.exp(mean_nll)
