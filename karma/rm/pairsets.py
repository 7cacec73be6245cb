"""Evaluation pair sets that no system can score on by reading how the pairs were built.

The prepared `pairs.parquet` follows a pair rule (by default SHP's: the chosen reply is written *no earlier*
than the rejected one), so on it the chosen reply is always the later one, and the longer one in ~70 % of the
college pairs: a model can score there by reading the rule (time after post, reply length) instead of the
reply. The sets here are built from the split's comments themselves, every sibling pair whose scores satisfy
the same score rule (higher ≥ `min_score_ratio` × lower, both ≥ `min_pair_score`), in **both** time orders:

| set | pairs | controls |
|---|---|---|
| `rule` | the prepared pairs.parquet (the data's pair rule) | nothing: kept for comparison |
| `natural` | every sibling pair, both orders, as karma falls | the pair rule |
| `balanced` | `natural`, subsampled to 50 % chosen-later / 50 % chosen-earlier | posting order |
| `length_controlled` | `natural` with reply lengths within `LENGTH_RATIO` (characters) | reply length |
| `close_in_time` | `natural` with replies posted within `CLOSE_SECONDS` of each other (DialogRPT's filter) | visibility time |

Each set is capped at `max_pairs` (a seeded random sample) and reports its own `chosen_later` and
`chosen_longer` shares, so a reader sees what a timing or length rule would score on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

PAIR_SETS = ("rule", "natural", "balanced", "length_controlled", "close_in_time")
LENGTH_RATIO = 1.25  # length_controlled: longer reply ≤ 1.25 × the shorter, in characters
CLOSE_SECONDS = 3600  # close_in_time: |Δ created_utc| ≤ 1 hour
MAX_SIBLINGS = 200  # parents with more scored children are subsampled to this many before the self-join

DESCRIPTIONS = {
    "rule": "the prepared pairs (the data's pair rule)",
    "natural": "every sibling pair of the split, both posting orders",
    "balanced": "natural pairs, 50 % chosen-later / 50 % chosen-earlier",
    "length_controlled": f"natural pairs with reply lengths within {LENGTH_RATIO:g}×",
    "close_in_time": f"natural pairs posted within {CLOSE_SECONDS // 60} min of each other (DialogRPT)",
}


def score_rule(data: str | Path) -> tuple[float, int]:
    """(min_score_ratio, min_pair_score) the data was prepared with (card.json; SHP's 2, 2 without one)."""
    import json

    card = Path(data) / "card.json"
    cfg = (json.loads(card.read_text()).get("config") or {}) if card.exists() else {}
    return float(cfg.get("min_score_ratio", 2.0)), int(cfg.get("min_pair_score", 2))


#: what sibling pairs read of each comment (`karma.rm.data.read_sibling_rows` reads exactly these)
SIBLING_COLUMNS = (
    "example_id",
    "parent_id",
    "subreddit",
    "thread_id",
    "context",
    "response",
    "score",
    "karma",
    "created_utc",
)


def sibling_pairs(examples, *, min_score_ratio: float = 2.0, min_pair_score: int = 2, seed: int = 0):
    """Every (chosen, rejected) sibling pair of `examples` (same parent_id) that meets the score rule.

    Columns: chosen_id, rejected_id, parent_id, subreddit, thread_id, context, chosen, rejected, chosen_karma,
    rejected_karma, score_ratio, chosen_later (bool), length_ratio (≥ 1), seconds_apart.
    """
    import numpy as np
    import pandas as pd

    ex = examples[[c for c in SIBLING_COLUMNS if c in examples.columns]]
    ex = ex[ex["score"] >= min_pair_score]
    rank = (
        ex.assign(_r=np.random.default_rng(seed).random(len(ex)))
        .groupby("parent_id")["_r"]
        .rank(method="first")
    )
    ex = ex[rank.to_numpy() <= MAX_SIBLINGS]
    key = ["example_id", "parent_id", "score", "created_utc"]
    m = ex[key].merge(ex[key], on="parent_id", suffixes=("_a", "_b"))
    m = m[(m["score_a"] > m["score_b"]) & (m["score_a"] >= min_score_ratio * m["score_b"])]
    text = ex.set_index("example_id")
    a, b = text.loc[m["example_id_a"]], text.loc[m["example_id_b"]]
    la = a["response"].fillna("").str.len().to_numpy()
    lb = b["response"].fillna("").str.len().to_numpy()
    out = pd.DataFrame(
        {
            "chosen_id": m["example_id_a"].to_numpy(),
            "rejected_id": m["example_id_b"].to_numpy(),
            "parent_id": m["parent_id"].to_numpy(),
            "subreddit": a["subreddit"].to_numpy(),
            "thread_id": a["thread_id"].to_numpy(),
            "context": a["context"].to_numpy(),
            "chosen": a["response"].to_numpy(),
            "rejected": b["response"].to_numpy(),
            "chosen_karma": a["karma"].to_numpy(),
            "rejected_karma": b["karma"].to_numpy(),
            "score_ratio": (m["score_a"] / m["score_b"]).to_numpy(dtype=float),
            "chosen_later": (m["created_utc_a"] > m["created_utc_b"]).to_numpy(),
            "chosen_longer": la > lb,
            "length_ratio": np.maximum(la, lb) / np.maximum(np.minimum(la, lb), 1),
            "seconds_apart": (m["created_utc_a"] - m["created_utc_b"]).abs().to_numpy(dtype=float),
        }
    )
    return out.sort_values(["chosen_id", "rejected_id"], kind="stable").reset_index(drop=True)


def cap(df, n: int | None, seed: int):
    return df if n is None or len(df) <= n else df.sample(n=n, random_state=seed).reset_index(drop=True)


def build_pair_sets(
    examples,
    rule_pairs,
    *,
    names: Sequence[str] = PAIR_SETS,
    max_pairs: int | None = 1000,
    seed: int = 0,
    min_score_ratio: float = 2.0,
    min_pair_score: int = 2,
) -> dict[str, Any]:
    """{set name: pairs DataFrame} for `names` (see the module table), each capped at `max_pairs`."""
    import pandas as pd

    unknown = [n for n in names if n not in PAIR_SETS]
    if unknown:
        raise ValueError(f"unknown pair set(s) {', '.join(unknown)}; expected {', '.join(PAIR_SETS)}")
    out: dict[str, Any] = {}
    if "rule" in names:
        out["rule"] = rule_pairs
    if set(names) - {"rule"}:
        nat = sibling_pairs(
            examples, min_score_ratio=min_score_ratio, min_pair_score=min_pair_score, seed=seed
        )
        for name in names:
            if name == "natural":
                out[name] = cap(nat, max_pairs, seed)
            elif name == "balanced":
                later, earlier = nat[nat["chosen_later"]], nat[~nat["chosen_later"]]
                k = min(len(later), len(earlier), (max_pairs // 2) if max_pairs else len(nat))
                out[name] = pd.concat(
                    [later.sample(n=k, random_state=seed), earlier.sample(n=k, random_state=seed)],
                    ignore_index=True,
                )
            elif name == "length_controlled":
                out[name] = cap(nat[nat["length_ratio"] <= LENGTH_RATIO], max_pairs, seed)
            elif name == "close_in_time":
                out[name] = cap(nat[nat["seconds_apart"] <= CLOSE_SECONDS], max_pairs, seed)
    return {n: out[n] for n in names}


def describe(name: str, pairs) -> dict[str, Any]:
    """n, and the shares of pairs whose chosen reply is the later / the longer one."""
    import numpy as np

    d: dict[str, Any] = {"description": DESCRIPTIONS[name], "n": len(pairs)}
    if len(pairs) and "chosen_later" in pairs:
        d["chosen_later"] = float(np.mean(pairs["chosen_later"]))
    if len(pairs):
        d["chosen_longer"] = float(
            np.mean(pairs["chosen"].fillna("").str.len() > pairs["rejected"].fillna("").str.len())
        )
    return d
