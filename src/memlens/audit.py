"""The audit: score members and non-members under the base and the fine-tuned model, attack, extract, measure.

Recipes
-------
* :func:`run_config`: ``memlens run``: fine-tune one configuration, audit it, store the results.
* :func:`audit_adapter`: ``memlens audit``: the same audit for an adapter trained elsewhere.

Both end in one transaction of the results store (see :mod:`memlens.store`).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import random
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from memlens import metrics as M
from memlens.attacks import attack_scores
from memlens.config import AuditConfig, RunConfig
from memlens.data.records import Record
from memlens.errors import MemlensError
from memlens.extraction import Decoding, extract, summarize
from memlens.blind import blind_baseline
from memlens.membership import attack_rows
from memlens.models import LoadedModel, at_precision, effective_precision, resolve_precision
from memlens.paths import cache_dir
from memlens.provenance import json_hash
from memlens.scoring import SampleStats, score, zlib_length

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------- cached base statistics


def _cache_secret() -> bytes:
    """A random key of this cache (``CACHE/stats/.key``, user-only), made once: records are found in the cache by a
    keyed hash of their token ids, so the cache holds nothing a reader could match a guessed sentence against."""
    return _secret_at(str(cache_dir() / "stats" / ".key"))


@functools.lru_cache(maxsize=8)
def _secret_at(where: str) -> bytes:
    import secrets

    path = Path(where)
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it first
            return bytes.fromhex(path.read_text().strip())
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return bytes.fromhex(path.read_text().strip())


def _ids_hash(ids: list[int]) -> str:
    import hmac

    return hmac.new(_cache_secret(), np.asarray(ids, dtype=np.int64).tobytes(), hashlib.sha256).hexdigest()[:32]


class StatsCache:
    """Per-record statistics of one scorer (a model at a precision, with settings), kept in one ``.npz`` file under
    the cache and keyed by each record's token ids: a record is scored once, whichever run or study asks again."""

    def __init__(self, key: dict[str, Any]):
        self.path = cache_dir() / "stats" / f"{json_hash(key)[:32]}.npz"
        self.arrays: dict[str, np.ndarray] = {}
        if self.path.is_file():
            with np.load(self.path, allow_pickle=False) as z:
                self.arrays = {k: z[k] for k in z.files}
        self._index = {h: i for i, h in enumerate(self.arrays.get("hashes", np.array([], dtype="U32")).tolist())}

    def missing(self, seqs: list[list[int]]) -> list[int]:
        return [i for i, s in enumerate(seqs) if _ids_hash(s) not in self._index]

    def add(self, seqs: list[list[int]], stats: SampleStats) -> None:
        new = stats.to_arrays()
        merged = {"hashes": np.concatenate([self.arrays.get("hashes", np.array([], dtype="U32")),
                                            np.array([_ids_hash(s) for s in seqs], dtype="U32")])}
        for k, v in new.items():
            merged[k] = np.concatenate([self.arrays[k], v]) if k in self.arrays else v
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, suffix=".npz")
        os.close(fd)
        np.savez(tmp, **merged)
        os.replace(tmp, self.path)
        self.arrays = merged
        self._index = {h: i for i, h in enumerate(merged["hashes"].tolist())}

    def get(self, seqs: list[list[int]]) -> SampleStats:
        idx = np.array([self._index[_ids_hash(s)] for s in seqs], dtype=np.int64)
        return SampleStats.from_arrays({k: v[idx] for k, v in self.arrays.items() if k != "hashes"})


def stats_key(identity: str, model: Any, cfg: AuditConfig, min_k_pp: bool = True) -> dict[str, Any]:
    device = next(model.parameters()).device
    precision = effective_precision(model, resolve_precision(cfg.precision, device))
    return {"model": identity, "dtype": precision, "device": device.type, "ks": sorted(cfg.ks), "min_k_pp": min_k_pp}


