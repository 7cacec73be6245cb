"""The arithmetic of evaluation: per-item multiple-choice scores, text statistics of generated replies,
bootstrap confidence intervals and paired tests. numpy only; every function is pure.

Multiple choice (lm-evaluation-harness definitions):
* `acc`: the option with the highest summed log-likelihood is a correct one.
* `acc_norm`: the same with each log-likelihood divided by the option's length in characters.
* TruthfulQA `mc1`: `acc` over MC1's options (exactly one is true).
* TruthfulQA `mc2`: the probability mass the model puts on the true answers among MC2's options,
  `sum_true exp(ll) / sum_all exp(ll)`, with summed (unnormalised) log-likelihoods.
* `p_correct` (every multiple-choice task): the same mass on the correct option(s), i.e. the softmax over the
  item's options of their log-likelihoods, summed over the correct ones (TruthfulQA: MC2's options and true
  set, so it equals `mc2`). Continuous, so it moves when no answer flips.
* `p_correct_cal`: `p_correct` after contextual calibration (Zhao et al. 2021): softmax over the options of
  `ll(option | prompt) - ll(option | content-free prompt)`. A label prior — the model preferring an option
  string whatever the item says — adds the same constant to both terms and cancels; what is left is what the
  item's content does to the options.

Generated replies (words = lower-cased `\\w+` runs and single punctuation marks):
* `length_words`, `length_tokens`: per reply.
* `distinct_1`, `distinct_2`: distinct n-grams / all n-grams over the whole set of replies (Li et al. 2016);
  corpus-level, so a policy that answers every prompt the same way scores low. Their CIs are jackknife
  intervals (a bootstrap resample repeats replies, which biases distinct-n down).
* `rep_4`: per reply, the share of its 4-grams that repeat an earlier 4-gram of the same reply (seq-rep-4,
  Welleck et al. 2019); 0 for replies shorter than 5 words.
* `reward`: the reward service's score of (prompt, reply).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence

import numpy as np

_WORD = re.compile(r"\w+|[^\w\s]")

#: metrics of generated replies computed over the whole set rather than averaged per reply
CORPUS_METRICS = ("distinct_1", "distinct_2")
#: metrics whose per-item values are 0/1 (paired test: exact McNemar)
BINARY_METRICS = ("acc", "acc_norm", "mc1")
#: the continuous, bias-controlled outcome of every multiple-choice task (what the experiment's claims decide on)
CALIBRATED_METRIC = "p_correct_cal"


# ------------------------------------------------------------------------------------ multiple choice
def mc_scores(
    loglik: Sequence[float], n_chars: Sequence[int], correct: set[int] | frozenset[int]
) -> dict[str, float]:
    """acc and acc_norm of one item; ties go to the first option (numpy's argmax)."""
    ll = np.asarray(loglik, dtype=float)
    norm = ll / np.maximum(np.asarray(n_chars, dtype=float), 1.0)
    return {"acc": float(int(np.argmax(ll)) in correct), "acc_norm": float(int(np.argmax(norm)) in correct)}


def mc1(loglik: Sequence[float], correct: int) -> float:
    return float(int(np.argmax(np.asarray(loglik, dtype=float))) == correct)


def mc2(loglik: Sequence[float], true: Sequence[bool]) -> float:
    """Normalised probability mass on the true answers (computed stably in log space)."""
    t = np.asarray(true, dtype=bool)
    if not t.any() or t.all():
        raise ValueError("mc2 needs at least one true and one false answer")
    return p_correct(loglik, np.flatnonzero(t))


def p_correct(
    loglik: Sequence[float], correct: Iterable[int], content_free: Sequence[float] | None = None
) -> float:
    """The probability mass on the correct options (indices `correct`): softmax over the item's options of
    their summed log-likelihoods, summed over the correct ones. With `content_free` (each option's
    log-likelihood after the content-free prompt), the softmax is over `loglik - content_free`: contextual
    calibration, `p_correct_cal`. Computed stably in log space."""
    ll = np.asarray(loglik, dtype=float)
    if content_free is not None:
        cf = np.asarray(content_free, dtype=float)
        if cf.shape != ll.shape:
            raise ValueError(f"{ll.size} log-likelihoods but {cf.size} content-free ones")
        ll = ll - cf
    idx = sorted(set(correct))
    if not idx or idx[0] < 0 or idx[-1] >= ll.size:
        raise ValueError(f"correct options {idx} out of range for {ll.size} options")
    p = np.exp(ll - ll.max())
    return float(p[idx].sum() / p.sum())


# ------------------------------------------------------------------------------------ generated text
def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(replies: Sequence[str], n: int) -> float:
    """Distinct n-grams / all n-grams over all replies (0 when there is no n-gram at all)."""
    grams = [g for r in replies for g in ngrams(words(r), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def rep_n(text: str, n: int = 4) -> float:
    """Share of a reply's n-grams that repeat an earlier one (1 - distinct/total)."""
    grams = ngrams(words(text), n)
    return 1.0 - len(set(grams)) / len(grams) if len(grams) > 1 else 0.0


def corpus_metric(name: str) -> Callable[[Sequence[str]], float]:
    n = int(name.rsplit("_", 1)[1])
    return lambda replies: distinct_n(replies, n)


# ------------------------------------------------------------------------------------ confidence intervals
def _indices(n: int, n_boot: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def mean_ci(values: Sequence[float], *, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> dict:
    """{value, ci_low, ci_high, n}: the mean and its percentile-bootstrap (1 - alpha) interval."""
    v = np.asarray(values, dtype=float)
    if v.size == 0:
        return {"value": math.nan, "ci_low": math.nan, "ci_high": math.nan, "n": 0}
    means = v[_indices(v.size, n_boot, seed)].mean(axis=1)
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return {"value": float(v.mean()), "ci_low": float(lo), "ci_high": float(hi), "n": int(v.size)}


def jackknife_ci(stat: Callable[[np.ndarray], float], n: int, *, alpha: float = 0.05) -> dict:
    """Normal interval from the delete-one jackknife standard error of a statistic of the items, `stat(indices)`.

    Used for corpus-level distinct-n: a bootstrap resample repeats replies, and repeated replies repeat their
    n-grams, so bootstrap distributions of distinct-n sit well below the observed value.
    """
    from scipy.stats import norm

    if n == 0:
        return {"value": math.nan, "ci_low": math.nan, "ci_high": math.nan, "n": 0}
    value = float(stat(np.arange(n)))
    if n < 2:
        return {"value": value, "ci_low": value, "ci_high": value, "n": 1}
    loo = np.array([stat(np.delete(np.arange(n), i)) for i in range(n)])
    se = math.sqrt((n - 1) / n * float(((loo - loo.mean()) ** 2).sum()))
    z = float(norm.ppf(1 - alpha / 2))
    return {"value": value, "ci_low": value - z * se, "ci_high": value + z * se, "n": int(n)}


# ------------------------------------------------------------------------------------ paired comparison
def mcnemar_exact(base: Sequence[float], new: Sequence[float]) -> float:
    """Two-sided exact McNemar p-value for paired 0/1 outcomes (binomial test on the discordant pairs)."""
    from scipy.stats import binomtest

    a, b = np.asarray(base) > 0.5, np.asarray(new) > 0.5
    gained, lost = int((~a & b).sum()), int((a & ~b).sum())
    if gained + lost == 0:
        return 1.0
    return float(binomtest(gained, gained + lost, 0.5).pvalue)


def _sign_flip_means(d: np.ndarray, n_perm: int, rng: np.random.Generator, chunk: int = 500) -> np.ndarray:
    """Means of `d` under `n_perm` random sign flips (in chunks, to bound memory on large tasks)."""
    out = np.empty(n_perm)
    for start in range(0, n_perm, chunk):
        k = min(chunk, n_perm - start)
        out[start : start + k] = (rng.choice([-1.0, 1.0], size=(k, d.size)) * d).mean(axis=1)
    return out


def paired_permutation(
    stat: Callable[[np.ndarray, np.ndarray], float] | None,
    base: Sequence,
    new: Sequence,
    *,
    n_perm: int = 10000,
    seed: int = 0,
) -> float:
    """Two-sided paired permutation p-value: swap each pair's labels at random and recompute the difference.

    `stat(base_items, new_items)` defaults to the difference of means (vectorised sign flips); any other
    statistic (corpus-level distinct-n) is recomputed per permutation. Returns (hits + 1) / (n_perm + 1).
    """
    rng = np.random.default_rng(seed)
    n = len(base)
    if n == 0:
        return math.nan
    if stat is None:
        d = np.asarray(new, dtype=float) - np.asarray(base, dtype=float)
        hits = int((np.abs(_sign_flip_means(d, n_perm, rng)) >= abs(d.mean()) - 1e-12).sum())
        return (hits + 1) / (n_perm + 1)
    base_l, new_l = list(base), list(new)
    observed = abs(stat(base_l, new_l))
    hits = 0
    for _ in range(n_perm):
        swap = rng.random(n) < 0.5
        b = [y if s else x for x, y, s in zip(base_l, new_l, swap, strict=True)]
        t = [x if s else y for x, y, s in zip(base_l, new_l, swap, strict=True)]
        hits += abs(stat(b, t)) >= observed - 1e-12
    return (hits + 1) / (n_perm + 1)


def paired_delta(
    base: Sequence,
    new: Sequence,
    *,
    corpus: Callable[[Sequence], float] | None = None,
    binary: bool = False,
    n_boot: int = 1000,
    n_perm: int = 10000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict:
    """new - base on paired items: {delta, ci_low, ci_high, p, test, n}.

    The interval is a paired bootstrap (items resampled jointly); the test is exact McNemar for 0/1 scores,
    else a paired permutation test. With `corpus`, the metric is `corpus(items)` rather than a mean and the
    interval is a delete-one-pair jackknife (see `jackknife_ci`).
    """
    n = len(base)
    if n != len(new):
        raise ValueError(f"paired samples differ in size: {n} vs {len(new)}")
    if n == 0:
        return {"delta": math.nan, "ci_low": math.nan, "ci_high": math.nan, "p": math.nan, "test": "", "n": 0}
    if corpus is None:
        d = np.asarray(new, dtype=float) - np.asarray(base, dtype=float)
        ci = mean_ci(d, n_boot=n_boot, seed=seed, alpha=alpha)
        if binary:
            p, test = mcnemar_exact(base, new), "McNemar exact"
        else:
            p, test = paired_permutation(None, base, new, n_perm=n_perm, seed=seed), "paired permutation"
    else:
        base_l, new_l = list(base), list(new)

        def diff(idx: np.ndarray) -> float:
            return corpus([new_l[i] for i in idx]) - corpus([base_l[i] for i in idx])

        ci = jackknife_ci(diff, n, alpha=alpha)
        p = paired_permutation(
            lambda b, t: corpus(t) - corpus(b), base_l, new_l, n_perm=min(n_perm, 2000), seed=seed
        )
        test = "paired permutation"
    return {
        "delta": ci["value"],
        "ci_low": ci["ci_low"],
        "ci_high": ci["ci_high"],
        "p": p,
        "test": test,
        "n": n,
    }


# ------------------------------------------------------------------------------------ suite means
def mean_of_means_ci(
    groups: Sequence[Sequence[float]], *, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05
) -> dict:
    """The unweighted mean of several tasks' means; each task's items are resampled on their own."""
    arrays = [np.asarray(g, dtype=float) for g in groups if len(g)]
    if not arrays:
        return {"value": math.nan, "ci_low": math.nan, "ci_high": math.nan, "n": 0}
    boots = np.mean(
        [v[_indices(v.size, n_boot, seed + k)].mean(axis=1) for k, v in enumerate(arrays)], axis=0
    )
    lo, hi = np.quantile(boots, [alpha / 2, 1 - alpha / 2])
    value = float(np.mean([v.mean() for v in arrays]))
    return {"value": value, "ci_low": float(lo), "ci_high": float(hi), "n": int(sum(v.size for v in arrays))}


def paired_mean_of_means(
    pairs: Sequence[tuple[Sequence[float], Sequence[float]]],
    *,
    n_boot: int = 1000,
    n_perm: int = 10000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict:
    """new - base of an unweighted mean of task means, on paired items: bootstrap CI (items resampled jointly
    within each task) and a sign-flip permutation test of the same statistic."""
    diffs = [np.asarray(n, dtype=float) - np.asarray(b, dtype=float) for b, n in pairs if len(b)]
    if not diffs:
        return {"delta": math.nan, "ci_low": math.nan, "ci_high": math.nan, "p": math.nan, "test": "", "n": 0}
    ci = mean_of_means_ci(diffs, n_boot=n_boot, seed=seed, alpha=alpha)
    rng = np.random.default_rng(seed)
    null = np.mean([_sign_flip_means(d, n_perm, rng) for d in diffs], axis=0)
    hits = int((np.abs(null) >= abs(ci["value"]) - 1e-12).sum())
    return {
        "delta": ci["value"],
        "ci_low": ci["ci_low"],
        "ci_high": ci["ci_high"],
        "p": (hits + 1) / (n_perm + 1),
        "test": "paired permutation",
        "n": ci["n"],
    }
