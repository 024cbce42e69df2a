"""Canary exposure: how far a model ranks an inserted secret above the other texts it could have been.

Carlini et al. (2019) insert a *formatted canary* (a template with random slots, e.g. "Patient 381247 was given
20 mg daily of warfarin and developed pancreatitis.") into the training data and measure its **exposure**::

    exposure(c) = log2 |R| - log2 rank(c)

where R is the randomness space (every text the template can produce) and ``rank(c)`` the canary's rank in R when
sorted by the model's log-perplexity. An unmemorized canary has exposure about 1 bit; a fully memorized one
log2 |R| bits.

Conventions
-----------
* A **score** is a log-perplexity: the total negative log-likelihood of the whole text in nats. LOWER means more
  likely under the model (unlike the attack scores of :mod:`memlens.metrics`, which rise with membership).
* **Ranks** count ties half: ``rank = 1 + #(strictly lower) + 0.5 * #(equal)``, the mid-rank convention of
  :func:`memlens.metrics.auc`.
* Candidates are texts of R other than the canary, drawn uniformly (:meth:`CanaryFormat.sample`); the caller scores
  them with the model and passes the scores here.

Two estimators, both from Carlini et al. Section 4 and TF-Privacy ``privacy_tests/secret_sharer/exposures.py``:
:func:`rank_exposure` (interpolation: exact when the candidates are all of R, otherwise resolves at most
log2(N + 1) bits) and :func:`skewnorm_exposure` (extrapolation: fits a skew-normal to the candidate scores and
reads off the canary's tail probability, unbounded).

Everything here is pure: no model, no I/O.

References
----------
N. Carlini, C. Liu, U. Erlingsson, J. Kos, D. Song, "The Secret Sharer: Evaluating and Testing Unintended
Memorization in Neural Networks", USENIX Security 2019.
"""

from __future__ import annotations

import itertools
import math
import re
import string
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import integrate, special, stats

from memlens.data.records import Record
from memlens.errors import MemlensError

#: The default canary: a made-up case report whose values come from the corpus (:func:`canary_format`).
CANARY_TEMPLATE = "Patient {number} was given {dose} of {drug} and developed {effect}."
#: Template slot -> annotated role whose corpus values fill it (the ``number`` slot is random digits).
SLOT_ROLES = {"drug": "treatment.drug", "dose": "treatment.dosage", "effect": "effect"}
#: Corpus values longer than this, or spanning lines, are not used as slot values.
MAX_VALUE_CHARS = 60


# ----------------------------------------------------------------------------------------------------------------
# Formatted canaries
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Slot:
    """The values one template slot can take, indexed 0 .. size-1.

    Either an explicit tuple of distinct ``values``, or (``digits`` > 0) every zero-padded ``digits``-digit string,
    held lazily: ``Slot(digits=6)`` stands for "000000" .. "999999" without materialising them.
    """

    values: tuple[str, ...] = ()
    digits: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "values", tuple(self.values))
        if bool(self.values) == (self.digits > 0):
            raise MemlensError("a Slot needs either a non-empty tuple of values or digits >= 1, not both")
        if not 0 <= self.digits <= 18:
            raise MemlensError(f"Slot digits={self.digits}: expected 1 to 18")
        if len(set(self.values)) != len(self.values):
            dup = sorted({v for v in self.values if self.values.count(v) > 1})
            raise MemlensError(f"Slot values must be distinct; repeated: {dup[:5]}")

    @property
    def size(self) -> int:
        """Number of values."""
        return 10**self.digits if self.digits else len(self.values)

    def value(self, i: int) -> str:
        """The i-th value (digits: ``i`` zero-padded)."""
        if not 0 <= i < self.size:
            raise IndexError(f"slot value index {i} out of range 0..{self.size - 1}")
        return f"{int(i):0{self.digits}d}" if self.digits else self.values[i]

    def __contains__(self, v: object) -> bool:
        if self.digits:
            return isinstance(v, str) and len(v) == self.digits and v.isascii() and v.isdigit()
        return v in self.values

    def pattern(self) -> str:
        """A regular expression matching exactly the slot's values."""
        if self.digits:
            return f"[0-9]{{{self.digits}}}"
        return "|".join(re.escape(v) for v in sorted(self.values, key=len, reverse=True))


