"""Prefix-prompted extraction: split a record's tokens, generate from the prefix, compare with the true suffix.

The split (the paper's default): the token ids with the BOS, cut at ``midpoint = floor(L / 2)``; the prefix keeps
the BOS. Also a prefix fraction or a fixed prefix length. Generation runs in batches with left padding and the KV
cache, greedy or by nucleus sampling, and asks for as many new tokens as the suffix has (generation stops early at
the EOS token). Only the continuation is scored, never the prompt (the authors' code searched the prompt too).

Similarity of a continuation c to the true suffix s, both token lists (pure functions below):
* ``ngram_share``: the longest contiguous token run shared by c and s, divided by len(s) (the paper's "share of
  n-gram");
* ``exact``: c == s;
* ``prefix_match``: number of leading tokens of s that c reproduces;
* ``rouge_l``: F1 of the longest common subsequence;
* ``edit_sim``: 1 - Levenshtein(c, s) / max(len(c), len(s)).

Fine-tuning on a domain raises these for unseen sentences too, so each rate is also measured on as many
non-members, and the member-minus-non-member difference is what indicates memorization.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

# ------------------------------------------------------------------------------------------------ similarity (pure)


def longest_common_run(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest contiguous run of tokens that appears in both a and b."""
    best, prev = 0, [0] * (len(b) + 1)
    for x in a:
        cur = [0] * (len(b) + 1)
        for j, y in enumerate(b, start=1):
            if x == y:
                cur[j] = prev[j - 1] + 1
                if cur[j] > best:
                    best = cur[j]
        prev = cur
    return best


def lcs_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common subsequence."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, start=1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def levenshtein(a: Sequence[int], b: Sequence[int]) -> int:
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, start=1):
        cur = [i]
        for j, y in enumerate(b, start=1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def matched_prefix(c: Sequence[int], s: Sequence[int]) -> int:
    n = 0
    for x, y in zip(c, s):
        if x != y:
            break
        n += 1
    return n


def similarity(c: Sequence[int], s: Sequence[int]) -> dict[str, float]:
    """All similarity measures of a continuation ``c`` against the true suffix ``s`` (len(s) >= 1)."""
    lcs = lcs_length(c, s)
    p = lcs / len(c) if c else 0.0
    r = lcs / len(s)
    return {
        "ngram_share": longest_common_run(c, s) / len(s),
        "exact": float(list(c) == list(s)),
        "prefix_match": float(matched_prefix(c, s)),
        "rouge_l": 2 * p * r / (p + r) if p + r > 0 else 0.0,
        "edit_sim": 1.0 - levenshtein(c, s) / max(len(c), len(s)),
    }


def split_point(n_tokens: int, rule: str = "midpoint", fraction: float = 0.5, length: int = 16) -> int:
    """Number of prompt tokens (BOS included) for a sequence of ``n_tokens``; at least 1 and at most n - 1."""
    if rule == "midpoint":
        k = n_tokens // 2
    elif rule == "fraction":
        k = int(math.floor(fraction * n_tokens))
    elif rule == "length":
        k = length
    else:
        raise ValueError(f"unknown prefix rule {rule!r}")
    return min(max(k, 1), n_tokens - 1)


# ------------------------------------------------------------------------------------------------------ generation


@dataclass(frozen=True)
class Decoding:
    """Greedy decoding (temperature None) or nucleus sampling at a temperature."""

    temperature: float | None = None
    top_p: float = 0.9
    samples: int = 1

    @property
    def label(self) -> str:
        return "greedy" if self.temperature is None else f"T={self.temperature:g}"


@dataclass
class Continuation:
    tokens: list[int]
    logprobs: list[float]  # log p of each token under the model, from the logits it was generated from

    @property
    def perplexity(self) -> float:
        return math.exp(-sum(self.logprobs) / len(self.logprobs)) if self.logprobs else float("nan")


def generate(model: Any, prompts: list[list[int]], max_new: list[int], decoding: Decoding, *, pad_id: int,
             eos_id: int | None, batch_size: int = 32, seed: int = 0,
             progress: str | None = None) -> list[list[Continuation]]:
    """For each prompt, ``decoding.samples`` continuations of at most max_new[i] tokens (cut at the first EOS), with
    the log-probability of each token under ``model`` (before temperature or nucleus filtering).

    Prompts are grouped by length, left-padded, and generated with the KV cache. Sampling is seeded per batch.
    """
    from memlens.progress import progress_bar

    device = next(model.parameters()).device
    out: list[list[Continuation]] = [[] for _ in prompts]
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), max_new[i]))
    was_training = model.training
    model.eval()
    with progress_bar(progress or "", len(order), enabled=progress is not None, unit="prompts") as advance:
        for b0 in range(0, len(order), batch_size):
            _generate_batch(model, prompts, max_new, decoding, order[b0 : b0 + batch_size], out, pad_id=pad_id,
                            eos_id=eos_id, seed=seed + b0, device=device)
            advance(min(batch_size, len(order) - b0))
    model.train(was_training)
    return out


