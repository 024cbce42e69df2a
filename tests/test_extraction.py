import pytest
import torch

from memlens.scoring import score
from memlens.extraction import (Decoding, extract, generate, lcs_length, levenshtein, longest_common_run,
                                matched_prefix, similarity, split_point, summarize)
from memlens.models import build_tiny


def test_hand_computed_ngram_shares():
    s = [5, 6, 7, 8, 9, 10]
    assert similarity(s, s)["ngram_share"] == 1.0
    assert similarity([5, 6, 7, 0, 0, 0], s)["ngram_share"] == pytest.approx(3 / 6)
    assert similarity([1, 7, 8, 9, 10, 2], s)["ngram_share"] == pytest.approx(4 / 6)
    assert similarity([6, 5, 8, 7, 10, 9], s)["ngram_share"] == pytest.approx(1 / 6)
    assert similarity([], s)["ngram_share"] == 0.0
    assert similarity([1, 2, 3], s)["ngram_share"] == 0.0
    # the paper's Fig. 3.1 shape: a paraphrase keeps a long run but not the whole suffix
    assert longest_common_run([1, 2, 3, 9, 4, 5], [1, 2, 3, 4, 5]) == 3


def test_other_similarity_measures_by_hand():
    s = [1, 2, 3, 4]
    r = similarity([1, 2, 9, 4], s)
    assert r["exact"] == 0.0 and r["prefix_match"] == 2.0
    assert r["rouge_l"] == pytest.approx(0.75)  # lcs 3 of 4 both ways
    assert r["edit_sim"] == pytest.approx(0.75)  # one substitution
    assert similarity(s, s) == {"ngram_share": 1.0, "exact": 1.0, "prefix_match": 4.0, "rouge_l": 1.0,
                                "edit_sim": 1.0}
    assert lcs_length([1, 3, 5], [1, 2, 3, 4, 5]) == 3
    assert levenshtein([1, 2, 3], []) == 3 and levenshtein([], []) == 0
    assert matched_prefix([1, 2], [1, 2, 3]) == 2
    r = similarity([1, 2], s)  # short continuation: precision 1, recall 0.5
    assert r["rouge_l"] == pytest.approx(2 * 1 * 0.5 / 1.5) and r["edit_sim"] == 0.5


def test_split_points():
    assert split_point(10) == 5 and split_point(11) == 5  # floor(L/2), BOS included in the prompt
    assert split_point(2) == 1
    assert split_point(10, "fraction", fraction=0.25) == 2
    assert split_point(10, "length", length=4) == 4
    assert split_point(5, "length", length=40) == 4  # at least one suffix token


def test_batched_greedy_generation_equals_one_generate_per_prompt():
    lm = build_tiny()
    texts = ["A 45-year-old woman developed acute hepatitis.", "Rash.", "Warfarin and bleeding in a man of 80 years",
             "CASE: A 12-year-old boy on oral lithium"]
    seqs = lm.encode(texts)
    prompts = [s[: split_point(len(s))] for s in seqs]
    max_new = [len(s) - len(p) for s, p in zip(seqs, prompts)]
    pad = lm.tokenizer.pad_token_id
    batched = generate(lm.model, prompts, max_new, Decoding(None), pad_id=pad, eos_id=None, batch_size=4)
    for p, m, got in zip(prompts, max_new, batched):
        with torch.no_grad():
            ref = lm.model.generate(input_ids=torch.tensor([p]), max_new_tokens=m, do_sample=False,
                                    pad_token_id=pad)[0, len(p):].tolist()
        assert [c.tokens for c in got] == [ref]


def test_extract_scores_continuations_only_and_summarizes():
    lm = build_tiny()
    seqs = lm.encode(["A 45-year-old woman developed acute hepatitis after oral amiodarone.",
                      "Carbamazepine-induced rash in a child with epilepsy."])
    rows = extract(lm.model, seqs, [True, False], [Decoding(None), Decoding(0.7, samples=2)],
                   pad_id=lm.tokenizer.pad_token_id, eos_id=None)
    assert len(rows) == 2 * 1 + 2 * 2
    for r in rows:
        s = seqs[r.index]
        assert r.prefix_len == len(s) // 2 and r.suffix_len == len(s) - len(s) // 2
        assert len(r.continuation) == r.suffix_len
        assert r.scores == similarity(r.continuation, s[r.prefix_len:])
        # the perplexity taken from the generation's own logits equals an independent scoring of prompt + continuation
        ref = score(lm.model, [s[: r.prefix_len] + r.continuation], starts=[r.prefix_len]).perplexity[0]
        assert r.gen_ppl == pytest.approx(ref, rel=1e-4) and r.gen_ppl > 1
    summ = {(x["decoding"], x["measure"]): x for x in summarize(rows)}
    g = summ[("greedy", "ngram_share")]
    assert g["difference"] == pytest.approx(g["members"] - g["nonmembers"])
    assert summ[("T=0.7", "exact")]["n_members"] == 2


def test_a_difference_without_variation_gets_newcombes_interval_not_a_zero_width_welch():
    """No continuation exact on either side: Welch's interval would be (0, 0); the summary gives Newcombe's on the
    number of prompts (two samples a prompt: 20 and 15 prompts, not 40 and 30 continuations)."""
    from statsmodels.stats.proportion import confint_proportions_2indep

    import numpy as np

    from memlens.extraction import ExtractionRow, summarize

    rows = [ExtractionRow(i, i < 20, "T=1", j, 4, 4, [1], {"ngram_share": 0.5 * (i % 2), "exact": 0.0,
                                                               "prefix_match": 0.0, "rouge_l": 0.25 * (j + i % 3),
                                                               "edit_sim": 0.1}, 2.0)
            for i in range(35) for j in range(2)]
    by = {r["measure"]: r for r in summarize(rows)}
    lo, hi = confint_proportions_2indep(0, 20, 0, 15, method="newcomb", compare="diff")
    assert by["exact"]["difference_by"] == "newcombe" and (by["exact"]["difference_lo"], by["exact"]["difference_hi"]) \
        == pytest.approx((lo, hi)) and hi > 0.1
    assert by["edit_sim"]["difference_by"] == "newcombe"  # constant 0.1 on both sides
    assert by["prefix_match"]["difference_by"] == "none" and by["prefix_match"]["difference_lo"] != \
        by["prefix_match"]["difference_lo"]  # a count without variation: no interval (nan), not (0, 0)
    # where both sides vary and have 10 prompts or more: Welch over the continuations, as before
    r = by["rouge_l"]
    mem = np.array([0.25 * (j + i % 3) for i in range(20) for j in range(2)])
    non = np.array([0.25 * (j + i % 3) for i in range(20, 35) for j in range(2)])
    half = 1.959964 * np.sqrt(mem.var(ddof=1) / mem.size + non.var(ddof=1) / non.size)
    assert r["difference_by"] == "welch" and r["difference_lo"] == pytest.approx(mem.mean() - non.mean() - half)