def _template_fields(template: str) -> list[tuple[str, str | None]]:
    """(literal text, field name or None) pieces of a ``str.format`` template; ``{{``/``}}`` are literal braces."""
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as e:
        raise MemlensError(f"canary template {template!r}: {e}") from None
    out = []
    for literal, name, spec, conv in parts:
        if name is not None and (not name.isidentifier() or spec or conv):
            raise MemlensError(f"canary template {template!r}: slot {{{name}}} must be a plain name like {{drug}}")
        out.append((literal, name))
    return out


@dataclass(frozen=True)
class CanaryFormat:
    """A template with named slots and the values each slot can take: the randomness space R of Carlini et al.

    Parameters
    ----------
    template : str
        A ``str.format`` template, e.g. ``"Patient {number} was given {dose} of {drug}."``; a slot may appear
        more than once (it takes the same value everywhere).
    slots : mapping of str to Slot or tuple of str
        Every slot of the template and its values; a tuple is turned into ``Slot(values=...)``. The mapping's order
        is the order of :meth:`enumerate` and :meth:`assignment` (last slot fastest, as :func:`itertools.product`).

    Notes
    -----
    R has ``space_size`` = the product of the slot sizes. Distinct assignments render distinct texts unless
    values of neighbouring slots can be split two ways (e.g. "{a}{b}" with a in {"x", "xy"}, b in {"yz", "z"});
    the canary formats memlens builds put literal words between slots, which rules this out.
    """

    template: str
    slots: Mapping[str, Slot]

    def __post_init__(self) -> None:
        slots = {k: v if isinstance(v, Slot) else Slot(values=tuple(v)) for k, v in dict(self.slots).items()}
        object.__setattr__(self, "slots", slots)
        used = {name for _, name in _template_fields(self.template) if name is not None}
        errors = []
        if not used:
            errors.append("it has no {slot}")
        if used - slots.keys():
            errors.append(f"no values given for slot(s) {sorted(used - slots.keys())}")
        if slots.keys() - used:
            errors.append(f"slot(s) {sorted(slots.keys() - used)} do not appear in it")
        if errors:
            raise MemlensError(f"canary template {self.template!r}: " + "; ".join(errors))

    @property
    def space_size(self) -> int:
        """|R|: the number of value assignments (an exact Python int)."""
        return math.prod(s.size for s in self.slots.values())

    @property
    def log2_space(self) -> float:
        """log2 |R|, the largest possible exposure."""
        return sum(math.log2(s.size) for s in self.slots.values())

    def render(self, values: Mapping[str, str]) -> str:
        """The text of one assignment; raises MemlensError for a missing, unknown or out-of-space value."""
        if values.keys() != self.slots.keys():
            raise MemlensError(f"canary values {sorted(values)} do not match the slots {sorted(self.slots)}")
        bad = [k for k, v in values.items() if v not in self.slots[k]]
        if bad:
            raise MemlensError(f"canary value(s) not in their slot: {', '.join(f'{k}={values[k]!r}' for k in bad)}")
        return self.template.format(**values)

    def assignment(self, index: int) -> dict[str, str]:
        """The ``index``-th assignment of R (0 <= index < space_size), in :meth:`enumerate` order."""
        if not 0 <= index < self.space_size:
            raise IndexError(f"assignment index {index} out of range 0..{self.space_size - 1}")
        index, out = int(index), {}
        for name, slot in reversed(self.slots.items()):
            index, i = divmod(index, slot.size)
            out[name] = slot.value(i)
        return {name: out[name] for name in self.slots}

    def sample(self, rng: np.random.Generator, n: int) -> list[dict[str, str]]:
        """``n`` independent uniform draws from R (each slot drawn independently and uniformly; repeats possible)."""
        idx = {name: rng.integers(slot.size, size=n) for name, slot in self.slots.items()}
        return [{name: slot.value(int(idx[name][j])) for name, slot in self.slots.items()} for j in range(n)]

    def enumerate(self) -> Iterator[dict[str, str]]:
        """Every assignment of R, lazily, last slot fastest. Only sensible when ``space_size`` is small."""
        names = list(self.slots)
        ranges = [range(s.size) for s in self.slots.values()]
        for combo in itertools.product(*ranges):
            yield {name: self.slots[name].value(i) for name, i in zip(names, combo)}

    def pattern(self) -> re.Pattern:
        """A regular expression whose full matches are exactly the texts of R."""
        out, seen = [], set()
        for literal, name in _template_fields(self.template):
            out.append(re.escape(literal))
            if name is None:
                continue
            out.append(f"(?P={name})" if name in seen else f"(?P<{name}>{self.slots[name].pattern()})")
            seen.add(name)
        return re.compile("".join(out), re.DOTALL)

    def __contains__(self, text: object) -> bool:
        """``text in fmt``: whether the text is one of R's texts."""
        return isinstance(text, str) and self.pattern().fullmatch(text) is not None


