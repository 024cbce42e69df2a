"""The report's figures (matplotlib, Agg). Each function takes plain data and returns a Figure, or None when the
store holds nothing to draw."""

from __future__ import annotations

from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from memlens.report import paper  # noqa: E402


def roc_curves(curves: list[tuple[str, np.ndarray, np.ndarray, float]], loglog: bool = False):
    """curves: (label, fpr, tpr, auc)."""
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(6, 5))
    for label, fpr, tpr, a in curves:
        if loglog:
            keep = (fpr > 0) & (tpr > 0)
            ax.plot(fpr[keep], tpr[keep], label=f"{label} (AUC {a:.3f})", lw=1.2)
        else:
            ax.plot(fpr, tpr, label=f"{label} (AUC {a:.3f})", lw=1.2)
    if loglog:
        lo = min(float(np.min(c[1][c[1] > 0])) for c in curves if np.any(c[1] > 0))
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.plot([lo, 1], [lo, 1], "k:", lw=0.8, label="chance")
        ax.set_title("ROC, log-log (the low-FPR regime)")
    else:
        ax.plot([0, 1], [0, 1], "k:", lw=0.8, label="chance")
        ax.set_title("ROC")
    ax.set_xlabel("false positive rate (non-members flagged)")
    ax.set_ylabel("true positive rate (members flagged)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def auc_vs_rank(series: dict[str, list[tuple[int, float, float, float]]], show_paper: bool):
    """series: label -> [(rank, auc, lo, hi)]."""
    if not any(len({p[0] for p in v}) > 1 for v in series.values()):
        return None
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for label, pts in series.items():
        pts = sorted(pts)
        r = np.array([p[0] for p in pts])
        a = np.array([p[1] for p in pts])
        err = np.array([[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]])
        ax.errorbar(r, a, yerr=err, marker="o", capsize=3, label=label)
    if show_paper:
        ranks = sorted(paper.FIG_3_6)
        ax.plot(ranks, [paper.FIG_3_6[k] for k in ranks], "k--", marker="x", lw=1,
                label="paper Fig. 3.6 (LLaMA-2-7B, Q+K+V+O)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("LoRA rank")
    ax.set_ylabel("ROC AUC (95% interval)")
    ax.set_title("Membership AUC against rank")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


MIN_FIT_POINTS = 10  # no line and no R^2 on fewer points


def memorization_vs_perplexity(share: np.ndarray, ppl_ft: np.ndarray, ppl_base: np.ndarray, what: str):
    """Two panels: share of n-gram against fine-tuned and against base perplexity; a linear fit with R^2, its n
    and the 95% interval of r only from :data:`MIN_FIT_POINTS` points on."""
    from memlens.metrics import correlation

    if share.size < 3:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharey=True)
    for ax, x, title, paper_r2 in ((axes[0], ppl_ft, "fine-tuned", paper.FIG_3_4_R2),
                                   (axes[1], ppl_base, "base", paper.FIG_3_5_R2)):
        ax.scatter(x, share, s=12, alpha=0.6)
        if share.size >= MIN_FIT_POINTS and np.std(x) > 0 and np.std(share) > 0:
            slope, icpt = np.polyfit(x, share, 1)
            c = correlation(x, share, "pearson")
            xs = np.linspace(x.min(), x.max(), 50)
            ax.plot(xs, slope * xs + icpt, "r-", lw=1.2,
                    label=f"fit: R² = {c.r * c.r:.3f} (n = {share.size}; r = {c.r:.2f}, 95% CI {c.lo:.2f} to "
                          f"{c.hi:.2f}); paper R² {paper_r2}")
            ax.legend(fontsize=7)
        else:
            ax.text(0.02, 0.97, f"n = {share.size}: too few points for a fit (fewer than {MIN_FIT_POINTS})",
                    transform=ax.transAxes, fontsize=8, va="top")
        ax.set_xlabel(f"perplexity under the {title} model")
        ax.set_title(f"share of n-gram vs {title} perplexity")
    axes[0].set_ylabel(f"share of n-gram ({what})")
    fig.tight_layout()
    return fig


def extraction_vs_repetition(series: dict[str, list[tuple[int, float, float, int]]],
                             control: list[tuple[int, float, float, int]]):
    """series: decoding -> [(repeats, mean share of a run's canaries, standard error, n)]; control: non-members,
    greedy. Error bars are 95% intervals (mean -+ 1.96 SE); a point from a single continuation has none."""
    if not any(len({p[0] for p in v}) > 1 for v in series.values()):
        return None
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for label, pts in series.items():
        pts = sorted(pts)
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[1.96 * p[2] for p in pts], marker="o",
                    capsize=3, label=f"canaries, {label} (n per point: {', '.join(str(p[3]) for p in pts)})")
    if control:
        control = sorted(control)
        ax.errorbar([p[0] for p in control], [p[1] for p in control], yerr=[1.96 * p[2] for p in control],
                    fmt="k:", marker=".", capsize=2, label="non-members, greedy")
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("copies of the canary in the training set")
    ax.set_ylabel("share of n-gram of the suffix (95% interval)")
    ax.set_title("Extraction against repetition and temperature")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def privacy_vs_utility(points: list[tuple[str, float, tuple | None, float, float, float]],
                       front: list[bool] | None = None):
    """points: (label, held-out perplexity, its 95% interval or None, AUC, AUC lo, AUC hi); both axes start from
    their plain ranges (not zoomed on differences smaller than the error bars). ``front``: which points are on the
    Pareto frontier (joined by a dashed line; the point estimates only)."""
    if len(points) < 2:
        return None
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for label, ppl, pci, a, lo, hi in points:
        xerr = None if pci is None else [[ppl - pci[0]], [pci[1] - ppl]]
        ax.errorbar(ppl, a, xerr=xerr, yerr=[[a - lo], [hi - a]], fmt="o", capsize=3, ms=4)
        ax.annotate(label, (ppl, a), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if front is not None and sum(front) >= 2:
        on = sorted((p[1], p[3]) for p, f in zip(points, front) if f)
        ax.plot([x for x, _ in on], [y for _, y in on], "k--", lw=0.8, label="Pareto frontier (point estimates)")
        ax.legend(fontsize=7)
    ax.set_ylim(min(0.5, min(p[4] for p in points)) - 0.02, min(1.0, max(p[5] for p in points)) + 0.02)
    ax.axhline(0.5, color="k", ls=":", lw=0.8)
    ax.set_xlabel("held-out perplexity of the fine-tuned model, 95% interval (utility: lower is better)")
    ax.set_ylabel("membership AUC, 95% interval (privacy: lower is better)")
    ax.set_title("Privacy against utility (one point per run)")
    fig.tight_layout()
    return fig


def exposure_vs_repetition(points: dict[str, list[tuple[int, float, bool]]], space_bits: float | None):
    """points: estimator -> [(repeats, exposure in bits, capped)], one point per canary; capped points hollow."""
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for (label, pts), marker, dx in zip(points.items(), "osx^", (0.94, 1.0, 1.06, 1.12)):
        r = np.array([p[0] for p in pts], dtype=float) * dx  # side by side, not on top of each other
        e = np.array([p[1] for p in pts])
        capped = np.array([p[2] for p in pts], dtype=bool)
        line = ax.scatter(r[~capped], e[~capped], marker=marker, label=label, s=28)
        if capped.any():
            ax.scatter(r[capped], e[capped], marker=marker, facecolors="none", edgecolors=line.get_facecolor(),
                       s=28, label=f"{label}, at its cap (a lower bound)")
    if space_bits:
        ax.axhline(space_bits, color="k", ls=":", lw=0.8, label=f"log2|R| = {space_bits:.1f} bits")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("copies of the canary in the training set")
    ax.set_ylabel("exposure (bits)")
    ax.set_title("Exposure of formatted canaries against repetition")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def trajectory(label: str, points: list[dict[str, Any]], attack: str, threshold_step: int | None):
    """Utility and leakage against the optimizer step for one run: held-out perplexity (left) and the attack's AUC
    with its 95% interval (right); the threshold, where there is one, as a dotted line."""
    pts = [p for p in points if "heldout_ppl" in p and "auc" in p]
    if len(pts) < 2:
        return None
    steps = np.array([p["step"] for p in pts])
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.6))
    a1.plot(steps, [p["heldout_ppl"] for p in pts], "o-", ms=3)
    a1.set_xlabel("optimizer step")
    a1.set_ylabel("held-out perplexity (lower is better)")
    auc = np.array([p["auc"] for p in pts], dtype=float)
    a2.plot(steps, auc[:, 0], "o-", ms=3, color="C1")
    a2.fill_between(steps, auc[:, 1], auc[:, 2], color="C1", alpha=0.2, label="95% interval (Hanley-McNeil)")
    a2.axhline(0.5, color="k", ls=":", lw=0.8)
    a2.set_xlabel("optimizer step")
    a2.set_ylabel(f"membership AUC ({attack})")
    for ax in (a1, a2):
        if threshold_step is not None:
            ax.axvline(threshold_step, color="k", ls=":", lw=1.0)
    a2.legend(fontsize=7)
    fig.suptitle(f"Utility and leakage over training: {label}", fontsize=10)
    fig.tight_layout()
    return fig


