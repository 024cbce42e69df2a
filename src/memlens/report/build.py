"""``memlens report``: a self-contained HTML page (figures embedded) plus each figure as PNG and SVG.

What the page says is computed from the store, never written in advance: the Table 3.1 analog, the paired
differences between matrices, and a plain statement of whether V and O memorize more than Q and K here.
"""

from __future__ import annotations

import datetime as dt
import html
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from memlens import metrics as M
from memlens.errors import MemlensError
from memlens.report import audit_tables as AT
from memlens.report import data as D
from memlens.report import figures as F
from memlens.report import leakage as LK
from memlens.report import paper
from memlens.report import privacy as PV
from memlens.report import seeds as SD
from memlens.report import timing

TARGET_ORDER = {"Q": 0, "K": 1, "V": 2, "O": 3, "Q+K": 4, "Q+K+V+O": 5}


def _fmt(x: Any, d: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, (int, np.integer)):
        return f"{int(x):,}"
    return f"{x:.{d}f}"


def _group(runs: list[D.RunView]) -> dict[str, list[D.RunView]]:
    groups: dict[str, list[D.RunView]] = defaultdict(list)
    for r in runs:
        groups[r.key].append(r)
    return groups


def table_rows(runs: list[D.RunView], attack: str) -> list[dict[str, Any]]:
    """The Table 3.1 analog: one row per configuration, seeds pooled (mean and spread)."""
    rows = []
    for key, rs in _group(runs).items():
        r0 = rs[0]
        aucs = np.array([r.auc(attack) for r in rs])
        m = r0.metric("auc", attack)
        tpr = np.array([(r.metric("tpr@0.01", attack) or {}).get("value", np.nan) for r in rs], dtype=float)
        ppl = np.array([r.summary.get("perplexity", {}).get("heldout_ft", np.nan) for r in rs], dtype=float)
        paper_auc = None
        if r0.alpha_rule == "fixed" and r0.repeats == 1:
            paper_auc = paper.TABLE_3_1.get((r0.targets, r0.rank))
        row = {
            "targets": r0.targets, "rank": r0.rank, "alpha_rule": r0.alpha_rule, "repeats": r0.repeats,
            "n_runs": len(rs), "auc": float(np.mean(aucs)),
            "interval": (f"{_fmt(m['lo'])} - {_fmt(m['hi'])} (Hanley-McNeil)" if len(rs) == 1 and m else
                         f"sd {_fmt(float(np.std(aucs, ddof=1)))} over {len(rs)} seeds, range {_fmt(aucs.min())}"
                         f" - {_fmt(aucs.max())}"),
            "tpr1": float(np.nanmean(tpr)) if np.isfinite(tpr).any() else float("nan"),
            "tpr1_flag": bool(((r0.metric("tpr@0.01", attack) or {}).get("details") or {}).get("below_resolution")),
            "trainable": r0.trainable, "heldout_ppl": float(np.nanmean(ppl)) if np.isfinite(ppl).any() else None,
            "paper": paper_auc, "n_members": r0.summary.get("n_members"), "n_nonmembers": r0.summary.get("n_nonmembers"),
        }
        rows.append(row)
    rows.sort(key=lambda x: (x["repeats"], x["alpha_rule"], x["rank"] or 0, TARGET_ORDER.get(x["targets"], 99),
                             x["targets"]))
    return rows


def paired_rows(conn, runs: list[D.RunView], attack: str, n_boot: int = 1000) -> list[dict[str, Any]]:
    """AUC differences V-Q, V-K, O-Q, O-K (same rank, seeds and settings otherwise), paired over the same records."""
    by: dict[tuple, D.RunView] = {}
    for r in runs:
        by[(r.targets, r.rank, r.seeds, r.settings_key(("lora.targets",)))] = r
    rows = []
    for (t, rank, seeds, rest), ra in sorted(by.items(), key=lambda kv: (kv[0][1] or 0, str(kv[0][2]),
                                                                          TARGET_ORDER.get(kv[0][0], 9))):
        if t not in ("V", "O"):
            continue
        sa = D.sample_scores(conn, ra.run_id, [f"score_{attack}"])
        for other in ("Q", "K"):
            rb = by.get((other, rank, seeds, rest))
            if rb is None:
                continue
            sb = D.sample_scores(conn, rb.run_id, [f"score_{attack}"])
            if sa["ids"] != sb["ids"]:
                continue  # not the same records: no paired comparison
            d = M.paired_difference(sa["member"], sa[f"score_{attack}"], sb[f"score_{attack}"], "auc", n_boot=n_boot)
            verdict = "higher" if d.lo > 0 else "lower" if d.hi < 0 else "not resolved"
            rows.append({"a": t, "b": other, "rank": rank, "seeds": seeds, "diff": d.diff, "lo": d.lo, "hi": d.hi,
                         "verdict": verdict})
    return rows


