"""Reading a prepared data folder (`karma data prepare --out DIR`) for reward-model training and evaluation.

The folder schema is docs/architecture.md section 1. Everything here checks the schema *before* any model
is loaded, so a wrong folder fails in a second with a message naming what is missing.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from karma.rm.model import RMInput
from karma.rm.template import METADATA_KEYS, VARIANTS

EXAMPLES = "examples.parquet"
PAIRS = "pairs.parquet"
CARD = "card.json"

#: columns every consumer of examples.parquet reads
EXAMPLE_COLUMNS = ("example_id", "subreddit", "thread_id", "context", "response", "karma", "split")
#: columns the pairwise objective and the pairwise metrics read from pairs.parquet
PAIR_COLUMNS = (
    "pair_id",
    "split",
    "subreddit",
    "thread_id",
    "context",
    "chosen_id",
    "rejected_id",
    "chosen",
    "rejected",
    "score_ratio",
    "chosen_karma",
    "rejected_karma",
)
OBJECTIVES = ("regression", "pairwise", "both")


class DataError(ValueError):
    """A prepared-data folder that cannot serve the requested variant / objective."""


def _schema_names(path: Path) -> list[str]:
    import pyarrow.parquet as pq

    return list(pq.read_schema(path).names)


def check_data(
    data: str | Path, variant: str, objective: str = "pairwise", *, need_pairs: bool | None = None
) -> None:
    """Raise DataError unless `data` holds what `variant` + `objective` need. Reads schemas only."""
    import pyarrow.parquet as pq

    root = Path(data)
    if variant not in VARIANTS:
        raise DataError(f"unknown variant {variant!r}; expected one of {', '.join(VARIANTS)}")
    if objective not in OBJECTIVES:
        raise DataError(f"unknown objective {objective!r}; expected one of {', '.join(OBJECTIVES)}")
    if not root.is_dir():
        raise DataError(
            f"data folder does not exist: {root} (create it with `karma data prepare --out {root}`)"
        )
    ex_path = root / EXAMPLES
    if not ex_path.exists():
        raise DataError(f"{root} has no {EXAMPLES}; is it a `karma data prepare` output folder?")
    names = _schema_names(ex_path)
    missing = [c for c in EXAMPLE_COLUMNS if c not in names]
    if missing:
        raise DataError(f"{ex_path} lacks required columns: {', '.join(missing)}")
    if variant == "full":
        lacking = [c for c in METADATA_KEYS if c not in names]
        if lacking:
            raise DataError(
                f"variant 'full' needs metadata columns that {ex_path} lacks: {', '.join(lacking)} "
                "(use --variant context or response on this data)"
            )
        table = pq.read_table(ex_path, columns=list(METADATA_KEYS))
        empty = [c for c in METADATA_KEYS if table.column(c).null_count == table.num_rows]
        if empty and table.num_rows:
            raise DataError(
                f"variant 'full' needs metadata that {ex_path} lacks: column(s) {', '.join(empty)} are all null "
                "(use --variant context or response on this data)"
            )
    if need_pairs is None:
        need_pairs = objective in ("pairwise", "both")
    if need_pairs:
        pr_path = root / PAIRS
        if not pr_path.exists():
            raise DataError(f"objective {objective!r} needs {PAIRS}, which {root} does not have")
        missing = [c for c in PAIR_COLUMNS if c not in _schema_names(pr_path)]
        if missing:
            raise DataError(f"{pr_path} lacks required columns: {', '.join(missing)}")


def card_sha256(data: str | Path) -> str | None:
    """sha256 of the data folder's card.json (None when the folder has no card)."""
    p = Path(data) / CARD
    return hashlib.sha256(p.read_bytes()).hexdigest() if p.exists() else None


def karma_normalization(data: str | Path) -> str:
    """The karma normalisation method recorded in card.json `config.normalize` ("unknown" without a card)."""
    p = Path(data) / CARD
    if not p.exists():
        return "unknown"
    card = json.loads(p.read_text())
    norm = (card.get("config") or {}).get("normalize")
    return norm if isinstance(norm, str) else json.dumps(norm) if norm is not None else "unknown"


def _filters(split: str | None, subreddits: Sequence[str] | None) -> list | None:
    f = []
    if split is not None:
        f.append(("split", "==", split))
    if subreddits:
        f.append(("subreddit", "in", list(subreddits)))
    return f or None