def stats_cache(lm: LoadedModel, model: Any, seqs: list[list[int]], cfg: AuditConfig, *,
                identity: str | None = None, min_k_pp: bool = True) -> StatsCache:
    """The cache that holds (or will hold) the statistics of ``seqs`` under ``model`` (see :func:`cached_score`)."""
    key = stats_key(identity or lm.info.get("identity", lm.info["source"]), model, cfg, min_k_pp)
    if key["dtype"] != "float32":
        # In half precision a record's statistics depend on the other records of its batch (up to ~0.04 nats on
        # SmolLM2 in bf16), so records are never reused from another set: the pass is over this whole set, in its
        # length-sorted batches, and the same set always gives the same numbers. In float32 they agree to 1e-5
        # whatever the batch, and each record is scored once across sets.
        key.update({"set": json_hash([_ids_hash(s) for s in seqs]), "batch_size": cfg.batch_size})
    return StatsCache(key)


def cached_score(lm: LoadedModel, model: Any, seqs: list[list[int]], cfg: AuditConfig, pad_id: int,
                 progress: bool = False, *, identity: str | None = None, min_k_pp: bool = True,
                 label: str = "score base") -> SampleStats:
    """Statistics of ``seqs`` under a model that does not depend on the run (the *base* model by default, or a
    reference adapter named by ``identity``), cached per record (keyed by model, settings and token ids).

    A study scores the same records under the same base model run after run: each record is scored once.
    """
    cache = stats_cache(lm, model, seqs, cfg, identity=identity, min_k_pp=min_k_pp)
    missing = cache.missing(seqs)
    if missing:
        device = next(model.parameters()).device
        precision = effective_precision(model, resolve_precision(cfg.precision, device))
        part = [seqs[i] for i in missing]
        new = score(at_precision(model, precision), part, batch_size=cfg.batch_size, pad_id=pad_id, ks=cfg.ks,
                    min_k_pp=min_k_pp, progress=label if progress else None)
        cache.add(part, new)
    return cache.get(seqs)


# ------------------------------------------------------------------------------------------------------- the audit


@dataclass
class AuditOutput:
    """Everything a run stores, as rows for :func:`memlens.store.write_run`."""

    samples: list[tuple] = field(default_factory=list)
    values: list[tuple] = field(default_factory=list)
    generations: list[tuple] = field(default_factory=list)
    metrics: list[tuple] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


def _ppl(stats: SampleStats) -> float:
    return float(np.exp(stats.corpus_mean_nll()))


def audit(lm: LoadedModel, model_ft: Any, base: SampleStats, records: list[Record], member: np.ndarray,
          seqs: list[list[int]], canaries: dict[str, int], cfg: AuditConfig, pad_id: int,
          progress: bool = False, refs: Any = None) -> AuditOutput:
    """Attack, extract and measure, given the base statistics of ``records`` (in the same order).

    ``member`` holds 1 for members and 0 for non-members; ``canaries`` maps a canary id to its copies; ``refs``
    (a :class:`memlens.references.ReferenceAudit`) adds the attacks that use reference adapters.
    """
    with warnings.catch_warnings():
        # degenerate inputs (a constant score, too few points) give nan correlations: stored as such, not warned
        warnings.simplefilter("ignore", M.MemlensUndefinedMetricWarning)
        return _audit(lm, model_ft, base, records, member, seqs, canaries, cfg, pad_id, progress, refs)


