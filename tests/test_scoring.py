import math
import zlib

import numpy as np
import pytest
import torch

from memlens.models import build_tiny
from memlens import scoring as S
from memlens.config import LoraConfig
from memlens.finetune import apply_lora
from memlens.scoring import score, zlib_length

TEXTS = ["Short one.", "A 45-year-old woman developed acute hepatitis after amiodarone 200 mg daily.",
         "Carbamazepine-induced rash in a child.", "x y", "OBJECTIVE: To report 2 cases of serotonin syndrome."]


def _one_at_a_time(model, s):
    """Independent computation: one sequence, full log-softmax, plain Python reductions."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([s])).logits[0, :-1].double()
    logp = torch.log_softmax(logits, -1)
    lp = [float(logp[t, s[t + 1]]) for t in range(len(s) - 1)]
    p = logp.exp()
    mu = (p * logp).sum(-1)
    sd = ((p * (logp - mu[:, None]) ** 2).sum(-1)).sqrt()
    z = [(lp[t] - float(mu[t])) / float(sd[t]) for t in range(len(s) - 1)]
    return lp, z


def _lowest(vals, k):
    m = max(1, math.ceil(k * len(vals)))
    return sum(sorted(vals)[:m]) / m


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("path", ["head on targets", "full logits"])
def test_stats_match_an_independent_per_sample_computation(arch, path, monkeypatch):
    lm = build_tiny(arch=arch)
    seqs = lm.encode(TEXTS)
    assert S.plain_head(lm.model) is not None  # both tiny models have a plain output head
    if path == "full logits":
        monkeypatch.setattr(S, "plain_head", lambda model: None)
    st = score(lm.model, seqs, batch_size=2, pad_id=lm.tokenizer.pad_token_id, ks=(0.1, 0.5, 1.0), min_k_pp=True,
               head_chunk=7)  # chunks that cut through sequences
    for i, s in enumerate(seqs):
        lp, z = _one_at_a_time(lm.model, s)
        assert st.n_tokens[i] == len(s) - 1
        assert st.mean_nll[i] == pytest.approx(-np.mean(lp), abs=1e-5)
        assert st.perplexity[i] == pytest.approx(math.exp(-np.mean(lp)), rel=1e-5)
        for k in (0.1, 0.5):
            assert st.min_k[k][i] == pytest.approx(_lowest(lp, k), abs=1e-5)
            assert st.min_k_pp[k][i] == pytest.approx(_lowest(z, k), abs=1e-4)
        assert st.min_k[1.0][i] == pytest.approx(np.mean(lp), abs=1e-5)


def test_adapted_model_is_scored_through_its_adapter():
    lm = build_tiny()
    seqs = lm.encode(TEXTS)
    model, _ = apply_lora(lm, LoraConfig(targets=["q", "v", "o"], rank=2), seed=0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    model.eval()  # no LoRA dropout in the reference computation
    st = score(model, seqs, batch_size=3, pad_id=0)
    for i, s in enumerate(seqs):
        lp, _ = _one_at_a_time(model, s)
        assert st.mean_nll[i] == pytest.approx(-np.mean(lp), abs=1e-5)
    with model.disable_adapter():
        base = score(model, seqs, batch_size=3, pad_id=0)
    assert np.abs(base.mean_nll - st.mean_nll).max() > 1e-3  # the adapter matters, and was used above


def test_starts_restrict_the_targets():
    lm = build_tiny()
    s = lm.encode([TEXTS[1]])[0]
    full = score(lm.model, [s])
    tail = score(lm.model, [s], starts=[5])
    lp, _ = _one_at_a_time(lm.model, s)
    assert tail.n_tokens[0] == len(s) - 5
    assert tail.sum_nll[0] == pytest.approx(-sum(lp[4:]), abs=1e-4)
    assert full.sum_nll[0] == pytest.approx(-sum(lp), abs=1e-4)


def test_batch_size_and_order_do_not_change_results():
    lm = build_tiny()
    seqs = lm.encode(TEXTS)
    a = score(lm.model, seqs, batch_size=1, pad_id=0, ks=(0.2,), min_k_pp=True)
    b = score(lm.model, seqs, batch_size=5, pad_id=0, ks=(0.2,), min_k_pp=True)
    assert np.allclose(a.sum_nll, b.sum_nll, atol=1e-4) and np.allclose(a.min_k_pp[0.2], b.min_k_pp[0.2], atol=1e-4)


def test_zlib_length():
    assert zlib_length("aaaa" * 50) == len(zlib.compress(("aaaa" * 50).encode(), 9)) < 20


def test_length_sorted_batches_keep_padding_under_ten_percent():
    from memlens.scoring import length_sorted_batches

    lengths = [3 + (i * 53) % 120 for i in range(500)] + [400]
    batches = list(length_sorted_batches(lengths, 64))
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        longest = max(lengths[i] for i in b)
        assert len(b) <= 64 and lengths[b[0]] == longest
        assert 1 - sum(lengths[i] for i in b) / (len(b) * longest) < 0.1
    assert [400] == [lengths[i] for i in batches[0]]  # the longest first, alone
