"""Studies: a base run config plus sweep axes, expanded into runs and executed until all are in the store.

A study file::

    name: paper-table-3.1
    description: which attention matrices memorize more
    base:                      # a run config (see memlens.config.RunConfig)
      model: smollm2-135m
      data: {source: phee, members: {split: train, n: 640}, nonmembers: {split: test, n: 640}}
    axes:                      # dotted keys -> values; the runs are their cartesian product
      lora.targets: [[q], [k], [v], [o], [q, k]]
      lora.rank: [1, 2, 4]
    match_params: null         # or {reference: [q], rank: 8}: per target set, the rank whose trainable
                               # parameters come closest to those of the reference at that rank
    profiles:                  # named variants: `set` overrides base keys, `axes` replaces axes
      quick: {set: {data.members.n: 128}, axes: {lora.rank: [1, 2]}}

Each run is identified by the hash of its resolved config: a run already in the store is never redone, so a
study that was killed resumes where it stopped. Runs execute in their own processes (memory never creeps across
runs), locally one after the other, or as Ray tasks that declare their CPU and GPU needs; the results flow back
to this process, which alone writes the store.
"""

from __future__ import annotations

import itertools
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field

from memlens.config import RunConfig, _Strict, deep_merge, parse_overrides, read_yaml, validate
from memlens.errors import MemlensError

log = logging.getLogger(__name__)

STUDIES_DIR = Path(__file__).parent / "studies"


class MatchParams(_Strict):
    reference: list[str] = Field(..., description="target set whose parameter count is matched, e.g. [q]")
    rank: int = Field(..., ge=1, description="rank of the reference")


class Profile(_Strict):
    set: dict[str, Any] = Field(default_factory=dict, description="dotted keys of the base config to override")
    axes: dict[str, list[Any]] = Field(default_factory=dict, description="axes to replace (or add)")
    match_params: MatchParams | None = Field(None, description="match trainable parameters instead of ranks")


class StudyConfig(_Strict):
    name: str
    description: str = ""
    base: dict[str, Any] = Field(default_factory=dict)
    axes: dict[str, list[Any]] = Field(default_factory=dict)
    match_params: MatchParams | None = None
    profiles: dict[str, Profile] = Field(default_factory=dict)


@dataclass
class PlannedRun:
    run_id: str
    label: str  # the axis values that define it, e.g. "lora.targets=[v] lora.rank=2"
    config: RunConfig


def shipped_studies() -> dict[str, Path]:
    return {p.stem: p for p in sorted(STUDIES_DIR.glob("*.yaml"))}


def load_study(ref: str | Path) -> StudyConfig:
    """A study from a YAML path or the name of a shipped study (``memlens study paper-table-3.1``)."""
    path = Path(ref)
    if not path.is_file():
        shipped = shipped_studies()
        if str(ref) not in shipped:
            raise MemlensError(f"{ref}: no such study file or shipped study (shipped: {', '.join(shipped)})")
        path = shipped[str(ref)]
    return validate(read_yaml(path), StudyConfig, where=str(path))


