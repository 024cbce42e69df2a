"""Every bad input is one clear line, exit status 2, no traceback and nothing written; and the readers and the
config loader, fed anything (hypothesis), either read it or raise memlens's user error, never anything else."""

import json
import os
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memlens.errors import MemlensError

GOOD_CONFIG = ("model: tiny\ndata: {source: synthetic, synthetic_size: 300, members: {n: 16}, nonmembers: {n: 16}}\n"
               "train: {batch_size: 8, max_steps: 1}\naudit: {bootstrap: 0, extraction: null, blind: false}\n")
GOOD_ROWS = [{"id": f"r{i}", "text": f"Sentence number {i} about a patient."} for i in range(60)]


def _jsonl(rows):
    return "".join(json.dumps(r) + "\n" for r in rows)


# (name, files to write {name: text or bytes}, command line); every case must fail with exit 2 before any compute
CASES = [
    ("config missing", {}, ["run", "nope.yaml"]),
    ("config is a folder", {"dir/x": "x"}, ["run", "dir"]),
    ("config not UTF-8", {"c.yaml": b"model: \xff\xfe\n"}, ["run", "c.yaml"]),
    ("config not YAML", {"c.yaml": "model: [tiny\n"}, ["run", "c.yaml"]),
    ("config a list", {"c.yaml": "- model\n"}, ["run", "c.yaml"]),
    ("config key twice", {"c.yaml": "model: tiny\nmodel: tiny\n"}, ["run", "c.yaml"]),
    ("unknown key", {"c.yaml": GOOD_CONFIG}, ["run", "c.yaml", "lora.rnak=2"]),
    ("unknown section", {"c.yaml": GOOD_CONFIG + "extra: {a: 1}\n"}, ["run", "c.yaml"]),
    ("rank 0", {"c.yaml": GOOD_CONFIG}, ["run", "c.yaml", "lora.rank=0"]),
    ("negative lr", {"c.yaml": GOOD_CONFIG}, ["run", "c.yaml", "train.lr=-1"]),
    ("unknown target", {"c.yaml": GOOD_CONFIG}, ["run", "c.yaml", "lora.targets=[x]"]),
    ("repeated target", {"c.yaml": GOOD_CONFIG}, ["run", "c.yaml", "lora.targets=[q, q]"]),
    ("bad dtype", {"c.yaml": GOOD_CONFIG}, ["run", "c.yaml", "train.dtype=float8"]),
    ("bad precision", {"c.yaml": GOOD_CONFIG}, ["run", "c.yaml", "audit.precision=int4"]),
    ("fp16 full fine-tuning", {"c.yaml": GOOD_CONFIG}, ["run", "c.yaml", "train.dtype=float16",
                                                         "train.method=full"]),
    ("override without =", {"c.yaml": GOOD_CONFIG}, ["run", "c.yaml", "lora.rank"]),
    ("override bad YAML", {"c.yaml": GOOD_CONFIG}, ["run", "c.yaml", "lora.targets=[q"]),
    ("override section clash", {"c.yaml": GOOD_CONFIG}, ["run", "c.yaml", "lora=1", "lora.rank=2"]),
    ("run name a path", {"c.yaml": GOOD_CONFIG}, ["run", "c.yaml", "name=../elsewhere"]),
    ("run name a dot", {"c.yaml": GOOD_CONFIG}, ["run", "c.yaml", "name=."]),
    ("unknown source", {"c.yaml": GOOD_CONFIG}, ["run", "c.yaml", "data.source=parquet:x"]),
    ("data file missing", {"c.yaml": GOOD_CONFIG}, ["run", "c.yaml", "data.source=jsonl:none.jsonl"]),
    ("malformed JSONL", {"c.yaml": GOOD_CONFIG, "d.jsonl": _jsonl(GOOD_ROWS) + "{not json\n"},
     ["run", "c.yaml", "data.source=jsonl:d.jsonl", "data.members.n=10", "data.nonmembers.n=10"]),
    ("JSONL not an object", {"c.yaml": GOOD_CONFIG, "d.jsonl": "[1, 2]\n"}, ["run", "c.yaml",
                                                                          "data.source=jsonl:d.jsonl"]),
    ("JSONL text missing", {"c.yaml": GOOD_CONFIG, "d.jsonl": '{"id": 1}\n'}, ["run", "c.yaml",
                                                                            "data.source=jsonl:d.jsonl"]),
    ("JSONL text empty", {"c.yaml": GOOD_CONFIG, "d.jsonl": '{"text": "  "}\n'}, ["run", "c.yaml",
                                                                               "data.source=jsonl:d.jsonl"]),
    ("JSONL text a number", {"c.yaml": GOOD_CONFIG, "d.jsonl": '{"text": 3}\n'}, ["run", "c.yaml",
                                                                              "data.source=jsonl:d.jsonl"]),
    ("JSONL duplicate id", {"c.yaml": GOOD_CONFIG, "d.jsonl": _jsonl(GOOD_ROWS + GOOD_ROWS[:1])},
     ["run", "c.yaml", "data.source=jsonl:d.jsonl"]),
    ("JSONL invalid UTF-8", {"c.yaml": GOOD_CONFIG, "d.jsonl": b'{"text": "a\xff"}\n'},
     ["run", "c.yaml", "data.source=jsonl:d.jsonl"]),
    ("JSONL empty file", {"c.yaml": GOOD_CONFIG, "d.jsonl": ""}, ["run", "c.yaml", "data.source=jsonl:d.jsonl"]),
    ("JSONL huge line", {"c.yaml": GOOD_CONFIG, "d.jsonl": json.dumps({"text": "w " * 600_000}) + "\n"},
     ["run", "c.yaml", "data.source=jsonl:d.jsonl"]),
    ("CSV no text column", {"c.yaml": GOOD_CONFIG, "d.csv": "id,body\n1,x\n"}, ["run", "c.yaml",
                                                                             "data.source=csv:d.csv"]),
    ("CSV ragged row", {"c.yaml": GOOD_CONFIG, "d.csv": "id,text\n1,a,b\n"}, ["run", "c.yaml",
                                                                           "data.source=csv:d.csv"]),
    ("CSV empty", {"c.yaml": GOOD_CONFIG, "d.csv": ""}, ["run", "c.yaml", "data.source=csv:d.csv"]),
    ("more members than records", {"c.yaml": GOOD_CONFIG}, ["run", "c.yaml", "data.members.n=100000"]),
    ("members and non-members of one split without n", {"c.yaml": GOOD_CONFIG, "d.jsonl": _jsonl(GOOD_ROWS)},
     ["run", "c.yaml", "data.source=jsonl:d.jsonl", "data.members.n=null"]),
    ("unknown split", {"c.yaml": GOOD_CONFIG}, ["run", "c.yaml", "data.members.split=validation"]),
    ("too many canaries", {"c.yaml": GOOD_CONFIG}, ["run", "c.yaml", "data.canary.repeats=40"]),
    ("overlap refused", {"c.yaml": GOOD_CONFIG, "d.jsonl": _jsonl(GOOD_ROWS + [{"id": "dup", "text":
                                                                                 GOOD_ROWS[0]["text"]}])},
     ["run", "c.yaml", "data.source=jsonl:d.jsonl", "data.overlap=error", "data.members.n=30",
      "data.nonmembers.n=31", "data.seed=0"]),
    ("odd online references", {"c.yaml": GOOD_CONFIG}, ["run", "c.yaml", "audit.references.mode=online",
                                                        "audit.references.count=3"]),
    ("references with full fine-tuning", {"c.yaml": GOOD_CONFIG}, ["run", "c.yaml", "train.method=full",
                                                                   "audit.references.count=2"]),
    ("formatted canary repeats 0", {"c.yaml": GOOD_CONFIG}, ["run", "c.yaml", "data.canary.formatted.repeats=[0]"]),
    ("unknown model alias", {"c.yaml": GOOD_CONFIG}, ["run", "c.yaml", "model=gpt-17"]),
    ("model folder without safetensors", {"c.yaml": GOOD_CONFIG, "m/config.json": "{}"},
     ["run", "c.yaml", "model=m"]),
    ("model folder with corrupt files", {"c.yaml": GOOD_CONFIG, "m/config.json": '{"model_type": "llama"',
                                         "m/model.safetensors": b"\x00" * 64, "m/tokenizer.json": "{"},
     ["run", "c.yaml", "model=m"]),
    ("CUDA asked on a CPU machine", {"c.yaml": GOOD_CONFIG}, ["run", "c.yaml", "train.device=cuda"]),
    ("output_dir under a file", {"c.yaml": GOOD_CONFIG, "f": "x"}, ["run", "c.yaml", "output_dir=f/runs"]),
    ("store not a memlens store", {"c.yaml": GOOD_CONFIG, "s.sqlite": b"SQLite format 3\x00" + b"\x00" * 200},
     ["run", "c.yaml", "store=s.sqlite"]),
    ("study missing", {}, ["study", "no-such-study"]),
    ("study unknown profile", {}, ["study", "demo", "--profile", "huge", "--dry-run"]),
    ("study unknown executor", {}, ["study", "demo", "--profile", "tiny", "--executor", "slurm"]),
    ("report of a missing store", {}, ["report", "--out", "r", "--store", "none.sqlite"]),
    ("results of a missing store", {}, ["results", "list", "--store", "none.sqlite"]),
    ("export format unknown", {}, ["results", "export", "x", "--format", "xlsx", "--out", "o", "--store",
                                   "none.sqlite"]),
    ("audit members missing", {"n.jsonl": _jsonl(GOOD_ROWS)}, ["audit", "--model", "tiny", "--members", "m.jsonl",
                                                               "--nonmembers", "n.jsonl"]),
    ("audit adapter not a folder", {"m.jsonl": _jsonl(GOOD_ROWS[:30]), "n.jsonl": _jsonl(GOOD_ROWS[30:])},
     ["audit", "--model", "tiny", "--adapter", "nothing", "--members", "m.jsonl", "--nonmembers", "n.jsonl"]),
    ("audit ids on both sides", {"m.jsonl": _jsonl(GOOD_ROWS[:30]), "n.jsonl": _jsonl(GOOD_ROWS[:30])},
     ["audit", "--model", "tiny", "--members", "m.jsonl", "--nonmembers", "n.jsonl"]),
    ("audit bad setting", {"m.jsonl": _jsonl(GOOD_ROWS[:30]), "n.jsonl": _jsonl(GOOD_ROWS[30:])},
     ["audit", "--model", "tiny", "--members", "m.jsonl", "--nonmembers", "n.jsonl", "bootstrap=-1"]),
    ("audit with references", {"m.jsonl": _jsonl(GOOD_ROWS[:30]), "n.jsonl": _jsonl(GOOD_ROWS[30:])},
     ["audit", "--model", "tiny", "--members", "m.jsonl", "--nonmembers", "n.jsonl", "references.count=2"]),
    ("data inspect unknown source", {}, ["data", "inspect", "nowhere:x"]),
    ("models prepare unknown alias", {}, ["models", "prepare", "gpt-17", "--no-install"]),
]


