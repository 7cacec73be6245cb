"""Power arithmetic (`karma.eval.power`): closed forms against hand-computed values, the exact McNemar power
against the test the project runs (scipy's binomtest via `metrics.mcnemar_exact`) and against simulation, the
paired-t MDE against a seeded simulation, and the inverse functions against the forward ones."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.optimize import brentq
from scipy.stats import binom, binomtest, nct
from scipy.stats import t as student

from karma.eval import metrics as M
from karma.eval import power as P

Z = 1.959963984540054 + 0.8416212335729143  # z_{0.975} + z_{0.80}


# ------------------------------------------------------------------------------------ continuous
def test_paired_mde_z_formula_and_its_inverse():
    assert P.mde_paired(1.0, 100, t=False) == pytest.approx(Z / 10, rel=1e-12)  # 0.2802
    assert P.mde_paired(0.3, 400, t=False) == pytest.approx(Z * 0.3 / 20, rel=1e-12)
    # Student-t quantiles on n - 1 df: (2.1448 + 0.8681) / √15 at n = 15
    q = student.ppf(0.975, 14) + student.ppf(0.8, 14)
    assert P.mde_paired(1.0, 15) == pytest.approx(q / math.sqrt(15), rel=1e-12)
    assert P.mde_paired(1.0, 15) > P.mde_paired(1.0, 15, t=False)
    assert P.mde_paired(2.0, 10_000) == pytest.approx(P.mde_paired(2.0, 10_000, t=False), rel=1e-3)
    assert math.isnan(P.mde_paired(1.0, 1))
    for effect, sd in ((0.05, 0.3), (0.2, 1.0), (0.01, 0.05)):
        n = P.n_paired(effect, sd)
        assert P.mde_paired(sd, n) <= effect < P.mde_paired(sd, n - 1)
    assert P.n_paired(0.28, 1.0, t=False) == math.ceil((Z / 0.28) ** 2) == 101
    with pytest.raises(ValueError, match="diff_sd must be >= 0"):
        P.mde_paired(-1.0, 10)
    with pytest.raises(ValueError, match="n must be >= 1, got 0"):
        P.mde_paired(1.0, 0)
    with pytest.raises(ValueError, match=r"power must be in \(0, 1\), got 1.5"):
        P.mde_paired(1.0, 10, power=1.5)


def test_paired_t_mde_has_80_percent_power_in_a_seeded_simulation():
    """At the t-formula MDE a paired t-test rejects about 80 % of the time (the z formula under-delivers at n = 15)."""
    rng = np.random.default_rng(0)
    n, sd, sims = 15, 1.0, 20_000
    mde = P.mde_paired(sd, n)
    d = rng.normal(mde, sd, size=(sims, n))
    tstat = d.mean(axis=1) / (d.std(axis=1, ddof=1) / math.sqrt(n))
    crit = student.ppf(0.975, n - 1)
    simulated = float(np.mean(np.abs(tstat) > crit))
    exact = float(
        nct.sf(crit, n - 1, mde / sd * math.sqrt(n)) + nct.cdf(-crit, n - 1, mde / sd * math.sqrt(n))
    )
    assert simulated == pytest.approx(exact, abs=0.01)  # the simulation is right
    assert exact == pytest.approx(0.80, abs=0.01)  # and the formula gives 80 %
    z_mde = P.mde_paired(sd, n, t=False)
    z_power = float(nct.sf(crit, n - 1, z_mde / sd * math.sqrt(n)))
    assert z_power < 0.77


def test_se_and_spearman_mde():
    assert P.mde_from_se(0.01) == pytest.approx(Z * 0.01)
    assert P.mde_spearman(1000) == pytest.approx(math.tanh(Z * math.sqrt(1.06 / 997)))  # 0.0911
    assert P.mde_spearman(1000) == pytest.approx(0.0911, abs=1e-4)
    with pytest.raises(ValueError, match="n >= 4"):
        P.mde_spearman(3)


# ------------------------------------------------------------------------------------ McNemar
def test_min_discordant_pairs_matches_the_exact_test():
    assert P.mcnemar_min_discordant(0.05) == 6
    assert binomtest(6, 6, 0.5).pvalue < 0.05 <= binomtest(5, 5, 0.5).pvalue
    assert P.mcnemar_min_discordant(0.01) == 8
    assert binomtest(8, 8, 0.5).pvalue < 0.01 <= binomtest(7, 7, 0.5).pvalue


def test_rejection_region_is_that_of_the_projects_mcnemar_test():
    c = P._reject_below(80, 0.05)
    for k in range(81):
        for x in range(k + 1):
            base = [1.0] * (k - x) + [0.0] * x  # x gained, k - x lost
            new = [0.0] * (k - x) + [1.0] * x
            rejects = M.mcnemar_exact(base, new) < 0.05
            assert rejects == (c[k] >= 0 and (x <= c[k] or x >= k - c[k])), (k, x)


def test_exact_mcnemar_power_matches_simulation():
    rng = np.random.default_rng(1)
    n, disc, delta, sims = 120, 0.2, 0.1, 4000
    gained, lost = (disc + delta) / 2, (disc - delta) / 2
    u = rng.random((sims, n))
    hits = 0
    for row in u:
        base = np.where(row < lost, 1.0, 0.0)  # lost items: right before, wrong after
        new = np.where((row >= lost) & (row < lost + gained), 1.0, 0.0)
        hits += M.mcnemar_exact(base, new) < 0.05
    assert P.mcnemar_power(n, disc, delta) == pytest.approx(hits / sims, abs=0.02)
    assert P.mcnemar_power(n, disc, 0.0) <= 0.05  # the exact test keeps its size
    assert P.mcnemar_power(n, 0.0, 0.0) == 0.0
    with pytest.raises(ValueError, match="need 0 <= |delta| <= discordance"):
        P.mcnemar_power(n, 0.05, 0.1)


def test_connor_sample_size_by_hand():
    # Connor (1987): n = (z_a √p + z_b √(p − Δ²))² / Δ²; p = 0.2, Δ = 0.1 → 154.6 → 155
    by_hand = ((1.959964 * math.sqrt(0.2) + 0.841621 * math.sqrt(0.2 - 0.01)) / 0.1) ** 2
    assert by_hand == pytest.approx(154.6, abs=0.05)
    assert P.n_mcnemar(0.1, 0.2, asymptotic=True) == 155
    assert (
        P.mcnemar_power(155, 0.2, 0.1, asymptotic=True)
        >= 0.8
        > P.mcnemar_power(154, 0.2, 0.1, asymptotic=True)
    )
    n = P.n_mcnemar(0.1, 0.2)  # exact: a little more than the normal approximation
    assert 155 <= n <= 180
    assert P.mcnemar_power(n, 0.2, 0.1) >= 0.8 > P.mcnemar_power(n - 1, 0.2, 0.1)


def test_mcnemar_mde_with_and_without_discordance():
    # asymptotic MDE solves Connor's equation
    mde = P.mde_mcnemar(500, 0.2, asymptotic=True)
    assert mde * math.sqrt(500) == pytest.approx(
        1.959964 * math.sqrt(0.2) + 0.841621 * math.sqrt(0.2 - mde**2), abs=1e-3
    )
    # exact MDE at a discordance it does not exceed: power 0.8 there
    mde = P.mde_mcnemar(500, 0.2)
    assert 0.05 < mde < 0.2
    assert P.mcnemar_power(500, 0.2, mde) == pytest.approx(0.8, abs=0.01)
    assert P.mcnemar_power(500, 0.2, mde) >= 0.8
    # more discordance, larger MDE; more items, smaller
    assert P.mde_mcnemar(500, 0.1) < P.mde_mcnemar(500, 0.2) < P.mde_mcnemar(500, 0.3)
    assert P.mde_mcnemar(1000, 0.2) < P.mde_mcnemar(500, 0.2)
    # no discordance: the floor where every change goes one way, i.e. P(Binomial(n, Δ) >= 6) = 0.8
    floor = brentq(lambda d: binom.sf(5, 150, d) - 0.8, 1e-6, 0.5)
    assert P.mde_mcnemar(150, 0.0) == pytest.approx(floor, abs=1e-4)  # 0.052
    assert P.mde_mcnemar(150, 0.0) == pytest.approx(0.052, abs=1e-3)
    assert P.mde_mcnemar(150, 0.01) == P.mde_mcnemar(150, 0.0)  # too few changes to matter
    assert P.mde_mcnemar(5, 0.3) == math.inf  # 5 items can never give p < 0.05
    assert P.mde_mcnemar(6, 0.0) == pytest.approx(0.8 ** (1 / 6), abs=1e-4)  # all 6 must flip the same way
    with pytest.raises(ValueError, match=r"discordance must be in \[0, 1\], got 1.2"):
        P.mde_mcnemar(100, 1.2)


def test_mean_of_means_mde():
    # one task: Connor's asymptotic McNemar; K equal tasks: the same as one task with all their items
    assert P.mde_mean_of_means([0.2], [300]) == pytest.approx(
        P.mde_mcnemar(300, 0.2, asymptotic=True), abs=1e-4
    )
    assert P.mde_mean_of_means([0.2] * 4, [100] * 4) == pytest.approx(
        P.mde_mcnemar(400, 0.2, asymptotic=True), abs=1e-4
    )
    # a small task dominates the unweighted mean
    assert P.mde_mean_of_means([0.2, 0.2], [1000, 50]) > P.mde_mean_of_means([0.2, 0.2], [1000, 1000]) * 2
    # continuous: z · √(Σ sd² / n) / K
    assert P.mde_mean_of_means_sd([0.3, 0.5], [100, 25]) == pytest.approx(
        Z * math.sqrt(0.09 / 100 + 0.25 / 25) / 2
    )
    with pytest.raises(ValueError, match="one discordance per task"):
        P.mde_mean_of_means([0.1], [10, 20])


# ------------------------------------------------------------------------------------ from observed pairs
def test_observed_mde_of_pairs():
    base = [1, 0, 1, 0, 1, 0, 1, 0, 1, 0] * 10
    new = list(base)
    r = P.observed_mde(base, new, binary=True)
    assert r["discordance"] == 0.0 and r["mde"] == pytest.approx(P.mde_mcnemar(100, 0.0))
    assert "no discordant pairs" in r["mde_basis"]
    new[0], new[1] = 1 - new[0], 1 - new[1]  # 2 of 100 flip: fewer changes than any detectable effect needs
    r = P.observed_mde(base, new, binary=True)
    assert r["mde"] == pytest.approx(P.mde_mcnemar(100, 0.0)) and r["mde"] > r["discordance"] == 0.02
    assert "observed discordance 0.020 is below the MDE: the floor at this n" in r["mde_basis"]
    new = list(base)
    for i in range(0, 30, 3):  # 10 of 100 items flip
        new[i] = 1 - new[i]
    r = P.observed_mde(base, new, binary=True)
    assert r["discordance"] == pytest.approx(0.1) and r["mde"] == pytest.approx(P.mde_mcnemar(100, 0.1))
    assert r["mde_basis"] == "exact McNemar, observed discordance 0.100"
    rng = np.random.default_rng(0)
    b, d = rng.random(50), rng.normal(0, 0.2, 50)
    r = P.observed_mde(b, b + d, binary=False)
    assert r["mde"] == pytest.approx(P.mde_paired(float(np.std(d, ddof=1)), 50)) and r["discordance"] is None
    r = P.observed_mde(b, b + 0.1, binary=False)
    assert math.isnan(r["mde"]) and "no spread" in r["mde_basis"]
    r = P.observed_mde(b[:5], b[:5] + d[:5], binary=False)  # 5 pairs: sign flips never reach p < 0.05
    assert r["mde"] == math.inf and r["mde_basis"] == "paired permutation: 5 pairs can never give p < 0.05"
    assert M.paired_permutation(None, b[:5], b[:5] + 1.0, n_perm=2000) > 0.05  # even a huge shift
    assert M.paired_permutation(None, b[:6], b[:6] + 1.0, n_perm=2000) < 0.05
    suite = P.suite_mde([(base, new), (base[:50], base[:50])], binary=True)
    assert suite["mde"] == pytest.approx(P.mde_mean_of_means([0.1, 0.0], [100, 50]))
    assert suite["discordance"] == pytest.approx(10 / 150)
    jk = P.corpus_mde(-0.0392, 0.0392, 32)  # ±1.96 SE with SE = 0.02
    assert jk["mde"] == pytest.approx(Z * 0.02, rel=1e-4) and jk["mde_basis"] == "normal, jackknife SE 0.02"
    assert P.corpus_mde(-0.0392, 0.0392, 5)["mde"] == math.inf
