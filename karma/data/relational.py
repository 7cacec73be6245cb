"""Relational stage (DuckDB, out-of-core): decoded rows → examples, pairs and splits.

Everything here is SQL over the Arrow files the decode stage wrote; nothing is materialised as Python
objects. DuckDB runs with a ``memory_limit`` and a ``temp_directory``, so inputs larger than memory spill to
disk instead of failing.

Steps (each a named, timed phase in the card):

1. ``dedupe``     — one row per comment / post id (the first usable copy wins); the usable copies that
                    lose are counted against their file as ``duplicate_id``.
2. ``contexts``   — for every distinct parent comment, walk up the parent chain ``max_depth`` hops with
                    repeated joins (siblings share a context, so the walk is per parent, not per example);
                    deleted or unknown ancestors are left out and mark the context as missing.
3. ``depth``      — the record's own ``depth`` when every comment has one; otherwise pointer jumping over
                    the parent links (log2(max depth) joins) — exact when the chain reaches the post, a lower
                    bound when it stops at a comment that is not in the input.
4. ``examples``   — join post, context, siblings, parent times; normalise karma; assign splits.
5. ``pairs``      — SHP-style pairs per parent (chosen written no earlier — SHP's rule, `pair_order`
   — and scored higher, ratio ≥ min), at most K
                    per parent, chosen by a seeded hash.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from karma.config import Cli

log = logging.getLogger(__name__)

#: examples.parquet columns, in order (docs/architecture.md §1)
EXAMPLE_COLUMNS = (
    "example_id", "source", "subreddit", "thread_id", "parent_id", "post_title", "post_body",
    "context_comments", "context_missing", "context", "response", "score", "karma", "created_utc",
    "seconds_since_post", "seconds_since_parent", "depth", "sibling_count", "split",
)  # fmt: skip

PAIR_COLUMNS = (
    "pair_id", "split", "subreddit", "thread_id", "parent_id", "context", "context_missing", "chosen_id",
    "rejected_id", "chosen", "rejected", "chosen_score", "rejected_score", "score_ratio", "chosen_karma",
    "rejected_karma",
)  # fmt: skip

#: the time condition on (chosen a, rejected b) per `pair_order`
_ORDER_RULE = {
    "later": "a.created_utc >= b.created_utc",
    "earlier": "a.created_utc <= b.created_utc",
    "any": "TRUE",
}

MAX_JUMPS = 64  # pointer-jumping rounds: covers chains of 2**64 comments; a parent cycle ends as "unknown"


class RelationalConfig(BaseModel):
    """The options of the relational stage (threads, karma, splits, pairs); `PrepareConfig` extends it."""

    model_config = ConfigDict(extra="forbid")

    min_score_ratio: float = Field(2.0, ge=1, description="pairs: chosen score / rejected score >= this")
    min_pair_score: int = Field(
        2, ge=1, description="pairs: both scores >= this (a score ratio needs positive scores; SHP uses 2)"
    )
    max_pairs_per_parent: int = Field(5, ge=0, description="pairs: at most K per parent (seeded pick)")
    pair_order: Literal["later", "earlier", "any"] = Field(
        "later",
        description="pairs: 'later' = chosen written no earlier than rejected (SHP: its higher score is not "
        "explained by visibility); 'earlier' = the reverse (confounded with posting time); 'any' = both "
        "orders (the natural pairs: no timing rule a variant can read)",
    )
    normalize: Literal["log1p", "percentile", "zscore"] = Field(
        "log1p", description="karma: log1p (signed) | percentile | zscore (within thread)"
    )
    split_by: Literal["thread", "time"] = Field(
        "thread", description="thread (seeded hash of the thread id) | time (earlier threads train)"
    )
    val_frac: float = Field(0.05, ge=0, lt=1, description="fraction of threads (by time: of examples) in val")
    test_frac: float = Field(
        0.05, ge=0, lt=1, description="fraction of threads (by time: of examples) in test"
    )
    seed: int = Field(0, description="seed of the split hash and of the pair pick")
    max_depth: int = Field(8, ge=0, description="ancestor comments kept in the context (nearest first)")
    drop_missing_context: Annotated[bool, Cli("--drop-missing-context/--keep-missing-context")] = Field(
        False, description="examples whose post/ancestor is unknown or deleted"
    )
    memory_limit: str = Field(
        "auto", description="DuckDB memory limit, e.g. 8GB (auto: half the RAM); beyond it, it spills to disk"
    )
    workers: int = Field(0, ge=0, description="decode processes and DuckDB threads (0: one per core)")

    @model_validator(mode="after")
    def _fractions(self) -> RelationalConfig:
        if self.val_frac + self.test_frac >= 1:
            raise ValueError(
                f"val_frac and test_frac must be in [0, 1) with a sum below 1, got {self.val_frac} + "
                f"{self.test_frac}"
            )
        return self


@dataclass
class RelationalResult:
    examples: int = 0
    pairs: int = 0
    duplicates: dict[int, int] = field(default_factory=dict)  # file index -> usable duplicate rows
    missing_context_dropped: dict[int, int] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


def _sql_str(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _split_expr(key: str, cfg: RelationalConfig) -> str:
    """Seeded split of a thread key: u = first 32 bits of md5(f"{seed}:{key}") / 2**32 (reproducible in Python)."""
    u = f"(('0x' || substr(md5('{cfg.seed}:' || {key}), 1, 8))::UBIGINT / 4294967296.0)"
    return (
        f"CASE WHEN {u} < {cfg.test_frac} THEN 'test' "
        f"WHEN {u} < {cfg.test_frac + cfg.val_frac} THEN 'val' ELSE 'train' END"
    )


def split_of(thread_id: str, seed: int, val_frac: float, test_frac: float) -> str:
    """The split the SQL assigns to a thread under ``--split-by thread`` (for users and tests)."""
    import hashlib

    u = int(hashlib.md5(f"{seed}:{thread_id}".encode()).hexdigest()[:8], 16) / 2**32
    return "test" if u < test_frac else "val" if u < test_frac + val_frac else "train"


def _karma_expr(method: str) -> str:
    log1p = "sign(score) * ln(1 + abs(CAST(score AS DOUBLE)))"  # DOUBLE: abs(-2**63) overflows BIGINT
    if method == "log1p":
        return log1p
    if method == "percentile":  # mid-rank percentile of the score within its thread, 0.5 for a lone example
        return (
            "CASE WHEN count(*) OVER t = 1 THEN 0.5 ELSE "
            "((rank() OVER (PARTITION BY thread_id ORDER BY score) - 1) "
            "+ (count(*) OVER (PARTITION BY thread_id, score) - 1) / 2.0) / (count(*) OVER t - 1) END"
        )
    if method == "zscore":  # z-score of the raw score within its thread, 0 when the thread has no spread
        return (
            "CASE WHEN coalesce(stddev_pop(score) OVER t, 0) = 0 THEN 0.0 "
            "ELSE (score - avg(score) OVER t) / stddev_pop(score) OVER t END"
        )
    raise ValueError(f"unknown normalize {method!r}; expected log1p, percentile or zscore")


class Relational:
    """One DuckDB session over the decode stage's Arrow files."""

    def __init__(self, tmp_dir: Path, cfg: RelationalConfig):
        import duckdb

        self.cfg = cfg
        self.tmp_dir = tmp_dir
        spill = tmp_dir / "duckdb_spill"
        spill.mkdir(parents=True, exist_ok=True)
        self.con = duckdb.connect(config={"memory_limit": cfg.memory_limit, "threads": max(cfg.workers, 1)})
        self.con.execute(f"SET temp_directory = {_sql_str(str(spill))}")
        self.result = RelationalResult()
        self._datasets: list[Any] = []  # keep the registered pyarrow datasets alive

    def run(
        self, paths: dict[str, list[str]], *, has_comments: bool, posts_are_examples: bool, out_dir: Path
    ) -> dict[str, Any] | None:
        """All phases, timed; writes examples.parquet and pairs.parquet to out_dir and returns the summary.

        ``paths`` maps comments / submissions / shp to the decode stage's Arrow files. Returns None when
        there is nothing to make examples from, and {"examples": 0} when every candidate was dropped.
        """
        from karma.data.records import COMMENT_COLUMNS, POST_COLUMNS, SHP_COLUMNS

        if not any(paths.values()):
            return None
        for name, kind, cols in (("raw_comments", "comments", COMMENT_COLUMNS), ("raw_posts", "submissions", POST_COLUMNS),
                                 ("raw_shp", "shp", SHP_COLUMNS)):  # fmt: skip
            self.register(name, paths.get(kind, []), cols)
        self._timed("dedupe", self.dedupe)
        made = False
        if has_comments:
            self._timed("contexts", self.contexts)
            self._timed("depth", self.depth)
            self._timed("comment_examples", self.comment_examples)
            made = True
        elif posts_are_examples and paths.get("submissions"):
            self._timed("post_examples", self.post_examples)
            made = True
        if paths.get("shp"):
            self._timed("shp_examples", lambda: self.shp_examples(append=made))
            made = True
        if not made:
            return None
        self._timed("finish_examples", self.finish_examples)
        if self.result.examples == 0:
            return {"examples": 0}
        self._timed("pairs", self.pairs)
        self._timed("write", lambda: self.write(out_dir))
        return self._timed("summary", self.summary)

    # -- helpers -------------------------------------------------------------------------------------------
    def _timed(self, name: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        out = fn()
        self.result.timings[name] = round(time.perf_counter() - t0, 3)
        return out

    def sql(self, query: str, params: list | None = None):
        return self.con.execute(query, params or [])

    def scalar(self, query: str) -> Any:
        return self.con.execute(query).fetchone()[0]

    def register(self, name: str, paths: list[str], columns: tuple[tuple[str, str], ...]) -> None:
        """Expose Arrow IPC files as a view (an empty table of the right schema when there are none)."""
        import pyarrow as pa
        import pyarrow.dataset as ds

        schema = pa.schema(
            [(n, getattr(pa, t)()) for n, t in columns] + [("file_idx", pa.int32()), ("row_no", pa.int64())]
        )
        data = ds.dataset(paths, format="ipc", schema=schema) if paths else pa.table(schema.empty_table())
        self._datasets.append(data)
        self.con.register(name, data)

    # -- phases --------------------------------------------------------------------------------------------
    # Text (bodies, titles, contexts) is big; ids and numbers are small. Every phase works on narrow tables
    # of ids and numbers, and the text is joined in once, by the COPY that writes the parquet file.

    def dedupe(self) -> None:
        """c, p, s: one row per comment / post / SHP comment; cn, pn: their narrow (text-free) columns."""
        for table, raw in (("c", "raw_comments"), ("p", "raw_posts")):
            dup = self.scalar(f"SELECT count(*) FROM (SELECT id FROM {raw} GROUP BY id HAVING count(*) > 1)")
            if not dup:
                self.sql(f"CREATE TABLE {table} AS SELECT * FROM {raw}")
                continue
            # the first usable copy wins; usable copies that lose are counted as duplicate_id for their file.
            # Ranked on the narrow key columns only; the text is copied once, for the winners.
            self.sql(
                f"CREATE TEMP TABLE ranked AS SELECT file_idx, row_no, usable, row_number() OVER "
                f"(PARTITION BY id ORDER BY usable DESC, file_idx, row_no) AS rn FROM {raw}"
            )
            self.sql(
                f"CREATE TABLE {table} AS SELECT r.* FROM {raw} r "
                "SEMI JOIN (SELECT file_idx, row_no FROM ranked WHERE rn = 1) k USING (file_idx, row_no)"
            )
            for idx, n in self.sql(
                "SELECT file_idx, count(*) FROM ranked WHERE rn > 1 AND usable GROUP BY file_idx"
            ).fetchall():
                self.result.duplicates[idx] = self.result.duplicates.get(idx, 0) + n
            self.sql("DROP TABLE ranked")
        self.sql(
            "CREATE TABLE cn AS SELECT id, parent_id, thread_id, subreddit, score, created_utc, depth_field, usable, "
            "file_idx FROM c"
        )
        self.sql(
            "CREATE TABLE pn AS SELECT id, subreddit, score, created_utc, flair, usable, file_idx, "
            "selftext IS NULL AS body_missing FROM p"
        )
        # SHP rows repeat each comment once per pair it is in: one row per comment, silently
        self.sql(
            "CREATE TABLE s AS SELECT id, any_value(post_id) AS post_id, any_value(subreddit) AS subreddit, "
            "any_value(shp_split) AS shp_split, any_value(history) AS history, any_value(body) AS body, "
            "any_value(score) AS score, any_value(created_utc) AS created_utc, min(file_idx) AS file_idx "
            "FROM raw_shp GROUP BY id"
        )

    def contexts(self) -> None:
        """ctx(pid, comments, missing): the ancestor bodies of every parent comment, root first.

        The walk runs on ids only (anc: pid, hop, aid; hop 1 = the parent itself) and stops at the post, at
        an unknown comment, or after max_depth hops; the bodies are joined in once at the end.
        """
        self.sql(
            "CREATE TEMP TABLE frontier AS SELECT DISTINCT substr(parent_id, 4) AS pid, substr(parent_id, 4) AS cur "
            "FROM cn WHERE usable AND parent_id LIKE 't1_%'"
        )
        self.sql("CREATE TEMP TABLE anc (pid VARCHAR, hop INTEGER, aid VARCHAR)")
        for hop in range(1, self.cfg.max_depth + 1):
            self.sql(
                "CREATE OR REPLACE TEMP TABLE step AS SELECT f.pid, f.cur, n.id AS aid, n.parent_id AS up "
                "FROM frontier f LEFT JOIN cn n ON n.id = f.cur"
            )
            self.sql(f"INSERT INTO anc SELECT pid, {hop}, aid FROM step")
            self.sql(
                "CREATE OR REPLACE TEMP TABLE frontier AS SELECT pid, substr(up, 4) AS cur FROM step "
                "WHERE up LIKE 't1_%'"
            )
            if not self.scalar("SELECT count(*) FROM frontier"):
                break
        self.sql(
            "CREATE TABLE ctx AS SELECT a.pid, "
            "list(n.body ORDER BY a.hop DESC) FILTER (WHERE n.body IS NOT NULL AND n.body <> '' "
            "AND n.body NOT IN ('[deleted]', '[removed]')) AS comments, "
            "bool_or(n.id IS NULL OR n.body IS NULL OR n.body IN ('[deleted]', '[removed]')) AS missing "
            "FROM anc a LEFT JOIN c n ON n.id = a.aid GROUP BY a.pid"
        )
        self.sql("DROP TABLE anc")
        self.sql("DROP TABLE IF EXISTS step")
        self.sql("DROP TABLE IF EXISTS frontier")

    def depth(self) -> None:
        """node_depth(id, depth) for every comment."""
        if not self.scalar("SELECT count(*) FROM cn WHERE depth_field IS NULL"):
            self.sql("CREATE TABLE node_depth AS SELECT id, depth_field AS depth FROM cn")
            return
        self.sql(
            "CREATE TEMP TABLE jump AS SELECT id, CASE WHEN parent_id LIKE 't1_%' THEN substr(parent_id, 4) END AS up, "
            "1 AS dist, CASE WHEN parent_id LIKE 't3_%' THEN 'post' END AS term FROM cn"
        )
        for _ in range(MAX_JUMPS):
            if not self.scalar("SELECT count(*) FROM jump WHERE up IS NOT NULL"):
                break
            self.sql(
                "CREATE OR REPLACE TEMP TABLE jump AS SELECT a.id, "
                "CASE WHEN a.up IS NULL OR b.id IS NULL THEN NULL ELSE b.up END AS up, "
                "a.dist + coalesce(b.dist, 0) AS dist, "
                "CASE WHEN a.up IS NULL THEN a.term WHEN b.id IS NULL THEN 'unknown' ELSE b.term END AS term "
                "FROM jump a LEFT JOIN jump b ON a.up = b.id"
            )
        # exact when the chain reaches the post; else the record's own depth, else a lower bound
        self.sql(
            "CREATE TABLE node_depth AS SELECT j.id, CASE WHEN j.term = 'post' THEN j.dist - 1 "
            "ELSE coalesce(n.depth_field, j.dist) END AS depth FROM jump j JOIN cn n USING (id)"
        )
        self.sql("DROP TABLE jump")

    def comment_examples(self) -> None:
        """ex0 (narrow): comment examples with their metadata, before karma and splits."""
        self.sql("CREATE TEMP TABLE sib AS SELECT parent_id, count(*) - 1 AS n FROM cn GROUP BY parent_id")
        self.sql(
            """
            CREATE TABLE ex0 AS
            SELECT e.id AS example_id, 'pushshift' AS source, e.subreddit, e.thread_id, e.parent_id,
                   (p.id IS NULL OR p.body_missing OR coalesce(x.missing, false)) AS context_missing,
                   e.score, e.created_utc,
                   CAST(e.created_utc - p.created_utc AS DOUBLE) AS seconds_since_post,
                   CAST(e.created_utc - CASE WHEN e.parent_id LIKE 't1_%' THEN pc.created_utc ELSE p.created_utc END
                        AS DOUBLE) AS seconds_since_parent,
                   CAST(d.depth AS INTEGER) AS depth, CAST(s.n AS INTEGER) AS sibling_count,
                   e.parent_id AS pair_key, coalesce(p.created_utc, e.created_utc) AS thread_time,
                   NULL::VARCHAR AS fixed_split, e.file_idx
            FROM cn e
            LEFT JOIN pn p ON p.id = e.thread_id
            LEFT JOIN ctx x ON e.parent_id LIKE 't1_%' AND x.pid = substr(e.parent_id, 4)
            LEFT JOIN cn pc ON e.parent_id LIKE 't1_%' AND pc.id = substr(e.parent_id, 4)
            LEFT JOIN node_depth d ON d.id = e.id
            LEFT JOIN sib s ON s.parent_id = e.parent_id
            WHERE e.usable
            """
        )

    def post_examples(self) -> None:
        """ex0 in submissions-only mode: each post is an example; its context is the subreddit (and flair)."""
        self.sql(
            """
            CREATE TABLE ex0 AS
            SELECT id AS example_id, 'submissions' AS source, subreddit, id AS thread_id, NULL::VARCHAR AS parent_id,
                   false AS context_missing, score, created_utc,
                   NULL::DOUBLE AS seconds_since_post, NULL::DOUBLE AS seconds_since_parent, CAST(-1 AS INTEGER) AS depth,
                   CAST(count(*) OVER (PARTITION BY subreddit ORDER BY created_utc
                        RANGE BETWEEN 3600 PRECEDING AND 3600 FOLLOWING) - 1 AS INTEGER) AS sibling_count,
                   subreddit || chr(0) || coalesce(flair, '') AS pair_key, created_utc AS thread_time,
                   NULL::VARCHAR AS fixed_split, file_idx
            FROM pn WHERE usable
            """
        )

    def shp_examples(self, append: bool) -> None:
        """SHP comments as examples: the post text (title + body, SHP's `history`) is the whole context."""
        verb = "INSERT INTO ex0" if append else "CREATE TABLE ex0 AS"
        self.sql(
            f"""
            {verb}
            SELECT id AS example_id, 'shp' AS source, subreddit, post_id AS thread_id, 't3_' || post_id AS parent_id,
                   false AS context_missing, score, created_utc,
                   NULL::DOUBLE AS seconds_since_post, NULL::DOUBLE AS seconds_since_parent, CAST(0 AS INTEGER) AS depth,
                   CAST(count(*) OVER (PARTITION BY post_id) - 1 AS INTEGER) AS sibling_count,
                   't3_' || post_id AS pair_key, min(created_utc) OVER (PARTITION BY post_id) AS thread_time,
                   shp_split AS fixed_split, file_idx
            FROM s
            """
        )

    def finish_examples(self) -> None:
        """ex (narrow): ex0 + karma, split, pair group key and output order."""
        cfg = self.cfg
        if cfg.drop_missing_context:
            for idx, n in self.sql(
                "SELECT file_idx, count(*) FROM ex0 WHERE context_missing GROUP BY file_idx"
            ).fetchall():
                self.result.missing_context_dropped[idx] = n
            self.sql("DELETE FROM ex0 WHERE context_missing")
        if cfg.split_by == "thread":
            split = f"coalesce(fixed_split, {_split_expr('thread_id', cfg)})"
            join = ""
        else:
            # by time: threads ordered by their start; the earliest (1 - val - test) of the examples train
            self.sql(
                "CREATE TEMP TABLE thread_split AS WITH t AS (SELECT thread_id, min(thread_time) AS t0, "
                "count(*) AS n FROM ex0 GROUP BY thread_id), c AS (SELECT thread_id, "
                "(sum(n) OVER (ORDER BY t0, thread_id) - n) / sum(n) OVER () AS before FROM t) "
                f"SELECT thread_id, CASE WHEN before < {1 - cfg.val_frac - cfg.test_frac} THEN 'train' "
                f"WHEN before < {1 - cfg.test_frac} THEN 'val' ELSE 'test' END AS split FROM c"
            )
            split = "ts.split"
            join = "LEFT JOIN thread_split ts USING (thread_id)"
        # pairs come from one parent; a post's "parent" is its subreddit's feed (same flair) in the same hour
        self.sql(
            f"""
            CREATE TABLE ex AS
            SELECT *, {_karma_expr(cfg.normalize)} AS karma,
                   CASE WHEN source = 'submissions'
                        THEN pair_key || chr(0) || split || chr(0) || CAST(created_utc // 3600 AS VARCHAR)
                        ELSE pair_key END AS group_key,
                   row_number() OVER (ORDER BY thread_id, created_utc, example_id) AS ord
            FROM (SELECT ex0.*, {split} AS split FROM ex0 {join})
            WINDOW t AS (PARTITION BY thread_id)
            """
        )
        self.sql("DROP TABLE ex0")
        self.result.examples = self.scalar("SELECT count(*) FROM ex")

    def pairs(self) -> None:
        """pr (narrow): at most K pairs per parent among the candidates that obey the pair rule."""
        cfg = self.cfg
        self.sql(
            f"""
            CREATE TEMP TABLE cand AS
            SELECT a.example_id AS chosen_id, b.example_id AS rejected_id, a.group_key, a.split,
                   a.score AS chosen_score, b.score AS rejected_score
            FROM ex a JOIN ex b ON a.group_key = b.group_key AND a.example_id <> b.example_id
            WHERE {_ORDER_RULE[cfg.pair_order]} AND a.score > b.score
              AND b.score >= {int(cfg.min_pair_score)} AND a.score >= {float(cfg.min_score_ratio)} * b.score
            """
        )
        self.result.stats["pair_candidates"] = self.scalar("SELECT count(*) FROM cand")
        self.sql(
            f"""
            CREATE TABLE pr AS
            SELECT chosen_id || '>' || rejected_id AS pair_id, chosen_id, rejected_id, group_key, split,
                   chosen_score, rejected_score, chosen_score / rejected_score AS score_ratio
            FROM (SELECT *, row_number() OVER (PARTITION BY group_key
                         ORDER BY md5('{cfg.seed}:' || chosen_id || '>' || rejected_id)) AS rn FROM cand)
            WHERE rn <= {int(cfg.max_pairs_per_parent)}
            """
        )
        self.sql("DROP TABLE cand")
        self.result.pairs = self.scalar("SELECT count(*) FROM pr")

    def _with_text(self, where: str) -> str:
        """SELECT of the examples.parquet columns (text joined in) for the ex rows matching `where`."""
        # karma.rm.template.context_text([title, body, *comments]): the decode stage stripped every part and
        # the context walk kept only non-empty comments, so joining the non-empty parts is the same function
        ctx = (
            "concat_ws(chr(10) || chr(10), nullif(post_title, ''), nullif(post_body, ''), "
            "nullif(array_to_string(context_comments, chr(10) || chr(10)), ''))"
        )
        meta = (
            "e.score, e.karma, e.created_utc, e.seconds_since_post, e.seconds_since_parent, e.depth, "
            "e.sibling_count, e.split, e.ord"
        )
        head = "e.example_id, e.source, e.subreddit, e.thread_id, e.parent_id"
        parts = [
            # comments: post title/body + ancestor bodies
            f"""SELECT {head}, post_title, post_body, context_comments, e.context_missing, {ctx} AS context,
                       response, {meta}
                FROM (SELECT e.*, p.title AS post_title,
                             CASE WHEN p.selftext IN ('[deleted]', '[removed]') THEN NULL ELSE p.selftext END AS post_body,
                             coalesce(x.comments, []::VARCHAR[]) AS context_comments, c.body AS response
                      FROM ex e JOIN c ON c.id = e.example_id
                      LEFT JOIN p ON p.id = e.thread_id
                      LEFT JOIN ctx x ON e.parent_id LIKE 't1_%' AND x.pid = substr(e.parent_id, 4)
                      WHERE e.source = 'pushshift' AND ({where})) e""",
            # posts (submissions-only mode): context = subreddit (+ flair), response = title + body
            f"""SELECT {head}, NULL::VARCHAR AS post_title, NULL::VARCHAR AS post_body,
                       []::VARCHAR[] AS context_comments, e.context_missing,
                       'r/' || p.subreddit || CASE WHEN p.flair IS NULL THEN '' ELSE chr(10) || chr(10) || 'flair: ' || p.flair END
                           AS context,
                       CASE WHEN coalesce(p.selftext, '') = '' THEN p.title ELSE p.title || chr(10) || chr(10) || p.selftext END
                           AS response,
                       {meta}
                FROM ex e JOIN p ON p.id = e.example_id WHERE e.source = 'submissions' AND ({where})""",
            # SHP: the post text is the whole context
            f"""SELECT {head}, NULL::VARCHAR AS post_title, s.history AS post_body, []::VARCHAR[] AS context_comments,
                       e.context_missing, s.history AS context, s.body AS response, {meta}
                FROM ex e JOIN s ON s.id = e.example_id WHERE e.source = 'shp' AND ({where})""",
        ]
        present = {r[0] for r in self.sql("SELECT DISTINCT source FROM ex").fetchall()}
        chosen = [
            q for q, src in zip(parts, ("pushshift", "submissions", "shp"), strict=True) if src in present
        ]
        return " UNION ALL ".join(chosen)

    def _to_parquet(self, query: str, path: Path) -> None:
        """COPY a query's result to a parquet file (zstd level 1, no dictionary pages).

        Dictionary encoding is off: on these long, mostly distinct strings DuckDB's attempt at it cost half
        of the write's CPU and saved about 1 % of the file size.
        """
        self.sql(
            f"COPY ({query}) TO {_sql_str(str(path))} "
            "(FORMAT parquet, COMPRESSION zstd, COMPRESSION_LEVEL 1, DICTIONARY_SIZE_LIMIT 1)"
        )

    def write(self, out_dir: Path) -> None:
        """examples.parquet and pairs.parquet, ordered (thread, time, id) so equal inputs give equal files."""
        self._to_parquet(
            f"SELECT {', '.join(EXAMPLE_COLUMNS)} FROM ({self._with_text('true')}) ORDER BY ord",
            out_dir / "examples.parquet",
        )
        self.sql(
            "CREATE TEMP TABLE pt AS "
            + self._with_text("e.example_id IN (SELECT chosen_id FROM pr UNION SELECT rejected_id FROM pr)")
        )
        self._to_parquet(
            """
                SELECT r.pair_id, a.split, a.subreddit, a.thread_id, a.parent_id, a.context,
                       (a.context_missing OR b.context_missing) AS context_missing, r.chosen_id, r.rejected_id,
                       a.response AS chosen, b.response AS rejected, r.chosen_score, r.rejected_score, r.score_ratio,
                       a.karma AS chosen_karma, b.karma AS rejected_karma
                FROM pr r JOIN pt a ON a.example_id = r.chosen_id JOIN pt b ON b.example_id = r.rejected_id
                ORDER BY a.ord, b.ord
            """,
            out_dir / "pairs.parquet",
        )

    def summary(self) -> dict[str, Any]:
        """Score / karma statistics, split sizes and pair counts for the card."""
        q = self.sql(
            "SELECT count(*), min(score), max(score), avg(score), median(score), stddev_pop(score), "
            "quantile_cont(score, 0.1), quantile_cont(score, 0.9), min(karma), max(karma), avg(karma), "
            "stddev_pop(karma), sum(context_missing::INT), count(DISTINCT thread_id), count(DISTINCT subreddit) "
            "FROM ex"
        ).fetchone()
        names = ("n", "min", "max", "mean", "median", "std", "p10", "p90")
        score = {k: (float(v) if v is not None else None) for k, v in zip(names, q[:8], strict=True)}
        score["n"] = int(q[0])
        karma = {
            k: (float(v) if v is not None else None)
            for k, v in zip(("min", "max", "mean", "std"), q[8:12], strict=True)
        }
        splits: dict[str, dict[str, int]] = {
            s: {"examples": 0, "threads": 0, "pairs": 0} for s in ("train", "val", "test")
        }
        for split, n, threads in self.sql(
            "SELECT split, count(*), count(DISTINCT thread_id) FROM ex GROUP BY split"
        ).fetchall():
            splits[split].update(examples=n, threads=threads)
        for split, n in self.sql("SELECT split, count(*) FROM pr GROUP BY split").fetchall():
            splits[split]["pairs"] = n
        sources = dict(self.sql("SELECT source, count(*) FROM ex GROUP BY source ORDER BY source").fetchall())
        subs = self.sql(
            "SELECT subreddit, count(*) AS n FROM ex GROUP BY subreddit ORDER BY n DESC, subreddit LIMIT 20"
        ).fetchall()
        parents = self.scalar("SELECT count(DISTINCT group_key) FROM ex")
        return {
            "examples": int(q[0]),
            "threads": int(q[13]),
            "subreddits": int(q[14]),
            "context_missing": int(q[12] or 0),
            "sources": sources,
            "top_subreddits": dict(subs),
            "score": score,
            "karma": karma,
            "splits": splits,
            "pairs": {
                "total": self.result.pairs,
                "candidates_before_cap": int(self.result.stats.get("pair_candidates", 0)),
                "parents": int(parents),
                "parents_with_pairs": int(self.scalar("SELECT count(DISTINCT group_key) FROM pr")),
            },
        }

    def close(self) -> None:
        self.con.close()
