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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from karma.data.errors import InputNotFoundError, NoUsableDataError
from karma.data.records import Filters
from karma.data.shp import expand_shp_inputs

__all__ = ["InputNotFoundError", "NoUsableDataError", "PrepareConfig", "prepare"]

log = logging.getLogger(__name__)

NORMALIZE_CHOICES = ("log1p", "percentile", "zscore")
SPLIT_BY_CHOICES = ("thread", "time")


@dataclass
class PrepareConfig:
    """Every option of `karma data prepare` (the CLI maps one flag to each field)."""

    comments: list[str] = field(default_factory=list)
    submissions: list[str] = field(default_factory=list)
    shp: list[str] = field(default_factory=list)
    out: str = "data/prepared"
    min_score_ratio: float = 2.0
    min_pair_score: int = 2
    max_pairs_per_parent: int = 5
    # SHP's rule: the chosen reply was written no earlier than the rejected one, so its higher score is not
    # explained by having been visible longer. "earlier" gives the opposite rule (timing-confounded).
    pair_order: str = "later"
    normalize: str = "log1p"
    split_by: str = "thread"
    val_frac: float = 0.05
    test_frac: float = 0.05
    seed: int = 0
    max_depth: int = 8
    drop_bots: bool = True
    drop_deleted: bool = True
    drop_moderator: bool = True
    drop_stickied: bool = True
    drop_missing_context: bool = False
    workers: int = 0  # 0 = one per CPU core
    limit: int | None = None
    memory_limit: str = "auto"  # DuckDB memory limit ("8GB"); auto = half of this machine's RAM
    batch_rows: int = 65536

    def __post_init__(self) -> None:
        self.comments = [str(p) for p in self.comments]
        self.submissions = [str(p) for p in self.submissions]
        self.shp = [str(p) for p in self.shp]
        self.out = str(self.out)
        if not (self.comments or self.submissions or self.shp):
            raise ValueError("no input: give --comments, --submissions and/or --shp")
        if self.normalize not in NORMALIZE_CHOICES:
            raise ValueError(
                f"normalize must be one of {', '.join(NORMALIZE_CHOICES)}, got {self.normalize!r}"
            )
        if self.split_by not in SPLIT_BY_CHOICES:
            raise ValueError(f"split_by must be one of {', '.join(SPLIT_BY_CHOICES)}, got {self.split_by!r}")
        if not (0 <= self.val_frac < 1 and 0 <= self.test_frac < 1 and self.val_frac + self.test_frac < 1):
            raise ValueError(
                f"val_frac and test_frac must be in [0, 1) with a sum below 1, got {self.val_frac} + {self.test_frac}"
            )
        if self.min_score_ratio < 1:
            raise ValueError(f"min_score_ratio must be >= 1, got {self.min_score_ratio}")
        if self.min_pair_score < 1:
            raise ValueError(
                f"min_pair_score must be >= 1 (a score ratio needs positive scores), got {self.min_pair_score}"
            )
        if self.pair_order not in ("later", "earlier", "any"):
            raise ValueError(f"pair_order must be 'later', 'earlier' or 'any', got {self.pair_order!r}")
        if self.max_pairs_per_parent < 0:
            raise ValueError(f"max_pairs_per_parent must be >= 0, got {self.max_pairs_per_parent}")
        if self.max_depth < 0:
            raise ValueError(f"max_depth must be >= 0, got {self.max_depth}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {self.limit}")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")
        if self.batch_rows < 1:
            raise ValueError(f"batch_rows must be >= 1, got {self.batch_rows}")
        if self.workers == 0:
            self.workers = os.cpu_count() or 1
        if self.memory_limit == "auto":
            self.memory_limit = default_memory_limit()

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
    from karma.data.relational import Relational, RelationalConfig

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

        rcfg = RelationalConfig(
            normalize=cfg.normalize,
            split_by=cfg.split_by,
            val_frac=cfg.val_frac,
            test_frac=cfg.test_frac,
            seed=cfg.seed,
            max_depth=cfg.max_depth,
            min_score_ratio=cfg.min_score_ratio,
            min_pair_score=cfg.min_pair_score,
            max_pairs_per_parent=cfg.max_pairs_per_parent,
            pair_order=cfg.pair_order,
            drop_missing_context=cfg.drop_missing_context,
            memory_limit=cfg.memory_limit,
            threads=cfg.workers,
        )
        paths = {
            k: [p for s in file_stats if s.kind == k for p in s.out_paths]
            for k in ("comments", "submissions", "shp")
        }
        rel = Relational(tmp, rcfg)
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
