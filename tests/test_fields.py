import numpy as np
import pytest

from memlens.audit import run_config
from memlens.config import load_config
from memlens.data import synthetic
from memlens.fields import (candidates, field_items, field_table, normalise, recovered, substituted, token_f1,
                            true_rank, value_pool)

BASE = ["model=tiny", "data.source=synthetic", "data.synthetic_size=400", "train.batch_size=8",
        "audit.bootstrap=50", "audit.extraction=null", "audit.blind=false", "audit.fields.bootstrap=200",
        "audit.fields.types=[drug, age, effect, disorder]"]


def test_matching_rules():
    assert normalise("  Lisinopril, ") == "lisinopril"
    assert recovered(" lisinopril therapy for", "Lisinopril")
    assert not recovered(" the lisinopril", "lisinopril")
    assert token_f1(" 25 mg every 8 hours and", "25 mg every 8 hours") == 1.0
    assert token_f1(" 25 mg daily", "25 mg every 8 hours") == pytest.approx(2 * (2 / 3) * (2 / 5) / (2 / 3 + 2 / 5))
    assert token_f1("", "x") == 0.0
    assert true_rank([1.0, 2.0, 3.0]) == 1.0 and true_rank([2.0, 1.0, 3.0]) == 2.0
    assert true_rank([1.0, 1.0, 3.0]) == 1.5  # a tie counts half


def test_prompts_never_contain_the_field_they_ask_for():
    recs = synthetic.generate(300, seed=1)
    items = field_items(recs)
    assert len(items) > 600 and {it.ftype for it in items} >= {"drug", "age", "effect", "disorder", "gender"}
    for it in items:
        text = recs[it.record].text
        assert text[it.start : it.start + len(it.value)] == it.value
        prompt = text[: it.start].rstrip()
        assert it.repeat == (normalise(it.value) in normalise(prompt))
        if not it.repeat:
            assert normalise(it.value) not in normalise(prompt)
    # a value written twice: its second mention is a repeat
    from memlens.data.records import Event, Record, Span

    r = Record("x", "Aspirin again: aspirin caused rash.",
               events=(Event("ADE", (Span("treatment.drug", "Aspirin", 0), Span("treatment.drug", "aspirin", 15))),))
    first, second = field_items([r])
    assert not first.repeat and second.repeat


def test_candidates_are_distinct_values_of_the_same_type():
    recs = synthetic.generate(300, seed=1)
    items = field_items(recs)[:50]
    pool = value_pool(recs)
    cands = candidates(items, pool, 10, seed=0)
    for it, cs in zip(items, cands):
        assert cs[0] == it.value and 1 < len(cs) <= 11
        assert len({normalise(c) for c in cs}) == len(cs)
        assert all(c in pool[it.ftype] for c in cs[1:])
        text = substituted(recs[it.record].text, it, cs[1])
        assert cs[1] in text and text.startswith(recs[it.record].text[: it.start])
    assert candidates(items, pool, 10, seed=0) == cands  # seeded


def test_field_table_rates_and_paired_intervals():
    from memlens.data.records import Event, Record, Span

    recs = [Record(f"r{i}", "A took drug.", events=(Event("ADE", (Span("treatment.drug", "drug", 7),)),))
            for i in range(40)]
    items = field_items(recs)
    member = np.array([1] * 20 + [0] * 20)
    ft = np.array([1.0] * 20 + [0.0] * 10 + [1.0] * 10)  # members all recovered, half of the non-members
    base = np.array([0.0] * 10 + [1.0] * 10 + [0.0] * 10 + [1.0] * 10)
    (drug, every) = field_table(items, member, {"ft": ft, "base": base}, "recovered", n_boot=500)
    assert drug["field"] == "drug" and every["field"] == "all"
    assert (drug["members"], drug["nonmembers"], drug["members_base"]) == (1.0, 0.5, 0.5)
    assert drug["member_minus_nonmember"] == 0.5 and drug["mn_lo"] < 0.5 < drug["mn_hi"] and drug["mn_lo"] > 0.2
    assert drug["ft_minus_base"] == 0.5 and drug["fb_lo"] > 0.2
    # gain - gain: members gain 0.5 over the base, non-members 0 (the same on every record: no variation, so
    # Newcombe on the gains mapped onto [0, 1], (g + 1) / 2, the interval doubled)
    assert drug["gain_minus_gain"] == 0.5 and drug["gg_by"] == "newcombe"
    lo, hi = _newcombe(0.75 * 20, 20, 0.5 * 20, 20)
    assert drug["gg_lo"] == pytest.approx(2 * lo) and drug["gg_hi"] == pytest.approx(2 * hi)
    # both sides' gains vary: the cluster bootstrap
    ft2 = ft.copy()
    ft2[30:] = 0.0  # non-members: base 1 on the last 10 and now ft 0 there: their gains 0 and -1, -0.5 on average
    (d2, _) = field_table(items, member, {"ft": ft2, "base": base}, "recovered", n_boot=500)
    assert d2["gain_minus_gain"] == pytest.approx(0.5 - (-0.5)) and d2["gg_by"] == "bootstrap"
    assert d2["gg_lo"] > 0.5 and d2["gg_hi"] <= 1.5


