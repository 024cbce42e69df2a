"""A LoRA training that survives an interruption: its state saved every few minutes, continued by a rerun.

While :func:`memlens.finetune.train_loop` trains, it saves everything the rest of the training depends on into one
safetensors file (written to a temporary file, then renamed over the last one): the trainable weights, AdamW's
moments and step counts, the scheduler's position, the random state of the batch order at the start of the current
epoch and of dropout now, the step and the position within the epoch, and the log rows so far. A rerun of the same
training finds the file and goes on from there; on a CPU with the same versions the result is the same adapter, to
the byte, as a training never interrupted (tested). The file is saved once more when training ends, so that a run
stopped while it audits does not train again; the run deletes it once its own folder is written (a reference
adapter's, once the adapter is in the cache). The file is the user's alone (mode 0600): it holds the adapter, and
AdamW's moments, which are averages of gradients on the training texts.

A state file is taken only when it was saved by this same training (the run id, or the reference adapter's hash),
on the same token sequences, with the same memlens commit, torch, transformers and peft, on the same kind of
processor (and GPU) with the same number of threads, and when its fields and tensors pass the checks of
:func:`_problem`; otherwise training starts over with a warning, and the file is replaced at the first save. A file
at the path that is not a memlens state, or is another training's, is never replaced or deleted: the training then
runs unsaved, with a warning that says so. A save that fails (a full disk) is a warning too: training goes on,
unsaved. Trainings with hooks (trajectory checkpoints, early stopping) and DP trainings are not saved: their own
state is not in the file.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memlens.provenance import json_hash

log = logging.getLogger(__name__)

FORMAT = 1


def stamp(device: str) -> dict[str, Any]:
    """What a saved state must have been computed under to be continued here."""
    from memlens.provenance import versions

    v = versions()
    p = v["processor"]
    out = {"memlens": v.get("memlens"), "memlens_git": v.get("memlens_git"), "torch": v.get("torch"),
           "transformers": v.get("transformers"), "peft": v.get("peft"), "processor": p["model"],
           "family_model": p["family_model"], "isa": p["isa"], "threads": p["torch_threads"], "device": device}
    if device == "cuda":
        import torch

        out["gpu"], out["cuda"] = torch.cuda.get_device_name(), torch.version.cuda
    return out


def _read(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The metadata and tensors of a state file; raises on anything that is not one."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {})["memlens"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if not isinstance(meta, dict) or not isinstance(meta.get("identity"), dict):
        raise ValueError("no memlens identity")
    return meta, tensors


def _regular(path: Path) -> bool:
    return path.is_file() and not path.is_symlink()


def discard(path: Path, key: str) -> None:
    """Delete the state file at ``path`` if it is a memlens state of training ``key`` (and the temporary files a
    killed save of it left); anything else there is left as it is."""
    path = Path(path)
    for tmp in path.parent.glob(f".{path.name}.tmp-*"):
        if _regular(tmp):
            tmp.unlink(missing_ok=True)
    if not _regular(path):
        return
    try:
        meta, _ = _read(path)
    except Exception:  # noqa: BLE001 - not a state file: not memlens's to delete
        return
    if meta["identity"].get("key") == key:
        path.unlink(missing_ok=True)


@dataclass
class Position:
    """Where a restored training goes on: after optimizer step ``step``, in epoch ``epoch`` at group ``group`` of
    its batches, with the log rows so far and the seconds it had trained."""
    step: int
    epoch: int
    group: int
    rows: list[dict]
    elapsed_s: float


ROW_KEYS = {"step", "epoch", "loss", "lr", "grad_norm", "tokens", "sequences", "elapsed_s"}


def _problem(meta: dict[str, Any], tensors: dict[str, Any], params: dict[str, Any], opt: Any, sched: Any, gen: Any,
             device: Any) -> str | None:
    """What makes a state of this training's identity unusable (None: nothing), checked before anything is loaded:
    the position, the log rows, every weight, moment and random state (shape and type), the optimizer's groups and
    the scheduler's fields against the fresh ones here (all but the learning rate and the scheduler's counters)."""
    import torch

    ints = [meta.get(k) for k in ("step", "epoch", "group")]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in ints):
        return "step, epoch or group"
    rows = meta.get("rows")
    if not isinstance(rows, list) or len(rows) != meta["step"] or not all(
            isinstance(r, dict) and set(r) == ROW_KEYS and r["step"] == i + 1 for i, r in enumerate(rows)):
        return "rows"
    if not isinstance(meta.get("elapsed_s"), (int, float)) or isinstance(meta["elapsed_s"], bool):
        return "elapsed_s"
    for n, p in params.items():
        t = tensors.get(f"param.{n}")
        if t is None or t.shape != p.shape or t.dtype != p.dtype:
            return f"weight {n}"
    keys = meta.get("opt_keys")  # AdamW keeps a state only for the parameters that have had a gradient
    if not isinstance(keys, dict) or not set(keys) <= {str(i) for i in range(len(params))}:
        return "optimizer state"
    for i, p in enumerate(params.values()):
        if str(i) not in keys:
            continue
        if not isinstance(keys[str(i)], list) or set(keys[str(i)]) != {"step", "exp_avg", "exp_avg_sq"}:
            return "optimizer state"
        for k in keys[str(i)]:
            t = tensors.get(f"opt.{i}.{k}")
            if t is None or (k == "step" and t.dim() != 0) or (k != "step" and (t.shape != p.shape
                                                                                or t.dtype != p.dtype)):
                return f"optimizer state of {k}"
    fresh = json.loads(json.dumps(opt.state_dict()["param_groups"]))
    groups = meta.get("opt_groups")
    if not isinstance(groups, list) or len(groups) != len(fresh) or not all(
            isinstance(g, dict) and set(g) == set(f) and isinstance(g["lr"], (int, float))
            and all(g[k] == f[k] for k in f if k != "lr") for g, f in zip(groups, fresh)):
        return "optimizer groups"
    fresh_sched = sched.state_dict()
    saved = meta.get("sched")
    if not isinstance(saved, dict) or set(saved) != set(fresh_sched) or not isinstance(saved.get("last_epoch"), int) \
            or saved.get("base_lrs") != fresh_sched.get("base_lrs"):
        return "scheduler"
    rngs = {"rng.epoch": gen.get_state(), "rng.torch": torch.get_rng_state()}
    if device.type == "cuda":
        rngs["rng.cuda"] = torch.cuda.get_rng_state(device)
    for k, here in rngs.items():
        t = tensors.get(k)
        if t is None or t.dtype != torch.uint8 or t.shape != here.shape:
            return k
    return None


class TrainingState:
    """The state file of one training: ``path``, saved every ``every_s`` seconds of training; ``key`` names the
    training (a run id or a reference's hash)."""

    def __init__(self, path: Path, key: str, every_s: float):
        self.path, self.key, self.every_s = Path(path), key, every_s
        self.last_save = time.monotonic()
        self.resumed_from: int | None = None  # the step a restored training went on from
        self.earlier_s = 0.0  # the seconds it had trained before
        self.saving = True  # False once a file not this training's is found at the path, or a save failed
        self._now: dict[str, Any] | None = None  # the identity of the training at hand

    def _identity(self, seqs: list[list[int]], params: dict[str, Any], total: int, device: str) -> dict[str, Any]:
        if self._now is None:
            self._now = {"format": FORMAT, "key": self.key, "sequences": json_hash(seqs), "total_steps": total,
                         "params": {n: list(p.shape) for n, p in params.items()}, "stamp": stamp(device)}
        return self._now

    def _not_saved(self, why: str) -> None:
        log.warning("%s: %s; left as it is, and this training is not saved (remove the file to have it saved)",
                    self.path, why)
        self.saving = False

    def restore(self, seqs: list[list[int]], params: dict[str, Any], opt: Any, sched: Any, gen: Any, total: int,
                device: Any) -> Position | None:
        """Load the saved state into the weights, optimizer, scheduler and generators; None, with nothing changed,
        when there is no usable file."""
        import torch

        if self.path.is_symlink() or (self.path.exists() and not self.path.is_file()):
            self._not_saved("not a memlens training state")
            return None
        if not self.path.is_file():
            return None
        now = self._identity(seqs, params, total, device.type)
        try:
            meta, tensors = _read(self.path)
        except Exception as e:  # noqa: BLE001 - whatever cannot be read is passed over, never trusted
            self._not_saved(f"not a memlens training state ({type(e).__name__})")
            return None
        if meta["identity"].get("key") != self.key:
            self._not_saved("the state of another training")
            return None
        if meta["identity"] != now:
            diff = sorted(k for k in now if meta["identity"].get(k) != now[k])
            log.warning("%s: saved by this training under another set-up (differs in %s); training starts over",
                        self.path, ", ".join(diff) or "its format")
            return None
        problem = _problem(meta, tensors, params, opt, sched, gen, device)
        if problem is not None:
            log.warning("%s: a damaged training state (%s); training starts over", self.path, problem)
            return None
        opt_before, sched_before = opt.state_dict(), sched.state_dict()
        try:
            opt.load_state_dict({"state": {int(i): {k: tensors[f"opt.{i}.{k}"] for k in keys}
                                           for i, keys in meta["opt_keys"].items()},
                                 "param_groups": meta["opt_groups"]})
            sched.load_state_dict(meta["sched"])
        except Exception as e:  # noqa: BLE001 - put back as found
            opt.load_state_dict(opt_before)
            sched.load_state_dict(sched_before)
            log.warning("%s: a damaged training state (%s); training starts over", self.path, e)
            return None
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(tensors[f"param.{n}"])
        gen.set_state(tensors["rng.epoch"])
        torch.set_rng_state(tensors["rng.torch"])
        if device.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng.cuda"], device)
        pos = Position(meta["step"], meta["epoch"], meta["group"], meta["rows"], float(meta["elapsed_s"]))
        self.resumed_from, self.earlier_s = pos.step, pos.elapsed_s
        self.last_save = time.monotonic()
        log.info("training goes on from step %d of %d, saved in %s", pos.step, total, self.path)
        return pos

    def due(self) -> bool:
        return time.monotonic() - self.last_save >= self.every_s

    def save(self, seqs: list[list[int]], params: dict[str, Any], opt: Any, sched: Any, epoch_rng: Any, total: int,
             device: Any, pos: Position) -> None:
        """Write the state after optimizer step ``pos.step`` (``epoch_rng``: the batch-order generator's state at
        the start of the epoch), atomically: a reader finds the last complete file or none. A failed write (a full
        disk) is a warning: the training goes on, unsaved."""
        import torch
        from safetensors.torch import save as serialized

        if not self.saving:
            return
        tensors = {f"param.{n}": p.detach().cpu().contiguous() for n, p in params.items()}
        sd = opt.state_dict()
        opt_keys = {}
        for i, st in sd["state"].items():
            opt_keys[str(i)] = sorted(st)
            for k, v in st.items():
                tensors[f"opt.{i}.{k}"] = torch.as_tensor(v).detach().cpu().contiguous()
        tensors["rng.epoch"] = epoch_rng.clone()
        tensors["rng.torch"] = torch.get_rng_state()
        if device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(device)
        meta = {"identity": self._identity(seqs, params, total, device.type), "step": pos.step, "epoch": pos.epoch,
                "group": pos.group, "rows": pos.rows, "elapsed_s": pos.elapsed_s, "opt_keys": opt_keys,
                "opt_groups": sd["param_groups"], "sched": sched.state_dict()}
        data = serialized(tensors, metadata={"memlens": json.dumps(meta)})
        tmp = None
        try:  # every write below is Python's own: a full disk or an unwritable folder is an OSError
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.tmp-")  # mode 0600
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except OSError as e:
            log.warning("%s: the training's state could not be saved (%s); it goes on unsaved", self.path, e)
            self.saving = False
        finally:
            if tmp is not None and Path(tmp).exists():
                Path(tmp).unlink(missing_ok=True)
        self.last_save = time.monotonic()

    def remove(self) -> None:
        """Delete the state file once the training's result is kept (only if it is this training's)."""
        discard(self.path, self.key)
