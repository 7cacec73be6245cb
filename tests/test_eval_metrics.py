"""The arithmetic of `karma eval`: MC1/MC2 and acc/acc_norm on hand-made log-likelihoods, text statistics of
replies, bootstrap intervals and the paired tests of `compare`."""

from __future__ import annotations

import math

import numpy as np
import pytest

from karma.eval import metrics as M


# ------------------------------------------------------------------------------------ multiple choice
def test_acc_and_acc_norm_disagree_when_length_matters():
    # option 0: ll -4 over 2 chars (-2.0/char); option 1: ll -6 over 12 chars (-0.5/char)
    assert M.mc_scores([-4.0, -6.0], [2, 12], {1}) == {"acc": 0.0, "acc_norm": 1.0}
    assert M.mc_scores([-4.0, -6.0], [2, 12], {0}) == {"acc": 1.0, "acc_norm": 0.0}
    # several correct options (BIG-bench ties at the top score): any of them counts
    assert M.mc_scores([-1.0, -2.0, -0.5], [1, 1, 1], {0, 2}) == {"acc": 1.0, "acc_norm": 1.0}


def test_ties_go_to_the_first_option():
    assert M.mc_scores([-1.0, -1.0], [3, 3], {1}) == {"acc": 0.0, "acc_norm": 0.0}
    assert M.mc1([-1.0, -1.0], 0) == 1.0


def test_mc1_is_argmax_of_summed_loglik():
    assert M.mc1([-2.0, -1.5, -3.0], 1) == 1.0
    assert M.mc1([-2.0, -1.5, -3.0], 0) == 0.0


def test_mc2_is_normalised_probability_mass_on_true_answers():
    ll = np.log([0.2, 0.3, 0.5])
    assert M.mc2(ll, [True, False, True]) == pytest.approx(0.7)
    # probabilities that do not sum to one are renormalised: 0.1, 0.1, 0.2 -> 0.5 on the first two
    assert M.mc2(np.log([0.1, 0.1, 0.2]), [True, True, False]) == pytest.approx(0.5)
    # stable at very low log-likelihoods, invariant to a shared offset
    assert M.mc2([-1000.0, -1001.0], [True, False]) == pytest.approx(1 / (1 + math.exp(-1)))
    assert M.mc2(ll - 500, [True, False, True]) == pytest.approx(0.7)


def test_mc2_needs_both_true_and_false_answers():
    with pytest.raises(ValueError, match="at least one true and one false"):
        M.mc2([-1.0, -2.0], [True, True])


# ------------------------------------------------------------------------------------ replies
def test_words_distinct_and_repetition():
    assert M.words("Hello, World! hello") == ["hello", ",", "world", "!", "hello"]
    # unigrams a b a a c: 3 distinct of 5; bigrams (a b) (b a) (a c): all distinct
    assert M.distinct_n(["a b a", "a c"], 1) == pytest.approx(0.6)
    assert M.distinct_n(["a b a", "a c"], 2) == pytest.approx(1.0)
    assert M.distinct_n(["", "x"], 2) == 0.0
    # 4-grams of "a b c d a b c d a": abcd bcda cdab dabc abcd bcda -> 4 distinct of 6
    assert M.rep_n("a b c d a b c d a", 4) == pytest.approx(1 / 3)
    assert M.rep_n("one two three four", 4) == 0.0
    assert M.rep_n("", 4) == 0.0


# ------------------------------------------------------------------------------------ intervals
def test_mean_ci_values_and_width():
    const = M.mean_ci([1.0] * 20)
    assert (const["value"], const["ci_low"], const["ci_high"], const["n"]) == (1.0, 1.0, 1.0, 20)
    half = M.mean_ci([0.0, 1.0] * 50, n_boot=2000)
    assert half["value"] == 0.5 and half["n"] == 100
    # normal approximation: +-1.96 * sqrt(0.25 / 100) = +-0.098
    assert half["ci_low"] == pytest.approx(0.402, abs=0.03)
    assert half["ci_high"] == pytest.approx(0.598, abs=0.03)
    assert math.isnan(M.mean_ci([])["value"])


def test_bootstrap_interval_covers_the_true_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(1)
    hits = 0
    for rep in range(300):
        ci = M.mean_ci(rng.random(60) < 0.3, n_boot=500, seed=rep)
        hits += ci["ci_low"] <= 0.3 <= ci["ci_high"]
    assert 0.89 <= hits / 300 <= 0.99


