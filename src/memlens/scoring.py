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

Memory stays bounded by one batch of hidden states and one chunk of logits, whatever the corpus size. Only the
target positions go through the output head (padding and prompt tokens cost no vocabulary-sized work).
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


def pack_batch(seqs: list[list[int]], pad_id: int = 0, row_length: int | None = None):
    """Token id lists packed into rows: (input_ids (R, T), position_ids (R, T) restarting at 0 for each sequence,
    labels (R * T,)), where a label is the token after its position within the same sequence, and -100 at each
    sequence's last token and on the padding that evens the rows out at their ends. With no attention mask,
    transformers keeps attention within each sequence (it reads the sequences off the restarting positions; the
    padding, last in its row, is seen by no real token under causal attention), so a packed batch computes what a
    padded one does, without most of the padding.

    Rows: ``row_length`` None = about max(longest sequence, 64) tokens each, the sequences dealt longest first to the
    shortest row, so that attention, which costs the square of a row's length, stays near the padded batch's
    (one row of 16 PHEE sentences made attention 22% of a training step); a large ``row_length`` gives one row.
    """
    import torch

    longest, total = max(len(s) for s in seqs), sum(len(s) for s in seqs)
    n_rows = max(1, math.ceil(total / max(row_length or max(longest, 64), longest)))
    rows: list[list[int]] = [[] for _ in range(n_rows)]
    fill = [0] * n_rows
    for i in sorted(range(len(seqs)), key=lambda i: -len(seqs[i])):
        r = min(range(n_rows), key=lambda r: fill[r])
        rows[r].append(i)
        fill[r] += len(seqs[i])
    width = max(fill)
    ids = torch.full((n_rows, width), pad_id, dtype=torch.long)
    pos = torch.zeros((n_rows, width), dtype=torch.long)
    labels = torch.full((n_rows, width), -100, dtype=torch.long)
    for r, members in enumerate(rows):
        at = 0
        for i in members:
            seq = torch.tensor(seqs[i], dtype=torch.long)
            n = len(seq)
            ids[r, at : at + n] = seq
            pos[r, at : at + n] = torch.arange(n)
            labels[r, at : at + n - 1] = seq[1:]
            at += n
        pos[r, at:] = torch.arange(width - at)  # the padding: a sequence of its own, after every real token
    return ids, pos, labels.reshape(-1)


def gpu_attention(device: Any) -> Any:
    """On a GPU, scaled-dot-product attention without the cuDNN backend, whose per-shape plans made the first pass
    over a set of new batch shapes 3.7x slower than the second (H100, SmolLM2's architecture: 14.9k against 92k
    tokens/s; 55k against 106k without it, benchmarks/gpu.py --attention); elsewhere nothing changes."""
    import contextlib

    import torch

    if torch.device(device).type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def to_device(tensors: Sequence[Any], device: Any) -> list[Any]:
    """CPU tensors moved to ``device``; to a GPU through pinned memory without waiting, so that the host goes on
    queueing work instead of waiting for the GPU's queue to drain (a plain copy from pageable memory waits)."""
    import torch

    if torch.device(device).type != "cuda":
        return [t.to(device) for t in tensors]
    return [t.pin_memory().to(device, non_blocking=True) for t in tensors]


def length_sorted_batches(lengths: Sequence[int], batch_size: int, min_fill: float = 0.9) -> Iterator[list[int]]:
    """Indices in batches of similar length, longest first (memory peaks early): a batch ends at ``batch_size``
    sequences or before a sequence shorter than ``min_fill`` times its longest, so padding stays under
    1 - min_fill (10%) of the tokens of every batch."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batch: list[int] = []
    for i in order:
        if batch and (len(batch) >= batch_size or lengths[i] < min_fill * lengths[batch[0]]):
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


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


def plain_head(model: Any) -> tuple[Any, Any] | None:
    """(decoder, output head) when the logits are the head applied to the decoder's last hidden state, else None.

    Then :func:`score` runs the head only on the target positions, a chunk at a time, and padding costs no
    vocabulary-sized work. Models that rescale or soft-cap their logits take the full-logits path.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = getattr(base, "config", None)
    if cfg is None or any(getattr(cfg, a, None) not in (None, 1, 1.0)
                          for a in ("final_logit_softcapping", "logit_scale", "logits_scaling")):
        return None
    try:
        decoder, head = base.get_decoder(), base.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    if decoder is None or head is None or decoder is base:
        return None
    return decoder, head


