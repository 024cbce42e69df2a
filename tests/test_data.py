import json

import pytest

from memlens.config import DataConfig
from memlens.data import find_overlaps, load_corpus, make_split, read_csv, read_jsonl
from memlens.data import phee, synthetic
from memlens.data.records import Record
from memlens.errors import MemlensError


# ----------------------------------------------------------------------------------------------------------- PHEE


@pytest.fixture(scope="module")
def phee_corpus(phee_dir):
    return phee.load(phee_dir)


def test_phee_split_sizes_and_annotations(phee_corpus):
    assert {s: len(r) for s, r in phee_corpus.items()} == {"train": 2898, "dev": 961, "test": 968}
    first = phee_corpus["train"][0]
    assert first.id == "8908396_3"
    assert first.text.startswith("OBJECTIVE: To test the hypothesis that tumor necrosis factor")
    assert first.fields["treatment.drug"] == ("insulin",)
    assert first.fields["treatment.disorder"] == ("diabetic",)
    assert first.fields["effect"] == ("lipoatrophies",)
    assert first.events[0].event_type == "Adverse_event"
    drug = [s for s in first.events[0].spans if s.role == "treatment.drug"][0]
    assert first.text[drug.start : drug.start + len(drug.text)] == "insulin"
    # every record has at least one event, and subject annotations exist across the corpus
    assert all(r.events for recs in phee_corpus.values() for r in recs)
    n_age = sum("subject.age" in r.fields for recs in phee_corpus.values() for r in recs)
    n_drug = sum("treatment.drug" in r.fields for recs in phee_corpus.values() for r in recs)
    assert n_age > 500 and n_drug > 4000


def test_phee_locate_refuses_a_folder_without_the_splits(tmp_path):
    with pytest.raises(MemlensError, match="not a PHEE folder"):
        phee.locate(tmp_path)


def test_phee_not_found_without_download(monkeypatch):
    monkeypatch.delenv("MEMLENS_PHEE_DIR", raising=False)
    with pytest.raises(MemlensError, match="PHEE not found"):
        phee.locate(None, allow_download=False)


def test_phee_bad_annotation_offset_names_the_line(tmp_path, phee_dir):
    lines = (phee_dir / "dev.json").read_text().splitlines()[:3]
    obj = json.loads(lines[1])
    obj["context"] = "X" + obj["context"]  # shifts every offset
    lines[1] = json.dumps(obj)
    p = tmp_path / "dev.json"
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(MemlensError, match=r"dev\.json:2: annotation .* is not at offset"):
        phee.read_split(p, "dev")


# ------------------------------------------------------------------------------------------------------ bad input

BAD_JSONL = [
    ('{"id": "a", "text": "fine"}\n{"id": "b", "text": "broken"\n', r"x\.jsonl:2: malformed JSON"),
    ('{"id": "a", "text": "fine"}\n{"id": "b"}\n', r"x\.jsonl:2: missing field 'text'"),
    ('{"id": "a", "text": "fine"}\n{"id": "b", "text": "   "}\n', r"x\.jsonl:2: field 'text' is empty"),
    ('{"id": "a", "text": "fine"}\n{"id": "a", "text": "again"}\n',
     r"x\.jsonl:2: duplicate id 'a' \(first seen at .*x\.jsonl:1\)"),
    ('{"id": "a", "text": "fine"}\n[1, 2]\n', r"x\.jsonl:2: expected a JSON object"),
    ('{"id": "a", "text": 3}\n', r"x\.jsonl:1: field 'text' must be a string"),
]


@pytest.mark.parametrize("content,message", BAD_JSONL)
def test_bad_jsonl_names_file_and_line(tmp_path, content, message):
    p = tmp_path / "x.jsonl"
    p.write_text(content)
    with pytest.raises(MemlensError, match=message):
        read_jsonl(p)


