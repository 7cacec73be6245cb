"""Power arithmetic for the paired tests `compare` runs: the minimum detectable effect (MDE) at a given n, and
the n needed for a given effect. Pure functions (scipy.stats only); defaults: two-sided α = 0.05, power 0.8.

The MDE is the smallest true effect the test would call significant (p < α) with probability `power`. A run
that finds nothing says "no effect larger than the MDE" — it says nothing about effects below it.

* **Paired 0/1 scores, exact McNemar** (`acc`, `acc_norm`, `mc1`). Only discordant items (right before and
  wrong after, or the reverse) carry information. With discordant share `p_d` and an accuracy change
  `Δ = p_gained − p_lost`, the count of discordant items is Binomial(n, p_d) and, given k of them, the
  gains are Binomial(k, (p_d + Δ) / (2 p_d)); `mcnemar_power` sums the exact rejection probability over k.
  `Δ` cannot exceed the discordance, so the MDE lets the discordance grow to Δ where Δ needs it
  (`p_d' = max(p_d, Δ)`): at zero observed discordance the MDE is the floor "every changed item moved the same
  way", which no n below `mcnemar_min_discordant()` (6 at α = 0.05) can reach at all.
  `asymptotic=True` uses Connor's (1987) normal approximation instead.
* **Paired continuous scores** (paired permutation ≈ paired t; `mc2`, reward, lengths):
  `MDE = (q_{1-α/2} + q_power) · sd(diff) / √n`, with Student-t quantiles on n − 1 degrees of freedom (the
  z formula `(z_{1-α/2} + z_power) · sd / √n`, 2.80 · sd / √n, for `t=False` or large n).
* **A statistic with a known standard error** (the suite's mean of task means, corpus-level distinct-n, a
  Spearman difference from a bootstrap): `MDE = (z_{1-α/2} + z_power) · SE`.
* **The unweighted mean of K task means of 0/1 scores** (the pragmatics suite row): normal approximation
  with each task's discordance, `K·Δ = z_{1-α/2}·√(Σ p_k / n_k) + z_power·√(Σ (p_k − Δ²) / n_k)`,
  `p_k = max(p_k, Δ)` as for McNemar — a small task weighs as much as a large one, so small tasks dominate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import numpy as np

ALPHA = 0.05
POWER = 0.80


def _z(alpha: float, power: float) -> tuple[float, float]:
    from scipy.stats import norm

    _check(alpha, power)
    return float(norm.ppf(1 - alpha / 2)), float(norm.ppf(power))


def _check(alpha: float, power: float) -> None:
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if not 0 < power < 1:
        raise ValueError(f"power must be in (0, 1), got {power}")


def _check_n(n: int) -> None:
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")


# ------------------------------------------------------------------------------------ continuous, paired
def mde_paired(
    diff_sd: float, n: int, *, alpha: float = ALPHA, power: float = POWER, t: bool = True
) -> float:
    """MDE of a paired test on continuous scores: `(q_{1-α/2} + q_power) · sd(diff) / √n`.

    `t=True` takes the quantiles from Student's t on n − 1 degrees of freedom (matches a paired t-test's power
    at small n); `t=False` is the normal (z) formula. NaN when n < 2 with `t=True` (no degrees of freedom).
    """
    _check_n(n)
    if diff_sd < 0:
        raise ValueError(f"diff_sd must be >= 0, got {diff_sd}")
    if t:
        from scipy.stats import t as student

        _check(alpha, power)
        if n < 2:
            return math.nan
        q = float(student.ppf(1 - alpha / 2, n - 1) + student.ppf(power, n - 1))
    else:
        q = sum(_z(alpha, power))
    return q * diff_sd / math.sqrt(n)


def n_paired(
    effect: float, diff_sd: float, *, alpha: float = ALPHA, power: float = POWER, t: bool = True
) -> int:
    """The smallest n whose `mde_paired` is at most `effect`."""
    if effect <= 0:
        raise ValueError(f"effect must be > 0, got {effect}")
    if diff_sd == 0:
        return 2 if t else 1
    z = sum(_z(alpha, power))
    n = max(2 if t else 1, math.ceil((z * diff_sd / effect) ** 2))
    while t and mde_paired(diff_sd, n, alpha=alpha, power=power) > effect:
        n += 1
    return n


def mde_from_se(se: float, *, alpha: float = ALPHA, power: float = POWER) -> float:
    """MDE of a normally distributed estimate with standard error `se`: `(z_{1-α/2} + z_power) · se`."""
    if se < 0:
        raise ValueError(f"se must be >= 0, got {se}")
    return sum(_z(alpha, power)) * se


def mde_spearman(n: int, *, alpha: float = ALPHA, power: float = POWER) -> float:
    """The smallest Spearman correlation distinguishable from 0: Fisher z with Fieller's variance 1.06 / (n − 3)."""
    if n < 4:
        raise ValueError(f"mde_spearman needs n >= 4, got {n}")
    return math.tanh(sum(_z(alpha, power)) * math.sqrt(1.06 / (n - 3)))