def field_rates(recovered: dict[str, dict[str, tuple]], top1: dict[str, dict[str, tuple]], chance: float | None):
    """Two panels, exact recovery and the candidate game's top-1: per field type (its members' n under the name,
    "all" last), one bar per configuration for the members under the fine-tuned model, with the non-members' rate
    (o) and the base model's on the members (x) marked on it; chance as a line on the top-1 panel."""
    if not recovered and not top1:
        return None
    first = next(iter((recovered or top1).values()))
    fields = list(first)
    if not fields:
        return None
    n_conf = max(len(recovered), len(top1), 1)
    fig, axes = plt.subplots(2, 1, figsize=(min(14.0, max(6.0, 0.25 * len(fields) * n_conf + 2)), 6.4), sharex=True)
    x = np.arange(len(fields))
    width = 0.8 / n_conf
    for ax, series, ylabel in ((axes[0], recovered, "recovered (exact)"), (axes[1], top1, "candidate game top-1")):
        for k, (label, rates) in enumerate(series.items()):
            pos = x - 0.4 + width * (k + 0.5)
            get = [rates.get(f, (np.nan,) * 4) for f in fields]
            ax.bar(pos, [g[0] for g in get], width, label=f"{label}: members")
            ax.scatter(pos, [g[1] for g in get], marker="o", color="k", s=10, zorder=3,
                       label="non-members" if k == 0 else None)
            ax.scatter(pos, [g[2] for g in get], marker="x", color="r", s=10, zorder=3,
                       label="base model, members" if k == 0 else None)
        if ax is axes[1] and chance is not None:
            ax.axhline(chance, color="grey", lw=0.8, ls="--", label="chance")
        ax.set_ylim(0, 1.02)
        ax.set_ylabel(ylabel)
    axes[1].set_xticks(x, [f"{f}\n({first[f][3]})" for f in fields], fontsize=7)
    axes[0].set_title("Field leakage by field type and configuration (members' n of the first configuration)",
                      fontsize=9)
    axes[1].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return fig


def anatomy_heatmap(label: str, layers: list[int], matrices: list[str], grid: np.ndarray, stat: str):
    """Layers x columns (adapted matrices, or runs): the size of the adapter's update in each module."""
    if grid.size == 0:
        return None
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(matrices), 1.2 + 0.22 * len(layers)))
    im = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(matrices)), matrices, fontsize=7, rotation=30 if len(matrices) > 4 else 0)
    ax.set_yticks(range(len(layers)), [str(layer) for layer in layers], fontsize=6)
    ax.set_ylabel("layer")
    fig.colorbar(im, ax=ax, label={"fro": "||s B A||_F", "relative": "||s B A||_F / ||W||_F"}.get(stat, stat))
    ax.set_title(f"Adapter anatomy: {label}", fontsize=9)
    fig.tight_layout()
    return fig


def save(fig: Any, folder, name: str) -> tuple[str, str]:
    """Write PNG and SVG; return the PNG's base64 text and the file stem."""
    import base64
    import io

    fig.savefig(folder / f"{name}.png", dpi=120)
    fig.savefig(folder / f"{name}.svg")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii"), name
