"""`karma data prepare` on the real dumps in ../shared/data (slow: the college set is 428,518 comments)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest
import zstandard

from karma.data import prepare
from karma.data.records import is_bot
from karma.rm.template import context_text

pytestmark = pytest.mark.slow


def read_zst(path: Path):
    with open(path, "rb") as fh:
        reader = zstandard.ZstdDecompressor(max_window_size=2**31).stream_reader(fh)
        for line in io.TextIOWrapper(reader, encoding="utf-8"):
            yield json.loads(line)


@pytest.fixture(scope="module")
def college(shared_data, tmp_path_factory):
    base = shared_data / "reddit" / "college_2011_2022"
    out = tmp_path_factory.mktemp("college")
    card = prepare(comments=[base / "RC_college.zst"], submissions=[base / "RS_college.zst"], out=out)
    return base, out, card


def test_college_counts(college):
    base, out, card = college
    rc, rs = card["inputs"]
    assert (rc["lines_read"], rs["lines_read"]) == (428_518, 30_731)
    assert rs["kept"] == 30_731 and rs["role"] == "context"
    deleted = bots = 0
    for c in read_zst(base / "RC_college.zst"):
        body = c["body"].strip()
        if body in ("[deleted]", "[removed]"):
            deleted += 1
        elif is_bot(c["author"]):
            bots += 1
    assert rc["skipped"]["deleted_body"] == deleted == 9_792
    assert rc["skipped"]["bot_author"] == bots
    for f in card["inputs"]:
        assert f["kept"] + sum(f["skipped"].values()) == f["lines_read"]
    assert card["kept"] + sum(card["skipped"].values()) == card["lines_read"] == 428_518 + 30_731
    assert card["examples"] == rc["kept"] == pq.ParquetFile(out / "examples.parquet").metadata.num_rows
    assert card["pairs"]["total"] == pq.ParquetFile(out / "pairs.parquet").metadata.num_rows > 10_000
    assert sum(s["examples"] for s in card["splits"].values()) == card["examples"]


def test_college_threads_splits_pairs_contexts(college):
    base, out, card = college
    ex = str(out / "examples.parquet")
    pairs = str(out / "pairs.parquet")
    con = duckdb.connect()
    assert (
        con.execute(
            f"SELECT count(*) FROM (SELECT thread_id FROM '{ex}' GROUP BY 1 HAVING count(DISTINCT split) > 1)"
        ).fetchone()[0]
        == 0
    )
    # every pair obeys the pair rule, against the examples it names
    bad = con.execute(
        f"""SELECT count(*) FROM '{pairs}' p JOIN '{ex}' a ON a.example_id = p.chosen_id
            JOIN '{ex}' b ON b.example_id = p.rejected_id
            WHERE NOT (a.parent_id = b.parent_id AND a.created_utc >= b.created_utc AND a.score > b.score
                       AND b.score >= 2 AND a.score >= 2 * b.score AND p.split = a.split AND p.split = b.split
                       AND p.context = a.context AND p.chosen = a.response AND p.rejected = b.response)"""
    ).fetchone()[0]
    assert bad == 0
    assert (
        con.execute(
            f"SELECT max(n) FROM (SELECT parent_id, count(*) AS n FROM '{pairs}' GROUP BY 1)"
        ).fetchone()[0]
        <= 5
    )
    # every example whose post is in the input has the post title in its context
    posts = {p["id"]: p["title"].strip() for p in read_zst(base / "RS_college.zst")}
    rows = con.execute(f"SELECT thread_id, post_title, context FROM '{ex}'").fetchall()
    with_post = [r for r in rows if r[0] in posts]
    assert len(with_post) == len(rows)  # the set is complete: every comment's post is there
    assert all(title == posts[t] and ctx.startswith(title) for t, title, ctx in with_post if posts[t])
    # ancestors: with nothing deleted on the way, a reply's context holds min(depth, max_depth) comments
    assert (
        con.execute(
            f"SELECT count(*) FROM '{ex}' WHERE NOT context_missing AND len(context_comments) <> least(depth, 8)"
        ).fetchone()[0]
        == 0
    )
    assert (
        card["context_missing"]
        == con.execute(f"SELECT count(*) FROM '{ex}' WHERE context_missing").fetchone()[0]
    )
    # the context column is exactly the template's context_text of its parts, on every real row
    t = pq.read_table(ex, columns=["post_title", "post_body", "context_comments", "context"]).to_pydict()
    assert all(
        context_text([ti, bo, *cc]) == ctx
        for ti, bo, cc, ctx in zip(
            t["post_title"], t["post_body"], t["context_comments"], t["context"], strict=True
        )
    )


def test_college_parallel_equals_sequential(college, tmp_path):
    base, out, card = college
    assert card["config"]["workers"] >= 1
    seq = prepare(
        comments=[base / "RC_college.zst"], submissions=[base / "RS_college.zst"], out=tmp_path, workers=1
    )
    assert (seq["examples"], seq["pairs"], seq["skipped"]) == (
        card["examples"],
        card["pairs"],
        card["skipped"],
    )
    for name in ("examples.parquet", "pairs.parquet"):
        assert pq.read_table(out / name).equals(pq.read_table(tmp_path / name)), name


def test_pushshift_2005_2006_comments_only(shared_data, tmp_path):
    base = shared_data / "reddit" / "pushshift_2005_2006"
    cmd = [sys.executable, "-m", "karma.cli", "data", "prepare", "--comments", str(base / "RC_2005-12.zst"),
           "--comments", str(base / "RC_2006-01.zst"), "--out", str(tmp_path)]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert res.returncode == 0, res.stderr
    card = json.loads((tmp_path / "card.json").read_text())
    assert [f["lines_read"] for f in card["inputs"]] == [1_075, 3_666]
    assert card["kept"] + sum(card["skipped"].values()) == card["lines_read"] == 4_741
    assert card["skipped"]["deleted_body"] == 648 and card["mode"] == "comments"
    rows = pq.read_table(tmp_path / "examples.parquet").to_pylist()
    assert len(rows) == card["examples"] == card["kept"]
    assert all(r["post_title"] is None and r["context_missing"] for r in rows)  # no submissions in the input
    ids = {r["example_id"] for r in rows}
    replies = [r for r in rows if r["parent_id"].startswith("t1_")]
    # context from parent comments only: a reply whose (kept) parent is in the input shows its text
    by_id = {r["example_id"]: r for r in rows}
    with_parent = [r for r in replies if r["parent_id"][3:] in ids]
    assert len(with_parent) > 1_000
    assert all(
        r["context_comments"] and r["context_comments"][-1] == by_id[r["parent_id"][3:]]["response"]
        for r in with_parent
    )
    assert f"{card['examples']:,} examples" in res.stdout


def test_askmen_submissions_only(shared_data, tmp_path):
    path = shared_data / "reddit" / "askmen_2019_10" / "AskMen_submissions_2019-10.zst"
    card = prepare(submissions=[path], out=tmp_path)
    assert card["mode"] == "submissions" and card["lines_read"] == 13_050
    assert card["kept"] + sum(card["skipped"].values()) == 13_050
    rows = pq.read_table(tmp_path / "examples.parquet").to_pylist()
    assert len(rows) == card["examples"] == card["kept"] > 13_000
    titles = {p["id"]: p["title"].strip() for p in read_zst(path)}
    for r in rows:
        assert r["context"].startswith("r/AskMen") and r["response"].startswith(titles[r["example_id"]])
    assert card["pairs"]["total"] > 0


def test_truncated_copy_of_a_real_dump(shared_data, tmp_path):
    src = (shared_data / "reddit" / "pushshift_2005_2006" / "RC_2006-01.zst").read_bytes()
    cut = tmp_path / "RC_2006-01_cut.zst"
    cut.write_bytes(src[: len(src) // 2])
    junk = tmp_path / "RC_junk.zst"
    junk.write_bytes(b"\x00garbage that is not zstd")
    res = subprocess.run(
        [sys.executable, "-m", "karma.cli", "data", "prepare", "--comments", str(cut), "--comments", str(junk),
         "--out", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "warning:" in res.stderr and "truncated_frame" in res.stderr
    card = json.loads((tmp_path / "o" / "card.json").read_text())
    f = card["inputs"][0]
    assert f["status"] == "truncated_frame" and f["skipped"]["truncated_frame"] == 1
    assert 1_000 < f["lines_read"] < 3_666 and f["kept"] + sum(f["skipped"].values()) == f["lines_read"]
    assert card["skipped_files"] == {"not_zstd": 1}