def canary_format(records: Sequence[Record], number_digits: int = 6, *,
                  template: str = CANARY_TEMPLATE) -> CanaryFormat:
    """The default canary format of a corpus: a random ID number plus a drug, dose and effect seen in the corpus.

    Parameters
    ----------
    records : sequence of Record
        The corpus; the values of the roles in :data:`SLOT_ROLES` found in ``Record.fields`` fill the slots.
    number_digits : int, default 6
        The ``number`` slot holds every zero-padded ``number_digits``-digit string (10**number_digits values).
    template : str, default :data:`CANARY_TEMPLATE`
        Its slots must be among ``number``, ``drug``, ``dose``, ``effect``.

    Returns
    -------
    CanaryFormat
        Slots in template order; value slots hold the sorted distinct corpus values of their role, skipping values
        longer than :data:`MAX_VALUE_CHARS` characters or containing a newline.

    Raises
    ------
    MemlensError
        A role with fewer than 2 usable distinct values (all such roles named at once); a template slot that is not
        one of the four; or a corpus text that is itself a text of R (a canary must never equal a corpus text, or
        its exposure would measure the corpus, not the canary).
    """
    if isinstance(number_digits, bool) or not isinstance(number_digits, int) or not 1 <= number_digits <= 18:
        raise MemlensError(f"number_digits={number_digits!r}: expected an integer from 1 to 18")
    names = [name for _, name in _template_fields(template) if name is not None]
    unknown = sorted(set(names) - SLOT_ROLES.keys() - {"number"})
    if unknown:
        raise MemlensError(f"canary template {template!r}: unknown slot(s) {unknown}; "
                           f"expected among {['number', *SLOT_ROLES]}")
    slots: dict[str, Slot] = {}
    errors = []
    for name in dict.fromkeys(names):
        if name == "number":
            slots[name] = Slot(digits=number_digits)
            continue
        role = SLOT_ROLES[name]
        values = sorted({v for r in records for v in r.fields.get(role, ())
                         if len(v) <= MAX_VALUE_CHARS and "\n" not in v and "\r" not in v})
        if len(values) < 2:
            errors.append(f"role {role!r} (slot {{{name}}}) has {len(values)} usable distinct value(s), needs 2")
        else:
            slots[name] = Slot(values=tuple(values))
    if errors:
        raise MemlensError("cannot build canaries from this corpus: " + "; ".join(errors))
    fmt = CanaryFormat(template, slots)
    pat = fmt.pattern()
    clash = [r.id for r in records if pat.fullmatch(r.text)]
    if clash:
        raise MemlensError(f"corpus record(s) {clash[:5]} are themselves possible canaries of {template!r}; "
                           "choose another template")
    return fmt


