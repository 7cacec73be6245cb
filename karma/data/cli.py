"""`karma data prepare`: the command-line face of :func:`karma.data.prepare`; its flags are generated from
`PrepareConfig` (`karma.config`), each also `KARMA_DATA_<FIELD>` and a key of `--config FILE`."""

from __future__ import annotations

import logging

import typer

from karma.config import command
from karma.data.prepare import PrepareConfig

app = typer.Typer(no_args_is_help=True)
log = logging.getLogger(__name__)

ENV_PREFIX = "KARMA_DATA_"


@app.callback()
def _data() -> None:
    """Turn Reddit dumps / SHP rows into karma examples, pairs and splits."""


def run_prepare(cfg: PrepareConfig) -> None:
    """Raw Pushshift/SHP dumps → examples.parquet, pairs.parquet, card.json (+ card.md) in --out."""
    from karma.data.decode import DecodeError
    from karma.data.errors import InputNotFoundError, NoUsableDataError
    from karma.data.prepare import prepare
    from karma.data.shp import ShpHubError

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
        f"({card['kept']:,} kept, {sum(card['skipped'].values()):,} skipped) in {card['elapsed_seconds']} s -> {cfg.out}"
    )


app.command("prepare")(command(PrepareConfig, run_prepare, prefix=ENV_PREFIX, help=run_prepare.__doc__))


def _fail(message: str, code: int) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)