def _run(tmp_path, *extra):
    return run_config(load_config(None, [*BASE, f"output_dir={tmp_path}", *extra]), progress=False)


def test_memorized_fields_are_recovered_and_inferred_and_an_untrained_adapter_is_at_chance(tmp_path, monkeypatch):
    """Full fine-tuning that memorizes 12 members: their fields come back (completion) and win the candidate game;
    the non-members' recovery stays near the base model's. With an adapter that never moved (one step at warm-up
    lr 0), the candidate game is at chance."""
    res = _run(tmp_path / "mem", "data.members.n=12", "data.nonmembers.n=12", "train.method=full",
               "train.epochs=60", "train.lr=1e-2", "train.warmup_steps=5", "audit.fields.n=12")
    f = res.summary["fields"]
    rec = {r["field"]: r for r in f["tables"]["recovered"]}["all"]
    top = {r["field"]: r for r in f["tables"]["top1"]}["all"]
    # (the misses are fields whose prompt several members share, e.g. "A" before an age: nothing tells them apart)
    assert rec["n_members"] > 20 and rec["members"] > 0.8 and top["members"] > 0.9
    assert abs(rec["nonmembers"] - rec["nonmembers_base"]) < 0.25 and rec["members_base"] < 0.3
    assert rec["mn_lo"] > 0.4 and rec["fb_lo"] > 0.4
    # the export carries the per-field rows (rates only: no field value leaves the store)
    import csv

    from memlens import store as S

    out = S.export(S.connect(res.store), res.run_id, "csv", tmp_path / "f.csv", table="fields")
    rows = list(csv.DictReader(open(out)))
    assert {r["measure"] for r in rows} == {"recovered", "f1", "top1", "rr"}
    row = next(r for r in rows if r["measure"] == "recovered" and r["field"] == "all")
    assert float(row["members"]) == pytest.approx(rec["members"]) and "value" not in row
    # anatomy: a full fine-tune has no adapter; the untrained LoRA run below has one (B = 0: every norm 0)
    assert "anatomy" not in res.summary
    untrained = _run(tmp_path / "un", "data.members.n=30", "data.nonmembers.n=30", "train.max_steps=1",
                     "audit.fields.n=30", "audit.fields.candidates=4", "audit.fields.temperature=0.0001",
                     "audit.fields.samples=2")
    top = {r["field"]: r for r in untrained.summary["fields"]["tables"]["top1"]}["all"]
    assert untrained.summary["adapter_changed"] is False
    assert all(v["fro"] == 0.0 for v in untrained.summary["anatomy"].values())
    assert top["members"] == top["members_base"]  # the model is the base model
    assert abs(top["members"] - top["chance"]) < 0.15 and top["chance"] == pytest.approx(0.2, abs=0.02)
    # sampling at a temperature near 0 is greedy decoding: the sampled table equals the greedy one
    tables = untrained.summary["fields"]["tables"]
    assert untrained.summary["fields"]["sampling"] == {"temperature": 0.0001, "top_p": 0.9, "samples": 2}
    for greedy, sampled in zip(tables["recovered"], tables["sampled"]):
        assert (sampled["members"], sampled["nonmembers"], sampled["members_base"]) == \
            (greedy["members"], greedy["nonmembers"], greedy["members_base"])
    # memlens run prints it: both games' n, the rates, the intervals (no rich wrapping at this width)
    from rich.console import Console

    from memlens import cli

    printed = Console(width=300, record=True)
    monkeypatch.setattr(cli, "console", printed)
    cli._print_fields(untrained.summary)
    rec = {r["field"]: r for r in untrained.summary["fields"]["tables"]["recovered"]}["all"]
    text = printed.export_text()
    assert f"{rec['n_members']} / {rec['n_nonmembers']}" in text and f"{top['n_members']} / {top['n_nonmembers']}" in text
    assert f"({rec['fb_lo']:.3f}, {rec['fb_hi']:.3f})" in text and f"{top['chance']:.3f}" in text
    assert f"{top['gain_minus_gain']:+.3f} ({top['gg_lo']:.3f}, {top['gg_hi']:.3f})" in text
    # the report shows the run's field table (its values; an untrained adapter recovers what the base model does)
    from memlens.report import build_report

    page = build_report(untrained.store, tmp_path / "rep").read_text()
    rec = {r["field"]: r for r in untrained.summary["fields"]["tables"]["recovered"]}["all"]
    assert "What exactly leaks: the annotated fields" in page
    assert f"<td>{rec['n_members']} / {rec['n_nonmembers']}</td>" in page
    assert f"<td>{top['n_members']} / {top['n_nonmembers']}</td><td>{top['members']:.3f}</td>" in page
    assert f"({rec['fb_lo']:.3f}, {rec['fb_hi']:.3f})" in page
    assert f"{top['gain_minus_gain']:+.3f} ({top['gg_lo']:.3f}, {top['gg_hi']:.3f})" in page