def draw_canaries(fmt: CanaryFormat, count: int, seed: int) -> list[dict[str, str]]:
    """``count`` distinct assignments of R, drawn uniformly without replacement with ``numpy.random.default_rng(seed)``.

    The same (format, count, seed) always gives the same canaries. Raises MemlensError when ``count`` is not between
    1 and ``fmt.space_size``.
    """
    size = fmt.space_size
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= size:
        raise MemlensError(f"canary count={count!r}: expected an integer from 1 to {size} (the size of the space)")
    rng = np.random.default_rng(seed)
    if size <= np.iinfo(np.int64).max:
        return [fmt.assignment(int(i)) for i in rng.choice(size, size=count, replace=False)]
    out: dict[tuple[str, ...], dict[str, str]] = {}  # a space this large: collisions are all but impossible
    while len(out) < count:
        for v in fmt.sample(rng, count - len(out)):
            out.setdefault(tuple(v.values()), v)
    return list(out.values())


# ----------------------------------------------------------------------------------------------------------------
# Exposure from scores
# ----------------------------------------------------------------------------------------------------------------


def _scores(canary_score, candidate_scores, min_candidates: int) -> tuple[float, np.ndarray]:
    c = np.asarray(canary_score, dtype=np.float64)
    s = np.asarray(candidate_scores, dtype=np.float64).ravel()
    if c.ndim != 0 or not np.isfinite(c):
        raise MemlensError(f"canary_score must be one finite number, got {canary_score!r}")
    if s.size < min_candidates:
        raise MemlensError(f"need at least {min_candidates} candidate score(s), got {s.size}")
    if not np.isfinite(s).all():
        raise MemlensError(f"candidate scores must be finite ({int((~np.isfinite(s)).sum())} are not)")
    return float(c), s


def _mid_rank(canary: float, candidates: np.ndarray) -> float:
    """1 + #(candidates strictly below the canary) + 0.5 * #(equal to it)."""
    return 1.0 + float(np.sum(candidates < canary)) + 0.5 * float(np.sum(candidates == canary))


def rank_exposure(canary_score: float, candidate_scores, space_size: int) -> float:
    """Exposure by interpolation: the canary's rank among N sampled candidates, scaled up to R.

    With N candidate scores (the canary excluded) and the canary's mid-rank among candidates plus canary
    ``r = 1 + #(candidates < s_c) + 0.5 * #(candidates == s_c)``, in 1 .. N + 1, the canary's rank in R is
    estimated as ``r * |R| / (N + 1)`` (the canary and the candidates are N + 1 draws from R, so ``r / (N + 1)``
    estimates the fraction of R ranked at or above it), floored at 1. The exposure is::

        log2 |R| - log2 max(1, r |R| / (N + 1))  =  min(log2(N + 1) - log2 r,  log2 |R|)

    Parameters
    ----------
    canary_score : float
        The canary's log-perplexity (nats; lower = more likely).
    candidate_scores : array-like of shape (N,)
        Log-perplexities of N >= 1 candidates drawn uniformly from R without the canary.
    space_size : int
        |R|, e.g. :attr:`CanaryFormat.space_size`.

    Returns
    -------
    float
        The exposure in bits, in ``[0, min(log2(N + 1), log2 |R|)]``.

    Notes
    -----
    * Exact on enumeration: when the candidates are all of R but the canary (N = |R| - 1), the result is exactly
      ``log2 |R| - log2 rank`` with the mid-rank of the canary in R, Carlini et al.'s definition.
    * Cap: a canary that beats every candidate gets ``log2(N + 1)`` (or ``log2 |R|`` if smaller), the most N
      samples can resolve; the true exposure may be higher (see :func:`skewnorm_exposure`). One that is worse than
      every candidate gets exactly 0, never less.
    * The value depends on |R| only through that floor: with N + 1 < |R| it is ``log2((N + 1) / r)``.
    * TF-Privacy's ``compute_exposure_interpolation`` uses ``log2 N - log2 r`` with strict ranks; the N + 1 and
      the mid-rank make the enumerated case exact and treat ties symmetrically.

    Examples
    --------
    >>> rank_exposure(1.0, [2.0, 3.0, 4.0], space_size=4)   # best of all 4 texts of R: log2 4
    2.0
    >>> rank_exposure(5.0, [2.0, 3.0, 4.0], space_size=10**6)  # worse than every candidate
    0.0
    """
    c, s = _scores(canary_score, candidate_scores, 1)
    if isinstance(space_size, bool) or not isinstance(space_size, (int, np.integer)) or space_size < 1:
        raise MemlensError(f"space_size must be a positive integer, got {space_size!r}")
    r = _mid_rank(c, s)
    return min(math.log2(s.size + 1) - math.log2(r), math.log2(int(space_size)))