def _audit(lm: LoadedModel, model_ft: Any, base: SampleStats, records: list[Record], member: np.ndarray,
           seqs: list[list[int]], canaries: dict[str, int], cfg: AuditConfig, pad_id: int,
           progress: bool, refs: Any) -> AuditOutput:
    out = AuditOutput()
    t = time.perf_counter()
    model_ft = at_precision(model_ft, resolve_precision(cfg.precision, next(model_ft.parameters()).device))
    ft = score(model_ft, seqs, batch_size=cfg.batch_size, pad_id=pad_id, ks=cfg.ks, min_k_pp=True,
               progress="score fine-tuned" if progress else None)
    out.timings["score_ft_s"] = time.perf_counter() - t

    t = time.perf_counter()
    zl = np.array([zlib_length(r.text) for r in records], dtype=np.float64)
    scores = attack_scores(ft, base, zl, k=cfg.min_k, attacks=tuple(cfg.attacks))
    y = member.astype(int)
    for r, m in zip(records, y):
        out.samples.append((r.id, int(m), r.text_hash, canaries.get(r.id, 1 if m else 0),
                            r.text if cfg.include_text else None))
    per_sample = {"n_tokens": ft.n_tokens, "nll_base": base.mean_nll, "nll_ft": ft.mean_nll,
                  "ppl_base": base.perplexity, "ppl_ft": ft.perplexity, "zlib_bytes": zl}
    for k in cfg.ks:
        per_sample[f"min_k_{k:g}_base"], per_sample[f"min_k_{k:g}_ft"] = base.min_k[k], ft.min_k[k]
        per_sample[f"min_k_pp_{k:g}_base"], per_sample[f"min_k_pp_{k:g}_ft"] = base.min_k_pp[k], ft.min_k_pp[k]
    per_sample.update({f"score_{a}": s for a, s in scores.items()})
    for name, arr in per_sample.items():
        out.values.extend((r.id, name, float(v)) for r, v in zip(records, arr))

    # canaries are scored apart: a record repeated on purpose is not a sample of what the fine-tune leaks, and it
    # must not lift the member-vs-non-member AUC (see canary_rows for how each one ranks)
    keep = np.array([r.id not in canaries for r in records], dtype=bool)
    yk = y[keep]
    rows, headline = attack_rows(yk, {a: s[keep] for a, s in scores.items()}, cfg.fpr, cfg.bootstrap)
    out.metrics.extend(rows)
    blind = None
    if cfg.blind:
        blind = blind_baseline([r.text for r, k in zip(records, keep) if k], yk)
        out.metrics.append(("blind:auc", "blind", blind["auc"], blind["lo"], blind["hi"], blind))
    references = None
    if refs is not None:
        references = refs.attach(out, records, y, scores, ft, model_ft, cfg, pad_id, progress, keep)
        headline.update(references.pop("headline"))
    canary_summary = canary_rows(out, records, y, keep, scores, canaries)
    mem, non = base.subset((y == 1) & keep), base.subset(y == 0)
    ftm, ftn = ft.subset((y == 1) & keep), ft.subset(y == 0)
    ppl = {"members_base": _ppl(mem), "members_ft": _ppl(ftm), "nonmembers_base": _ppl(non),
           "heldout_ft": _ppl(ftn)}
    for k, v in ppl.items():
        out.metrics.append(("perplexity", k, v, None, None, {"token_weighted": True}))
    out.timings["attacks_s"] = time.perf_counter() - t

    extraction: list[dict] = []
    if cfg.extraction is not None:
        t = time.perf_counter()
        ex = cfg.extraction
        rng = random.Random(ex.seed)
        canary_idx = [i for i in range(len(records)) if records[i].id in canaries]
        mem_idx = [i for i in range(len(records)) if y[i] == 1 and records[i].id not in canaries]
        non_idx = [i for i in range(len(records)) if y[i] == 0]
        pick_m = mem_idx if ex.n is None or ex.n >= len(mem_idx) else rng.sample(mem_idx, ex.n)
        pick_m = sorted(set(pick_m) | set(canary_idx))
        pick_n = non_idx if ex.n is None or ex.n >= len(non_idx) else rng.sample(non_idx, ex.n)
        chosen = pick_m + sorted(pick_n)
        decodings = ([Decoding(None)] if ex.greedy else []) + [
            Decoding(tmp, ex.top_p, ex.samples) for tmp in ex.temperatures]
        rows = extract(model_ft, [seqs[i] for i in chosen], [bool(y[i]) for i in chosen], decodings,
                       pad_id=pad_id, eos_id=lm.tokenizer.eos_token_id, rule=ex.prefix, fraction=ex.prefix_fraction,
                       length=ex.prefix_length, batch_size=ex.batch_size, seed=ex.seed,
                       progress=progress)
        for r in rows:
            rec = records[chosen[r.index]]
            text = lm.tokenizer.decode(r.continuation) if cfg.include_text else None
            out.generations.append((rec.id, int(r.member), r.decoding, r.sample, r.prefix_len, r.suffix_len,
                                    *(r.scores[m] for m in ("ngram_share", "exact", "prefix_match", "rouge_l",
                                                             "edit_sim")), r.gen_ppl, text))
        extraction = summarize(rows, {j for j, i in enumerate(chosen) if records[i].id in canaries})
        for s in extraction:
            out.metrics.append((f"extraction:{s['measure']}", s["decoding"], s["members"], None, None, s))
        # the paper's Fig. 3.4/3.5: memorization (n-gram share) against fine-tuned and base perplexity, members
        for label in dict.fromkeys(r.decoding for r in rows):
            sel = [r for r in rows if r.decoding == label and r.member and r.sample == 0
                   and records[chosen[r.index]].id not in canaries]
            share = np.array([r.scores["ngram_share"] for r in sel])
            pos = [chosen[r.index] for r in sel]
            for which, px in (("ppl_ft", ft.perplexity[pos]), ("ppl_base", base.perplexity[pos])):
                c = M.correlation(px, share, "pearson")
                out.metrics.append(("pearson", f"ngram_share~{which} ({label})", c.r, c.lo, c.hi,
                                    {**c.as_dict(), "r2": c.r * c.r if c.r == c.r else None}))
        out.timings["extraction_s"] = time.perf_counter() - t
    out.summary = {"attacks": headline, "perplexity": ppl, "extraction": extraction,
                   "n_members": int(yk.sum()), "n_nonmembers": int((1 - yk).sum())}
    if canary_summary:
        out.summary["canaries"] = canary_summary
    if references is not None:
        out.summary["references"] = references
    if blind is not None:
        out.summary["blind"] = blind
    return out