def test_jackknife_ci_equals_the_classical_interval_for_a_mean_and_brackets_distinct_n():
    v = np.random.default_rng(0).normal(size=40)
    ci = M.jackknife_ci(lambda idx: float(v[idx].mean()), 40)
    half = 1.959964 * v.std(ddof=1) / math.sqrt(40)  # jackknife SE of a mean = s / sqrt(n)
    assert ci["value"] == pytest.approx(v.mean()) and ci["ci_high"] - ci["value"] == pytest.approx(
        half, rel=1e-5
    )
    replies = ["a b", "a b", "c d", "e f"]
    ci = M.jackknife_ci(lambda idx: M.distinct_n([replies[i] for i in idx], 1), len(replies))
    assert ci["value"] == pytest.approx(6 / 8) and ci["n"] == 4
    assert ci["ci_low"] < ci["value"] < ci["ci_high"]
    # leave-one-out values: 1 without either "a b", 4/6 without "c d" or "e f" -> deviations +-1/6 from their
    # mean, SE = sqrt(3/4 * 4/36)
    assert ci["ci_high"] - ci["value"] == pytest.approx(1.959964 * math.sqrt(0.75 * 4 / 36), rel=1e-5)


def test_mean_of_means_weighs_tasks_equally():
    ci = M.mean_of_means_ci([[1.0] * 10, [0.0] * 90])
    assert ci["value"] == 0.5 and ci["n"] == 100 and ci["ci_low"] == ci["ci_high"] == 0.5


# ------------------------------------------------------------------------------------ paired tests
def test_mcnemar_exact_counts_only_discordant_pairs():
    base = [1] * 10 + [0] * 10
    new = [1] * 9 + [0] + [1] * 8 + [0] * 2  # lost 1, gained 8
    # two-sided binomial on 9 discordant pairs: 2 * P(X >= 8) = 2 * (9 + 1) / 512
    assert M.mcnemar_exact(base, new) == pytest.approx(20 / 512)
    assert M.mcnemar_exact(base, base) == 1.0


def test_paired_permutation_of_means():
    rng = np.random.default_rng(0)
    base = rng.normal(size=80)
    assert M.paired_permutation(None, base, base, n_perm=999) == 1.0
    assert M.paired_permutation(None, base, base + 1.0, n_perm=999) == pytest.approx(1 / 1000)
    noise = base + rng.normal(scale=0.01, size=80) * rng.choice([-1, 1], size=80)
    assert M.paired_permutation(None, base, noise, n_perm=999) > 0.05


def test_paired_delta_binary_and_continuous():
    base = [1, 0, 1, 0, 1, 0, 0, 0]
    new = [1, 1, 1, 1, 1, 1, 0, 0]
    d = M.paired_delta(base, new, binary=True, n_boot=500)
    assert d["delta"] == pytest.approx(3 / 8) and d["n"] == 8 and d["test"] == "McNemar exact"
    assert d["p"] == pytest.approx(0.25)  # 3 gained, 0 lost: 2 * 0.5**3
    assert d["ci_low"] <= d["delta"] <= d["ci_high"]
    c = M.paired_delta([0.1, 0.2, 0.3], [0.3, 0.4, 0.5], n_perm=999)
    assert c["delta"] == pytest.approx(0.2) and c["test"] == "paired permutation"
    assert c["ci_low"] == pytest.approx(0.2) and c["ci_high"] == pytest.approx(0.2)
    # 3 pairs, all differences +0.2: only the all-plus and all-minus sign patterns are as extreme (2 of 8)
    assert c["p"] == pytest.approx(0.25, abs=0.05)
    with pytest.raises(ValueError, match="differ in size"):
        M.paired_delta([1, 0], [1])


def test_paired_delta_of_corpus_level_distinct_detects_mode_collapse():
    base = [f"reply number {i} about topic {i * 7}" for i in range(30)]
    collapsed = ["the same answer every time"] * 30
    d = M.paired_delta(base, collapsed, corpus=M.corpus_metric("distinct_1"), n_boot=300, n_perm=300)
    assert d["delta"] == pytest.approx(M.distinct_n(collapsed, 1) - M.distinct_n(base, 1))
    assert d["delta"] < -0.1 and d["ci_high"] < 0 and d["p"] < 0.01


def test_paired_mean_of_means():
    pairs = [([0, 0, 1, 1], [1, 1, 1, 1]), ([0.5] * 6, [0.25] * 6)]
    d = M.paired_mean_of_means(pairs, n_perm=999)
    assert d["delta"] == pytest.approx((0.5 - 0.25) / 2) and d["n"] == 10
    assert d["ci_low"] <= d["delta"] <= d["ci_high"]
