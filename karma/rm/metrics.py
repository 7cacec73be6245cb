"""Karma-prediction metrics as pure functions on arrays (numpy / scipy / scikit-learn, imported lazily).

A metric that cannot be computed (fewer than two items, a constant input) is None, never NaN, so the JSON
written from it is valid and a reader cannot mistake "undefined" for a number.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

#: score-ratio bucket edges for the SHP-style accuracy curve ([lo, hi) per bucket; the last is open)
RATIO_EDGES: tuple[float, ...] = (1.0, 1.5, 2.0, 3.0, 5.0, 10.0, math.inf)


def _finite(x: float) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def correlations(pred: Sequence[float], target: Sequence[float]) -> dict[str, float | None]:
    """Spearman and Pearson correlation of predictions with (normalised) karma."""
    import numpy as np
    from scipy.stats import pearsonr, spearmanr

    p, t = np.asarray(pred, dtype=float), np.asarray(target, dtype=float)
    if len(p) < 3 or np.ptp(p) == 0 or np.ptp(t) == 0:
        return {"spearman": None, "pearson": None, "n": len(p)}
    return {
        "spearman": _finite(spearmanr(p, t).statistic),
        "pearson": _finite(pearsonr(p, t).statistic),
        "n": len(p),
    }


def pairwise_wins(chosen: Sequence[float], rejected: Sequence[float]):
    """Per pair: 1 when the chosen reply scores higher, 0.5 on a tie, 0 otherwise."""
    import numpy as np

    c, r = np.asarray(chosen, dtype=float), np.asarray(rejected, dtype=float)
    return (c > r).astype(float) + 0.5 * (c == r)


def pairwise_accuracy(chosen: Sequence[float], rejected: Sequence[float]) -> float | None:
    wins = pairwise_wins(chosen, rejected)
    return float(wins.mean()) if len(wins) else None


def bucket_label(lo: float, hi: float) -> str:
    return f"[{lo:g},{hi:g})" if math.isfinite(hi) else f">={lo:g}"


def accuracy_by_ratio(
    chosen: Sequence[float],
    rejected: Sequence[float],
    ratios: Sequence[float],
    edges: Sequence[float] = RATIO_EDGES,
) -> list[dict]:
    """Pairwise accuracy per score-ratio bucket (SHP reports accuracy as a curve over score ratio)."""
    import numpy as np

    wins, r = pairwise_wins(chosen, rejected), np.asarray(ratios, dtype=float)
    out = []
    for lo, hi in itertools.pairwise(edges):
        m = (r >= lo) & (r < hi)
        n = int(m.sum())
        out.append(
            {
                "bucket": bucket_label(lo, hi),
                "lo": lo,
                "hi": None if math.isinf(hi) else hi,
                "n": n,
                "accuracy": float(wins[m].mean()) if n else None,
            }
        )
    return out


def ndcg_within_groups(pred: Sequence[float], target: Sequence[float], groups: Sequence, k: int) -> dict:
    """Mean NDCG@k over groups (threads) with at least two items and non-constant karma.

    Gains are karma shifted so the lowest item in each group has gain 0 (NDCG needs non-negative gains).
    """
    import numpy as np
    from sklearn.metrics import ndcg_score

    p, t, g = np.asarray(pred, dtype=float), np.asarray(target, dtype=float), np.asarray(groups)
    order = np.argsort(g, kind="stable")
    p, t, g = p[order], t[order], g[order]
    starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
    ends = np.r_[starts[1:], len(g)]
    values = []
    for s, e in zip(starts, ends, strict=True):
        if e - s < 2 or np.ptp(t[s:e]) == 0:
            continue
        gains = t[s:e] - t[s:e].min()
        values.append(ndcg_score(gains[None, :], p[s:e][None, :], k=k))
    return {"value": float(np.mean(values)) if values else None, "groups": len(values)}


def bootstrap_diff(a, b, stat, n_boot: int = 500, seed: int = 0) -> dict:
    """Paired bootstrap of stat(a) - stat(b) over the same resampled indices: point value and 95% interval.

    `a` and `b` are tuples of aligned arrays that `stat(*arrays)` reduces to a number.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    n = len(a[0])
    pa, pb = stat(*a), stat(*b)
    point = pa - pb if pa is not None and pb is not None else None
    diffs = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        da, db = stat(*(x[idx] for x in a)), stat(*(x[idx] for x in b))
        if da is not None and db is not None and math.isfinite(da - db):
            diffs.append(da - db)
    if not diffs:
        return {"diff": _finite(point) if point is not None else None, "lo": None, "hi": None}
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return {"diff": _finite(point) if point is not None else None, "lo": float(lo), "hi": float(hi)}


