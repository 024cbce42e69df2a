"""Check before computing: bad input, impossible settings and unusable paths are found before any model work, with
one line naming the thing, exit 2 and nothing written."""

import json
import os
import logging

import pytest

import memlens.audit as A
from memlens.audit import audit_adapter, run_config
from memlens.config import AuditConfig, load_config
from memlens.data.records import read_csv, read_jsonl
from memlens.errors import MemlensError

BASE = ["model=tiny", "data.source=synthetic", "data.synthetic_size=300", "data.members.n=16",
        "data.nonmembers.n=16", "train.batch_size=8", "train.max_steps=2", "audit.bootstrap=0",
        "audit.extraction=null", "audit.blind=false"]


from cli_helpers import cli as _cli  # noqa: E402
from cli_helpers import one_line_error as _one_line_error  # noqa: E402


def test_readers_accept_a_byte_order_mark(tmp_path):
    csv_file = tmp_path / "with-bom.csv"
    csv_file.write_bytes("\ufeffid,text\nr1,A first sentence.\nr2,A second one.\n".encode("utf-8"))
    assert [r.id for r in read_csv(csv_file)] == ["r1", "r2"]  # the id column survives the BOM
    jsonl = tmp_path / "with-bom.jsonl"
    jsonl.write_bytes('\ufeff{"id": "a", "text": "x y"}\n{"id": "b", "text": "z"}\n'.encode("utf-8"))
    assert [r.id for r in read_jsonl(jsonl)] == ["a", "b"]


def test_a_huge_line_is_refused_with_its_line_number(tmp_path):
    f = tmp_path / "big.jsonl"
    f.write_text('{"text": "fine"}\n' + json.dumps({"text": "word " * 300_000}) + "\n")
    with pytest.raises(MemlensError, match=r"big.jsonl:2: line of 1,500,01\d bytes \(at most 1,048,576"):
        read_jsonl(f)