def _generate_batch(model: Any, prompts: list[list[int]], max_new: list[int], decoding: Decoding, batch: list[int],
                    out: list[list[Continuation]], *, pad_id: int, eos_id: int | None, seed: int, device: Any) -> None:
    import torch

    from memlens.scoring import gpu_attention

    width = max(len(prompts[i]) for i in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for r, i in enumerate(batch):
        ids[r, width - len(prompts[i]) :] = torch.tensor(prompts[i])
        mask[r, width - len(prompts[i]) :] = 1
    kwargs: dict[str, Any] = dict(max_new_tokens=max(max_new[i] for i in batch), min_new_tokens=0,
                                  pad_token_id=pad_id, num_return_sequences=decoding.samples, use_cache=True,
                                  output_logits=True, return_dict_in_generate=True)
    if eos_id is not None:
        kwargs["eos_token_id"] = eos_id
    if decoding.temperature is None:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    else:
        kwargs.update(do_sample=True, temperature=decoding.temperature, top_p=decoding.top_p, top_k=None)
    torch.manual_seed(seed)
    with torch.inference_mode(), gpu_attention(device):
        res = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
        new = res.sequences[:, width:]
        # log p of each generated token from the raw logits of its step (float32 log-softmax, one step at a time)
        lp = torch.stack([torch.log_softmax(step.float(), -1).gather(-1, new[:, t : t + 1]).squeeze(-1)
                          for t, step in enumerate(res.logits)], dim=1)
    new, lp = new.cpu().tolist(), lp.double().cpu().tolist()
    for r, i in enumerate(batch):
        for s in range(decoding.samples):
            row = r * decoding.samples + s
            toks = new[row][: max_new[i]]
            if eos_id is not None and eos_id in toks:
                toks = toks[: toks.index(eos_id)]
            out[i].append(Continuation(toks, lp[row][: len(toks)]))


@dataclass
class ExtractionRow:
    index: int  # position in the list of records given
    member: bool
    decoding: str
    sample: int
    prefix_len: int
    suffix_len: int
    continuation: list[int]
    scores: dict[str, float]
    gen_ppl: float = float("nan")  # perplexity of the continuation under the model (nan when empty)


def extract(model: Any, seqs: list[list[int]], members: list[bool], decodings: list[Decoding], *, pad_id: int,
            eos_id: int | None, rule: str = "midpoint", fraction: float = 0.5, length: int = 16,
            batch_size: int = 32, seed: int = 0, progress: bool = False) -> list[ExtractionRow]:
    """Run every decoding on every sequence and score each continuation (and its perplexity under ``model``)."""
    cut = [split_point(len(s), rule, fraction, length) for s in seqs]
    prompts = [s[:k] for s, k in zip(seqs, cut)]
    suffixes = [s[k:] for s, k in zip(seqs, cut)]
    rows: list[ExtractionRow] = []
    for d in decodings:
        conts = generate(model, prompts, [len(x) for x in suffixes], d, pad_id=pad_id, eos_id=eos_id,
                         batch_size=batch_size, seed=seed, progress=f"extract {d.label}" if progress else None)
        for i, samples in enumerate(conts):
            for j, c in enumerate(samples):
                rows.append(ExtractionRow(i, members[i], d.label, j, len(prompts[i]), len(suffixes[i]), c.tokens,
                                          similarity(c.tokens, suffixes[i]), c.perplexity))
    return rows


MEASURES = ("ngram_share", "exact", "prefix_match", "rouge_l", "edit_sim")
UNIT = ("ngram_share", "exact", "rouge_l", "edit_sim")  # the measures in [0, 1] (prefix_match counts tokens)
MIN_WELCH = 10  # fewer prompts on a side: Newcombe's interval for a measure in [0, 1]


def _difference_interval(mem: np.ndarray, non: np.ndarray, n_mem: int, n_non: int, unit: bool
                         ) -> tuple[float, float, str]:
    """95% interval of mean(mem) - mean(non): Welch's, except where it cannot see the variance (a side without
    variation, or, for a measure in [0, 1], fewer than :data:`MIN_WELCH` prompts a side): there a measure in [0, 1]
    gets Newcombe's hybrid score interval on the number of prompts (``n_mem``, ``n_non``: conservative when a prompt
    has several samples) and a count (prefix_match) without variation no interval (nan)."""
    if mem.size < 2 or non.size < 2:
        return float("nan"), float("nan"), "none"
    diff = float(mem.mean() - non.mean())
    varies = np.ptp(mem) > 0 and np.ptp(non) > 0
    if varies and (min(n_mem, n_non) >= MIN_WELCH or not unit):
        half = 1.959964 * float(np.sqrt(mem.var(ddof=1) / mem.size + non.var(ddof=1) / non.size))
        return diff - half, diff + half, "welch"
    if not unit:
        return float("nan"), float("nan"), "none"
    from memlens.metrics import newcombe_difference

    return (*newcombe_difference(float(mem.mean()), n_mem, float(non.mean()), n_non), "newcombe")


def summarize(rows: list[ExtractionRow], canaries: set[int] = frozenset()) -> list[dict[str, Any]]:
    """Per decoding and measure: the mean for members, for non-members, and their difference with n and a 95%
    interval (Welch: difference -+ 1.96 * sqrt(var_m / n_m + var_n / n_n) over the continuations; where a side has
    no variation or (a measure in [0, 1]) under 10 prompts, Newcombe's on the prompts; a count without variation has
    none: see
    :func:`_difference_interval`; ``difference_by`` says which). Continuations of the records whose index is in
    ``canaries`` are kept apart (their own mean), never among the members."""
    out = []
    for label in dict.fromkeys(r.decoding for r in rows):
        sel = [r for r in rows if r.decoding == label]
        for m in MEASURES:
            mem = np.array([r.scores[m] for r in sel if r.member and r.index not in canaries])
            non = np.array([r.scores[m] for r in sel if not r.member])
            can = np.array([r.scores[m] for r in sel if r.index in canaries])
            mean = {k: float(v.mean()) if v.size else float("nan") for k, v in (("m", mem), ("n", non), ("c", can))}
            diff = mean["m"] - mean["n"]
            n_mem = len({r.index for r in sel if r.member and r.index not in canaries})
            n_non = len({r.index for r in sel if not r.member})
            lo, hi, by = _difference_interval(mem, non, n_mem, n_non, m in UNIT)
            out.append({"decoding": label, "measure": m, "members": mean["m"], "nonmembers": mean["n"],
                        "difference": diff, "difference_lo": lo, "difference_hi": hi, "difference_by": by,
                        "n_members": int(mem.size), "n_nonmembers": int(non.size),
                        "canaries": mean["c"] if can.size else None,
                        "n_canaries": int(can.size)})
    return out
