"""Members, non-members and canaries, drawn by a seeded rule, with a manifest of what was used.

Rules
-----
* Members come from ``data.members.split`` and non-members from ``data.nonmembers.split``. When both name the same
  split, they are disjoint draws from one seeded permutation of it; otherwise each is a seeded sample of its split.
  ``n = None`` takes the whole split. The paper's default is members = PHEE train, non-members = PHEE test.
* Canaries (``data.canary``): ``count`` members are chosen at random and each appears ``repeats`` times in the
  training set, either by overwriting ``repeats - 1`` other members (the paper's code; the training set keeps its
  size and the overwritten records are *displaced*: in neither the member nor the non-member set) or by adding
  copies.
* Non-members that duplicate a member, exactly or nearly (Jaccard of word 3-gram sets), are dropped, reported or
  refused (``data.overlap``).
"""

from __future__ import annotations

import logging
import random
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memlens.config import DataConfig, SplitSpec
from memlens.data import phee, synthetic
from memlens.data.records import Record, file_sha256, read_csv
from memlens.errors import MemlensError
from memlens.provenance import json_hash

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------------------ corpora


@dataclass
class Corpus:
    """Records per split, and the files (with sha256) they were read from."""

    source: str
    splits: dict[str, list[Record]]
    files: dict[str, str] = field(default_factory=dict)

    @property
    def default_member_split(self) -> str:
        return "train" if "train" in self.splits else "all"

    @property
    def default_nonmember_split(self) -> str:
        return "test" if "test" in self.splits else "all"


def load_corpus(cfg: DataConfig) -> Corpus:
    kind, _, path = cfg.source.partition(":")
    if kind == "phee":
        folder = phee.locate(cfg.path, cfg.allow_download)
        files = {f"{s}.json": file_sha256(folder / f"{s}.json") for s in phee.SPLITS}
        return Corpus("phee", {s: phee.read_split(folder / f"{s}.json", s) for s in phee.SPLITS}, files)
    if kind == "synthetic":
        return Corpus("synthetic", synthetic.load(cfg.synthetic_size, seed=0), {})
    p = Path(path).expanduser()
    records = phee.read_jsonl_any(p) if kind == "jsonl" else read_csv(p)
    return Corpus(cfg.source, {"all": records}, {p.name: file_sha256(p)})


# ------------------------------------------------------------------------------------------------- near-duplicates


