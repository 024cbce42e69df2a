import numpy as np
import pytest

from memlens.audit import run_config
from memlens.config import load_config
from memlens.data import load_corpus, make_split
from memlens.data.splits import validation_records

BASE = ["model=tiny", "data.source=synthetic", "data.synthetic_size=400", "train.batch_size=8",
        "audit.bootstrap=50", "audit.extraction=null", "audit.blind=false"]


def test_validation_records_are_apart_from_every_trained_or_audited_record():
    # members and non-members both from dev: the validation draw must avoid them
    cfg = load_config(None, [*BASE, "data.members.split=dev", "data.nonmembers.split=dev", "data.members.n=20",
                             "data.nonmembers.n=20", "train.early_stopping.split.n=30"])
    corpus = load_corpus(cfg.data)
    split = make_split(corpus, cfg.data)
    valid = validation_records(corpus, cfg.data, split, cfg.train.early_stopping.split)
    used = {r.id for r in (*split.train, *split.members, *split.nonmembers)}
    assert len(valid) == 30 and not {r.id for r in valid} & used
    assert {r.id for r in valid} <= {r.id for r in corpus.splits["dev"]}
    from memlens.errors import MemlensError

    big = cfg.train.early_stopping.split.model_copy(update={"n": len(corpus.splits["dev"])})
    with pytest.raises(MemlensError, match="early_stopping.split.n"):
        validation_records(corpus, cfg.data, split, big)


def test_early_stopping_stops_an_overfitting_run_and_keeps_the_best_adapter(tmp_path):
    """Full fine-tuning of 8 members at a high learning rate overfits: validation NLL falls, then rises; training
    stops `patience` evaluations after its best, and the model audited is the best one."""
    cfg = load_config(None, [*BASE, f"output_dir={tmp_path}", "data.members.n=8", "data.nonmembers.n=16",
                             "train.method=full", "train.max_steps=120", "train.lr=1e-2", "train.warmup_steps=5",
                             "train.early_stopping.every=5", "train.early_stopping.patience=2",
                             "train.early_stopping.split.n=40"])
    res = run_config(cfg, progress=False)
    es = res.summary["early_stopping"]
    ev = [e["validation_nll"] for e in es["evaluations"]]
    assert es["stopped_at"] is not None and es["stopped_at"] < 120
    assert res.summary["steps"] == es["stopped_at"]
    assert es["best_step"] == es["evaluations"][int(np.argmin(ev))]["step"]
    assert es["stopped_at"] == es["best_step"] + 2 * 5  # two evaluations without improvement
    assert es["best_validation_nll"] == min(ev)
    # the audited model is the best one: re-scoring the validation records under the saved model gives the best NLL
    import torch
    from transformers import AutoModelForCausalLM

    from memlens.finetune import prepare
    from memlens.models import at_precision, resolve_precision
    from memlens.scoring import score

    prep = prepare(cfg)
    model = AutoModelForCausalLM.from_pretrained(res.run_dir / "model", dtype=torch.float32)
    st = score(at_precision(model, resolve_precision(cfg.audit.precision, torch.device("cpu"))), prep.valid_ids,
               pad_id=prep.pad_id)
    assert float(st.sum_nll.sum() / st.n_tokens.sum()) == pytest.approx(es["best_validation_nll"], rel=1e-5)
