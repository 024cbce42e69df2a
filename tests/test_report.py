import html
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from memlens import metrics as M
from memlens.report import build_report
from memlens.report.build import verdict_text
from memlens.report import data as D
from memlens.study import StudyConfig, plan, run_study

STUDY = {
    "name": "r",
    "base": {"model": "tiny", "data": {"source": "synthetic", "synthetic_size": 300, "members": {"n": 16},
                                       "nonmembers": {"n": 16}, "canary": {"repeats": 4}},
             "train": {"epochs": 4, "batch_size": 4, "lr": 5e-3},
             "audit": {"bootstrap": 50, "include_text": True, "extraction": {"n": 6, "temperatures": [0.7]}}},
    "axes": {"lora.targets": [["q"], ["v"], ["o"]], "lora.rank": [1, 4]},
}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    st = StudyConfig.model_validate(STUDY)
    run_study(st, plan(st, None, [], str(tmp / "runs")), tmp / "s.sqlite", progress=False)
    return tmp / "s.sqlite"


def test_report_files_tables_and_verdict(store, tmp_path):
    out = tmp_path / "rep"
    page = build_report(store, out, study="r").read_text()
    for name in ("roc", "roc_loglog", "auc_vs_rank", "memorization_vs_ppl", "privacy_vs_utility"):
        assert (out / f"{name}.png").stat().st_size > 1000 and (out / f"{name}.svg").is_file(), name
    assert page.count('<img src="data:image/png;base64,') == len(list(out.glob("*.png")))
    conn = D.connect_readonly(store)
    runs = D.load_runs(conn, "r")
    assert len(runs) == 6
    # 16 non-members: TPR at 1% FPR is below the resolution, and the Table 3.1 analog says so on every row
    table = page.split("(the analog of the paper's Table 3.1)</h2>")[1].split("</table>")[0]
    assert table.count("<tr>") == 7 and table.count(" *</td>") == 6 and "below the FPR" in page
    for r in runs:  # every run's AUC is on the page as stored
        assert f"{r.auc('ref_ratio'):.3f}" in page
    # the paired comparisons, recomputed from the stored per-sample scores
    pairs = re.findall(r"<td>([VO]) - ([QK])</td><td>(\d+)</td><td>[^<]*</td><td>(-?[\d.]+)</td>", page)
    assert len(pairs) == 4  # V-Q and O-Q at ranks 1 and 4
    for a, b, rank, diff in pairs:
        ra = next(r for r in runs if r.targets == a and r.rank == int(rank))
        rb = next(r for r in runs if r.targets == b and r.rank == int(rank))
        sa = D.sample_scores(conn, ra.run_id, ["score_ref_ratio"])
        sb = D.sample_scores(conn, rb.run_id, ["score_ref_ratio"])
        d = M.auc(sa["member"], sa["score_ref_ratio"]) - M.auc(sb["member"], sb["score_ref_ratio"])
        assert float(diff) == pytest.approx(d, abs=6e-4)
    verdict = html.unescape(re.search(r'<p class="verdict">(.*?)</p>', page, re.S).group(1))
    readings = re.findall(r'<td class="l">(higher|lower|not resolved)</td></tr>', page)
    assert len(readings) == 4
    assert verdict == verdict_text([{"verdict": v} for v in readings])
    n_low, n_high = readings.count("lower"), readings.count("higher")
    if n_high == 0 and n_low == 0:
        assert verdict.startswith("Not resolved: every one of the 4 paired comparisons")
    # raw training text stays out unless asked for
    texts = D.texts(conn, runs[0].run_id)
    assert texts and not any(t in page for t in texts.values())
    page_text = build_report(store, tmp_path / "rep2", study="r", include_text=True).read_text()
    assert any(t.replace("'", "&#39;").replace('"', "&#34;") in page_text for t in texts.values())


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_report_renders_in_headless_chromium(store, tmp_path):
    exe = _chromium()
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (.ci/run installs Debian's chromium package)")
        pytest.skip("chromium not installed: apt-get install chromium")
    page = build_report(store, tmp_path / "rep", study="r")
    out = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                          "--disable-background-networking", "--disable-component-update", "--disable-sync",
                          f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000", "--dump-dom",
                          page.resolve().as_uri()], capture_output=True, text=True, timeout=120)
    body = re.search(r"<body[^>]*>", out.stdout)
    assert body, out.stderr[-2000:]
    expected = int(re.search(r'data-figures-expected="(\d+)"', body.group(0)).group(1))
    loaded = int(re.search(r'data-figures-loaded="(\d+)"', body.group(0)).group(1))
    assert expected >= 5 and loaded == expected


