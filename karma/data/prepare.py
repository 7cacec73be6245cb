"""`karma data prepare`: raw Reddit dumps / SHP rows → examples.parquet, pairs.parquet, card.json, card.md.

Two stages, joined only by Arrow files in a temporary folder:

1. decode (:mod:`karma.data.decode`) — streaming, per file, bounded memory, parallel over processes;
2. relational (:mod:`karma.data.relational`) — DuckDB with a memory limit and a spill folder.

The Python API is :func:`prepare`; the CLI (:mod:`karma.data.cli`) is a thin wrapper around it.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, field_validator, model_validator

from karma.config import Cli
from karma.data.errors import InputNotFoundError, NoUsableDataError
from karma.data.records import Filters
from karma.data.relational import RelationalConfig
from karma.data.shp import expand_shp_inputs

__all__ = ["InputNotFoundError", "NoUsableDataError", "PrepareConfig", "prepare"]

log = logging.getLogger(__name__)


class PrepareConfig(RelationalConfig):
    """Every option of `karma data prepare`: its inputs and filters, plus the relational stage's options."""

    comments: list[str] = Field(
        default_factory=list, description="Pushshift comment dump (RC_*.zst, .jsonl, .gz); repeatable"
    )
    submissions: list[str] = Field(
        default_factory=list,
        description="Pushshift submission dump (RS_*.zst, ...); repeatable. Alone: posts are the examples",
    )
    shp: list[str] = Field(
        default_factory=list,
        description="SHP rows: a JSONL/parquet file, a folder of them, or a hub id (needs internet); repeatable",
    )
    out: str = Field(
        "data/prepared", description="output folder: examples.parquet, pairs.parquet, card.json, card.md"
    )
    drop_bots: Annotated[bool, Cli("--drop-bots/--keep-bots")] = Field(
        True, description="bot accounts (AutoModerator, *bot)"
    )
    drop_deleted: Annotated[bool, Cli("--drop-deleted/--keep-deleted")] = Field(
        True, description="[deleted]/[removed] bodies"
    )
    drop_moderator: Annotated[bool, Cli("--drop-moderator/--keep-moderator")] = Field(
        True, description="distinguished comments"
    )
    drop_stickied: Annotated[bool, Cli("--drop-stickied/--keep-stickied")] = Field(
        True, description="stickied comments"
    )
    limit: int | None = Field(None, ge=1, description="read only the first N records of each example file")
    batch_rows: int = Field(65536, ge=1, description="rows per decoded batch")

    @field_validator("comments", "submissions", "shp", mode="before")
    @classmethod
    def _paths(cls, value: Any) -> Any:
        return [str(p) for p in value] if isinstance(value, list | tuple) else value

    @field_validator("out", mode="before")
    @classmethod
    def _out(cls, value: Any) -> Any:
        return str(value) if isinstance(value, Path) else value

    @model_validator(mode="after")
    def _resolve(self) -> PrepareConfig:
        if not (self.comments or self.submissions or self.shp):
            raise ValueError("no input: give --comments, --submissions and/or --shp")
        if self.workers == 0:
            self.workers = os.cpu_count() or 1
        if self.memory_limit == "auto":
            self.memory_limit = default_memory_limit()
        return self

    @property
    def filters(self) -> Filters:
        return Filters(
            drop_deleted=self.drop_deleted,
            drop_bots=self.drop_bots,
            drop_moderator=self.drop_moderator,
            drop_stickied=self.drop_stickied,
        )