def test_a_yaml_key_given_twice_is_an_error(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model: tiny\ntrain:\n  lr: 0.1\n  epochs: 2\n  lr: 0.2\n")
    with pytest.raises(MemlensError, match=r"c.yaml:5: invalid YAML: key 'lr' given twice \(first at line 3\)"):
        load_config(f)


def test_too_long_texts_are_cut_and_counted_or_refused(tmp_path, caplog):
    data = tmp_path / "d.jsonl"
    rows = [{"id": f"r{i}", "text": f"sentence number {i} about a drug."} for i in range(40)]
    rows[3]["text"] = " ".join(f"w{i}" for i in range(900))  # more tokens than the tiny model's 512 positions
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = ["model=tiny", f"data.source=jsonl:{data}", "data.members.n=20", "data.nonmembers.n=20",
            "train.batch_size=8", "train.max_steps=1", "audit.bootstrap=0", "audit.extraction=null",
            "audit.blind=false", f"output_dir={tmp_path / 'runs'}"]
    with caplog.at_level(logging.WARNING):
        run_config(load_config(None, base), progress=False)
    assert any("1 training text(s) longer than the context of tiny (512 tokens)" in r.message for r in caplog.records) \
        or any("1 audited text(s) longer than the context of tiny (512 tokens)" in r.message for r in caplog.records)
    calls = []
    real = A.cached_score
    A.cached_score = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        with pytest.raises(MemlensError, match="longer than the context of tiny .* set train.too_long=truncate"):
            run_config(load_config(None, [*base, "train.too_long=error", f"output_dir={tmp_path / 'r2'}"]),
                       progress=False)
    finally:
        A.cached_score = real
    assert not calls and not (tmp_path / "r2").exists()


def test_a_target_the_architecture_lacks_is_refused_before_any_scoring(tmp_path, monkeypatch):
    monkeypatch.setattr(A, "cached_score", lambda *a, **k: pytest.fail("scored before the targets were checked"))
    cfg = load_config(None, [*BASE, "model=tiny-gpt2", "lora.targets=[q]", f"output_dir={tmp_path}"])
    with pytest.raises(MemlensError, match="fuses Q, K and V"):
        run_config(cfg, progress=False)
    assert not any(tmp_path.iterdir())  # no store, no folder


def test_unusable_paths_are_found_before_the_model_loads(tmp_path, monkeypatch):
    import memlens.models as models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(MemlensError, match="is a file, not a folder"):
        run_config(load_config(None, [*BASE, f"output_dir={a_file / 'runs'}"]), progress=False)
    with pytest.raises(MemlensError, match="is a file, not a folder"):
        run_config(load_config(None, [*BASE, f"output_dir={tmp_path / 'o'}", f"store={a_file / 's.db'}"]),
                   progress=False)
    monkeypatch.setenv("MEMLENS_CACHE", str(a_file / "cache"))
    with pytest.raises(MemlensError, match="cache .* is a file, not a folder"):
        run_config(load_config(None, [*BASE, f"output_dir={tmp_path / 'o'}"]), progress=False)
    monkeypatch.setenv("MEMLENS_CACHE", str(tmp_path / "cache"))
    import memlens.preflight as P

    monkeypatch.setattr(P.shutil, "disk_usage", lambda p: type("U", (), {"free": 5 * 2**20})())
    with pytest.raises(MemlensError, match="only 5 MiB free"):
        run_config(load_config(None, [*BASE, f"output_dir={tmp_path / 'o'}"]), progress=False)
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("adapter")
    res = run_config(load_config(None, [*BASE, "train.max_steps=6", "train.warmup_steps=0", f"output_dir={tmp}"]),
                     progress=False)
    members = tmp / "m.jsonl"
    nonmembers = tmp / "n.jsonl"
    from memlens.data.synthetic import generate

    texts = [r.text for r in generate(40, seed=5)]
    members.write_text("".join(json.dumps({"id": f"m{i}", "text": t}) + "\n" for i, t in enumerate(texts[:20])))
    nonmembers.write_text("".join(json.dumps({"id": f"n{i}", "text": t}) + "\n" for i, t in enumerate(texts[20:])))
    return res.run_dir / "adapter", members, nonmembers


def test_an_adapter_of_another_base_is_refused(trained, tmp_path):
    adapter, members, nonmembers = trained
    assert json.loads((adapter / "memlens_base.json").read_text())["fingerprint"]
    from memlens.models import build_tiny

    other = tmp_path / "other-base"  # the same architecture and shapes, other weights
    lm = build_tiny(seed=1)
    lm.model.save_pretrained(other, safe_serialization=True)
    lm.tokenizer.save_pretrained(other)
    db = tmp_path / "s.sqlite"
    p = _cli("audit", "--model", str(other), "--adapter", str(adapter), "--members", str(members),
             "--nonmembers", str(nonmembers), "--store", str(db), "extraction=null", "bootstrap=0")
    _one_line_error(p, "trained on a base model with other weights")
    p = _cli("audit", "--model", "tiny-gpt2", "--adapter", str(adapter), "--members", str(members),
             "--nonmembers", str(nonmembers), "--store", str(db), "extraction=null", "bootstrap=0")
    _one_line_error(p, "another architecture")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    (broken / "adapter_model.safetensors").write_bytes(b"\x00" * 100)
    p = _cli("audit", "--model", "tiny", "--adapter", str(broken), "--members", str(members),
             "--nonmembers", str(nonmembers), "--store", str(db), "extraction=null", "bootstrap=0")
    _one_line_error(p, "not a readable safetensors file")
    p = _cli("audit", "--model", "tiny", "--adapter", str(adapter), "--members", str(members),
             "--nonmembers", str(nonmembers), "--store", str(db), "--dtype", "float8")
    _one_line_error(p, "--dtype 'float8'")
    assert not db.exists()  # nothing written by any of them
    # the right base is accepted
    res = audit_adapter("tiny", str(adapter), str(members), str(nonmembers),
                        AuditConfig(extraction=None, bootstrap=0, blind=False), db=db)
    assert res.summary["n_members"] == 20


def test_audit_handles_non_members_that_repeat_members_as_run_does(trained, tmp_path):
    adapter, members, _ = trained
    copies = tmp_path / "copies.jsonl"  # the members' own texts under new ids
    copies.write_text("".join(json.dumps({"id": "x" + json.loads(line)["id"], "text": json.loads(line)["text"]})
                              + "\n" for line in members.read_text().splitlines()))
    cfg = AuditConfig(extraction=None, bootstrap=0, blind=False)
    with pytest.raises(MemlensError, match="20 non-member\\(s\\) duplicate a member \\(20 exact\\).*no non-member is"):
        audit_adapter("tiny", str(adapter), str(members), str(copies), cfg, db=tmp_path / "a.sqlite")
    with pytest.raises(MemlensError, match="duplicate a member"):
        audit_adapter("tiny", str(adapter), str(members), str(copies), cfg, db=tmp_path / "a.sqlite",
                      overlap="error")
    assert not (tmp_path / "a.sqlite").exists()


@pytest.mark.parametrize("args, words", [
    (["run", "missing.yaml"], ["missing.yaml: config file not found"]),
    (["run", "c.yaml", "lora.rnak=2"], ["unknown key 'lora.rnak'", "did you mean 'lora.rank'"]),
    (["run", "c.yaml", "lora.rank=0", "train.lr=-1"], ["lora.rank", "train.lr", ";"]),
    (["run", "c.yaml", "name=../x"], ["plain name"]),
    (["run", "c.yaml", "data.source=jsonl:nowhere.jsonl"], ["nowhere.jsonl: file not found"]),
    (["results", "show", "x", "--store", "c.yaml"], ["not a memlens results store"]),
    (["audit", "--model", "tiny", "--members", "nowhere.jsonl", "--nonmembers", "n.jsonl"], ["nowhere.jsonl"]),
])
def test_user_errors_are_one_line_without_a_traceback(tmp_path, args, words):
    (tmp_path / "c.yaml").write_text("model: tiny\ndata: {source: synthetic, synthetic_size: 300}\n")
    p = _cli(*args, cwd=tmp_path)
    _one_line_error(p, *words)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["c.yaml"]  # nothing written
    if args[0] == "run":
        p = _cli("--debug", *args, cwd=tmp_path)
        assert "Traceback" in p.stderr  # --debug shows it


def test_help_examples_print_as_written():
    p = _cli("run", "--help")
    assert p.returncode == 0 and "lora.targets=[o]" in p.stdout  # a rich style tag would swallow "[o]"


def test_targets_are_checked_from_the_config_before_the_weights_load(tmp_path, monkeypatch):
    import memlens.models as models
    from memlens.models import build_tiny

    folder = tmp_path / "gpt2-like"
    lm = build_tiny(arch="gpt2")
    lm.model.save_pretrained(folder, safe_serialization=True)
    lm.tokenizer.save_pretrained(folder)
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the weights loaded"))
    with pytest.raises(MemlensError, match="fuses Q, K and V"):
        run_config(load_config(None, [*BASE, f"model={folder}", "lora.targets=[v]", f"output_dir={tmp_path / 'o'}"]),
                   progress=False)


def test_a_read_only_store_or_folder_is_found_before_the_model_loads(tmp_path, monkeypatch):
    import memlens.models as models
    import memlens.preflight as P

    first = run_config(load_config(None, [*BASE, f"output_dir={tmp_path / 'a'}"]), progress=False)
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    real_access = os.access
    monkeypatch.setattr(P.os, "access", lambda p, mode: False if str(p) == str(first.store) else real_access(p, mode))
    with pytest.raises(MemlensError, match="the results store is not writable"):
        run_config(load_config(None, [*BASE, "lora.rank=2", f"output_dir={tmp_path / 'a'}"]), progress=False)
    monkeypatch.setattr(P.os, "access", lambda p, mode: False)
    with pytest.raises(MemlensError, match="is not writable"):
        run_config(load_config(None, [*BASE, "lora.rank=3", f"output_dir={tmp_path / 'b'}"]), progress=False)
    assert not (tmp_path / "b").exists()
    # reading a store needs no write permission
    from memlens import store as S

    conn = S.connect_readonly(first.store)
    assert S.run_exists(conn, first.run_id)
    conn.close()