_TAIL_SWITCH = -20.0  # nats: below this log CDF the tail integral replaces scipy's skewnorm.logcdf


def _skewnorm_logcdf(z: float, a: float) -> float:
    """log CDF of the standard skew-normal with shape ``a`` at ``z``, accurate far into the left tail.

    ``scipy.stats.skewnorm.logcdf`` takes the log of the CDF, which loses relative accuracy once the CDF is tiny
    and underflows to -inf below about 1e-308 (exposure > 1000 bits: a strongly memorized canary against
    right-skewed candidates). Below ``exp(-20)`` and left of the mode, the CDF is written as::

        log F(z) = log f(z) - log d + log integral_0^inf exp(log f(z - w/d) - log f(z)) dw,   d = (log f)'(z) > 0

    in which the integrand is at most exp(-w) (f is log-concave), so ``scipy.integrate.quad`` evaluates it to full
    relative accuracy, and ``log f`` comes from ``log_ndtr`` without underflow.
    """
    lc = float(stats.skewnorm.logcdf(z, a))
    if lc > _TAIL_SWITCH:
        return lc
    d = -z + a * math.exp(stats.norm.logpdf(a * z) - special.log_ndtr(a * z))  # (log f)'(z)
    if not d > 0:  # not left of the mode: keep scipy's value
        return lc
    lf0 = float(stats.skewnorm.logpdf(z, a))
    v, _ = integrate.quad(lambda w: math.exp(stats.skewnorm.logpdf(z - w / d, a) - lf0), 0, np.inf)
    return lf0 - math.log(d) + math.log(v)


def skewnorm_exposure(canary_score: float, candidate_scores) -> float:
    """Exposure by extrapolation: ``-log2 F(s_c)``, F the skew-normal fitted to the candidate scores.

    The skew-normal is fitted by maximum likelihood (``scipy.stats.skewnorm.fit``) to the N candidate scores; F(s_c)
    then estimates the fraction of R at least as likely as the canary, i.e. rank / |R|, so ``-log2 F(s_c)``
    estimates ``log2 |R| - log2 rank`` without reference to |R|.

    Parameters
    ----------
    canary_score : float
        The canary's log-perplexity (nats; lower = more likely).
    candidate_scores : array-like of shape (N,)
        Log-perplexities of N >= 3 candidates drawn uniformly from R without the canary; not all equal.

    Returns
    -------
    float
        The exposure in bits, >= 0 and not capped: it can exceed both log2(N + 1) and log2 |R|.

    Notes
    -----
    * Carlini et al. (Section 4.3) observe that candidate log-perplexities are close to skew-normal. The value is
      only as good as that fit: extrapolating from 500 candidates to a 1-in-4096 tail is accurate to within about
      half a bit when the scores really are skew-normal and the 500 are representative, but a random 500 moves
      the fitted tail by 1 to 3 bits at that depth (see tests/test_exposure.py).
    * The log CDF is computed stably far into the tail (:func:`_skewnorm_logcdf`), so a canary far below every
      candidate gets a large finite exposure rather than inf.

    References
    ----------
    Carlini et al. 2019, Section 4.3; TF-Privacy ``compute_exposure_extrapolation``.
    """
    c, s = _scores(canary_score, candidate_scores, 3)
    if np.ptp(s) == 0:
        raise MemlensError("candidate scores are all equal: no skew-normal can be fitted")
    a, loc, scale = stats.skewnorm.fit(s)
    return max(0.0, -_skewnorm_logcdf((c - loc) / scale, a) / math.log(2))


