"""Reference adapters: LoRA adapters trained with the audited run's own settings on data the audit controls.

The base model as the reference mixes what a fine-tune learns of the domain with what it memorizes of its records.
A reference adapter trained the same way on other records of the same domain removes that confound
(Mireshghallah et al. 2022), and several of them let LiRA and RMIA model, per record, what a model that did not
train on it would say (see :mod:`memlens.attacks`).

Plan (``audit.references``)
---------------------------
* The **population** is a set of same-domain records disjoint from every audited, trained-on or displaced record
  (PHEE: the dev split; JSONL/CSV: the records of the members' split that the run neither trains on nor audits),
  without exact or near duplicates of an audited record. Its first ``holdout`` records (after a seeded shuffle) are
  never trained on by any reference: they are RMIA's population records z.
* **offline**: reference j trains on a seeded draw of the rest of the population, of the size of the run's member
  set (or all of it when the population is smaller), so every audited record is OUT for every reference.
* **online**: the audited records and the rest of the population are the universe; each universe record is IN for
  exactly K/2 references, chosen at random, and reference j trains on its IN records.
* Every reference makes as many optimizer steps as the audited run (its ``train`` settings with ``max_steps`` set),
  with seed ``references.seed + j``. A reference depends only on the base model, those settings and its draw: it is
  trained once, kept under ``CACHE/references/HASH/`` as a safetensors adapter, and its per-record statistics are
  cached like the base model's. A second audit that needs it trains nothing.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from memlens.config import RunConfig
from memlens.data.records import Record
from memlens.errors import MemlensError
from memlens.paths import cache_dir
from memlens.provenance import json_hash

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------------------ plan


@dataclass
class ReferencePlan:
    """Which records each reference trains on, and the masks the attacks need."""

    mode: str
    specs: list[dict[str, Any]]  # per reference: everything its weights depend on
    hashes: list[str]  # per reference: hash of its spec (its cache key)
    train: list[list[Record]]  # per reference: its training records
    in_audited: np.ndarray  # (n audited, K) bool: reference j trained on audited record i
    z: list[Record]  # RMIA's population records (never trained on by the audited model)
    in_z: np.ndarray  # (n z, K) bool
    tune: list[Record] = field(default_factory=list)  # population training records scored to tune RMIA's a
    in_tune: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=bool))
    notes: list[str] = field(default_factory=list)


def population(corpus: Any, cfg: RunConfig, split: Any) -> list[Record]:
    """Same-domain records disjoint from everything the run trains on or audits (see the module docstring)."""
    from memlens.data.splits import records_apart

    spec = cfg.audit.references.population
    name = spec.split or ("dev" if "dev" in corpus.splits else (cfg.data.members.split or
                                                                 corpus.default_member_split))
    pool = records_apart(corpus, split, name, cfg.data.near_duplicate_threshold, "audit.references.population")
    if spec.n is not None:
        if spec.n > len(pool):
            raise MemlensError(f"audit.references.population.n: {spec.n} asked, the population holds {len(pool)}")
        pool = random.Random(cfg.audit.references.seed).sample(pool, spec.n)
    return pool


def _spec(cfg: RunConfig, identity: str, steps: int, j: int, records: list[Record]) -> dict[str, Any]:
    from memlens.finetune import resolve_device
    from memlens.models import resolve_precision

    # references train as the audited run does (DP included) for its number of steps; early stopping has no
    # validation split of theirs to stop on
    train = cfg.train.model_copy(update={"seed": cfg.audit.references.seed + j, "max_steps": steps,
                                         "eval_members": True, "early_stopping": None})
    device = resolve_device(cfg.train.device)
    tdump = train.model_dump(mode="json")
    for key in ("dp", "early_stopping"):  # absent at their defaults: the cache keys of earlier references hold
        if tdump[key] is None:
            tdump.pop(key)
    precision = "float32" if cfg.train.dp is not None else resolve_precision(cfg.train.precision, device)
    return {"model": identity, "lora": cfg.lora.model_dump(mode="json"), "train": tdump,
            "precision": precision, "device": device.split(":")[0],
            "data": json_hash(sorted(r.text_hash for r in records))}


def plan(cfg: RunConfig, pool: list[Record], audited: list[Record], n_train: int, steps: int,
         identity: str) -> ReferencePlan:
    """Draw every reference's training records (see the module docstring). ``n_train`` is the size of the audited
    run's member set and ``steps`` its optimizer steps."""
    rc = cfg.audit.references
    k = rc.count
    rng = random.Random(rc.seed)
    pool = list(pool)
    rng.shuffle(pool)
    if len(pool) < rc.holdout + 2:
        raise MemlensError(f"audit.references: the population holds {len(pool)} records, fewer than holdout "
                           f"({rc.holdout}) + 2; lower audit.references.holdout or give a larger population")
    z, rest = pool[: rc.holdout], pool[rc.holdout :]
    notes = []
    if rc.mode == "offline":
        size = min(n_train, len(rest))
        if size < n_train:
            notes.append(f"the population leaves {len(rest)} records to train on, fewer than the {n_train} members "
                         f"of the run audited: each reference trains on all of them for the run's {steps} steps")
        draws = [sorted(rng.sample(range(len(rest)), size)) for _ in range(k)]
        train = [[rest[i] for i in d] for d in draws]
        in_pool = np.zeros((len(rest), k), dtype=bool)
        for j, d in enumerate(draws):
            in_pool[d, j] = True
        in_audited = np.zeros((len(audited), k), dtype=bool)
        tune_idx = sorted(rng.sample(range(len(rest)), min(rc.tune_records, len(rest))))
        tune, in_tune = [rest[i] for i in tune_idx], in_pool[tune_idx]
        in_z = np.zeros((len(z), k), dtype=bool)
    else:  # z joins the universe: RMIA's online marginal averages IN and OUT references for z as for x
        universe = list(audited) + z + rest
        inc = np.zeros((len(universe), k), dtype=bool)
        for i in range(len(universe)):
            inc[i, rng.sample(range(k), k // 2)] = True
        train = [[universe[i] for i in np.flatnonzero(inc[:, j])] for j in range(k)]
        in_audited, in_z = inc[: len(audited)], inc[len(audited) : len(audited) + len(z)]
        tune, in_tune = [], np.zeros((0, k), dtype=bool)
    specs = [_spec(cfg, identity, steps, j, train[j]) for j in range(k)]
    return ReferencePlan(rc.mode, specs, [json_hash(s) for s in specs], train, in_audited, z, in_z, tune, in_tune,
                         notes)


# ------------------------------------------------------------------------------------------------ train and cache


def reference_dir(ref_hash: str) -> Path:
    return cache_dir() / "references" / ref_hash[:32]


def train_reference(lm: Any, cfg: RunConfig, spec: dict[str, Any], ref_hash: str, records: list[Record],
                    progress: bool = False) -> float:
    """Train one reference adapter and keep it in the cache (all or nothing); returns the seconds it took, 0.0 when
    it was already there. The base model is left as it was found (the adapter is unloaded)."""
    from memlens.config import TrainConfig
    from memlens.finetune import apply_lora, train_loop, training_state
    from memlens.training_state import discard

    folder = reference_dir(ref_hash)
    state_file = folder.parent / f".{folder.name}.training-state.safetensors"
    if (folder / "adapter_model.safetensors").is_file():
        discard(state_file, ref_hash)  # left by a training that another audit finished
        return 0.0
    tcfg = TrainConfig.model_validate(spec["train"])
    seqs = lm.encode([r.text for r in records], tcfg.add_bos, tcfg.max_length, tcfg.too_long)
    t = time.perf_counter()
    state = training_state(cfg.model_copy(update={"train": tcfg}), ref_hash, state_file)  # None for DP
    model, _ = apply_lora(lm, cfg.lora, tcfg.seed)
    try:
        if tcfg.dp is not None:
            from memlens.dp import dp_train_loop

            rows, _ = dp_train_loop(model, seqs, tcfg, lm.pad_id, progress)
        else:
            rows = train_loop(model, seqs, tcfg, lm.pad_id, progress, state=state)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.tmp-"))
        try:
            model.save_pretrained(tmp, safe_serialization=True)
            (tmp / "reference.json").write_text(json.dumps(
                {"spec": spec, "hash": ref_hash, "records": len(records), "steps": len(rows),
                 "first_loss": rows[0]["loss"], "last_loss": rows[-1]["loss"],
                 "resumed_at_step": state.resumed_from if state is not None else None}, indent=1))
            if folder.exists():  # a concurrent audit finished the same reference first: same weights
                shutil.rmtree(tmp)
            else:
                os.replace(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        discard(state_file, ref_hash)
    finally:
        model.unload()
    return time.perf_counter() - t + (state.earlier_s if state is not None else 0.0)


def encode(lm: Any, cfg: RunConfig, records: list[Record]) -> list[list[int]]:
    if not records:
        return []
    return lm.encode([r.text for r in records], cfg.train.add_bos, cfg.train.max_length, cfg.train.too_long)


@dataclass
class ReferenceStats:
    """Mean token NLL of each record under each reference, and what the references cost."""

    audited: np.ndarray  # (n audited, K)
    z: np.ndarray  # (n z, K)
    tune: np.ndarray  # (n tune, K)
    cost: list[dict[str, float]]


def score_references(lm: Any, cfg: RunConfig, rp: ReferencePlan, audited_seqs: list[list[int]],
                     progress: bool = False) -> ReferenceStats:
    """Train (or find) every reference, then score the audited, z and tuning records under each (cached)."""
    from peft import PeftModel

    from memlens.audit import cached_score, stats_cache
    from memlens.progress import progress_bar

    z_seqs, tune_seqs = encode(lm, cfg, rp.z), encode(lm, cfg, rp.tune)
    every = audited_seqs + z_seqs + tune_seqs
    cols, cost = [], []
    with progress_bar("references", len(rp.hashes), enabled=progress, unit="adapters") as advance:
        for j, (spec, h) in enumerate(zip(rp.specs, rp.hashes)):
            train_s = train_reference(lm, cfg, spec, h, rp.train[j], progress)
            identity = f"reference:{h}"
            t = time.perf_counter()
            cache = stats_cache(lm, lm.model, every, cfg.audit, identity=identity, min_k_pp=False)
            if cache.missing(every):  # load the adapter only when something is left to score
                model = PeftModel.from_pretrained(lm.model, str(reference_dir(h)), is_trainable=False)
                model.eval()
                try:
                    stats = cached_score(lm, model, every, cfg.audit, lm.pad_id, progress, identity=identity,
                                         min_k_pp=False, label=f"score reference {j + 1}")
                finally:
                    model.unload()
            else:
                stats = cache.get(every)
            cols.append(stats.mean_nll)
            cost.append({"train_s": round(train_s, 3), "score_s": round(time.perf_counter() - t, 3),
                         "trained_now": train_s > 0, "records": len(rp.train[j])})
            advance(1)
    nll = np.stack(cols, axis=1)
    a, zn = len(audited_seqs), len(z_seqs)
    return ReferenceStats(nll[:a], nll[a : a + zn], nll[a + zn :], cost)


# ---------------------------------------------------------------------------------------------------- the attacks


@dataclass
class ReferenceAudit:
    """What the audit needs to add the reference attacks: the plan, the references' statistics and the settings."""

    plan: ReferencePlan
    stats: ReferenceStats
    z_seqs: list[list[int]]
    seconds: float

    def attach(self, out: Any, records: list[Record], y: np.ndarray, scores: dict[str, np.ndarray], ft: Any,
               model_ft: Any, cfg: Any, pad_id: int, progress: bool, keep: np.ndarray | None = None) -> dict[str, Any]:
        """Score z under the audited model, add the reference attacks' per-record scores and metrics to ``out``
        (and to ``scores``), and return the summary of the references (with a ``headline`` per new attack).
        ``keep`` selects the records the metrics count (canaries are scored, never counted)."""
        from memlens.attacks import lira_offline, lira_online, ref_lora, rmia, tune_rmia_a
        from memlens.membership import attack_rows, paired_rows
        from memlens.scoring import score

        rc, rp, rs = cfg.references, self.plan, self.stats
        t = time.perf_counter()
        ft_z = score(model_ft, self.z_seqs, batch_size=cfg.batch_size, pad_id=pad_id,
                     progress="score z (fine-tuned)" if progress else None).mean_nll
        nll_t, out_mask = ft.mean_nll, ~rp.in_audited
        new = ref_lora(nll_t, rs.audited, out_mask)
        new["lira_offline"] = lira_offline(-nll_t, -rs.audited, out_mask, rc.lira_variance == "global")
        tuned, curve = None, {}
        if rp.mode == "online":
            new["lira_online"] = lira_online(-nll_t, -rs.audited, rp.in_audited, rc.lira_variance == "global")
            a = None
            new["rmia"] = rmia(np.exp(-nll_t), np.exp(-rs.audited), np.exp(-ft_z), np.exp(-rs.z), rc.rmia_gamma)
        else:
            a = rc.rmia_a
            if a is None:
                tuned, curve = tune_rmia_a(rs.tune, rp.in_tune, rs.z, rc.rmia_gamma)
                a = 1.0 if tuned is None else tuned
                if tuned is None:
                    rp.notes.append("RMIA's a could not be tuned (no reference has members that another reference "
                                    "did not train on): a = 1.0")
            new["rmia"] = rmia(np.exp(-nll_t), np.exp(-rs.audited), np.exp(-ft_z), np.exp(-rs.z), rc.rmia_gamma, a,
                               out_mask, ~rp.in_z)
        scores.update(new)
        ref_out = np.where(out_mask, rs.audited, 0).sum(axis=1) / out_mask.sum(axis=1)
        for name, arr in {"nll_ref_out": ref_out, **{f"score_{k}": v for k, v in new.items()}}.items():
            out.values.extend((r.id, name, float(v)) for r, v in zip(records, arr))
        keep = np.ones(len(y), dtype=bool) if keep is None else keep
        rows, headline = attack_rows(y[keep], {a: v[keep] for a, v in new.items()}, cfg.fpr, cfg.bootstrap)
        out.metrics.extend(rows)
        prow, paired = paired_rows(y[keep], {a: v[keep] for a, v in scores.items()}, "ref_ratio", list(new),
                                   cfg.bootstrap)
        out.metrics.extend(prow)
        out.timings["references_s"] = self.seconds + time.perf_counter() - t
        summary = {
            "mode": rp.mode, "count": len(rp.hashes), "references": [h[:12] for h in rp.hashes],
            "train_records": [len(x) for x in rp.train], "z_records": len(rp.z), "rmia_gamma": rc.rmia_gamma,
            "rmia_a": a, "rmia_a_tuned": tuned, "rmia_a_curve": curve, "lira_variance": rc.lira_variance,
            "cost": rs.cost, "train_s": round(sum(c["train_s"] for c in rs.cost), 3),
            "score_s": round(sum(c["score_s"] for c in rs.cost), 3), "notes": rp.notes, "paired": paired,
            "headline": headline,
        }
        if rp.mode == "online":
            summary["in_mask"] = {r.id: "".join("1" if b else "0" for b in row)
                                  for r, row in zip(records, rp.in_audited)}
        return summary


def prepare_references(lm: Any, cfg: RunConfig, corpus: Any, split: Any, records: list[Record],
                       seqs: list[list[int]], n_train: int, steps: int, progress: bool = False) -> ReferenceAudit:
    """Plan, train (or find) and score the references of a run; call before the run's own adapter is attached."""
    t = time.perf_counter()
    identity = lm.info.get("identity", lm.info["source"])
    rp = plan(cfg, population(corpus, cfg, split), records, n_train, steps, identity)
    for note in rp.notes:
        log.warning("references: %s", note)
    rs = score_references(lm, cfg, rp, seqs, progress)
    return ReferenceAudit(rp, rs, encode(lm, cfg, rp.z), time.perf_counter() - t)