def default_memory_limit() -> str:
    """Half of the physical memory, in whole GB (at least 1GB): DuckDB spills to disk beyond it."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return "4GB"
    return f"{max(1, total // 2 // 2**30)}GB"


def _check_inputs(cfg: PrepareConfig) -> list[tuple[str, str]]:
    """(path, kind) for every input; InputNotFoundError naming the first path that does not exist."""
    inputs: list[tuple[str, str]] = []
    for kind, flag, paths in (
        ("comments", "--comments", cfg.comments),
        ("submissions", "--submissions", cfg.submissions),
    ):
        for p in paths:
            path = Path(p).expanduser()
            if not path.is_file():
                what = "is a directory, not a file" if path.is_dir() else "not found"
                raise InputNotFoundError(f"input file {what}: {p} ({flag})")
            inputs.append((str(path), kind))
    for p in cfg.shp:
        inputs.extend((str(f), "shp") for f in expand_shp_inputs(p))
    return inputs


def prepare(cfg: PrepareConfig | None = None, **options: Any) -> dict[str, Any]:
    """Run the whole pipeline and return the card (also written to ``out/card.json``).

    ``prepare(comments=[...], submissions=[...], out="DIR")`` or ``prepare(PrepareConfig(...))``.
    Raises InputNotFoundError for a missing input, NoUsableDataError when nothing usable remains,
    ValueError for a bad option, karma.data.decode.DecodeError when a decode worker process fails or dies.
    """
    from karma.data.card import build_card, write_card
    from karma.data.decode import FileTask, decode_files
    from karma.data.relational import Relational

    if cfg is None:
        cfg = PrepareConfig(**options)
    elif options:
        raise TypeError("pass either a PrepareConfig or keyword options, not both")
    t_start = time.perf_counter()
    inputs = _check_inputs(cfg)
    out = Path(cfg.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".karma-tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    timings: dict[str, float] = {}
    try:
        has_comments = any(kind == "comments" for _, kind in inputs)
        posts_are_examples = not has_comments
        tasks = []
        for i, (path, kind) in enumerate(inputs):
            gives_examples = kind != "submissions" or posts_are_examples
            tasks.append(
                FileTask(
                    path=path,
                    kind=kind,  # type: ignore[arg-type]
                    index=i,
                    out_path=str(tmp / f"{kind}-{i:05d}.arrow"),
                    filters=cfg.filters,
                    as_example=posts_are_examples,
                    limit=cfg.limit if gives_examples else None,
                    batch_rows=cfg.batch_rows,
                )
            )
        t0 = time.perf_counter()
        file_stats = decode_files(tasks, workers=cfg.workers)
        timings["decode"] = round(time.perf_counter() - t0, 3)
        log.info(
            "decoded %d file(s): %d records, %d kept in %.1f s",
            len(file_stats),
            sum(s.lines_read for s in file_stats),
            sum(s.kept for s in file_stats),
            timings["decode"],
        )

        paths = {
            k: [p for s in file_stats if s.kind == k for p in s.out_paths]
            for k in ("comments", "submissions", "shp")
        }
        rel = Relational(tmp, cfg)
        try:
            summary = rel.run(
                paths, has_comments=has_comments, posts_are_examples=posts_are_examples, out_dir=tmp
            )
        finally:
            rel.close()
        timings.update(rel.result.timings)
        for s in file_stats:
            for reason, counts in (
                ("duplicate_id", rel.result.duplicates),
                ("context_missing", rel.result.missing_context_dropped),
            ):
                n = counts.get(s.index, 0)
                if n:
                    s.kept -= n
                    s.skipped[reason] = s.skipped.get(reason, 0) + n
        if summary is None or summary["examples"] == 0:
            raise NoUsableDataError(_nothing_usable(file_stats))
        timings["total"] = round(time.perf_counter() - t_start, 3)
        card = build_card(cfg, file_stats, summary, timings, posts_are_examples)
        write_card(card, tmp)
        for name in ("examples.parquet", "pairs.parquet", "card.json", "card.md"):
            os.replace(tmp / name, out / name)
        for w in card["warnings"]:
            log.warning("%s", w)
        log.info("wrote %d examples and %d pairs to %s in %.1f s", card["examples"], card["pairs"]["total"], out,
                 timings["total"])  # fmt: skip
        return card
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _nothing_usable(file_stats) -> str:
    lines = sum(s.lines_read for s in file_stats)
    skipped: dict[str, int] = {}
    for s in file_stats:
        for k, v in s.skipped.items():
            skipped[k] = skipped.get(k, 0) + v
    bad_files = [
        f"{Path(s.path).name}: {s.status}" for s in file_stats if s.status in ("empty_file", "not_zstd")
    ]
    top = ", ".join(f"{k} {v}" for k, v in sorted(skipped.items(), key=lambda kv: -kv[1])[:4])
    parts = [f"no usable examples: {len(file_stats)} file(s), {lines} record(s) read"]
    if top:
        parts.append(f"skipped {top}")
    if bad_files:
        parts.append("; ".join(bad_files))
    return "; ".join(parts)
