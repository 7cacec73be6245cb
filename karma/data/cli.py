"""`karma data prepare`: the command-line face of :func:`karma.data.prepare`."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(no_args_is_help=True)
log = logging.getLogger(__name__)


@app.callback()
def _data() -> None:
    """Turn Reddit dumps / SHP rows into karma examples, pairs and splits."""


@app.command("prepare")
def prepare_cmd(
    out: Annotated[
        Path, typer.Option("--out", help="output folder: examples.parquet, pairs.parquet, card.json, card.md")
    ],
    comments: Annotated[
        list[Path] | None,
        typer.Option("--comments", help="Pushshift comment dump (RC_*.zst, .jsonl, .gz); repeatable"),
    ] = None,
    submissions: Annotated[
        list[Path] | None,
        typer.Option(
            "--submissions",
            help="Pushshift submission dump (RS_*.zst, ...); repeatable. Alone: posts are the examples",
        ),
    ] = None,
    shp: Annotated[
        list[str] | None,
        typer.Option(
            "--shp",
            help="SHP rows: a JSONL/parquet file, a folder of them, or a hub id (needs internet); repeatable",
        ),
    ] = None,
    min_score_ratio: Annotated[
        float, typer.Option("--min-score-ratio", help="pairs: chosen score / rejected score >= this")
    ] = 2.0,
    min_pair_score: Annotated[
        int, typer.Option("--min-pair-score", help="pairs: both scores >= this (SHP uses 2)")
    ] = 2,
    max_pairs_per_parent: Annotated[
        int, typer.Option("--max-pairs-per-parent", help="pairs: at most K per parent (seeded pick)")
    ] = 5,
    pair_order: Annotated[
        str,
        typer.Option(
            "--pair-order",
            help="pairs: 'later' = chosen written no earlier than rejected (SHP: its higher score is not explained "
            "by visibility); 'earlier' = the reverse (confounded with posting time); 'any' = both orders (the "
            "natural pairs: no timing rule a variant can read)",
        ),
    ] = "later",
    normalize: Annotated[
        str, typer.Option("--normalize", help="karma: log1p (signed) | percentile | zscore (within thread)")
    ] = "log1p",
    split_by: Annotated[
        str,
        typer.Option(
            "--split-by", help="thread (seeded hash of the thread id) | time (earlier threads train)"
        ),
    ] = "thread",
    val_frac: Annotated[
        float, typer.Option("--val-frac", help="fraction of threads (by time: of examples) in val")
    ] = 0.05,
    test_frac: Annotated[
        float, typer.Option("--test-frac", help="fraction of threads (by time: of examples) in test")
    ] = 0.05,
    seed: Annotated[int, typer.Option("--seed", help="seed of the split hash and of the pair pick")] = 0,
    max_depth: Annotated[
        int, typer.Option("--max-depth", help="ancestor comments kept in the context (nearest first)")
    ] = 8,
    drop_bots: Annotated[
        bool, typer.Option("--drop-bots/--keep-bots", help="bot accounts (AutoModerator, *bot)")
    ] = True,
    drop_deleted: Annotated[
        bool, typer.Option("--drop-deleted/--keep-deleted", help="[deleted]/[removed] bodies")
    ] = True,
    drop_moderator: Annotated[
        bool, typer.Option("--drop-moderator/--keep-moderator", help="distinguished comments")
    ] = True,
    drop_stickied: Annotated[
        bool, typer.Option("--drop-stickied/--keep-stickied", help="stickied comments")
    ] = True,
    drop_missing_context: Annotated[
        bool,
        typer.Option(
            "--drop-missing-context/--keep-missing-context",
            help="examples whose post/ancestor is unknown or deleted",
        ),
    ] = False,
    workers: Annotated[
        int, typer.Option("--workers", help="decode processes and DuckDB threads (0: one per core)")
    ] = 0,
    limit: Annotated[
        int | None, typer.Option("--limit", help="read only the first N records of each example file")
    ] = None,
    memory_limit: Annotated[
        str,
        typer.Option(
            "--memory-limit",
            help="DuckDB memory limit, e.g. 8GB (auto: half the RAM); beyond it, it spills to disk",
        ),
    ] = "auto",
) -> None:
    """Raw Pushshift/SHP dumps → examples.parquet, pairs.parquet, card.json (+ card.md) in --out."""
    from karma.data.decode import DecodeError
    from karma.data.errors import InputNotFoundError, NoUsableDataError
    from karma.data.prepare import PrepareConfig, prepare
    from karma.data.shp import ShpHubError

    try:
        cfg = PrepareConfig(
            comments=[str(p) for p in comments or []],
            submissions=[str(p) for p in submissions or []],
            shp=list(shp or []),
            out=str(out),
            min_score_ratio=min_score_ratio,
            min_pair_score=min_pair_score,
            max_pairs_per_parent=max_pairs_per_parent,
            pair_order=pair_order,
            normalize=normalize,
            split_by=split_by,
            val_frac=val_frac,
            test_frac=test_frac,
            seed=seed,
            max_depth=max_depth,
            drop_bots=drop_bots,
            drop_deleted=drop_deleted,
            drop_moderator=drop_moderator,
            drop_stickied=drop_stickied,
            drop_missing_context=drop_missing_context,
            workers=workers,
            limit=limit,
            memory_limit=memory_limit,
        )
    except ValueError as exc:
        _fail(str(exc), 2)
    try:
        card = prepare(cfg)
    except InputNotFoundError as exc:
        _fail(str(exc), 2)
    except (NoUsableDataError, ShpHubError, DecodeError) as exc:
        _fail(str(exc), 1)
    for w in card["warnings"]:
        typer.secho(f"warning: {w}", fg=typer.colors.YELLOW, err=True)
    sp = card["splits"]
    typer.echo(
        f"{card['examples']:,} examples ({sp['train']['examples']:,} train / {sp['val']['examples']:,} val / "
        f"{sp['test']['examples']:,} test) and {card['pairs']['total']:,} pairs from {card['lines_read']:,} records "
        f"({card['kept']:,} kept, {sum(card['skipped'].values()):,} skipped) in {card['elapsed_seconds']} s -> {out}"
    )


def _fail(message: str, code: int) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)