def _nest(key: str, value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    node = out
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def _label(assign: dict[str, Any]) -> str:
    def fmt(v):
        return "[" + ",".join(map(str, v)) + "]" if isinstance(v, list) else str(v)

    return " ".join(f"{k}={fmt(v)}" for k, v in assign.items())


def _name_part(v: Any) -> str:
    """An axis value as part of a run name: lists joined, None as "off", a mapping as its keys and values."""
    if v is None:
        return "off"
    if isinstance(v, list):
        return "".join(map(str, v))
    if isinstance(v, dict):
        return "".join(f"{k}{_name_part(x)}" for k, x in v.items())
    return str(v)


def plan(study: StudyConfig, profile: str | None = None, overrides: list[str] | None = None,
         output_dir: str | None = None) -> list[PlannedRun]:
    """Expand a study (with a profile and command-line overrides of its base) into resolved, validated runs."""
    base = dict(study.base)
    axes = dict(study.axes)
    match = study.match_params
    if profile is not None:
        if profile not in study.profiles:
            raise MemlensError(f"study {study.name}: no profile {profile!r} (has {', '.join(study.profiles) or 'none'})")
        prof = study.profiles[profile]
        for k, v in prof.set.items():
            base = deep_merge(base, _nest(k, v))
        axes.update(prof.axes)
        match = prof.match_params or match
    if match is not None:
        axes.pop("lora.rank", None)  # the rank follows from the parameter budget
    if overrides:
        base = deep_merge(base, parse_overrides(overrides))
    if output_dir is not None:
        base["output_dir"] = output_dir
    base.setdefault("output_dir", str(Path("runs") / study.name))
    validate(base, RunConfig, where=f"study {study.name}: base")  # errors name the base keys first
    keys = list(axes)
    # seed axes vary slowest: a study stopped part way has every configuration at its first seeds, which the
    # comparisons across configurations need, rather than all seeds of the first configurations
    loop = sorted(keys, key=lambda k: not k.endswith(".seed"))
    rank_for = _matched_ranks(study.name, match, base, axes) if match is not None else None
    runs: list[PlannedRun] = []
    seen: set[str] = set()
    for values in itertools.product(*(axes[k] for k in loop)):
        got = dict(zip(loop, values))
        assign = {k: got[k] for k in keys}  # names and labels keep the study's order of axes
        cfg_dict = base
        for k, v in assign.items():
            cfg_dict = deep_merge(cfg_dict, _nest(k, v))
        if rank_for is not None:
            targets = tuple(assign.get("lora.targets", cfg_dict.get("lora", {}).get("targets", ["v"])))
            cfg_dict = deep_merge(cfg_dict, {"lora": {"rank": rank_for[targets]}})
            assign["lora.rank"] = rank_for[targets]
        cfg = validate(cfg_dict, RunConfig, where=f"study {study.name}: run {_label(assign)}")
        run_id = cfg.config_hash()
        if run_id in seen:
            continue
        seen.add(run_id)
        name = f"{study.name}-" + "-".join(f"{k.split('.')[-1]}{_name_part(v)}" for k, v in assign.items())
        cfg = cfg.model_copy(update={"name": f"{name}-{run_id[:6]}"})
        runs.append(PlannedRun(run_id, _label(assign), cfg))
    return runs


def _matched_ranks(study: str, mp: MatchParams, base: dict[str, Any], axes: dict[str, list[Any]]) -> dict[tuple, int]:
    """Per target set, the rank whose trainable parameters come closest to the reference's (at least 1)."""
    from memlens.finetune import expected_lora_params
    from memlens.models import load_model, resolve_targets

    cfg = validate(base, RunConfig, where=f"study {study}: base")
    lm = load_model(cfg.model, trust_remote_code=cfg.trust_remote_code, allow_download=cfg.allow_download)

    def per_rank(targets) -> int:
        return sum(expected_lora_params(lm.model, resolve_targets(lm.model, list(targets)), 1).values())

    budget = per_rank(mp.reference) * mp.rank
    sets = axes.get("lora.targets", [cfg.lora.targets])
    return {tuple(t): max(1, round(budget / per_rank(t))) for t in sets}


# -------------------------------------------------------------------------------------------------------- execution


def _die_with_parent() -> None:
    """A worker must not outlive the study that started it (a killed study would leave a process of about 800 MB
    training for nobody): on Linux the kernel kills it when its parent dies (PR_SET_PDEATHSIG); everywhere a daemon
    thread also checks every two seconds that the parent is still the one that started it."""
    import signal
    import threading

    parent = os.getppid()
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass

    def watch() -> None:
        while True:
            time.sleep(2.0)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, daemon=True, name="memlens-parent-watch").start()


def _forward_to_study(events: Any, level: int, progress: bool) -> None:
    """A local worker's start: its memlens log records (at the study's level) and, with ``progress``, its loops'
    progress (memlens.progress) go to the study's process through ``events``, a multiprocessing queue."""
    import logging.handlers

    from memlens import progress as P

    if progress:
        P.forward_to(events.put)
    own = logging.getLogger("memlens")
    own.setLevel(level)
    own.addHandler(logging.handlers.QueueHandler(events))
    own.propagate = False


def _worker(cfg_json: dict[str, Any], study: str, threads: int | None = None, progress: bool = False
            ) -> dict[str, Any]:
    """Runs in a fresh process: import, fine-tune, audit, return the record.

    ``threads``: torch's intra-op threads, set to the CPUs a Ray task declared, so that tasks sharing a machine do
    not oversubscribe its cores (which slows small matrix products many times over). ``progress``: the run's loops
    report their progress (to the study's process: :func:`_forward_to_study`).
    """
    import warnings

    warnings.filterwarnings("ignore")
    _die_with_parent()
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    from memlens.audit import compute_run

    # a run not in the study's store is redone; a folder of that same run (left by a kill between the folder and the
    # store write) is the study's own output and is replaced; any other folder is refused
    return compute_run(RunConfig.model_validate(cfg_json), progress=progress, study=study, overwrite=True)


def done_runs(db: Path) -> set[str]:
    from memlens import store as S

    if not db.is_file():
        return set()
    conn = S.connect_readonly(db)  # reading: a dry run changes nothing in the store
    try:
        return {r[0] for r in conn.execute("SELECT run_id FROM runs")}
    finally:
        conn.close()