def test_demo_tiny_end_to_end(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    out = subprocess.run([sys.executable, "-m", "memlens", "demo", "--tiny", "--out", str(tmp_path / "d"), "--quiet"],
                         capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    report = Path(out.stdout.strip().splitlines()[-1])
    assert report == (tmp_path / "d" / "report" / "report.html").resolve() and report.is_file()
    assert "Membership inference per configuration" in report.read_text()


def test_verdict_text_by_case():
    def rows(*v):
        return [{"verdict": x} for x in v]

    assert verdict_text([]).startswith("This store has no pair")
    assert verdict_text(rows("higher", "higher")).startswith("Yes: in all 2 paired comparisons")
    assert verdict_text(rows("lower", "lower")).startswith("No, the opposite: in all 2")
    assert verdict_text(rows("lower", "not resolved")).startswith(
        "No: none of the 2 paired comparisons shows a higher AUC for V or O than for Q or K; 1 show")
    # one comparison: singular throughout
    assert verdict_text(rows("not resolved")).startswith(
        "Not resolved: the one paired comparison (V or O against Q or K) has a 95% interval that contains zero")
    assert verdict_text(rows("higher")).startswith("Yes: in the one paired comparison, adapting V or O")
    assert "its 95% interval below zero" in verdict_text(rows("lower"))
    assert verdict_text(rows("lower", "lower", "not resolved")).endswith(
        "2 show a significantly lower one (the opposite of the paper's finding) and 1 is not resolved (the 95% "
        "interval contains zero).")
    assert " 1 shows a significantly higher AUC for V/O, 1 a significantly lower one, and 1 is not resolved" in \
        verdict_text(rows("higher", "lower", "not resolved"))
    for case in (rows("higher"), rows("lower"), rows("not resolved"), rows("higher", "not resolved")):
        text = verdict_text(case)
        assert not re.search(r"\b1 (are|show|paired comparisons)\b", text), text
    assert verdict_text(rows("higher", "lower", "not resolved")).startswith(
        "Mixed: of 3 paired comparisons (V or O against Q or K), 1 shows a significantly higher AUC for V/O, 1")


REF_STUDY = {
    "name": "refs",
    "base": {"model": "tiny", "data": {"source": "synthetic", "synthetic_size": 400, "members": {"n": 32},
                                       "nonmembers": {"n": 32}, "canary": {"formatted": {"repeats": [1, 8],
                                                                                          "per_repeat": 1}}},
             "train": {"epochs": 6, "batch_size": 8, "lr": 1e-2},
             "audit": {"bootstrap": 50, "extraction": None, "exposure": {"candidates": 50},
                       "references": {"count": 2, "holdout": 20, "tune_records": 20}}},
    "axes": {"lora.targets": [["q"], ["v"]]},
}


def test_report_asks_again_under_the_domain_matched_reference(tmp_path):
    st = StudyConfig.model_validate(REF_STUDY)
    db = tmp_path / "s.sqlite"
    run_study(st, plan(st, None, [], str(tmp_path / "runs")), db, progress=False)
    out = tmp_path / "rep"
    page = build_report(db, out, study="refs").read_text()
    conn = D.connect_readonly(db)
    runs = D.load_runs(conn, "refs")
    # the V - Q comparison under ref_lora, recomputed from the stored per-sample scores
    section = page.split("domain-matched reference (<code>ref_lora</code>)")[1].split("<h2>")[0]
    (diff,) = re.findall(r"<td>V - Q</td><td>1</td><td>[^<]*</td><td>(-?[\d.]+)</td>", section)
    rv, rq = (next(r for r in runs if r.targets == t) for t in ("V", "Q"))
    sv, sq = (D.sample_scores(conn, r.run_id, ["score_ref_lora"]) for r in (rv, rq))
    d = M.auc(sv["member"], sv["score_ref_lora"]) - M.auc(sq["member"], sq["score_ref_lora"])
    assert float(diff) == pytest.approx(d, abs=6e-4)
    (reading,) = re.findall(r'<td class="l">(higher|lower|not resolved)</td></tr>', section)
    assert html.unescape(re.search(r'<p class="verdict">(.*?)</p>', section, re.S).group(1)) == verdict_text(
        [{"verdict": reading}])
    # every attack of every run, with its TPR flagged below the resolution (32 non-members: 1% and 0.1%)
    for r in runs:
        block = page.split(f"<code>{r.run_id[:12]}</code>: 32 members, 32 non-members")[1].split("<h3>")[0]
        for a in ("loss", "ref_ratio", "ref_lora", "lira_offline", "rmia"):
            assert f'<td class="l">{a}</td><td>{r.auc(a):.3f}</td>' in block, a
        assert block.count(" *</td>") == 2 * len(r.summary["attacks"])  # 0.1% and 1% flagged, 10% not
        assert "Blind baseline (the texts alone, never the model)" in block
    for r in runs:
        assert (out / f"roc_attacks_{r.run_id[:8]}.png").is_file()
    assert (out / "exposure_vs_repetition.png").stat().st_size > 1000


def test_report_across_seeds_means_intervals_and_csv(tmp_path):
    import csv

    import numpy as np

    from memlens.report import seeds as SD

    study = {"name": "s", "base": {"model": "tiny", "data": {"source": "synthetic", "synthetic_size": 300,
                                                            "members": {"n": 20}, "nonmembers": {"n": 20}},
                                   "train": {"epochs": 3, "batch_size": 4, "lr": 5e-3},
                                   "audit": {"bootstrap": 50, "blind": False, "extraction": {"n": 2}}},
             "axes": {"lora.targets": [["q"], ["v"]], "lora.rank": [2], "train.seed": [0, 1, 2]}}
    st = StudyConfig.model_validate(study)
    run_study(st, plan(st, None, [], str(tmp_path / "runs")), tmp_path / "s.sqlite", progress=False)
    out = tmp_path / "rep"
    page = build_report(tmp_path / "s.sqlite", out, study="s", n_boot=200).read_text()
    conn = D.connect_readonly(tmp_path / "s.sqlite")
    runs = D.load_runs(conn, "s")
    rows = {r["targets"]: r for r in SD.seed_rows(conn, runs, "ref_ratio", n_boot=200)}
    assert set(rows) == {"Q", "V"} and rows["Q"]["seeds"] == [0, 1, 2]
    scores = {}
    for t in ("Q", "V"):
        rs = sorted((r for r in runs if r.targets == t), key=lambda r: r.seeds)
        assert rows[t]["auc"] == pytest.approx(np.mean([r.auc("ref_ratio") for r in rs]))
        sc = [D.sample_scores(conn, r.run_id, ["score_ref_ratio"]) for r in rs]
        scores[t] = (sc[0]["member"], [s["score_ref_ratio"] for s in sc])
        direct = M.seed_record_bootstrap(*scores[t], n_boot=200)
        assert (rows[t]["auc_lo"], rows[t]["auc_hi"]) == pytest.approx((direct.lo, direct.hi))
        assert rows[t]["auc_lo"] <= rows[t]["auc"] <= rows[t]["auc_hi"]
        assert rows[t]["tpr1_below_resolution"]  # 20 non-members: 1% FPR is below the resolution
    (pair,) = SD.seed_pairs(conn, runs, "ref_ratio", n_boot=200)
    assert (pair["a"], pair["b"], pair["seeds_a"], pair["seeds_b"]) == ("V", "Q", 3, 3)
    assert pair["auc_diff"] == pytest.approx(rows["V"]["auc"] - rows["Q"]["auc"])
    direct = M.seed_record_bootstrap(scores["V"][0], scores["V"][1], scores["Q"][1], n_boot=200)
    assert (pair["auc_lo"], pair["auc_hi"]) == pytest.approx((direct.lo, direct.hi))
    assert "Across training seeds" in page and f"{pair['auc_diff']:+.3f}" in page
    with (out / "runs.csv").open() as fh:
        csv_runs = list(csv.DictReader(fh))
    assert len(csv_runs) == 6 and {r["train_seed"] for r in csv_runs} == {"0", "1", "2"}
    assert not any("text" in k for k in csv_runs[0])  # metrics only, no per-record data
    with (out / "seed-pairs.csv").open() as fh:
        (csv_pair,) = list(csv.DictReader(fh))
    assert float(csv_pair["auc_diff"]) == pytest.approx(pair["auc_diff"])
    with (out / "seed-means.csv").open() as fh:
        csv_means = {r["targets"]: r for r in csv.DictReader(fh)}
    assert csv_means["Q"]["seeds"] == "0 1 2" and float(csv_means["V"]["auc"]) == pytest.approx(rows["V"]["auc"])
    assert float(csv_means["V"]["tpr1_hi"]) == pytest.approx(rows["V"]["tpr1_hi"])


def test_across_seeds_leaves_out_runs_whose_records_play_other_roles():
    """Three runs of one configuration whose data seeds put the same records into other roles: no mean over them
    (scoring one run's scores against another's labels would be wrong), and no row at all."""
    import json
    import sqlite3

    import numpy as np

    from memlens.report import seeds as SD
    from memlens.store import SCHEMA

    conn = sqlite3.connect(":memory:")
    conn.executescript(SCHEMA)
    ids = [f"r{i:03d}" for i in range(40)]
    for k, data_seed in enumerate((0, 0, 1)):
        cfg = {"model": "m", "lora": {"targets": ["v"], "rank": 1}, "train": {"seed": k}, "data": {"seed": data_seed}}
        member = np.zeros(40, int)
        member[np.random.default_rng(data_seed).permutation(40)[:20]] = 1
        conn.execute("INSERT INTO runs (run_id, name, study, created, config_json, summary_json) VALUES (?,?,?,?,?,?)",
                     (f"run{k}", f"run{k}", None, k, json.dumps(cfg), "{}"))
        for i, m in zip(ids, member):
            conn.execute("INSERT INTO samples VALUES (?,?,?,?,?,?)", (f"run{k}", i, int(m), "", int(m), None))
            conn.execute('INSERT INTO "values" VALUES (?,?,?,?)', (f"run{k}", i, "score_loss", float(m)))
    runs = D.load_runs(conn)
    assert SD.seed_rows(conn, runs, "loss", n_boot=50) == []
    same = [r for r in runs if r.seeds[1] == 0]  # the two runs with data seed 0: one mean, AUC 1 each
    (row,) = SD.seed_rows(conn, same, "loss", n_boot=50)
    assert row["auc"] == 1.0 and row["seeds"] == [0, 1]


def test_report_privacy_sections_trajectories_dp_frontier_and_factors(tmp_path):
    pytest.importorskip("opacus")
    from memlens import frontier as FR
    from memlens.report import privacy as PV

    study = {"name": "pu", "base": {"model": "tiny", "data": {"source": "synthetic", "synthetic_size": 300,
                                                             "members": {"n": 24}, "nonmembers": {"n": 24},
                                                             "canary": {"one_run": {"count": 20}}},
                                    "lora": {"rank": 4},
                                    "train": {"epochs": 3, "batch_size": 4, "lr": 5e-3},
                                    "audit": {"bootstrap": 50, "blind": False, "extraction": None,
                                              "checkpoints": {"at": [0.5]}}},
             "axes": {"lora.targets": [["q"], ["v"]], "train.dp": [None, {"noise_multiplier": 0.8}],
                      "train.seed": [0, 1]}}
    st = StudyConfig.model_validate(study)
    runs_planned = plan(st, None, [], str(tmp_path / "runs"))
    assert len(runs_planned) == 8 and any("dpnoise_multiplier0.8" in r.config.name for r in runs_planned)
    run_study(st, runs_planned, tmp_path / "s.sqlite", progress=False)
    out = tmp_path / "rep"
    page = build_report(tmp_path / "s.sqlite", out, study="pu", n_boot=100, max_perplexity=1e9).read_text()
    conn = D.connect_readonly(tmp_path / "s.sqlite")
    runs = D.load_runs(conn, "pu")
    assert "Privacy over training: the threshold" in page and list(out.glob("trajectory_*.png"))
    assert "Differential privacy and the one-run audit" in page
    dp = PV.dp_rows(runs, "ref_ratio")
    assert len(dp) == 8  # every run has one-run canaries; four are DP
    assert sum(r["epsilon_spent"] is not None for r in dp) == 4
    assert all(r["one_run"]["m"] == 20 for r in dp)
    # the factor table is the OLS over the run points, settings from the configs (seeds are replicates)
    pts = PV.run_points(runs, "ref_ratio")
    assert {"lora.targets", "train.dp"} <= set(pts[0]) and "train.seed" not in pts[0]
    (auc_table, ppl_table) = PV.factors(runs, "ref_ratio")
    direct = FR.factor_table(pts, ["lora.targets", "train.dp"], "auc")
    assert auc_table["rows"] == direct["rows"] and auc_table["resid_df"] == 8 - 3
    assert {(r["axis"], r["level"], r["reference"]) for r in auc_table["rows"]} == {
        ("lora.targets", "v", "q"), ("train.dp", "sigma 0.8", "off")}
    assert "What drives leakage and utility" in page and f"{auc_table['rows'][0]['effect']:+.4f}" in page
    # every run is eligible at an unbounded perplexity: the least leaky one is named, with the runs it ties with
    best = min(pts, key=lambda p: p["auc"])
    assert "The least leakage at the utility asked for" in page and best["label"] in page


def test_runs_table_shows_a_resumed_runs_clock_as_the_time_section_counts_it(store, tmp_path):
    """A run resumed from a saved training and stored with its last try's clock only (memlens before the clock
    counted the earlier try): the Runs table shows the sum of its phases, as runs.csv and the Time section do."""
    import json
    import sqlite3

    db = tmp_path / "s.sqlite"
    shutil.copy(store, db)
    conn = sqlite3.connect(db)
    run_id, summary = conn.execute("SELECT run_id, summary_json FROM runs ORDER BY run_id LIMIT 1").fetchone()
    summary = json.loads(summary)
    summary["timings_s"] = {"train_s": 3400.0, "score_ft_s": 290.0, "attacks_s": 12.5, "total_s": 1160.0}
    summary["resumed_training_at_step"] = 70
    conn.execute("UPDATE runs SET summary_json = ? WHERE run_id = ?", (json.dumps(summary), run_id))
    conn.commit()
    conn.close()
    page = build_report(db, tmp_path / "rep", study="r").read_text()
    rows = page.split("<h2>Runs</h2>")[1].split("</table>")[0]
    row = next(r for r in rows.split("<tr>") if run_id[:12] in r)
    assert "3702.5" in row and "1160.0" not in row


def test_the_audit_says_so_when_no_attack_beats_the_blind_baseline(capsys):
    """Where the texts alone separate members from non-members (the blind baseline's interval above 0.5) and every
    attack's AUC is below that interval, the run's audit says so, naming the best attack; not where one attack
    reaches the interval, nor where the blind baseline finds no shift."""
    from memlens.report import audit_tables as AT
    from memlens.report.data import RunView

    blind = {"auc": 0.685, "lo": 0.652, "hi": 0.718, "shifted": True, "message": "differ"}
    attacks = {"loss": {"auc": 0.527}, "ref_ratio": {"auc": 0.574}, "zlib": {"auc": 0.510}}
    said = AT.attack_table(RunView("r", "r", "s", {}, {"attacks": attacks, "blind": blind}))["below_blind"]
    assert "ref_ratio at AUC 0.574" in said and "0.652 to 0.718" in said
    reaches = {**attacks, "ref_lora": {"auc": 0.652}}
    assert AT.attack_table(RunView("r", "r", "s", {}, {"attacks": reaches, "blind": blind}))["below_blind"] is None
    flat = {**blind, "auc": 0.52, "lo": 0.49, "hi": 0.55, "shifted": False}
    assert AT.attack_table(RunView("r", "r", "s", {}, {"attacks": attacks, "blind": flat}))["below_blind"] is None
    assert AT.attack_table(RunView("r", "r", "s", {}, {"attacks": attacks}))["below_blind"] is None
    # the end-of-run summary (and `memlens results show`) says the same
    from memlens.cli import print_audit_summary

    rows = {a: {"auc": h["auc"], "auc_lo": h["auc"] - 0.02, "auc_hi": h["auc"] + 0.02} for a, h in attacks.items()}
    ppl = {"members_base": 84.0, "members_ft": 24.2, "nonmembers_base": 81.8, "heldout_ft": 26.1}
    print_audit_summary({"attacks": rows, "n_nonmembers": 968, "blind": blind, "perplexity": ppl}, "run")
    assert "No attack separates members from non-members better than the texts alone" in capsys.readouterr().out
    print_audit_summary({"attacks": {**rows, "ref_lora": {"auc": 0.8, "auc_lo": 0.78, "auc_hi": 0.82}},
                         "n_nonmembers": 968, "blind": blind, "perplexity": ppl}, "run")
    assert "better than the texts alone" not in capsys.readouterr().out


def test_time_spent_sums_the_runs_clocks_by_phase():
    from memlens.report.data import RunView
    from memlens.report.timing import time_spent

    cpu = {"torch": "2.13.0+cpu", "processor": {"model": "AMD EPYC", "family_model": "23/49", "torch_threads": 2}}
    runs = [RunView("a", "a", "s", {}, {"timings_s": {"train_s": 3000.0, "score_ft_s": 600.0, "total_s": 3700.0},
                                        "versions": cpu}),
            RunView("b", "b", "s", {}, {"timings_s": {"train_s": 0.0, "reuse_s": 5.0, "score_ft_s": 400.0,
                                                      "total_s": 500.0}, "versions": cpu,
                                        "reused_training": {"run": "a"}}),
            RunView("c", "c", "s", {}, {})]  # no clock: not counted
    t = time_spent(runs)
    assert t["n"] == 2 and t["reused"] == 1
    assert t["hours"] == pytest.approx(4200 / 3600)
    assert (t["median_min"], t["min_min"], t["max_min"]) == pytest.approx((35.0, 500 / 60, 3700 / 60))
    assert [(p["phase"], p["hours"] * 3600) for p in t["phases"]] == [
        ("train", pytest.approx(3000)), ("score_ft", pytest.approx(1000)), ("other", pytest.approx(200))]  # reuse: 5 s
    assert sum(p["share"] for p in t["phases"]) == pytest.approx(1.0)
    assert t["processors"] == ["AMD EPYC (23/49), 2 threads, torch 2.13.0+cpu"]
    assert time_spent(runs[2:]) is None
    # a run resumed from a saved training, stored with a clock of its last try only: taken as the sum of its phases
    resumed = RunView("d", "d", "s", {}, {"timings_s": {"train_s": 3400.0, "score_ft_s": 290.0, "total_s": 1160.0},
                                          "versions": cpu, "resumed_training_at_step": 70})
    t = time_spent([runs[0], resumed])
    assert t["resumed"] == 1 and t["hours"] == pytest.approx((3700 + 3690) / 3600)
    from memlens.report.timing import run_clock  # the same clock for runs.csv's wall_s

    assert (run_clock(resumed.summary), run_clock(runs[0].summary), run_clock({})) == (3690.0, 3700.0, None)
    assert sum(p["share"] for p in t["phases"]) == pytest.approx(1.0)


def test_runs_stored_by_an_earlier_memlens_are_repeats_of_their_configuration():
    """A configuration's seed-0 run stored before reuse_training and training_state_minutes existed (its config
    lacks them) and its seed-1 run stored after (with them at any value) are one configuration: one row across
    seeds, no spurious factor; a setting that changes results (the rank) still tells configurations apart."""
    import json
    import sqlite3

    import numpy as np

    from memlens.report import privacy as PV
    from memlens.report import seeds as SD
    from memlens.store import SCHEMA

    conn = sqlite3.connect(":memory:")
    conn.executescript(SCHEMA)
    member = np.repeat([1, 0], 20)
    later = {"reuse_training": False, "training_state_minutes": 10.0, "name": "x", "output_dir": "elsewhere"}
    for k, (rank, seed, extra) in enumerate([(1, 0, {}), (1, 1, later), (2, 0, {}), (2, 1, {**later, "name": "y"})]):
        cfg = {"model": "m", "lora": {"targets": ["v"], "rank": rank}, "train": {"seed": seed, "too_long": "truncate"
               if seed else None}, "data": {"seed": 0}, **extra}
        if not seed:
            cfg["train"].pop("too_long")  # also added later, at its default
        conn.execute("INSERT INTO runs (run_id, name, study, created, config_json, summary_json) VALUES (?,?,?,?,?,?)",
                     (f"run{k}", f"run{k}", None, k, json.dumps(cfg), "{}"))
        score = member + np.random.default_rng(k).normal(0, 1, 40)
        for i, (m, v) in enumerate(zip(member, score)):
            conn.execute("INSERT INTO samples VALUES (?,?,?,?,?,?)", (f"run{k}", f"r{i}", int(m), "", int(m), None))
            conn.execute('INSERT INTO "values" VALUES (?,?,?,?)', (f"run{k}", f"r{i}", "score_loss", float(v)))
    runs = D.load_runs(conn)
    assert len({r.key for r in runs}) == 2
    rows = SD.seed_rows(conn, runs, "loss", n_boot=20)
    assert sorted(r["seeds"] for r in rows) == [[0, 1], [0, 1]]
    assert {k for v in PV.varying(runs).values() for k in v} == {"lora.rank"}