# ------------------------------------------------------------------------------------ 0/1, exact McNemar
def mcnemar_min_discordant(alpha: float = ALPHA) -> int:
    """The fewest discordant pairs with which the two-sided exact McNemar test can give p < alpha
    (all of them moving the same way: p = 2 · 0.5^k). The same bound holds for the number of pairs of a
    two-sided sign-flip permutation test."""
    _check(alpha, 0.5)
    return math.floor(math.log2(2 / alpha)) + 1


@lru_cache(maxsize=64)
def _reject_below(n: int, alpha: float) -> np.ndarray:
    """For k = 0..n discordant pairs, the largest count c with two-sided exact p < alpha for x <= c (or
    x >= k − c); −1 where no count rejects. p(x) = min(1, 2 · F(min(x, k − x); k, 0.5))."""
    from scipy.stats import binom, norm

    ks = np.arange(n + 1)
    # start from the normal approximation, then step to the exact boundary (vectorised cdf; ppf is slow)
    z = float(norm.ppf(1 - alpha / 2))
    c = np.clip(np.floor(ks / 2 - z * np.sqrt(ks) / 2), -1, ks).astype(int)
    for _ in range(64):
        up = (c + 1 <= ks) & (binom.cdf(c + 1, ks, 0.5) < alpha / 2)
        down = (c >= 0) & (binom.cdf(c, ks, 0.5) >= alpha / 2)
        if not (up.any() or down.any()):
            break
        c = c + up - down
    return np.minimum(c, (ks - 1) // 2)


def mcnemar_power(
    n: int, discordance: float, delta: float, *, alpha: float = ALPHA, asymptotic: bool = False
) -> float:
    """Probability that McNemar's test gives p < alpha on n paired 0/1 items whose discordant share is
    `discordance` and whose accuracy change is `delta` (|delta| <= discordance)."""
    _check_n(n)
    delta = abs(delta)
    if not 0 <= discordance <= 1 or delta > discordance + 1e-12:
        raise ValueError(
            f"need 0 <= |delta| <= discordance <= 1, got delta {delta}, discordance {discordance}"
        )
    if discordance == 0:
        return 0.0
    if asymptotic:
        from scipy.stats import norm

        za = float(norm.ppf(1 - alpha / 2))
        sd1 = math.sqrt(max(discordance - delta**2, 1e-15))
        return float(norm.cdf((delta * math.sqrt(n) - za * math.sqrt(discordance)) / sd1))
    from scipy.stats import binom

    # the counts of discordant pairs outside [lo, hi] carry < 1e-13 of the probability: skip them
    lo, hi = (int(x) for x in (binom.ppf(1e-14, n, discordance), binom.isf(1e-14, n, discordance)))
    ks = np.arange(max(lo - 1, 0), min(hi + 1, n) + 1)
    c = _reject_below(n, alpha)[ks]
    q = min((discordance + delta) / (2 * discordance), 1.0)
    ok = c >= 0
    reject = np.zeros(ks.size)
    reject[ok] = binom.cdf(c[ok], ks[ok], q) + binom.sf(ks[ok] - c[ok] - 1, ks[ok], q)
    return float(np.sum(binom.pmf(ks, n, discordance) * reject))


def _bisect_effect(power_at, target: float, hi: float = 1.0, tol: float = 1e-5) -> float:
    """The smallest effect in (0, hi] with power_at(effect) >= target (power_at non-decreasing); inf if none."""
    if power_at(hi) < target:
        return math.inf
    lo = 0.0
    while hi - lo > tol:
        mid = (lo + hi) / 2
        if power_at(mid) >= target:
            hi = mid
        else:
            lo = mid
    return hi


def mde_mcnemar(
    n: int, discordance: float, *, alpha: float = ALPHA, power: float = POWER, asymptotic: bool = False
) -> float:
    """MDE in accuracy (a share, 0.05 = 5 points) of McNemar's test on n paired items.

    `discordance`: the share of items whose score changed (observed, or assumed when planning). An effect Δ
    larger than it is evaluated at discordance Δ (all changes one way), so discordance 0 gives the floor of
    this n. inf when even Δ = 1 is not detectable (n < `mcnemar_min_discordant(alpha)`).
    """
    _check_n(n)
    _check(alpha, power)
    if not 0 <= discordance <= 1:
        raise ValueError(f"discordance must be in [0, 1], got {discordance}")
    return _bisect_effect(
        lambda d: (
            mcnemar_power(n, max(discordance, d), d, alpha=alpha, asymptotic=asymptotic) if d > 0 else 0.0
        ),
        power,
    )


def n_mcnemar(
    effect: float,
    discordance: float,
    *,
    alpha: float = ALPHA,
    power: float = POWER,
    asymptotic: bool = False,
    n_max: int = 10**6,
) -> int:
    """The smallest n whose McNemar MDE is at most `effect` at this discordance (the exact power is slightly
    saw-toothed in n; this is the first n that reaches it)."""
    if not 0 < effect <= 1:
        raise ValueError(f"effect must be in (0, 1], got {effect}")
    p = max(discordance, effect)
    za, zb = _z(alpha, power)
    # Connor's sample size as the starting point, then step (exact power is not monotone in n, so scan down too)
    guess = max(1, math.floor(((za * math.sqrt(p) + zb * math.sqrt(max(p - effect**2, 0.0))) / effect) ** 2))

    def ok(m: int) -> bool:
        return mcnemar_power(m, p, effect, alpha=alpha, asymptotic=asymptotic) >= power

    n = guess
    while not ok(n):
        n = max(n + 1, int(n * 1.02))
        if n > n_max:
            raise ValueError(f"no n <= {n_max} detects {effect} at discordance {discordance}")
    while n > 1 and ok(n - 1):
        n -= 1
    return n


# ------------------------------------------------------------------------------------ mean of task means
def mde_mean_of_means(
    discordances: Sequence[float], ns: Sequence[int], *, alpha: float = ALPHA, power: float = POWER
) -> float:
    """MDE of the unweighted mean of K task means of paired 0/1 scores (every task shifted by the same Δ),
    from each task's discordance and n (normal approximation; see the module docstring)."""
    if len(discordances) != len(ns) or not ns:
        raise ValueError("need one discordance per task and at least one task")
    for n in ns:
        _check_n(n)
    za = _z(alpha, power)[0]
    p0, inv_n, k = np.asarray(discordances, float), 1.0 / np.asarray(ns, float), len(ns)

    def power_at(d: float) -> float:
        from scipy.stats import norm

        if d <= 0:
            return 0.0
        p = np.maximum(p0, d)
        s0, s1 = (
            math.sqrt(float(np.sum(p * inv_n))),
            math.sqrt(max(float(np.sum((p - d * d) * inv_n)), 1e-15)),
        )
        return float(norm.cdf((k * d - za * s0) / s1))

    return _bisect_effect(power_at, power)


def mde_mean_of_means_sd(
    diff_sds: Sequence[float], ns: Sequence[int], *, alpha: float = ALPHA, power: float = POWER
) -> float:
    """MDE of the unweighted mean of K task means of continuous paired differences: z · √(Σ sd_k² / n_k) / K."""
    if len(diff_sds) != len(ns) or not ns:
        raise ValueError("need one sd per task and at least one task")
    se = math.sqrt(sum(s * s / n for s, n in zip(diff_sds, ns, strict=True))) / len(ns)
    return mde_from_se(se, alpha=alpha, power=power)


# ------------------------------------------------------------------------------------ from observed pairs
def discordance(base: Sequence[float], new: Sequence[float]) -> float:
    """Share of paired 0/1 items whose score changed."""
    a, b = np.asarray(base) > 0.5, np.asarray(new) > 0.5
    return float((a != b).mean()) if a.size else math.nan


def observed_mde(
    base: Sequence[float], new: Sequence[float], *, binary: bool, alpha: float = ALPHA, power: float = POWER
) -> dict:
    """The MDE a paired comparison had, from its own pairs: {mde, discordance, mde_basis}.

    0/1 scores: exact McNemar at the observed discordance (its floor when no item changed). Continuous:
    the t formula with the observed sd of the differences (NaN when every difference is the same; inf below
    6 pairs at alpha 0.05, where the sign-flip permutation test cannot reach significance at all)."""
    n = len(base)
    if n == 0:
        return {"mde": math.nan, "discordance": None, "mde_basis": "no items"}
    if binary:
        disc = discordance(base, new)
        mde = mde_mcnemar(n, disc, alpha=alpha, power=power)
        if disc == 0:
            basis = (
                "exact McNemar, no discordant pairs: the floor at this n (every changed item moving one way)"
            )
        elif mde > disc:
            basis = (
                f"exact McNemar, observed discordance {disc:.3f} is below the MDE: the floor at this n "
                "(every changed item moving one way)"
            )
        else:
            basis = f"exact McNemar, observed discordance {disc:.3f}"
        return {"mde": mde, "discordance": disc, "mde_basis": basis}
    if n < mcnemar_min_discordant(alpha):  # a sign-flip permutation test's smallest p is 2 / 2^n
        return {
            "mde": math.inf,
            "discordance": None,
            "mde_basis": f"paired permutation: {n} pairs can never give p < {alpha:g}",
        }
    d = np.asarray(new, dtype=float) - np.asarray(base, dtype=float)
    sd = float(d.std(ddof=1))
    if not sd > 1e-12 * max(1.0, float(np.abs(d).max())):  # all differences equal (up to rounding)
        return {
            "mde": math.nan,
            "discordance": None,
            "mde_basis": "paired t: no spread in the differences, MDE undefined",
        }
    return {
        "mde": mde_paired(sd, n, alpha=alpha, power=power),
        "discordance": None,
        "mde_basis": f"paired t, observed sd(diff) {sd:.4g}",
    }


def suite_mde(
    pairs: Sequence[tuple[Sequence[float], Sequence[float]]],
    *,
    binary: bool,
    alpha: float = ALPHA,
    power: float = POWER,
) -> dict:
    """The MDE of the unweighted mean of task means on paired items, from each task's own pairs."""
    pairs = [(b, n) for b, n in pairs if len(b)]
    if not pairs:
        return {"mde": math.nan, "discordance": None, "mde_basis": "no items"}
    ns = [len(b) for b, _ in pairs]
    if binary:
        discs = [discordance(b, n) for b, n in pairs]
        pooled = float(np.dot(discs, ns) / sum(ns))
        mde = mde_mean_of_means(discs, ns, alpha=alpha, power=power)
        return {
            "mde": mde,
            "discordance": pooled,
            "mde_basis": f"mean of {len(ns)} task means, normal approx., per-task observed discordance "
            f"(pooled {pooled:.3f})",
        }
    sds = [
        float(np.std(np.asarray(n, float) - np.asarray(b, float), ddof=1)) if len(b) > 1 else 0.0
        for b, n in pairs
    ]
    return {
        "mde": mde_mean_of_means_sd(sds, ns, alpha=alpha, power=power),
        "discordance": None,
        "mde_basis": f"mean of {len(ns)} task means, normal approx., observed sd(diff) per task",
    }


def corpus_mde(ci_low: float, ci_high: float, n: int, *, alpha: float = ALPHA, power: float = POWER) -> dict:
    """The MDE of a corpus-level statistic (distinct-n) on n paired items from its normal jackknife interval
    (1 − alpha); inf below 6 pairs at alpha 0.05 (its permutation test cannot reach significance)."""
    from scipy.stats import norm

    if n < mcnemar_min_discordant(alpha):
        return {
            "mde": math.inf,
            "discordance": None,
            "mde_basis": f"paired permutation: {n} pairs can never give p < {alpha:g}",
        }
    if any(math.isnan(x) for x in (ci_low, ci_high)):
        return {"mde": math.nan, "discordance": None, "mde_basis": "no interval"}
    se = (ci_high - ci_low) / (2 * float(norm.ppf(1 - alpha / 2)))
    return {
        "mde": mde_from_se(se, alpha=alpha, power=power),
        "discordance": None,
        "mde_basis": f"normal, jackknife SE {se:.4g}",
    }