def _write(tmp_path, files):
    for name, content in files.items():
        p = tmp_path / name
        p.parent.mkdir(parents=True, exist_ok=True)
        (p.write_bytes if isinstance(content, bytes) else p.write_text)(content)


def _listing(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("name, files, argv", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, monkeypatch, capsys, name, files, argv):
    from memlens import cli

    _write(tmp_path, files)
    before = _listing(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["memlens", *argv])
    mask = os.umask(0o022)
    try:
        with pytest.raises(SystemExit) as exit_:
            cli.main()
    finally:
        os.umask(mask)
    err = capsys.readouterr().err
    assert exit_.value.code == 2, (name, err)
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert _listing(tmp_path) == before, name  # nothing written: no store, no run folder, no report


def test_the_bad_input_table_is_large(capsys):
    with capsys.disabled():
        print(f"\nbad-input suite: {len(CASES)} kinds of bad input")
    assert len(CASES) >= 40


# ------------------------------------------------------------------------------------------------------ fuzzing

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
FUZZED = {"n": 0}


def _file(factory, name: str, content):
    f = factory.mktemp("fz") / name
    (f.write_bytes if isinstance(content, bytes) else f.write_text)(content)
    return f


def _only_user_errors(fn, *args):
    FUZZED["n"] += 1
    try:
        fn(*args)
    except MemlensError as e:
        assert str(e).strip()


@FUZZ
@given(st.binary(max_size=400))
def test_the_jsonl_reader_reads_or_refuses_any_bytes(tmp_path_factory, data):
    from memlens.data.records import read_jsonl

    _only_user_errors(read_jsonl, _file(tmp_path_factory, "x.jsonl", data))


@FUZZ
@given(st.lists(st.one_of(st.dictionaries(st.sampled_from(["id", "text", "x"]), st.one_of(
    st.text(max_size=20), st.integers(), st.none(), st.booleans(), st.lists(st.integers(), max_size=2))),
    st.text(max_size=30)), max_size=6))
def test_the_jsonl_reader_reads_or_refuses_any_json(tmp_path_factory, rows):
    from memlens.data.records import read_jsonl

    text = "".join((json.dumps(r) if not isinstance(r, str) else r) + "\n" for r in rows)
    _only_user_errors(read_jsonl, _file(tmp_path_factory, "x.jsonl", text))


@FUZZ
@given(st.text(max_size=300))
def test_the_csv_reader_reads_or_refuses_any_text(tmp_path_factory, text):
    from memlens.data.records import read_csv

    _only_user_errors(read_csv, _file(tmp_path_factory, "x.csv", "id,text\n" + text))


@FUZZ
@given(st.text(max_size=200))
def test_the_config_loader_reads_or_refuses_any_yaml(tmp_path_factory, text):
    from memlens.config import load_config

    _only_user_errors(load_config, _file(tmp_path_factory, "c.yaml", text))


KEYS = ["model", "lora.rank", "lora.targets", "train.lr", "train.epochs", "data.members.n", "audit.fpr",
        "audit.references.count", "data.canary.formatted.repeats", "name", "audit.extraction", "x.y"]


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(KEYS), st.text(max_size=12)), max_size=4))
def test_the_config_loader_reads_or_refuses_any_overrides(pairs):
    from memlens.config import load_config

    _only_user_errors(load_config, None, [f"{k}={v}" for k, v in pairs])


@FUZZ
@given(st.dictionaries(st.sampled_from(["id", "context", "annotations"]), st.one_of(
    st.text(max_size=30), st.integers(), st.lists(st.dictionaries(st.text(max_size=5), st.text(max_size=5),
                                                                  max_size=2), max_size=2))))
def test_the_phee_reader_reads_or_refuses_any_object(tmp_path_factory, obj):
    from memlens.data.phee import read_split

    _only_user_errors(read_split, _file(tmp_path_factory, "train.json", json.dumps(obj) + "\n"), "train")


def test_zz_fuzz_counts(capsys):
    with capsys.disabled():
        print(f"\nfuzzing: {FUZZED['n']} generated inputs across 6 readers and loaders")