def canary_rows(out: AuditOutput, records: list[Record], y: np.ndarray, keep: np.ndarray,
                scores: dict[str, np.ndarray], canaries: dict[str, int]) -> dict[str, dict[str, Any]]:
    """How each canary (a member repeated on purpose) ranks under each attack: the share of non-members scored at
    least as high (its false-positive rate if it were the threshold; 0 = above every non-member)."""
    summary: dict[str, dict[str, Any]] = {}
    non = (y == 0) & keep
    for i, r in enumerate(records):
        if r.id not in canaries:
            continue
        entry: dict[str, Any] = {"copies": canaries[r.id]}
        for a, s in scores.items():
            share = float((s[non] >= s[i]).mean())
            entry[a] = share
            out.metrics.append(("canary:fpr_rank", f"{a}:{r.id}", share, None, None,
                                {"copies": canaries[r.id], "n_nonmembers": int(non.sum())}))
        summary[r.id] = entry
    return summary


# --------------------------------------------------------------------------------------------------------- recipes


@dataclass
class ExposureInputs:
    """The formatted canaries of a run and their candidates, tokenized, with base-model scores taken before the
    run's adapter is attached (see :mod:`memlens.exposure`)."""

    canaries: list[tuple[str, int]]
    fmt: Any
    seqs: list[list[int]]  # canaries, then candidates
    base: np.ndarray  # total NLL under the base model
    seconds: float

    @classmethod
    def prepare(cls, prep: Any, cfg: RunConfig, progress: bool) -> ExposureInputs:
        from memlens.exposure import candidate_texts

        t = time.perf_counter()
        split = prep.split
        texts = [r.text for r, _ in split.formatted]
        cands = candidate_texts(split.canary_format, texts, cfg.audit.exposure.candidates, cfg.audit.exposure.seed)
        seqs = prep.lm.encode(texts + cands, cfg.train.add_bos, cfg.train.max_length, cfg.train.too_long,
                              "canary")
        base = cached_score(prep.lm, prep.lm.model, seqs, cfg.audit, prep.pad_id, progress, min_k_pp=False,
                            label="score canaries (base)").sum_nll
        return cls([(r.id, n) for r, n in split.formatted], split.canary_format, seqs, base,
                   time.perf_counter() - t)

    def measure(self, model_ft: Any, cfg: RunConfig, pad_id: int, progress: bool) -> tuple[list[tuple], dict]:
        from memlens.exposure import exposure_rows

        model = at_precision(model_ft, resolve_precision(cfg.audit.precision, next(model_ft.parameters()).device))
        ft = score(model, self.seqs, batch_size=cfg.audit.batch_size, pad_id=pad_id,
                   progress="score canaries (fine-tuned)" if progress else None).sum_nll
        c = len(self.canaries)
        return exposure_rows(self.canaries, self.fmt, ft[:c], ft[c:], self.base[:c], self.base[c:])


