"""Where a study's time went: the runs' own clocks, summed by phase, and the processors they ran on.

A run's clock is wall time: it counts any time the run's process was paused or shared its processor, so the sums
are what the study took on the machines it ran on, an upper bound on its compute. A run whose training went on from
a state saved by an interrupted try (memlens.training_state) counts that try's training up to the saved step, not
its set-up or the steps it lost after the save; a resumed run's clock shorter than its training (stored before the
clock counted the earlier try) is replaced by the sum of its phases.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from memlens.report import data as D

SMALL = 0.01  # phases under this share of the time are counted in "other"


def time_spent(runs: list[D.RunView]) -> dict[str, Any] | None:
    """The runs' wall time in all, per run (median and range) and per phase (hours and share; the phases under 1%
    and the time no phase clocked as "other"); None without clocks."""
    timed = [r for r in runs if (r.summary.get("timings_s") or {}).get("total_s")]
    if not timed:
        return None
    totals = np.array([run_clock(r.summary) for r in timed])
    phases: dict[str, float] = {}
    for r in timed:
        for k, v in r.summary["timings_s"].items():
            if k != "total_s":
                phase = k.removesuffix("_s")
                phases[phase] = phases.get(phase, 0.0) + float(v)
    total = float(totals.sum())
    small = [k for k, v in phases.items() if v < SMALL * total]
    rest = total - sum(phases.values()) + sum(phases.pop(k) for k in small)  # unclocked time and the small phases
    if rest > 0:
        phases["other"] = rest
    processors = sorted({_processor(r.summary.get("versions") or {}) for r in timed})
    return {"n": len(timed), "hours": total / 3600, "median_min": float(np.median(totals)) / 60,
            "min_min": float(totals.min()) / 60, "max_min": float(totals.max()) / 60,
            "phases": [{"phase": k, "hours": v / 3600, "share": v / total}
                       for k, v in sorted(phases.items(), key=lambda kv: -kv[1]) if v > 0],
            "reused": sum("reused_training" in r.summary for r in timed),
            "resumed": sum("resumed_training_at_step" in r.summary for r in timed), "processors": processors}


def run_clock(summary: dict[str, Any]) -> float | None:
    """A run's wall time: its clock, or, for a resumed run whose clock is shorter than its training (stored before
    the clock counted the earlier try), the sum of its phases; None without a clock."""
    t = summary.get("timings_s") or {}
    if t.get("total_s") is None:
        return None
    if "resumed_training_at_step" in summary and float(t["total_s"]) < float(t.get("train_s", 0.0)):
        return sum(float(v) for k, v in t.items() if k != "total_s")
    return float(t["total_s"])


def _processor(versions: dict[str, Any]) -> str:
    cpu = versions.get("processor") or {}
    if not cpu:
        return "processor not recorded"
    fm = f" ({cpu['family_model']})" if cpu.get("family_model") else ""
    return f"{cpu.get('model', '?')}{fm}, {cpu.get('torch_threads', '?')} threads, torch {versions.get('torch', '?')}"