def test_invalid_utf8_names_the_line(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(MemlensError, match=r"x\.jsonl:2: invalid UTF-8"):
        read_jsonl(p)
    q = tmp_path / "x.csv"
    q.write_bytes(b"id,text\n1,ok\n2,caf\xe9\n")
    with pytest.raises(MemlensError, match=r"x\.csv:3: invalid UTF-8"):
        read_csv(q)


BAD_CSV = [
    ("id,body\n1,hello\n", r"x\.csv:1: missing column 'text'"),
    ("id,text\n1,hello\n2,\n", r"x\.csv:3: field 'text' is empty"),
    ("id,text\n1,hello\n1,again\n", r"x\.csv:3: duplicate id '1'"),
    ("id,text\n1,hello\n2,a,b\n", r"x\.csv:3: more values than header columns"),
    ("id,text\n1,hello\n2\n", r"x\.csv:3: fewer values than header columns"),
]


@pytest.mark.parametrize("content,message", BAD_CSV)
def test_bad_csv_names_file_and_line(tmp_path, content, message):
    p = tmp_path / "x.csv"
    p.write_text(content)
    with pytest.raises(MemlensError, match=message):
        read_csv(p)


def test_good_jsonl_and_csv(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"id": 7, "text": "first"}\n\n{"text": "second"}\n')
    recs = read_jsonl(p)
    assert [(r.id, r.text) for r in recs] == [("7", "first"), ("line-3", "second")]
    q = tmp_path / "x.csv"
    q.write_text('text,id\n"a, quoted ""text""",x1\n"multi\nline",x2\n')
    assert [(r.id, r.text) for r in read_csv(q)] == [("x1", 'a, quoted "text"'), ("x2", "multi\nline")]


# ------------------------------------------------------------------------------------------------------ synthetic


def test_synthetic_is_seeded_and_its_spans_are_ground_truth():
    a, b = synthetic.generate(300, seed=3), synthetic.generate(300, seed=3)
    assert [r.text for r in a] == [r.text for r in b]
    assert [r.text for r in a] != [r.text for r in synthetic.generate(300, seed=4)]
    assert len({r.text for r in a}) == 300
    for r in a:
        roles = {s.role for s in r.events[0].spans}
        assert {"subject.age", "subject.gender", "treatment.drug", "effect", "treatment.disorder"} <= roles
        for s in r.events[0].spans:
            assert r.text[s.start : s.start + len(s.text)] == s.text
    corpus = synthetic.load(1000)
    assert {k: len(v) for k, v in corpus.items()} == {"train": 600, "dev": 200, "test": 200}


# --------------------------------------------------------------------------------------------- splits and canaries


def _cfg(**kw):
    return DataConfig(**kw)


def test_paper_default_split_is_train_vs_test(phee_dir):
    cfg = _cfg(source="phee", path=str(phee_dir))
    split = make_split(load_corpus(cfg), cfg)
    assert len(split.members) == 2898 and len(split.train) == 2898
    assert {r.split for r in split.members} == {"train"} and {r.split for r in split.nonmembers} == {"test"}
    # PHEE has no member/non-member duplicates to drop
    assert len(split.nonmembers) == 968 - len({o.b_id for o in split.overlaps})


def test_random_disjoint_draws_are_seeded():
    cfg = _cfg(source="synthetic", synthetic_size=500, members={"split": "train", "n": 100},
               nonmembers={"split": "train", "n": 120}, seed=5)
    corpus = load_corpus(cfg)
    a, b = make_split(corpus, cfg), make_split(corpus, cfg)
    assert [r.id for r in a.members] == [r.id for r in b.members]
    assert len(a.members) == 100 and len(a.nonmembers) == 120
    assert not {r.id for r in a.members} & {r.id for r in a.nonmembers}
    c = make_split(corpus, cfg.model_copy(update={"seed": 6}))
    assert [r.id for r in c.members] != [r.id for r in a.members]
    assert a.manifest["hash"] == b.manifest["hash"] != c.manifest["hash"]


def test_too_many_records_asked_names_the_field():
    cfg = _cfg(source="synthetic", synthetic_size=100, members={"split": "train", "n": 50},
               nonmembers={"split": "train", "n": 20})
    with pytest.raises(MemlensError, match="data.members.n \\+ data.nonmembers.n = 70 exceeds the 60 records"):
        make_split(load_corpus(cfg), cfg)
    cfg = _cfg(source="synthetic", synthetic_size=100, members={"split": "nope"})
    with pytest.raises(MemlensError, match="data.members.split: 'nope' is not a split"):
        make_split(load_corpus(cfg), cfg)


@pytest.mark.parametrize("mode", ["overwrite", "add"])
@pytest.mark.parametrize("repeats,count", [(1, 1), (2, 1), (8, 1), (32, 1), (4, 3)])
def test_canary_repetition_puts_exactly_n_copies(mode, repeats, count):
    cfg = _cfg(source="synthetic", synthetic_size=500, members={"n": 200}, nonmembers={"n": 50},
               canary={"repeats": repeats, "count": count, "mode": mode}, seed=13)
    split = make_split(load_corpus(cfg), cfg)
    ids = [r.id for r in split.train]
    if repeats == 1:
        assert split.canaries == {} and len(set(ids)) == 200
        return
    assert len(split.canaries) == count
    for cid, n in split.canaries.items():
        assert n == repeats and ids.count(cid) == repeats
    others = [i for i in ids if i not in split.canaries]
    assert len(others) == len(set(others))  # nothing else repeats
    if mode == "overwrite":
        assert len(ids) == 200 and len(split.displaced) == count * (repeats - 1)
        assert not {r.id for r in split.displaced} & set(ids)
        assert not {r.id for r in split.displaced} & {r.id for r in split.members}
    else:
        assert len(ids) == 200 + count * (repeats - 1) and not split.displaced
    assert {r.id for r in split.members} == set(ids)


def test_canary_needs_enough_members():
    cfg = _cfg(source="synthetic", synthetic_size=500, members={"n": 10}, nonmembers={"n": 10},
               canary={"repeats": 16})
    with pytest.raises(MemlensError, match="data.canary: 1 canaries x 16 repeats need 16 members"):
        make_split(load_corpus(cfg), cfg)


def test_overlap_check_finds_planted_duplicates(tmp_path):
    members = [Record("m1", "A 45-year-old woman developed acute hepatitis after oral amiodarone 200 mg daily."),
               Record("m2", "Carbamazepine-induced rash in a child with epilepsy treated for two weeks."),
               Record("m3", "Nothing in common with anything else here at all.")]
    nonmembers = [Record("n1", "a 45-year-old  WOMAN developed acute hepatitis after oral amiodarone 200 mg daily"),
                  Record("n2", "Carbamazepine-induced rash in a child with epilepsy treated for three weeks."),
                  Record("n3", "An unrelated sentence about warfarin and bleeding in the elderly.")]
    found = {(o.a_id, o.b_id): o for o in find_overlaps(members, nonmembers, threshold=0.6)}
    assert set(found) == {("m1", "n1"), ("m2", "n2")}
    assert found[("m1", "n1")].kind == "exact" and found[("m2", "n2")].kind == "near"
    assert 0.6 <= found[("m2", "n2")].similarity < 1


def test_overlap_policy_drop_and_error(tmp_path):
    rows = [{"id": f"r{i}", "text": f"sentence number {i} about drug {i} and effect {i}."} for i in range(40)]
    rows.append({"id": "dup", "text": rows[0]["text"]})
    p = tmp_path / "x.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = dict(source=f"jsonl:{p}", members={"n": 20}, nonmembers={"n": 21}, seed=0)
    # find a seed that puts r0 and its planted copy on opposite sides
    for seed in range(50):
        cfg = _cfg(**{**base, "seed": seed})
        s = make_split(load_corpus(cfg), cfg)
        if any(o.kind == "exact" for o in s.overlaps):
            break
    else:
        pytest.fail("no seed put the planted duplicate across members and non-members")
    dup_nonmember = [o.b_id for o in s.overlaps if o.kind == "exact"][0]
    assert dup_nonmember not in {r.id for r in s.nonmembers}
    with pytest.raises(MemlensError, match="data.overlap=error: 1 non-member"):
        make_split(load_corpus(cfg), cfg.model_copy(update={"overlap": "error"}))


def test_manifest_holds_no_text_nor_a_per_record_hash():
    cfg = _cfg(source="synthetic", synthetic_size=200, members={"n": 50}, nonmembers={"n": 20})
    split = make_split(load_corpus(cfg), cfg)
    blob = json.dumps(split.manifest)
    assert split.members[0].text not in blob
    assert split.manifest["members"][0] == split.members[0].id
    assert not any(r.text_hash in json.dumps(split.manifest) for r in split.members + split.nonmembers)
    assert split.manifest["counts"]["members"] == 50 and split.manifest["seed"] == 0