def run_study(study: StudyConfig, runs: list[PlannedRun], db: Path, *, executor: str = "local",
              progress: bool = True, cpus_per_run: float = 1.0, gpus_per_run: float = 0.0) -> list[str]:
    """Execute the runs not yet in the store (after :func:`memlens.resume.check_resume`); returns the ids of those
    executed now."""
    from memlens.audit import store_record
    from memlens.progress import LoopLines, study_progress
    from memlens.resume import check_resume

    check_resume(study.name, runs, db)
    done = done_runs(db)
    todo = [r for r in runs if r.run_id not in done]
    log.info("study %s: %d runs, %d already in %s, %d to do", study.name, len(runs), len(runs) - len(todo), db,
             len(todo))
    executed: list[str] = []
    with study_progress(enabled=progress) as bar:
        task = bar.add_task("study " + study.name, total=len(runs), completed=len(runs) - len(todo),
                            current="")

        def started(r: PlannedRun) -> LoopLines:
            bar.update(task, current=r.label)
            return LoopLines(bar, f"run {r.label}")

        for record in _execute(todo, study.name, executor, cpus_per_run, gpus_per_run, started, progress):
            if record["run"]["run_id"] in done_runs(db):  # another study on this store finished it meanwhile
                log.warning("run %s was stored by another process while this one computed it: the stored one is kept "
                            "(results are the same for the same config and seed)", record["run"]["run_id"][:12])
            else:
                store_record(db, record)
            resumed = record["run"]["summary"].get("resumed_training_at_step")
            if resumed is not None:
                log.info("run %s: its training went on from step %d of %d, saved by an interrupted try",
                         record["run"]["run_id"][:12], resumed, record["run"]["summary"]["steps"])
            executed.append(record["run"]["run_id"])
            bar.update(task, advance=1)
    return executed


def _execute(todo: list[PlannedRun], study: str, executor: str, cpus: float, gpus: float, on_start,
             progress: bool = False):
    """Yield each run's record as it completes. ``on_start(run)`` returns what takes the run's progress events
    (memlens.progress.LoopLines; local runs only, with ``progress``)."""
    if executor == "local":
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        ctx = multiprocessing.get_context("spawn")
        level = logging.getLogger("memlens").getEffectiveLevel()
        for r in todo:
            lines = on_start(r)
            t = time.perf_counter()
            events = ctx.Queue()
            relay = _Relay(events, lines)
            try:
                # one fresh process per run: nothing (memory, threads, RNG state) carries over to the next
                with ProcessPoolExecutor(max_workers=1, mp_context=ctx, initializer=_forward_to_study,
                                         initargs=(events, level, progress)) as pool:
                    record = pool.submit(_worker, r.config.model_dump(mode="json"), study, None, progress).result()
            finally:
                relay.stop()  # the worker has exited: what it sent is all in the queue
            log.info("run %s done in %.0f s", r.label, time.perf_counter() - t)
            yield record
        return
    if executor == "ray" or executor.startswith("ray:"):
        try:
            import ray
        except ImportError:
            raise MemlensError("--executor ray needs Ray: pip install 'memlens[ray]'") from None
        address = executor.partition(":")[2] or None
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # memlens sends nothing over the network by default
        started = not ray.is_initialized()
        if started:
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        try:
            remote = ray.remote(num_cpus=cpus, num_gpus=gpus, max_calls=1)(_worker)
            threads = max(1, int(cpus))
            pending = {remote.remote(r.config.model_dump(mode="json"), study, threads): r for r in todo}
            for r in todo:
                on_start(r)
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                pending.pop(ready[0])
                yield ray.get(ready[0])
        finally:
            if started:
                ray.shutdown()
        return
    raise MemlensError(f"unknown executor {executor!r}: expected local, ray or ray:ADDRESS")


class _Relay:
    """A thread of the study's process that takes a local worker's events off their queue: log records are logged
    here (under the worker's logger names), progress events go to ``lines``. It reads until :meth:`stop`'s end mark,
    put on the queue once the worker has exited (so after everything the worker sent), and never stops on an item
    it cannot show: a worker whose queue is not read would block at its exit, and the study with it."""

    END = "memlens-relay-end"
    STOP_WAIT_S = 10.0  # a worker killed while writing leaves a message cut short: the reader may never get past it

    def __init__(self, events: Any, lines: Any) -> None:
        import threading

        self.events, self.lines, self.failed = events, lines, False
        self.thread = threading.Thread(target=self._run, daemon=True, name="memlens-study-relay")
        self.thread.start()

    def _run(self) -> None:
        while True:
            try:
                item = self.events.get()
            except (EOFError, OSError):
                return
            if isinstance(item, str) and item == self.END:
                return
            try:
                if isinstance(item, logging.LogRecord):
                    logging.getLogger(item.name).handle(item)
                else:
                    self.lines(item)
            except Exception as e:  # noqa: BLE001
                if not self.failed:
                    self.failed = True
                    log.warning("the run's progress could not be shown (%s: %s); the run goes on", type(e).__name__, e)

    def stop(self) -> None:
        self.events.put(self.END)
        self.thread.join(self.STOP_WAIT_S)
        if self.thread.is_alive():
            log.warning("the run's last messages could not be read (its process ended while writing one)")
        self.lines.close()
        self.events.close()