def read_examples(
    data: str | Path,
    split: str | None,
    *,
    subreddits: Sequence[str] | None = None,
    exclude_subreddits: Sequence[str] | None = None,
    max_rows: int | None = None,
    seed: int = 0,
    by_thread: bool = False,
    metadata: bool = True,
):
    """Rows of examples.parquet for one split, optionally subsampled (by whole threads when `by_thread`)."""
    import pandas as pd

    path = Path(data) / EXAMPLES
    names = _schema_names(path)
    cols = list(EXAMPLE_COLUMNS) + [
        c for c in METADATA_KEYS if metadata and c in names and c not in EXAMPLE_COLUMNS
    ]
    df = pd.read_parquet(path, columns=cols, filters=_filters(split, subreddits))
    if exclude_subreddits:
        df = df[~df["subreddit"].isin(list(exclude_subreddits))]
    if max_rows is not None and len(df) > max_rows:
        if by_thread:
            sizes = df.groupby("thread_id", sort=True).size().sample(frac=1.0, random_state=seed)
            keep = sizes.index[sizes.cumsum().to_numpy() <= max_rows]
            if len(keep) == 0:
                keep = sizes.index[:1]
            df = df[df["thread_id"].isin(set(keep))]
        else:
            df = df.sample(n=max_rows, random_state=seed)
    return df.reset_index(drop=True)


def read_pairs(
    data: str | Path,
    split: str | None,
    *,
    subreddits: Sequence[str] | None = None,
    exclude_subreddits: Sequence[str] | None = None,
    max_rows: int | None = None,
    seed: int = 0,
):
    import pandas as pd

    path = Path(data) / PAIRS
    df = pd.read_parquet(path, columns=list(PAIR_COLUMNS), filters=_filters(split, subreddits))
    if exclude_subreddits:
        df = df[~df["subreddit"].isin(list(exclude_subreddits))]
    if max_rows is not None and len(df) > max_rows:
        df = df.sample(n=max_rows, random_state=seed)
    return df.reset_index(drop=True)


def metadata_by_id(data: str | Path, ids: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Metadata (the `full` variant's keys) of the given example ids, read from examples.parquet."""
    import pandas as pd

    path = Path(data) / EXAMPLES
    names = _schema_names(path)
    cols = ["example_id"] + [c for c in METADATA_KEYS if c in names]
    df = pd.read_parquet(path, columns=cols, filters=[("example_id", "in", list(set(ids)))] if ids else None)
    return {r.pop("example_id"): r for r in df.to_dict("records")}


def example_metadata(row: dict[str, Any]) -> dict[str, Any]:
    return {k: row[k] for k in METADATA_KEYS if k in row}


def example_inputs(df) -> list[RMInput]:
    """RMInput per examples row (metadata attached when the columns are present)."""
    return [RMInput(r["context"], r["response"], example_metadata(r)) for r in df.to_dict("records")]


def pair_inputs(df, metadata: dict[str, dict[str, Any]] | None = None) -> tuple[list[RMInput], list[RMInput]]:
    """(chosen, rejected) RMInputs per pairs row; metadata joined by chosen_id / rejected_id."""
    metadata = metadata or {}
    chosen, rejected = [], []
    for r in df[["context", "chosen", "rejected", "chosen_id", "rejected_id"]].to_dict("records"):
        chosen.append(RMInput(r["context"], r["chosen"], metadata.get(r["chosen_id"])))
        rejected.append(RMInput(r["context"], r["rejected"], metadata.get(r["rejected_id"])))
    return chosen, rejected


def read_sibling_rows(
    data: str | Path,
    split: str | None,
    *,
    subreddits: Sequence[str] | None = None,
    exclude_subreddits: Sequence[str] | None = None,
):
    """Every comment of a split with what sibling pairs need (parent_id, score, created_utc, texts, karma).

    Columns the folder lacks are left out (a caller checks for parent_id / score).
    """
    import pandas as pd

    path = Path(data) / EXAMPLES
    names = set(_schema_names(path))
    from karma.rm.pairsets import SIBLING_COLUMNS

    df = pd.read_parquet(
        path, columns=[c for c in SIBLING_COLUMNS if c in names], filters=_filters(split, subreddits)
    )
    if exclude_subreddits:
        df = df[~df["subreddit"].isin(list(exclude_subreddits))]
    return df.reset_index(drop=True)