def normalise(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


def _shingles(text: str, n: int = 3) -> frozenset[str]:
    words = normalise(text).split()
    if len(words) < n:
        return frozenset([" ".join(words)])
    return frozenset(" ".join(words[i : i + n]) for i in range(len(words) - n + 1))


@dataclass(frozen=True)
class Overlap:
    a_id: str
    b_id: str
    kind: str  # "exact" (same normalised text) or "near"
    similarity: float


def find_overlaps(a: list[Record], b: list[Record], threshold: float = 0.8) -> list[Overlap]:
    """Pairs (x in a, y in b) whose normalised texts are equal, or whose word 3-gram Jaccard is >= threshold.

    Candidate pairs come from an inverted index of shingles, so the cost follows the number of pairs that share a
    3-gram, not |a| x |b|.
    """
    index: dict[str, list[int]] = defaultdict(list)
    a_sh = [_shingles(r.text) for r in a]
    a_norm = [normalise(r.text) for r in a]
    for i, sh in enumerate(a_sh):
        for s in sh:
            index[s].append(i)
    out = []
    for y in b:
        y_sh, y_norm = _shingles(y.text), normalise(y.text)
        counts: dict[int, int] = defaultdict(int)
        for s in y_sh:
            for i in index.get(s, ()):
                counts[i] += 1
        for i, inter in counts.items():
            jac = inter / (len(a_sh[i]) + len(y_sh) - inter)
            if a_norm[i] == y_norm:
                out.append(Overlap(a[i].id, y.id, "exact", 1.0))
            elif jac >= threshold:
                out.append(Overlap(a[i].id, y.id, "near", round(jac, 4)))
    return out


def handle_overlaps(members: list[Record], nonmembers: list[Record], policy: str, threshold: float = 0.8,
                    where: str = "") -> tuple[list[Record], list[Overlap]]:
    """Non-members that duplicate a member, exactly or nearly: dropped with a warning (``drop``), only warned about
    (``warn``) or refused (``error``). Returns the non-members kept and the overlaps found; ``where`` prefixes the
    message (the setting or file it concerns)."""
    overlaps = find_overlaps(members, nonmembers, threshold)
    if not overlaps:
        return nonmembers, overlaps
    ids = sorted({o.b_id for o in overlaps})
    msg = (f"{where}{len(ids)} non-member(s) duplicate a member ({sum(o.kind == 'exact' for o in overlaps)} "
           f"exact): {', '.join(ids[:5])}{' ...' if len(ids) > 5 else ''}")
    if policy == "error":
        raise MemlensError(msg)
    if policy == "warn":
        log.warning(msg)
        return nonmembers, overlaps
    log.warning("%s; dropped from the non-members", msg)
    dropped = set(ids)
    return [r for r in nonmembers if r.id not in dropped], overlaps


# ------------------------------------------------------------------------------------------------------------- splits


@dataclass
class Split:
    """What a run trains on and what it audits.

    ``train`` is the training list (canaries repeated); ``members`` the distinct records in it; ``nonmembers``
    records never trained on; ``canaries`` maps a canary id to its number of copies in ``train``.
    """

    train: list[Record]
    members: list[Record]
    nonmembers: list[Record]
    canaries: dict[str, int]
    displaced: list[Record]
    overlaps: list[Overlap]
    manifest: dict[str, Any]
    formatted: list[tuple[Record, int]] = field(default_factory=list)  # formatted canaries and their copies
    canary_format: Any = None  # their space R (memlens.exposure.CanaryFormat)
    one_run: list[tuple[Record, bool]] = field(default_factory=list)  # one-run audit canaries, trained on or not


def _draw(pool: list[Record], n: int | None, rng: random.Random, what: str, split: str) -> list[Record]:
    if n is None:
        return list(pool)
    if n > len(pool):
        raise MemlensError(f"data.{what}.n: {n} records asked from split {split!r}, which holds {len(pool)}")
    return rng.sample(pool, n)


def make_split(corpus: Corpus, cfg: DataConfig) -> Split:
    m_split = cfg.members.split or corpus.default_member_split
    n_split = cfg.nonmembers.split or corpus.default_nonmember_split
    for what, name in (("members", m_split), ("nonmembers", n_split)):
        if name not in corpus.splits:
            raise MemlensError(
                f"data.{what}.split: {name!r} is not a split of {corpus.source} (has {', '.join(corpus.splits)})"
            )
    rng = random.Random(cfg.seed)
    if m_split == n_split:
        pool = list(corpus.splits[m_split])
        rng.shuffle(pool)
        n_m = cfg.members.n
        n_n = cfg.nonmembers.n
        if n_m is None or n_n is None:
            raise MemlensError(
                f"data.members.n and data.nonmembers.n must both be set when both draw from split {m_split!r}"
            )
        if n_m + n_n > len(pool):
            raise MemlensError(
                f"data.members.n + data.nonmembers.n = {n_m + n_n} exceeds the {len(pool)} records of split {m_split!r}"
            )
        members, nonmembers = pool[:n_m], pool[n_m : n_m + n_n]
    else:
        members = _draw(corpus.splits[m_split], cfg.members.n, rng, "members", m_split)
        nonmembers = _draw(corpus.splits[n_split], cfg.nonmembers.n, rng, "nonmembers", n_split)

    train, canaries, displaced = apply_canaries(members, cfg.canary.repeats, cfg.canary.count, cfg.canary.mode, rng)
    displaced_ids = {r.id for r in displaced}
    members = [r for r in members if r.id not in displaced_ids]

    nonmembers, overlaps = handle_overlaps(members, nonmembers, cfg.overlap, cfg.near_duplicate_threshold,
                                           f"data.overlap={cfg.overlap}: " if cfg.overlap == "error" else "")
    if not members or not nonmembers:
        raise MemlensError("the split leaves no members or no non-members")
    formatted, fmt = [], None
    if cfg.canary.formatted is not None:
        formatted, fmt = formatted_canaries(corpus, cfg)
        for rec, copies in formatted:
            train.extend([rec] * copies)
    one_run = []
    if cfg.canary.one_run is not None:
        one_run = one_run_canaries(corpus, cfg, {r.text for r, _ in formatted})
        train.extend(r for r, included in one_run if included)
    split = Split(train, members, nonmembers, canaries, displaced, overlaps, {}, formatted, fmt, one_run)
    split.manifest = build_manifest(corpus, cfg, split, m_split, n_split)
    return split


def records_apart(corpus: Corpus, split: Split, name: str, threshold: float, what: str) -> list[Record]:
    """The records of split ``name`` apart from everything the run trains on or audits: not one of them by id, nor
    a near-duplicate of an audited record (``what`` names the setting in errors and logs)."""
    if name not in corpus.splits:
        raise MemlensError(f"{what}.split: {name!r} is not a split of {corpus.source} (has {', '.join(corpus.splits)})")
    used = {r.id for r in (*split.train, *split.members, *split.nonmembers, *split.displaced)}
    pool = [r for r in corpus.splits[name] if r.id not in used]
    audited = list(split.members) + list(split.nonmembers) + list(split.displaced)
    dup = {o.b_id for o in find_overlaps(audited, pool, threshold)}
    if dup:
        log.info("%s: %d record(s) duplicate an audited record and are left out", what, len(dup))
        pool = [r for r in pool if r.id not in dup]
    return pool


def validation_records(corpus: Corpus, cfg: DataConfig, split: Split, spec: SplitSpec) -> list[Record]:
    """Early stopping's validation records (``train.early_stopping.split``), drawn with ``data.seed``."""
    name = spec.split or ("dev" if "dev" in corpus.splits else corpus.default_member_split)
    pool = records_apart(corpus, split, name, cfg.near_duplicate_threshold, "train.early_stopping.split")
    if spec.n is not None:
        if spec.n > len(pool):
            raise MemlensError(f"train.early_stopping.split.n: {spec.n} asked, split {name!r} holds {len(pool)} "
                               "records apart from the trained and audited ones")
        pool = random.Random(cfg.seed).sample(pool, spec.n)
    if not pool:
        raise MemlensError(f"train.early_stopping.split: split {name!r} has no record apart from the trained and "
                           "audited ones")
    return pool


def apply_canaries(
    members: list[Record], repeats: int, count: int, mode: str, rng: random.Random
) -> tuple[list[Record], dict[str, int], list[Record]]:
    """Return (training list, {canary id: copies}, displaced records). ``repeats == 1`` leaves the data unchanged."""
    if repeats == 1:
        return list(members), {}, []
    needed = count * repeats if mode == "overwrite" else count
    if needed > len(members):
        raise MemlensError(
            f"data.canary: {count} canaries x {repeats} repeats need {needed} members, but there are {len(members)}"
        )
    positions = rng.sample(range(len(members)), needed)
    train = list(members)
    canary_pos = positions[:count]
    canaries = {members[p].id: repeats for p in canary_pos}
    displaced = []
    if mode == "overwrite":
        # As in the paper's code: each of the repeats-1 chosen rows is replaced, id and all, by the canary.
        for c, p in enumerate(canary_pos):
            for q in positions[count + c * (repeats - 1) : count + (c + 1) * (repeats - 1)]:
                displaced.append(members[q])
                train[q] = members[p]
    else:
        for p in canary_pos:
            train.extend([members[p]] * (repeats - 1))
    return train, canaries, displaced


def formatted_canaries(corpus: Corpus, cfg: DataConfig) -> tuple[list[tuple[Record, int]], Any]:
    """The formatted canaries of ``data.canary.formatted`` (see :mod:`memlens.exposure`): ``per_repeat`` new texts
    for each repetition count, with slot values from the corpus's annotated drugs, doses and effects (the synthetic
    corpus's vocabulary when the corpus has no such annotations)."""
    spec = cfg.canary.formatted
    texts, fmt = _canary_texts(corpus, spec.digits, spec.per_repeat * len(spec.repeats), spec.seed,
                               "data.canary.formatted")
    out = [(Record(f"canary-{i:03d}", text, "canary"), spec.repeats[i // spec.per_repeat])
           for i, text in enumerate(texts)]
    return out, fmt


def _canary_texts(corpus: Corpus, digits: int, count: int, seed: int, what: str,
                  avoid: frozenset[str] | set[str] = frozenset()) -> tuple[list[str], Any]:
    """``count`` distinct canary texts of the corpus's canary format (slot values from its annotated fields, or
    the synthetic corpus's vocabulary), none equal to a corpus text or to one in ``avoid``."""
    from memlens.exposure import canary_format, draw_canaries

    every = [r for recs in corpus.splits.values() for r in recs]
    try:
        fmt = canary_format(every, digits)
    except MemlensError as e:
        if any(r.fields for r in every):
            raise MemlensError(f"{what}: {e}") from None
        log.info("%s: the corpus has no annotated fields; slot values from the synthetic corpus", what)
        fmt = canary_format(synthetic.generate(500, seed=0), digits)
    try:
        texts = [fmt.render(v) for v in draw_canaries(fmt, count, seed)]
    except MemlensError as e:
        raise MemlensError(f"{what}: {e}") from None
    clash = ({r.text for r in every} | set(avoid)) & set(texts)
    if clash:
        raise MemlensError(f"{what}: a canary equals a corpus text or another canary; change {what}.seed")
    return texts, fmt


def one_run_canaries(corpus: Corpus, cfg: DataConfig, avoid: set[str]) -> list[tuple[Record, bool]]:
    """The one-run audit's canaries (``data.canary.one_run``), each trained on with probability 1/2."""
    import numpy as np

    spec = cfg.canary.one_run
    texts, _ = _canary_texts(corpus, spec.digits, spec.count, spec.seed, "data.canary.one_run", avoid)
    included = np.random.default_rng([spec.seed, 1]).random(spec.count) < 0.5
    return [(Record(f"onerun-{i:04d}", t, "canary"), bool(inc)) for i, (t, inc) in enumerate(zip(texts, included))]


def build_manifest(corpus: Corpus, cfg: DataConfig, split: Split, m_split: str, n_split: str) -> dict[str, Any]:
    """Ids of everything used (never the raw text, nor a hash of one record's text), a digest of each list, counts,
    seed, and the manifest's own hash."""
    body = {
        "source": corpus.source,
        "files": corpus.files,
        "seed": cfg.seed,
        "member_split": m_split,
        "nonmember_split": n_split,
        "counts": {
            "train": len(split.train),
            "members": len(split.members),
            "nonmembers": len(split.nonmembers),
            "canaries": len(split.canaries),
            "displaced": len(split.displaced),
            "formatted_canaries": len(split.formatted),
            "overlaps": len(split.overlaps),
        },
        "canaries": split.canaries,
        "formatted_canaries": {r.id: copies for r, copies in split.formatted},
        # (only where there are some: the manifests, and their hashes, of other runs stay as they were)
        **({"one_run_canaries": {r.id: inc for r, inc in split.one_run}} if split.one_run else {}),
        # ids only, and one digest of each whole list: a per-record hash of the text beside its role would let a
        # reader who guesses a sentence test whether it was trained on
        "members": [r.id for r in split.members],
        "nonmembers": [r.id for r in split.nonmembers],
        "members_digest": json_hash([[r.id, r.text_hash] for r in split.members]),
        "nonmembers_digest": json_hash([[r.id, r.text_hash] for r in split.nonmembers]),
        "train": [r.id for r in split.train],
        "displaced": [r.id for r in split.displaced],
        "overlaps": [[o.a_id, o.b_id, o.kind, o.similarity] for o in split.overlaps],
    }
    body["hash"] = json_hash(body)
    return body