Z_ALPHA = 1.959963984540054  # two-sided α = 0.05
Z_POWER = 0.8416212335729143  # 80 % power


def accuracy_ci(wins, n_boot: int = 1000, seed: int = 0) -> dict:
    """Accuracy (mean of per-pair wins, ties ½) with a percentile bootstrap 95 % interval over pairs."""
    import numpy as np

    w = np.asarray(wins, dtype=float)
    if not len(w):
        return {"accuracy": None, "lo": None, "hi": None, "n": 0}
    rng = np.random.default_rng(seed)
    means = w[rng.integers(0, len(w), (n_boot, len(w)))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {"accuracy": float(w.mean()), "lo": float(lo), "hi": float(hi), "n": len(w)}


def paired_wins_test(wins_a, wins_b, n_boot: int = 1000, n_perm: int = 2000, seed: int = 0) -> dict:
    """Paired comparison of two systems' per-pair wins on the same pairs.

    diff = acc(a) − acc(b) with a paired bootstrap 95 % interval; p = two-sided sign-flip permutation test of
    the per-pair differences; mde = the smallest accuracy difference this n detects with 80 % power at
    α = 0.05 (paired z: (z_{α/2} + z_{0.8}) · sd(d) / √n); `discordant` = share of pairs the two disagree on.
    """
    import numpy as np

    a, b = np.asarray(wins_a, dtype=float), np.asarray(wins_b, dtype=float)
    d = a - b
    n = len(d)
    if n < 2:
        return {"diff": None, "lo": None, "hi": None, "p": None, "mde": None, "n": n, "discordant": None}
    rng = np.random.default_rng(seed)
    boots = d[rng.integers(0, n, (n_boot, n))].mean(axis=1)
    lo, hi = np.percentile(boots, [2.5, 97.5])
    observed = abs(d.mean())
    hits, done = 0, 0
    while done < n_perm:  # chunks keep memory at 200 × n
        k = min(200, n_perm - done)
        signs = rng.choice((-1.0, 1.0), size=(k, n))
        hits += int((np.abs((signs * d).mean(axis=1)) >= observed - 1e-12).sum())
        done += k
    sd = float(d.std(ddof=1))
    return {
        "diff": float(d.mean()),
        "lo": float(lo),
        "hi": float(hi),
        "p": (hits + 1) / (n_perm + 1),
        "mde": (Z_ALPHA + Z_POWER) * sd / math.sqrt(n),
        "n": n,
        "discordant": float(np.mean(d != 0)),
    }


def spearman_ci(pred, target, n_boot: int = 1000, seed: int = 0) -> dict:
    """Spearman with a percentile bootstrap 95 % interval over items."""
    import numpy as np

    p, t = np.asarray(pred, dtype=float), np.asarray(target, dtype=float)
    point = correlations(p, t)["spearman"]
    if point is None:
        return {"spearman": None, "lo": None, "hi": None, "n": len(p)}
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(p), len(p))
        v = correlations(p[idx], t[idx])["spearman"]
        if v is not None:
            vals.append(v)
    lo, hi = np.percentile(vals, [2.5, 97.5]) if vals else (None, None)
    return {"spearman": point, "lo": _finite(lo), "hi": _finite(hi), "n": len(p)}