def _newcombe(x1, n1, x2, n2, z=1.959963984540054):
    """Newcombe's (1998) method 10 from Wilson's score bounds, written out for the test."""
    def wilson(x, n):
        p = x / n
        c = (p + z * z / (2 * n)) / (1 + z * z / n)
        h = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        return c - h, c + h
    (l1, u1), (l2, u2) = wilson(x1, n1), wilson(x2, n2)
    p1, p2 = x1 / n1, x2 / n2
    d = p1 - p2
    return d - np.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2), d + np.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)


def test_a_side_without_variation_gets_newcombes_interval_on_its_records_not_a_zero_width_bootstrap():
    """No field recovered on either side: the bootstrap would say (0, 0); the table gives Newcombe's interval with
    each side's number of records (two fields a record here: 30 and 25 records, not 60 and 50 fields)."""
    from memlens.data.records import Event, Record, Span

    recs = [Record(f"r{i}", "A took drug and pill.", events=(Event("ADE", (Span("treatment.drug", "drug", 7),
                                                                            Span("treatment.drug", "pill", 16))),))
            for i in range(55)]
    items = field_items(recs)
    assert len(items) == 110
    member = np.array([1] * 30 + [0] * 25)
    zeros = np.zeros(len(items))
    rec = np.array([it.record for it in items])
    (drug, _) = field_table(items, member, {"ft": zeros, "base": zeros}, "recovered", n_boot=200)
    assert drug["mn_by"] == "newcombe" and drug["fb_by"] == "newcombe"
    lo, hi = _newcombe(0, 30, 0, 25)
    assert abs(drug["mn_lo"] - lo) < 1e-9 and abs(drug["mn_hi"] - hi) < 1e-9 and hi > 0.1
    # one side varies, the other not (members 1 in 3 recovered, non-members none): still Newcombe, on the records
    ft = np.where((rec < 30) & (rec % 3 == 0), 1.0, 0.0)
    (drug, _) = field_table(items, member, {"ft": ft, "base": zeros}, "recovered", n_boot=200)
    lo, hi = _newcombe(10, 30, 0, 25)
    assert drug["mn_by"] == "newcombe" and abs(drug["mn_lo"] - lo) < 1e-9 and abs(drug["mn_hi"] - hi) < 1e-9
    # both sides vary: the cluster bootstrap, as before
    ft = np.where(rec % 3 == 0, 1.0, 0.0)
    (drug, _) = field_table(items, member, {"ft": ft, "base": ft}, "recovered", n_boot=200)
    assert drug["mn_by"] == "bootstrap" and drug["mn_lo"] < drug["member_minus_nonmember"] < drug["mn_hi"]
    # ...but the paired fine-tuned - base difference of identical scores is the same (0) on every field: Newcombe
    assert drug["fb_by"] == "newcombe" and drug["fb_lo"] < 0 < drug["fb_hi"]
    # a side with fewer than 10 records: Newcombe, even where both vary
    few = np.array([1] * 8 + [0] * 47)
    (drug, _) = field_table(items, few, {"ft": ft, "base": zeros}, "recovered", n_boot=200)
    assert drug["n_members"] == 16 and drug["mn_by"] == "newcombe"
    lo, hi = _newcombe(ft[rec < 8].mean() * 8, 8, ft[rec >= 8].mean() * 47, 47)
    assert abs(drug["mn_lo"] - lo) < 1e-9 and abs(drug["mn_hi"] - hi) < 1e-9


def test_sampled_completion_counts_a_field_recovered_when_any_sample_recovers_it(monkeypatch):
    """Three continuations a field: recovered when any starts with the field, F1 the best of the three."""
    from memlens import extraction
    from memlens.data.records import Event, Record, Span
    from memlens.fields import complete

    recs = [Record("r0", "A took aspirin daily.", events=(Event("ADE", (Span("treatment.drug", "aspirin", 7),)),)),
            Record("r1", "B took ibuprofen daily.", events=(Event("ADE", (Span("treatment.drug", "ibuprofen", 7),)),))]
    items = field_items(recs)
    words = {1: " nothing", 2: " aspirin daily", 3: " ibu", 4: " ibuprofen"}

    class Tok:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [9] * len(text.split())}

        def decode(self, ids, skip_special_tokens=True):
            return "".join(words[i] for i in ids)

    def fake_generate(model, prompts, max_new, decoding, **kw):
        assert decoding.samples == 3 and decoding.temperature == 0.7
        return [[extraction.Continuation([1], [0.0]), extraction.Continuation([2], [0.0]),
                 extraction.Continuation([1], [0.0])],
                [extraction.Continuation([1], [0.0]), extraction.Continuation([3], [0.0]),
                 extraction.Continuation([1], [0.0])]]

    monkeypatch.setattr(extraction, "generate", fake_generate)
    rec, f1 = complete(None, Tok(), recs, items, add_bos=False, bos_id=None, pad_id=0, eos_id=None, margin=2,
                       batch_size=4, decoding=extraction.Decoding(0.7, 0.9, 3))
    assert rec.tolist() == [1.0, 0.0]  # "aspirin" came back in one of three; "ibuprofen" in none
    assert f1[0] == 1.0 and f1[1] == 0.0  # " ibu" shares no whole word with "ibuprofen"