@dataclass
class OneRunInputs:
    """The one-run audit's canaries (see :mod:`memlens.one_run`), tokenized, with their base-model mean NLL taken
    before the run's adapter is attached."""

    ids: list[str]
    included: list[bool]
    seqs: list[list[int]]
    base: np.ndarray

    @classmethod
    def prepare(cls, prep: Any, cfg: RunConfig, progress: bool) -> OneRunInputs:
        canaries = prep.split.one_run
        seqs = prep.lm.encode([r.text for r, _ in canaries], cfg.train.add_bos, cfg.train.max_length,
                              cfg.train.too_long, "one-run canary")
        base = cached_score(prep.lm, prep.lm.model, seqs, cfg.audit, prep.pad_id, progress, min_k_pp=False,
                            label="score one-run canaries (base)").mean_nll
        return cls([r.id for r, _ in canaries], [inc for _, inc in canaries], seqs, base)

    def measure(self, model_ft: Any, cfg: RunConfig, pad_id: int, progress: bool,
                dp: dict[str, Any] | None) -> tuple[list[tuple], dict[str, Any]]:
        from memlens import one_run

        spec = cfg.data.canary.one_run
        model = at_precision(model_ft, resolve_precision(cfg.audit.precision, next(model_ft.parameters()).device))
        ft = score(model, self.seqs, batch_size=cfg.audit.batch_size, pad_id=pad_id,
                   progress="score one-run canaries" if progress else None).mean_nll
        k = spec.guesses if spec.guesses is not None else max(1, len(self.ids) // 10)
        delta = dp["delta"] if dp is not None else 0.0
        out = one_run.audit(self.base, ft, self.included, k, delta, spec.confidence)
        if dp is not None:
            out["epsilon_accountant"] = dp["epsilon_spent"]
        row = ("one_run:epsilon_lb", "", out["epsilon_lb"], None, None, out)
        return [row], out


@dataclass
class RunResult:
    run_id: str
    store: Path
    run_dir: Path | None
    summary: dict[str, Any]


def store_path(cfg: RunConfig) -> Path:
    return Path(cfg.store) if cfg.store else Path(cfg.output_dir) / "memlens.sqlite"


def _audit_records(split) -> tuple[list[Record], np.ndarray]:
    records = list(split.members) + list(split.nonmembers)
    member = np.array([1] * len(split.members) + [0] * len(split.nonmembers))
    return records, member


def compute_run(cfg: RunConfig, *, progress: bool = True, study: str | None = None,
                overwrite: bool = False) -> dict[str, Any]:
    """Fine-tune and audit one configuration; write its run folder; return the store record (nothing stored yet).

    The record is plain data, so a worker process or a Ray task can hand it back to the process that owns the store.
    ``overwrite``: replace this same run's folder if it exists (never another folder).
    """
    from memlens.finetune import (check_run_folder, prepare, run_name, state_path, train, train_summary,
                                  training_state, write_run_folder)
    from memlens.training_state import discard

    from memlens.provenance import versions

    versions()  # read the commit now, not when the run is written
    run_id = cfg.config_hash()
    run_dir = Path(cfg.output_dir) / run_name(cfg)
    check_run_folder(run_dir, run_id, overwrite)
    t0 = time.perf_counter()
    prep = prepare(cfg)
    timings = dict(prep.timings)
    records, member = _audit_records(prep.split)
    seqs = prep.lm.encode([r.text for r in records], cfg.train.add_bos, cfg.train.max_length, cfg.train.too_long,
                          "audited")
    t = time.perf_counter()
    base = cached_score(prep.lm, prep.lm.model, seqs, cfg.audit, prep.pad_id, progress)  # before the adapter
    timings["score_base_s"] = time.perf_counter() - t
    refs = None
    if cfg.audit.references is not None:  # before the run's own adapter is attached to the base model
        from memlens.finetune import plan_steps
        from memlens.references import prepare_references

        refs = prepare_references(prep.lm, cfg, prep.corpus, prep.split, records, seqs, len(prep.split.members),
                                  plan_steps(len(prep.train_ids), cfg.train)[1], progress)
    expo = ExposureInputs.prepare(prep, cfg, progress) if prep.split.formatted else None
    one_run = OneRunInputs.prepare(prep, cfg, progress) if prep.split.one_run else None
    keep = np.array([r.id not in prep.split.canaries for r in records], dtype=bool)  # canaries are scored apart
    trajectory = None
    if cfg.audit.checkpoints is not None:
        from memlens.trajectory import Trajectory

        zl = np.array([zlib_length(r.text) for r in records], dtype=np.float64)
        trajectory = Trajectory(seqs, base, zl, member, keep, cfg.audit, prep.pad_id, progress,
                                eos_id=prep.lm.tokenizer.eos_token_id)
    games = None
    if cfg.audit.fields is not None:  # the base model's part before the adapter is attached
        from memlens.fields import FieldGames, value_pool

        pool = value_pool([r for recs in prep.corpus.splits.values() for r in recs], cfg.audit.fields.types)
        games = FieldGames.prepare(prep.lm, records, member, keep, pool, cfg.audit, cfg.train.add_bos,
                                   cfg.train.max_length, progress)
    tr, state = None, None
    if cfg.reuse_training:
        from memlens.reuse import find_trained

        tr = find_trained(cfg, prep)
    if tr is None:
        state = training_state(cfg, run_id, state_path(cfg), hooked=trajectory is not None)
        tr = train(cfg, prep, progress, hooks=[trajectory] if trajectory is not None else [], state=state)
        timings["train_s"] = tr.seconds
    else:
        timings["train_s"] = 0.0
        timings["reuse_s"] = tr.reused_from["load_s"]
    out = audit(prep.lm, tr.model, base, records, member, seqs, prep.split.canaries, cfg.audit, prep.pad_id,
                progress, refs)
    if expo is not None:
        t = time.perf_counter()
        rows, out.summary["exposure"] = expo.measure(tr.model, cfg, prep.pad_id, progress)
        out.metrics.extend(rows)
        timings["exposure_s"] = time.perf_counter() - t + expo.seconds
    if games is not None:
        t = time.perf_counter()
        rows, out.summary["fields"] = games.measure(tr.model, prep.lm, cfg.audit, cfg.train.add_bos,
                                                    cfg.train.max_length, progress)
        out.metrics.extend(rows)
        timings["fields_s"] = time.perf_counter() - t + games.seconds
    if cfg.train.method == "lora":
        from memlens import anatomy

        rows = anatomy.adapter_anatomy(tr.model, tr.modules)
        out.metrics.extend((f"anatomy:{k}", r["module"], r[k], None, None,
                            {"layer": r["layer"], "matrix": r["matrix"], "rank": r["rank"], "scaling": r["scaling"]})
                           for r in rows for k in ("fro", "spectral", "stable_rank", "relative"))
        out.summary["anatomy"] = anatomy.summarize(rows)
    if one_run is not None:
        t = time.perf_counter()
        rows, out.summary["one_run"] = one_run.measure(tr.model, cfg, prep.pad_id, progress, tr.dp)
        out.metrics.extend(rows)
        timings["one_run_s"] = time.perf_counter() - t
    if trajectory is not None:
        out.summary["trajectory"] = {
            "checkpoints": [p.step for p in trajectory.points],
            "threshold": trajectory.threshold_summary(cfg.audit.checkpoints.signal)}
    timings.update(out.timings)
    # a training that went on from a saved state: its clock, like train_s, counts the earlier try's training
    timings["total_s"] = time.perf_counter() - t0 + (state.earlier_s if state is not None else 0.0)
    summary = {"run": run_dir.name, "run_dir": str(run_dir), **train_summary(cfg, prep, tr), **out.summary,
               "timings_s": {k: round(v, 3) for k, v in timings.items()}}
    if tr.reused_from is not None:
        summary["reused_training"] = {**tr.reused_from, "train_s": round(tr.seconds, 3)}
    write_run_folder(run_dir, cfg, prep, tr, summary, overwrite=overwrite)
    discard(state_path(cfg), run_id)  # its saved training (or one an earlier, interrupted try left), now kept
    run = {"run_id": run_id, "name": run_dir.name, "study": study,
           "config": {**cfg.model_dump(mode="json"), "resolved": cfg.resolved()},
           "config_hash": run_id, "manifest_hash": prep.split.manifest["hash"], "versions": summary["versions"],
           "seed": cfg.train.seed, "timings": summary["timings_s"], "summary": summary}
    return {"run": run, "samples": out.samples, "values": out.values, "generations": out.generations,
            "metrics": out.metrics, "checkpoints": trajectory.rows() if trajectory is not None else []}


def store_record(db: Path, record: dict[str, Any], replace: bool = False) -> None:
    from memlens import store as S

    conn = S.connect(db)
    try:
        S.write_run(conn, record["run"], record["samples"], record["values"], record["generations"],
                    record["metrics"], replace=replace, checkpoints=record.get("checkpoints", ()))
    finally:
        conn.close()


def run_config(cfg: RunConfig, *, overwrite: bool = False, progress: bool = True,
               study: str | None = None) -> RunResult:
    """Fine-tune one configuration, audit it, write the run folder and the store (checked first, created last)."""
    from memlens.preflight import check_run

    db = store_path(cfg)
    check_run(cfg, overwrite=overwrite)
    record = compute_run(cfg, progress=progress, study=study, overwrite=overwrite)
    store_record(db, record, replace=overwrite)
    summary = record["run"]["summary"]
    return RunResult(record["run"]["run_id"], db, Path(summary["run_dir"]), summary)


def _read_records(path: str) -> list[Record]:
    from memlens.data import read_csv
    from memlens.data.phee import read_jsonl_any

    p = Path(path)
    return read_csv(p) if p.suffix.lower() == ".csv" else read_jsonl_any(p)


def audit_adapter(model_name: str, adapter: str | None, members_file: str, nonmembers_file: str, cfg: AuditConfig,
                  *, db: Path, dtype: str = "float32", device: str = "cpu", add_bos: bool = True,
                  trust_remote_code: bool = False, overwrite: bool = False, name: str | None = None,
                  overlap: str = "drop") -> RunResult:
    """Audit an adapter trained elsewhere: ``model_name`` is the base model (the reference), ``adapter`` the peft
    folder (safetensors), and the two files hold the member and non-member texts (JSONL or CSV with ``text``).
    Without an adapter the base model is audited against itself (a control: every AUC near 0.5)."""
    from memlens import store as S
    from memlens.data.records import file_sha256
    from memlens.models import load_model
    from memlens.provenance import versions

    adapter_dir = Path(adapter) if adapter else None
    if cfg.references is not None:
        raise MemlensError("references: reference adapters are trained with the audited run's own fine-tuning "
                           "settings, which memlens audit does not know; use memlens run")
    if cfg.checkpoints is not None:
        raise MemlensError("checkpoints: a trajectory is scored while training; memlens audit does not train (use "
                           "memlens run)")
    if adapter_dir is not None:
        if not (adapter_dir / "adapter_config.json").is_file():
            raise MemlensError(f"{adapter_dir}: not an adapter folder (no adapter_config.json)")
        if not (adapter_dir / "adapter_model.safetensors").is_file():
            raise MemlensError(f"{adapter_dir}: no adapter_model.safetensors (memlens never loads pickle weights)")
    members, nonmembers = _read_records(members_file), _read_records(nonmembers_file)
    clash = {r.id for r in members} & {r.id for r in nonmembers}
    if clash:
        raise MemlensError(f"{nonmembers_file}: ids also in {members_file}: {', '.join(sorted(clash)[:5])}")
    from memlens.data.splits import handle_overlaps

    nonmembers, found = handle_overlaps(members, nonmembers, overlap, where=f"{nonmembers_file}: ")
    if not nonmembers:
        raise MemlensError(f"{nonmembers_file}: {len({o.b_id for o in found})} non-member(s) duplicate a member "
                           f"({sum(o.kind == 'exact' for o in found)} exact): no non-member is left")
    records = members + nonmembers
    member = np.array([1] * len(members) + [0] * len(nonmembers))
    files = {"members": file_sha256(Path(members_file)), "nonmembers": file_sha256(Path(nonmembers_file))}
    if adapter_dir is not None:
        files["adapter"] = file_sha256(adapter_dir / "adapter_model.safetensors")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise MemlensError(f"--dtype {dtype!r}: expected float32, bfloat16 or float16")
    if overlap not in ("drop", "warn", "error"):
        raise MemlensError(f"--overlap {overlap!r}: expected drop, warn or error")
    config = {"model": model_name, "adapter": str(adapter_dir) if adapter_dir else None, "files": files,
              "dtype": dtype, "add_bos": add_bos, "audit": cfg.model_dump(mode="json")}
    if overlap != "drop":
        config["overlap"] = overlap
    from memlens.models import resolve_precision

    config["resolved"] = {"device": device.split(":")[0],
                          "audit_precision": dtype if dtype != "float32" else resolve_precision(cfg.precision, device)}
    run_id = json_hash(config)
    from memlens.paths import cache_dir
    from memlens.preflight import check_store, check_writable

    check_store(db, run_id, overwrite)
    check_writable(cache_dir(), "cache")
    if cfg.fields is not None and not any(r.events for r in records):
        raise MemlensError(f"fields: {members_file} and {nonmembers_file} carry no annotated fields; the field games "
                           "need PHEE's JSON Lines form (id, context, annotations)")
    t0 = time.perf_counter()
    lm = load_model(model_name, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    if adapter_dir is not None:
        from memlens.models import check_adapter_base

        check_adapter_base(lm, adapter_dir)  # before any scoring
    seqs = lm.encode([r.text for r in records], add_bos, what="audited")
    pad_id = lm.pad_id
    t = time.perf_counter()
    base = cached_score(lm, lm.model, seqs, cfg, pad_id, progress=True)
    timings = {"score_base_s": time.perf_counter() - t}
    games = None
    if cfg.fields is not None:  # the base model's part before the adapter is attached
        from memlens.fields import FieldGames, value_pool

        games = FieldGames.prepare(lm, records, member, np.ones(len(records), dtype=bool),
                                   value_pool(records, cfg.fields.types), cfg, add_bos, None, True)
    model = lm.model
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(lm.model, str(adapter_dir), is_trainable=False)
        model.eval()
    out = audit(lm, model, base, records, member, seqs, {}, cfg, pad_id, progress=True)
    if games is not None:
        t = time.perf_counter()
        rows, out.summary["fields"] = games.measure(model, lm, cfg, add_bos, None, True)
        out.metrics.extend(rows)
        timings["fields_s"] = time.perf_counter() - t + games.seconds
    timings.update(out.timings)
    timings["total_s"] = time.perf_counter() - t0
    manifest_hash = json_hash({"members": [[r.id, r.text_hash] for r in members],
                               "nonmembers": [[r.id, r.text_hash] for r in nonmembers]})
    summary = {**out.summary, "versions": versions(), "model": lm.info, "config_hash": run_id,
               "manifest_hash": manifest_hash, "timings_s": {k: round(v, 3) for k, v in timings.items()}}
    conn = S.connect(db)
    S.write_run(conn, {"run_id": run_id, "name": name or f"audit-{run_id[:8]}", "config": config,
                       "config_hash": run_id, "manifest_hash": manifest_hash, "versions": summary["versions"],
                       "seed": cfg.extraction.seed if cfg.extraction else 0, "timings": summary["timings_s"],
                       "summary": summary}, out.samples, out.values, out.generations, out.metrics, replace=overwrite)
    conn.close()
    return RunResult(run_id, db, None, summary)