def _n(count: int, noun: str) -> str:
    """'1 paired comparison', '3 paired comparisons'."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _show(count: int) -> str:
    return "shows" if count == 1 else "show"


def verdict_text(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ("This store has no pair of runs that differ only in the adapted matrix (V or O against Q or K) on "
                "the same records, so the paper's claim is not tested here.")
    pos = sum(r["verdict"] == "higher" for r in rows)
    neg = sum(r["verdict"] == "lower" for r in rows)
    n = len(rows)
    unresolved = n - pos - neg
    each = "its" if n == 1 else "each"
    if pos == n:
        return (f"Yes: {'in the one paired comparison' if n == 1 else f'in all {n} paired comparisons'}, adapting V "
                f"or O gives a higher AUC than adapting Q or K, {each} with a 95% paired-bootstrap interval above "
                "zero, as the paper reports.")
    if neg == n:
        return (f"No, the opposite: {'in the one paired comparison' if n == 1 else f'in all {n} paired comparisons'} "
                f"adapting V or O gives a lower AUC than Q or K ({'its' if n == 1 else 'every'} 95% interval below "
                "zero). The paper's effect does not appear with this model and data.")
    if pos == 0 and neg > 0:
        return (f"No: none of the {_n(n, 'paired comparison')} shows a higher AUC for V or O than for Q or K; {neg} "
                f"{_show(neg)} a significantly lower one (the opposite of the paper's finding) and {unresolved} "
                f"{'is' if unresolved == 1 else 'are'} not resolved (the 95% interval contains zero).")
    if pos == 0:
        which = ("the one paired comparison (V or O against Q or K) has a 95% interval that contains zero" if n == 1
                 else f"every one of the {n} paired comparisons (V or O against Q or K) has a 95% interval that "
                 "contains zero")
        return (f"Not resolved: {which}, so the data here neither support nor contradict the paper's claim that V "
                "and O memorize more than Q and K.")
    return (f"Mixed: of {_n(n, 'paired comparison')} (V or O against Q or K), {pos} {_show(pos)} a significantly "
            f"higher AUC for V/O, {neg} a significantly lower one, and {unresolved} {'is' if unresolved == 1 else 'are'} "
            "not resolved (the 95% interval contains zero). The data here do not establish the paper's claim that V "
            "and O memorize more than Q and K.")


def build_report(store: Path, out: Path, study: str | None = None, attack: str = "ref_ratio",
                 include_text: bool = False, n_boot: int = 1000, max_perplexity: float | None = None) -> Path:
    from jinja2 import Environment, PackageLoader, select_autoescape

    from memlens import __version__

    conn = D.connect_readonly(store)
    runs = D.load_runs(conn, study)
    if not any(r.metric("auc", attack) for r in runs):
        raise MemlensError(f"no run in the store has the attack {attack!r}")
    out.mkdir(parents=True, exist_ok=True)
    figs: list[dict[str, str]] = []
    notes: list[str] = []

    def add(fig, name: str, caption: str) -> None:
        if fig is None:
            notes.append(f"No {caption.split(':')[0].lower()}: the store holds no runs that vary what it plots.")
            return
        b64, stem = F.save(fig, out, name)
        figs.append({"b64": b64, "name": stem, "caption": caption})

    # ROC curves: one run per configuration (its first seed)
    curves = []
    for rs in list(_group(runs).values())[:14]:
        r = rs[0]
        sc = D.sample_scores(conn, r.run_id, [f"score_{attack}"])
        fpr, tpr, _ = M.roc_curve(sc["member"], sc[f"score_{attack}"])
        label = f"{r.targets} r{r.rank}" + (f" x{r.repeats}" if r.repeats > 1 else "") + (
            f" {r.alpha_rule}" if r.alpha_rule != "fixed" else "")
        curves.append((label, fpr, tpr, r.auc(attack)))
    add(F.roc_curves(curves), "roc", f"ROC curves ({attack} attack), linear axes")
    add(F.roc_curves(curves, loglog=True), "roc_loglog", f"ROC curves ({attack} attack), log-log axes")

    series: dict[str, list] = defaultdict(list)
    for r in runs:
        m = r.metric("auc", attack)
        if m and r.rank:
            series[f"{r.targets}, {r.alpha_rule}" + (f", x{r.repeats}" if r.repeats > 1 else "")].append(
                (r.rank, m["value"], m["lo"], m["hi"]))
    add(F.auc_vs_rank(series, show_paper=any(r.targets == "Q+K+V+O" for r in runs)), "auc_vs_rank",
        "AUC against LoRA rank: 95% Hanley-McNeil intervals; the paper's Fig. 3.6 dashed where comparable")

    # memorization against perplexity: canaries if there are any, else every extracted member (greedy)
    share, pft, pbase, what = [], [], [], "greedy, members"
    has_canaries = any(r.repeats > 1 for r in runs)
    for r in runs:
        gens = [g for g in D.generations(conn, r.run_id) if g["decoding"] == "greedy" and g["member"]]
        if has_canaries:
            cids = D.canary_ids(conn, r.run_id)
            gens = [g for g in gens if g["sample_id"] in cids]
            what = "greedy, canaries"
        if not gens:
            continue
        sc = D.sample_scores(conn, r.run_id, ["ppl_ft", "ppl_base"])
        pos = {i: k for k, i in enumerate(sc["ids"])}
        for g in gens:
            share.append(g["ngram_share"])
            pft.append(sc["ppl_ft"][pos[g["sample_id"]]])
            pbase.append(sc["ppl_base"][pos[g["sample_id"]]])
    add(F.memorization_vs_perplexity(np.array(share), np.array(pft), np.array(pbase), what), "memorization_vs_ppl",
        "Memorization against perplexity (the paper's Fig. 3.4 and 3.5): a linear fit and R² (with n and the 95% "
        f"interval of r) only from {F.MIN_FIT_POINTS} points on")

    rep: dict[str, list] = defaultdict(list)
    control = []

    def mean_se(vals: list[float]) -> tuple[float, float, int]:
        v = np.asarray(vals, dtype=float)
        return float(v.mean()), float(v.std(ddof=1) / np.sqrt(v.size)) if v.size > 1 else 0.0, int(v.size)

    for r in runs:
        gens = D.generations(conn, r.run_id)
        cids = D.canary_ids(conn, r.run_id)
        by_dec: dict[str, list[float]] = defaultdict(list)
        for g in gens:
            if g["sample_id"] in cids:
                by_dec[g["decoding"]].append(g["ngram_share"])
        for dec, vals in by_dec.items():
            rep[dec].append((r.repeats, *mean_se(vals)))
        non = [g["ngram_share"] for g in gens if not g["member"] and g["decoding"] == "greedy"]
        if non and cids:
            control.append((r.repeats, *mean_se(non)))
    add(F.extraction_vs_repetition(rep, control), "extraction_vs_repetition",
        "Extraction of canaries against repetition, per decoding (the paper's Appendix A), with 95% intervals")

    front = PV.frontier(runs, attack, max_perplexity)
    points = [(p["label"], p["heldout_ppl"], D.heldout_ppl_interval(conn, p["run_id"]), p["auc"],
               p["auc_lo"], p["auc_hi"]) for p in (front or {}).get("points", [])]
    add(F.privacy_vs_utility(points, [p["on_front"] for p in front["points"]] if front else None),
        "privacy_vs_utility", "Privacy against utility: membership AUC (Hanley-McNeil 95%) against held-out "
        "perplexity (bootstrap 95% over non-members), one point per run; the dashed line joins the runs no other "
        "run beats on both")
    trajectories = PV.trajectories(conn, runs)
    for t in trajectories[:12]:
        thr = t["threshold"]
        add(F.trajectory(t["label"], t["points"], t["attack"], thr.get("step") if thr.get("found") else None),
            f"trajectory_{t['run'][-8:]}", f"Utility and leakage over training: run {t['run']} (dotted: the "
            f"threshold, tolerance {thr['tolerance']:g} nats)")

    # every attack of a run, log-log (the first runs that have the reference attacks, else the first runs)
    shown = [r for r in runs if r.summary.get("references")][:4] or runs[:2]
    for r in shown:
        names = list(r.summary.get("attacks", {}))
        sc = D.sample_scores(conn, r.run_id, [f"score_{a}" for a in names])
        curves = []
        for a in names:
            if f"score_{a}" in sc:
                fpr, tpr, _ = M.roc_curve(sc["member"], sc[f"score_{a}"])
                curves.append((a, fpr, tpr, r.auc(a)))
        add(F.roc_curves(curves, loglog=True), f"roc_attacks_{r.run_id[:8]}",
            f"ROC of every attack, log-log: run {r.name}")
    expo = AT.exposure_points(runs)
    bits = [r.summary["exposure"]["space_bits"] for r in runs if r.summary.get("exposure")]
    add(F.exposure_vs_repetition(expo, min(bits) if bits else None), "exposure_vs_repetition",
        "Exposure of formatted canaries against repetition: one point per canary; rank exposure resolves at most "
        "log2(candidates + 1) bits (hollow: at that cap)")

    table = table_rows(runs, attack)
    pairs = paired_rows(conn, runs, attack, n_boot)
    across = {"rows": SD.seed_rows(conn, runs, attack, n_boot), "pairs": SD.seed_pairs(conn, runs, attack, n_boot)}
    across["verdict"] = verdict_text([{"verdict": p["auc_verdict"]} for p in across["pairs"]]) if across["pairs"] \
        else None
    SD.write_csv(out / "runs.csv", SD.run_rows(runs, attack))
    SD.write_csv(out / "seed-means.csv", [{**r, "seeds": " ".join(map(str, r["seeds"]))} for r in across["rows"]])
    SD.write_csv(out / "seed-pairs.csv", across["pairs"])
    domain = None
    if attack != "ref_lora" and any(r.metric("auc", "ref_lora") for r in runs):
        dpairs = paired_rows(conn, runs, "ref_lora", n_boot)
        domain = {"pairs": dpairs, "verdict": verdict_text(dpairs), "table": table_rows(
            [r for r in runs if r.metric("auc", "ref_lora")], "ref_lora")}
    chance = next((r.summary["fields"]["chance_top1"] for r in runs if r.summary.get("fields")), None)
    add(F.field_rates(LK.field_series(runs, "recovered"), LK.field_series(runs, "top1"), chance), "field_rates",
        "Field leakage: the members' exact recovery and candidate-game top-1 by field type per configuration (bars), "
        "non-members (o) and the base model on the members (x); intervals in the field tables below")
    g = LK.anatomy_columns(runs, "relative")
    if g is not None:
        add(F.anatomy_heatmap("the update's size against the frozen weight", *g, "relative"), "anatomy",
            "Adapter anatomy: ||s B A||_F / ||W||_F per layer, a column per run and adapted matrix (at most "
            f"{LK.MAX_ANATOMY_COLUMNS})")
    leakage = {"fields": LK.field_tables(runs), "size": LK.size_vs_leakage(runs, attack)}
    privacy = {"trajectories": trajectories, "dp": PV.dp_rows(runs, attack), "front": front,
               "factors": PV.factors(runs, attack)}
    models = sorted({r.summary.get("model", {}).get("source", "?") for r in runs})
    examples = []
    if include_text:
        for r in runs[:5]:
            tx = D.texts(conn, r.run_id)
            for g in sorted(D.generations(conn, r.run_id), key=lambda g: -g["ngram_share"])[:5]:
                if g["member"] and g["text"] is not None and g["sample_id"] in tx:
                    examples.append({"run": r.name, "text": tx[g["sample_id"]], "generated": g["text"],
                                     "share": g["ngram_share"]})
        if not examples:
            notes.append("--include-text: the store holds no texts (runs store them only with audit.include_text).")
    env = Environment(loader=PackageLoader("memlens.report", "templates"), autoescape=select_autoescape(["html"]))
    page = env.get_template("report.html").render(
        title=f"memlens report{': ' + study if study else ''}", generated=dt.datetime.now().isoformat(timespec="seconds"),
        version=__version__, store=str(store), attack=attack, runs=runs, table=table, pairs=pairs,
        verdict=verdict_text(pairs), figures=figs, domain=domain, across=across,
        audits=[AT.attack_table(r) for r in runs[:30]], fprs=AT.FPRS, notes=notes, models=models, paper_source=paper.SOURCE,
        fmt=_fmt, examples=examples, escape=html.escape, privacy=privacy, leakage=leakage,
        spent=timing.time_spent(runs), clock=timing.run_clock)
    path = out / "report.html"
    tmp = out / ".report.html.tmp"
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)
    conn.close()
    return path