def head_plan(device: Any, vocab: int) -> tuple[int, int]:
    """(target positions per output-head chunk, rows per log-softmax block) for ``device``.

    On a CPU, 256 positions and blocks of 32 rows, so that each float32 block stays in the cache (four times faster
    than one pass over a large block on the development CPU). On a GPU, where each of these small blocks is a kernel
    launch, chunks of about 1 GiB of float32 logits (at least 256 positions) in one block: 24x fewer launches than
    the CPU's plan at SmolLM2's vocabulary, and 2.6x its scoring speed on an H100 (benchmarks/gpu.py)."""
    import torch

    if torch.device(device).type == "cuda":
        chunk = max(256, 2**28 // max(1, vocab))
        return chunk, chunk
    return 256, 32


def token_stats(logits: Any, targets: Any, min_k_pp: bool, rows: int = 32) -> tuple[Any, Any | None]:
    """log p(target) for each row of ``logits`` (N, V), and the Min-K%++ z-score when asked; float32 throughout.

    Works ``rows`` rows at a time (see :func:`head_plan`)."""
    import torch

    lps, zs = [], []
    for j in range(0, logits.shape[0], rows):
        x = logits[j : j + rows].float()
        t = targets[j : j + rows, None]
        lse = torch.logsumexp(x, dim=-1)
        lp = x.gather(-1, t).squeeze(-1) - lse
        lps.append(lp)
        if min_k_pp:
            logp = x.sub_(lse[:, None])  # in place: the float logits are not needed any more
            p = logp.exp()
            mu = (p * logp).sum(-1)
            sigma = (p * (logp - mu[:, None]).square()).sum(-1).clamp_min(1e-24).sqrt()  # stable two-pass
            zs.append((lp - mu) / sigma)
    return torch.cat(lps), (torch.cat(zs) if min_k_pp else None)


def score(
    model: Any,
    seqs: list[list[int]],
    *,
    batch_size: int = 64,
    pad_id: int = 0,
    ks: Sequence[float] = (),
    min_k_pp: bool = False,
    starts: Sequence[int] | None = None,
    progress: str | None = None,
    head_chunk: int | None = None,
) -> SampleStats:
    """Per-sample statistics of token sequences under ``model`` (see the module docstring).

    ``starts[i]`` (default 1) is the position of the first target of sequence i; earlier tokens are context only.
    ``progress``: a description to show a progress bar under, or None for none. The model runs in the precision of
    its weights; the log-softmax is taken in float32, ``head_chunk`` target positions at a time (None: the device's
    :func:`head_plan`).
    """
    import torch

    from memlens.progress import progress_bar

    device = next(model.parameters()).device
    n = len(seqs)
    starts = [1] * n if starts is None else list(starts)
    for i, s in enumerate(seqs):
        if len(s) - 1 < starts[i]:
            raise ValueError(f"sequence {i} has no target (length {len(s)}, start {starts[i]})")
    n_tokens = np.zeros(n, dtype=np.int64)
    sum_nll = np.zeros(n, dtype=np.float64)
    mk = {k: np.zeros(n) for k in ks}
    mkpp = {k: np.zeros(n) for k in ks} if min_k_pp else {}
    split = plain_head(model)
    plan_chunk, block = head_plan(device, getattr(model.config, "vocab_size", 0) or 0)
    head_chunk = head_chunk or plan_chunk
    was_training = model.training
    model.eval()
    with torch.inference_mode(), gpu_attention(device), \
            progress_bar(progress or "", n, enabled=progress is not None) as advance:
        for batch in length_sorted_batches([len(s) for s in seqs], batch_size):
            ids, mask, _ = pad_batch([seqs[i] for i in batch], pad_id)
            ids, mask = to_device((ids, mask), device)
            # the target positions of the batch, row by row: position t predicts token t + 1
            rows = torch.cat([torch.full((len(seqs[i]) - starts[i],), r) for r, i in enumerate(batch)])
            pos = torch.cat([torch.arange(starts[i] - 1, len(seqs[i]) - 1) for i in batch])
            rows, pos = to_device((rows, pos), device)
            targets = ids[rows, pos + 1]
            if split is not None:
                decoder, head = split
                hidden = decoder(input_ids=ids, attention_mask=mask).last_hidden_state[rows, pos]  # (N, H)
                parts = [token_stats(head(hidden[c : c + head_chunk]), targets[c : c + head_chunk], min_k_pp,
                                     block) for c in range(0, len(targets), head_chunk)]
                lp = torch.cat([p[0] for p in parts])
                z = torch.cat([p[1] for p in parts]) if min_k_pp else None
            else:
                logits = model(input_ids=ids, attention_mask=mask).logits[rows, pos]  # (N, V)
                lp, z = token_stats(logits, targets, min_k_pp, block)
                del logits
            lp = lp.double().cpu().numpy()
            z = z.double().cpu().numpy() if z is not None else None
            offset = 0
            for i in batch:
                m = len(seqs[i]) - starts[i]
                t = lp[offset : offset + m]
                n_tokens[i], sum_nll[i] = m, -t.sum()
                for k in ks:
                    mk[k][i] = _lowest_mean(t, k)
                    if min_k_pp:
                        mkpp[k][i] = _lowest_mean(z[offset : offset + m], k)
                offset += m
            advance(len(batch))
    model.train(was_training)
    return SampleStats(n_tokens, sum_nll, mk, mkpp)