def exposure(canary_score: float, candidate_scores, space_size: int) -> dict:
    """Both exposure estimates of one canary.

    Returns
    -------
    dict
        ``rank_exposure`` (:func:`rank_exposure`, bits), ``skewnorm_exposure`` (:func:`skewnorm_exposure`, bits),
        ``n_candidates`` (N) and ``capped``: True when ``rank_exposure`` sits at its cap, because the canary beats every
        candidate (r = 1: the value is log2(N + 1), a lower bound; read ``skewnorm_exposure`` then) or because
        ``r |R| / (N + 1) <= 1`` (the value is log2 |R|, possible only when N + 1 >= |R|).
    """
    c, s = _scores(canary_score, candidate_scores, 3)
    rank = rank_exposure(c, s, space_size)
    r = _mid_rank(c, s)
    return {
        "rank_exposure": rank,
        "skewnorm_exposure": skewnorm_exposure(c, s),
        "n_candidates": int(s.size),
        "capped": bool(r == 1.0 or s.size + 1 >= r * int(space_size)),  # the estimated rank in R was floored at 1
    }


# ----------------------------------------------------------------------------------------------------------------
# The exposure probe of a run
# ----------------------------------------------------------------------------------------------------------------


def candidate_texts(fmt: CanaryFormat, canaries: Sequence[str], n: int, seed: int) -> list[str]:
    """``n`` texts drawn uniformly from R (seeded), none of them a canary: the texts each canary is ranked among."""
    rng = np.random.default_rng(seed)
    exclude, out = set(canaries), []
    while len(out) < n:
        out += [t for t in (fmt.render(v) for v in fmt.sample(rng, n - len(out))) if t not in exclude]
    return out


def exposure_rows(canaries: Sequence[tuple[str, int]], fmt: CanaryFormat, ft_scores: np.ndarray,
                  cand_ft: np.ndarray, base_scores: np.ndarray | None = None, cand_base: np.ndarray | None = None
                  ) -> tuple[list[tuple], dict]:
    """Exposure of every canary under the fine-tuned model (and the base model, the same canaries unseen).

    ``canaries``: (id, copies in the training set); scores are log-perplexities (total NLL, nats) of the canaries
    and of the candidates. Returns metric rows ``("exposure", id, rank exposure, None, None, details)`` and a
    summary with the per-canary values and their mean per repetition count.
    """
    rows, per = [], []
    for i, (cid, repeats) in enumerate(canaries):
        e = exposure(float(ft_scores[i]), cand_ft, fmt.space_size)
        entry = {"id": cid, "repeats": int(repeats), **e}
        if base_scores is not None:
            b = exposure(float(base_scores[i]), cand_base, fmt.space_size)
            entry.update({"base_rank_exposure": b["rank_exposure"], "base_skewnorm_exposure": b["skewnorm_exposure"],
                          "base_capped": b["capped"]})
        rows.append(("exposure", cid, e["rank_exposure"], None, None, entry))
        per.append(entry)
    by: dict[int, list[dict]] = {}
    for e in per:
        by.setdefault(e["repeats"], []).append(e)
    summary = {"template": fmt.template, "space_bits": fmt.log2_space, "n_candidates": int(len(cand_ft)),
               "max_rank_bits": math.log2(len(cand_ft) + 1), "canaries": per,
               "by_repeats": {str(r): {"n": len(es), "rank_exposure": float(np.mean([e["rank_exposure"] for e in es])),
                                       "skewnorm_exposure": float(np.mean([e["skewnorm_exposure"] for e in es])),
                                       **({"base_rank_exposure": float(np.mean([e["base_rank_exposure"] for e in es]))}
                                          if base_scores is not None else {})}
                              for r, es in sorted(by.items())}}
    return rows, summary
