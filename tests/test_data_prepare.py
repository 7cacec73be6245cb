"""`karma data prepare` end to end on small dumps the tests write: contexts, karma, splits, pairs, card, CLI."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from typer.testing import CliRunner

from karma.data import InputNotFoundError, NoUsableDataError, PrepareConfig, prepare, split_of
from karma.data.cli import app
from karma.data.relational import EXAMPLE_COLUMNS, PAIR_COLUMNS
from karma.rm.template import context_text
from tests.support import cli_text

T0 = 1_600_000_000


def c(cid, parent, score, dt, body=None, thread="p1", **over):
    rec = {"id": cid, "parent_id": parent, "link_id": f"t3_{thread}", "subreddit": "College", "author": f"user_{cid}",
           "body": body if body is not None else f"reply {cid}", "score": score, "created_utc": T0 + dt}  # fmt: skip
    rec.update(over)
    return rec


POSTS = [
    {"id": "p1", "title": "Which college?", "selftext": "I got into two schools.\n", "subreddit": "College",
     "score": 50, "created_utc": T0},
    {"id": "p2", "title": "Removed post", "selftext": "[removed]", "subreddit": "College", "score": 3, "created_utc": T0},
    {"id": "p3", "title": "A link post", "selftext": "", "subreddit": "ApplyingToCollege", "score": 9,
     "created_utc": T0 + 10},
]  # fmt: skip

COMMENTS = [
    c("a", "t3_p1", 40, 100),
    c("b", "t3_p1", 3, 50),
    c("cc", "t3_p1", 12, 200),
    c("e", "t3_p1", 2, 300),
    c("a1", "t1_a", 4, 400),
    c("a2", "t1_a1", 2, 500),
    c("a3", "t1_a2", 9, 600),
    c("d", "t1_a", 1, 410, body="[deleted]"),
    c("d1", "t1_d", 5, 700),
    c("bot", "t3_p1", 1, 60, author="AutoModerator", body="Please read the rules."),
    c("bot1", "t1_bot", 6, 800),
    c("mod", "t3_p1", 1, 70, distinguished="moderator"),
    c("st", "t3_p1", 1, 80, stickied=True),
    c("r1", "t3_p2", 7, 90, thread="p2"),
    c("x1", "t3_q9", 2, 100, thread="q9"),
    c("x2", "t1_zz", 3, 110, thread="q9"),
    c("l1", "t3_p3", 8, 20, thread="p3"),
    c("l2", "t3_p3", 2, 30, thread="p3"),
    c("f", "t3_p1", 1, 900),
    c("g", "t3_p1", 1, 950),
]


def write_zst(path: Path, records) -> Path:
    data = b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in records)
    path.write_bytes(zstandard.ZstdCompressor().compress(data))
    return path


@pytest.fixture(scope="module")
def dumps(tmp_path_factory):
    d = tmp_path_factory.mktemp("dumps")
    return write_zst(d / "RC_tiny.zst", COMMENTS), write_zst(d / "RS_tiny.zst", POSTS)


@pytest.fixture(scope="module")
def prepared(dumps, tmp_path_factory):
    rc, rs = dumps
    out = tmp_path_factory.mktemp("prepared")
    # the hand-checked pair expectations below use the reverse ("earlier") rule; the default is tested apart
    card = prepare(
        comments=[rc], submissions=[rs], out=out, min_pair_score=1, workers=1, seed=3, pair_order="earlier"
    )
    ex = pq.read_table(out / "examples.parquet")
    pairs = pq.read_table(out / "pairs.parquet")
    return out, card, {r["example_id"]: r for r in ex.to_pylist()}, pairs.to_pylist(), ex, pairs


def test_schema_is_exactly_the_architecture_contract(prepared):
    _, _, _, _, ex, pairs = prepared
    assert tuple(ex.schema.names) == EXAMPLE_COLUMNS
    assert tuple(pairs.schema.names) == PAIR_COLUMNS
    types = {f.name: f.type for f in ex.schema}
    assert (
        types["context_comments"] == pa.list_(pa.string())
        or str(types["context_comments"]) == "list<element: string>"
    )
    assert (types["score"], types["karma"], types["created_utc"]) == (pa.int64(), pa.float64(), pa.int64())
    assert (types["depth"], types["sibling_count"], types["context_missing"]) == (
        pa.int32(),
        pa.int32(),
        pa.bool_(),
    )
    assert types["seconds_since_post"] == pa.float64()
    ptypes = {f.name: f.type for f in pairs.schema}
    assert (ptypes["chosen_score"], ptypes["score_ratio"], ptypes["context_missing"]) == (
        pa.int64(),
        pa.float64(),
        pa.bool_(),
    )


def test_card_counts(prepared):
    out, card, ex, _, _, _ = prepared
    assert card == json.loads((out / "card.json").read_text())
    assert (out / "card.md").read_text().startswith("# Prepared KARMA data")
    rc, rs = card["inputs"]
    assert (rc["lines_read"], rc["kept"], rc["skipped"]) == (
        20,
        16,
        {"bot_author": 1, "deleted_body": 1, "moderator": 1, "stickied": 1},
    )
    assert (rs["lines_read"], rs["kept"], rs["role"]) == (3, 3, "context")
    assert card["kept"] + sum(card["skipped"].values()) == card["lines_read"] == 23
    assert card["examples"] == len(ex) == 16
    assert rc["sha256"] == hashlib.sha256(Path(rc["path"]).read_bytes()).hexdigest()
    assert (
        card["splits"]["train"]["examples"]
        + card["splits"]["val"]["examples"]
        + card["splits"]["test"]["examples"]
        == 16
    )
    assert card["config"]["normalize"] == "log1p" and card["mode"] == "comments"
    assert card["warnings"] == []


def test_context_walks_up_the_thread(prepared):
    _, _, ex, _, _, _ = prepared
    post = ["Which college?", "I got into two schools."]
    assert (
        ex["a"]["context_comments"] == []
        and ex["a"]["context"] == "Which college?\n\nI got into two schools."
    )
    assert ex["a3"]["context_comments"] == ["reply a", "reply a1", "reply a2"]  # root first, parent last
    assert ex["a3"]["context"] == context_text(post + ["reply a", "reply a1", "reply a2"])
    assert not ex["a3"]["context_missing"]
    # a deleted parent is left out of the context and marks it missing; its child is still an example
    assert ex["d1"]["context_comments"] == ["reply a"] and ex["d1"]["context_missing"]
    # a bot's comment is not an example but is context for the human reply below it
    assert "bot" not in ex and ex["bot1"]["context_comments"] == ["Please read the rules."]
    # removed post body: title only, context missing; unknown post / unknown parent: missing
    assert (ex["r1"]["post_title"], ex["r1"]["post_body"], ex["r1"]["context_missing"]) == (
        "Removed post",
        None,
        True,
    )
    assert ex["r1"]["context"] == "Removed post"
    assert ex["x1"]["post_title"] is None and ex["x1"]["context"] == "" and ex["x1"]["context_missing"]
    assert ex["x2"]["context_missing"] and ex["x2"]["context_comments"] == []
    # a link post (empty selftext) is not missing anything
    assert ex["l1"]["context"] == "A link post" and not ex["l1"]["context_missing"]
    for r in ex.values():
        assert r["context"] == context_text([r["post_title"], r["post_body"], *r["context_comments"]])


def test_metadata(prepared):
    _, _, ex, _, _, _ = prepared
    assert [ex[k]["depth"] for k in ("a", "a1", "a2", "a3", "d1", "bot1")] == [0, 1, 2, 3, 2, 1]
    assert ex["x2"]["depth"] == 1  # parent unknown: a lower bound
    assert ex["a"]["sibling_count"] == 8  # a, b, cc, e, f, g, bot, mod, st under the post: the others count
    assert ex["a1"]["sibling_count"] == 1  # a1 and the deleted d under a
    assert (ex["a1"]["seconds_since_post"], ex["a1"]["seconds_since_parent"]) == (400.0, 300.0)
    assert ex["x1"]["seconds_since_post"] is None and ex["x2"]["seconds_since_parent"] is None
    assert ex["a"]["karma"] == pytest.approx(math.log1p(40))
    assert (ex["a"]["source"], ex["a"]["thread_id"], ex["a"]["parent_id"], ex["a1"]["parent_id"]) == (
        "pushshift",
        "p1",
        "t3_p1",
        "t1_a",
    )


def test_splits_by_thread_are_seeded_hashes(prepared):
    _, _, ex, pairs, _, _ = prepared
    by_thread: dict[str, set] = {}
    for r in ex.values():
        by_thread.setdefault(r["thread_id"], set()).add(r["split"])
        assert r["split"] == split_of(r["thread_id"], seed=3, val_frac=0.05, test_frac=0.05)
    assert all(len(s) == 1 for s in by_thread.values())
    for p in pairs:
        assert p["split"] == ex[p["chosen_id"]]["split"] == ex[p["rejected_id"]]["split"]


def reference_pairs(ex, min_ratio, min_score, k=None, order="later"):
    out = set()
    for a in ex.values():
        for b in ex.values():
            if (
                a is not b
                and a["parent_id"] == b["parent_id"]
                and (
                    order == "any"
                    or (
                        a["created_utc"] >= b["created_utc"]
                        if order == "later"
                        else a["created_utc"] <= b["created_utc"]
                    )
                )
                and a["score"] > b["score"]
                and b["score"] >= min_score
                and a["score"] >= min_ratio * b["score"]
            ):
                out.add((a["example_id"], b["example_id"]))
    return out


def test_pairs_obey_the_rule_and_match_a_reference(prepared):
    _, card, ex, pairs, _, _ = prepared
    got = {(p["chosen_id"], p["rejected_id"]) for p in pairs}
    ref = reference_pairs(ex, 2.0, 1, order="earlier")
    assert got <= ref
    assert card["pairs"]["candidates_before_cap"] == len(ref)
    # a(40, t100) beats cc(12, t200) and e(2, t300); b(3, t50) is not twice e(2), a(40) came after b(3)
    assert {("a", "cc"), ("a", "e"), ("cc", "e"), ("b", "f"), ("e", "g")} <= ref
    assert ("b", "e") not in ref and ("a", "b") not in ref
    per_parent: dict[str, int] = {}
    for p in pairs:
        per_parent[p["parent_id"]] = per_parent.get(p["parent_id"], 0) + 1
        a, b = ex[p["chosen_id"]], ex[p["rejected_id"]]
        assert p["score_ratio"] == pytest.approx(a["score"] / b["score"]) and p["score_ratio"] >= 2
        assert (p["chosen"], p["rejected"], p["context"]) == (a["response"], b["response"], a["context"])
        assert (p["chosen_karma"], p["rejected_karma"]) == (a["karma"], b["karma"])
    assert max(per_parent.values()) <= 5
    # t3_p1 has 11 candidate pairs; the cap keeps 5
    assert sum(1 for x in ref if ex[x[0]]["parent_id"] == "t3_p1") == 11 and per_parent["t3_p1"] == 5


def test_default_pair_rule_is_shps_chosen_written_no_earlier(dumps, tmp_path):
    rc, rs = dumps
    card = prepare(comments=[rc], submissions=[rs], out=tmp_path / "shp", workers=1, min_pair_score=1)
    assert card["config"]["pair_order"] == "later"
    ex = {r["example_id"]: r for r in pq.read_table(tmp_path / "shp" / "examples.parquet").to_pylist()}
    pairs = pq.read_table(tmp_path / "shp" / "pairs.parquet").to_pylist()
    ref = reference_pairs(ex, 2.0, 1, order="later")
    assert pairs and {(p["chosen_id"], p["rejected_id"]) for p in pairs} <= ref
    assert card["pairs"]["candidates_before_cap"] == len(ref)
    assert all(ex[p["chosen_id"]]["created_utc"] >= ex[p["rejected_id"]]["created_utc"] for p in pairs)
    with pytest.raises(ValueError, match="pair_order\n  Input should be 'later', 'earlier' or 'any'"):
        prepare(comments=[rc], out=tmp_path / "bad", pair_order="first")


def test_pair_order_any_keeps_both_orders(dumps, tmp_path):
    rc, rs = dumps
    card = prepare(
        comments=[rc], submissions=[rs], out=tmp_path / "any", workers=1, min_pair_score=1, pair_order="any"
    )
    ex = {r["example_id"]: r for r in pq.read_table(tmp_path / "any" / "examples.parquet").to_pylist()}
    pairs = pq.read_table(tmp_path / "any" / "pairs.parquet").to_pylist()
    ref = reference_pairs(ex, 2.0, 1, order="any")
    assert card["pairs"]["candidates_before_cap"] == len(ref)
    assert {(p["chosen_id"], p["rejected_id"]) for p in pairs} <= ref
    # both rules' candidates: more than SHP's rule alone keeps
    assert len(ref) > len(reference_pairs(ex, 2.0, 1, order="later")) and any(
        ex[a]["created_utc"] < ex[b]["created_utc"] for a, b in ref
    )


def test_pair_options(dumps, tmp_path):
    rc, rs = dumps
    card = prepare(
        comments=[rc],
        submissions=[rs],
        out=tmp_path / "a",
        workers=1,
        max_pairs_per_parent=1,
        min_score_ratio=3.0,
    )  # min_pair_score 2 (SHP's default)
    pairs = pq.read_table(tmp_path / "a" / "pairs.parquet").to_pylist()
    ex = {r["example_id"]: r for r in pq.read_table(tmp_path / "a" / "examples.parquet").to_pylist()}
    ref = reference_pairs(ex, 3.0, 2)
    assert {(p["chosen_id"], p["rejected_id"]) for p in pairs} <= ref
    assert card["pairs"]["candidates_before_cap"] == len(ref)
    assert len(pairs) == len({ex[a]["parent_id"] for a, _ in ref})  # one per parent that has any


def test_karma_normalisations(dumps, tmp_path):
    rc, rs = dumps
    for method in ("percentile", "zscore"):
        prepare(comments=[rc], submissions=[rs], out=tmp_path / method, workers=1, normalize=method)
        rows = pq.read_table(tmp_path / method / "examples.parquet").to_pylist()
        threads: dict[str, list] = {}
        for r in rows:
            threads.setdefault(r["thread_id"], []).append(r)
        for members in threads.values():
            scores = [m["score"] for m in members]
            n = len(scores)
            mean = sum(scores) / n
            std = math.sqrt(sum((s - mean) ** 2 for s in scores) / n)
            for m in members:
                if method == "percentile":
                    below = sum(s < m["score"] for s in scores)
                    ties = sum(s == m["score"] for s in scores) - 1
                    want = 0.5 if n == 1 else (below + ties / 2) / (n - 1)
                else:
                    want = 0.0 if std == 0 else (m["score"] - mean) / std
                assert m["karma"] == pytest.approx(want), (method, m["example_id"])
        assert json.loads((tmp_path / method / "card.json").read_text())["config"]["normalize"] == method


def test_split_by_time_trains_on_earlier_threads(tmp_path):
    records, posts = [], []
    for t in range(40):
        posts.append({"id": f"p{t}", "title": f"t{t}", "selftext": "", "subreddit": "s", "score": 1,
                      "created_utc": T0 + t * 86400})  # fmt: skip
        records += [c(f"c{t}_{i}", f"t3_p{t}", i + 1, t * 86400 + i, thread=f"p{t}") for i in range(3)]
    rc = write_zst(tmp_path / "RC.zst", records)
    rs = write_zst(tmp_path / "RS.zst", posts)
    card = prepare(comments=[rc], submissions=[rs], out=tmp_path / "o", workers=1, split_by="time",
                   val_frac=0.1, test_frac=0.2)  # fmt: skip
    rows = pq.read_table(tmp_path / "o" / "examples.parquet").to_pylist()
    start = {r["thread_id"]: int(r["thread_id"][1:]) for r in rows}
    by_split = {
        s: sorted({start[r["thread_id"]] for r in rows if r["split"] == s}) for s in ("train", "val", "test")
    }
    assert by_split == {"train": list(range(28)), "val": list(range(28, 32)), "test": list(range(32, 40))}
    assert card["splits"]["test"]["threads"] == 8


def test_duplicates_across_files_are_counted(dumps, tmp_path):
    rc, rs = dumps
    card = prepare(comments=[rc, rc], submissions=[rs], out=tmp_path / "o", workers=1)
    first, second, _ = card["inputs"]
    assert first["kept"] == 16 and "duplicate_id" not in first["skipped"]
    assert second["kept"] == 0 and second["skipped"]["duplicate_id"] == 16
    assert card["examples"] == 16
    assert card["kept"] + sum(card["skipped"].values()) == card["lines_read"]


def test_filters_limit_and_drop_missing_context(dumps, tmp_path):
    rc, rs = dumps
    card = prepare(comments=[rc], submissions=[rs], out=tmp_path / "k", workers=1, drop_bots=False,
                   drop_moderator=False, drop_stickied=False)  # fmt: skip
    assert card["examples"] == 19 and card["skipped"] == {"deleted_body": 1}
    card = prepare(comments=[rc], submissions=[rs], out=tmp_path / "m", workers=1, drop_missing_context=True)
    ids = set(pq.read_table(tmp_path / "m" / "examples.parquet").column("example_id").to_pylist())
    assert not ids & {"d1", "r1", "x1", "x2"} and card["skipped"]["context_missing"] == 4 and len(ids) == 12
    assert card["kept"] + sum(card["skipped"].values()) == card["lines_read"]
    card = prepare(comments=[rc], submissions=[rs], out=tmp_path / "l", workers=1, limit=5)
    assert card["inputs"][0]["lines_read"] == 5 and card["inputs"][1]["lines_read"] == 3


def test_output_is_deterministic(dumps, prepared, tmp_path):
    rc, rs = dumps
    out, *_ = prepared
    prepare(
        comments=[rc],
        submissions=[rs],
        out=tmp_path,
        min_pair_score=1,
        workers=2,
        seed=3,
        pair_order="earlier",
    )
    for name in ("examples.parquet", "pairs.parquet"):
        a = pq.read_table(out / name)
        b = pq.read_table(tmp_path / name)
        assert a.equals(b), name


def test_submissions_only_mode(tmp_path):
    posts = [{"id": f"s{i}", "title": f"Question {i}", "selftext": "details" if i % 2 else "[removed]",
              "subreddit": "AskMen", "score": 2 ** (i % 6), "created_utc": T0 + 600 * i,
              "link_flair_text": "Serious" if i < 3 else None, "author": "AutoModerator" if i == 7 else f"u{i}"}
             for i in range(10)]  # fmt: skip
    rs = write_zst(tmp_path / "RS.zst", posts)
    card = prepare(submissions=[rs], out=tmp_path / "o", workers=1)
    assert card["mode"] == "submissions" and card["inputs"][0]["role"] == "examples"
    assert card["skipped"] == {"bot_author": 1} and card["examples"] == 9
    ex = {r["example_id"]: r for r in pq.read_table(tmp_path / "o" / "examples.parquet").to_pylist()}
    assert ex["s1"]["response"] == "Question 1\n\ndetails" and ex["s2"]["response"] == "Question 2"
    assert ex["s1"]["context"] == "r/AskMen\n\nflair: Serious" and ex["s5"]["context"] == "r/AskMen"
    assert (ex["s5"]["depth"], ex["s5"]["parent_id"], ex["s5"]["source"], ex["s5"]["thread_id"]) == (
        -1,
        None,
        "submissions",
        "s5",
    )
    assert ex["s0"]["sibling_count"] == 6  # posts in r/AskMen within an hour either side: s1..s6
    for p in pq.read_table(tmp_path / "o" / "pairs.parquet").to_pylist():
        a, b = ex[p["chosen_id"]], ex[p["rejected_id"]]
        assert a["context"] == b["context"] == p["context"] and a["split"] == b["split"]
        assert abs(a["created_utc"] // 3600 - b["created_utc"] // 3600) == 0
        assert a["created_utc"] >= b["created_utc"] and a["score"] >= 2 * b["score"] >= 4


def shp_rows(post, domain, comments):
    rows = []
    for i, (ida, ta, sa, ra) in enumerate(comments):
        for idb, tb, sb, rb in comments[i + 1 :]:
            if ta >= tb and sa >= 2 * sb:  # SHP: the preferred comment A was written after B
                rows.append({"post_id": post, "domain": domain, "upvote_ratio": 0.9, "history": f"Post {post}?",
                             "c_root_id_A": ida, "c_root_id_B": idb, "created_at_utc_A": ta, "created_at_utc_B": tb,
                             "score_A": sa, "score_B": sb, "human_ref_A": ra, "human_ref_B": rb, "labels": 1,
                             "seconds_difference": ta - tb, "score_ratio": sa / sb})  # fmt: skip
    return rows


def test_shp_jsonl_and_parquet(tmp_path):
    rows = shp_rows(
        "q1",
        "askculinary_train",
        [("k1", 30, 40, "Boil it."), ("k2", 20, 10, "Fry it."), ("k3", 10, 4, "No.")],
    )
    rows += shp_rows("q2", "askculinary_test", [("m1", 50, 9, "Yes."), ("m2", 10, 3, "Maybe.")])
    jl = tmp_path / "train.json"
    jl.write_text("".join(json.dumps(r) + "\n" for r in rows[:3]) + "{bad\n")
    pqf = tmp_path / "more.parquet"
    pq.write_table(pa.Table.from_pylist(rows[3:]), pqf)
    card = prepare(shp=[str(jl), str(pqf)], out=tmp_path / "o", workers=1)
    assert [i["lines_read"] for i in card["inputs"]] == [4, 1] and card["skipped"] == {"not_json": 1}
    ex = {r["example_id"]: r for r in pq.read_table(tmp_path / "o" / "examples.parquet").to_pylist()}
    assert set(ex) == {"k1", "k2", "k3", "m1", "m2"}
    assert (ex["k1"]["source"], ex["k1"]["context"], ex["k1"]["subreddit"], ex["k1"]["split"]) == (
        "shp",
        "Post q1?",
        "askculinary",
        "train",
    )
    assert ex["m1"]["split"] == "test" and ex["k2"]["sibling_count"] == 2
    got = {
        (p["chosen_id"], p["rejected_id"])
        for p in pq.read_table(tmp_path / "o" / "pairs.parquet").to_pylist()
    }
    assert got == {("k1", "k2"), ("k1", "k3"), ("k2", "k3"), ("m1", "m2")}


def test_shp_folder_and_missing(tmp_path):
    (tmp_path / "shp").mkdir()
    with pytest.raises(InputNotFoundError, match="no SHP files"):
        prepare(shp=[str(tmp_path / "shp")], out=tmp_path / "o")
    with pytest.raises(InputNotFoundError, match="input file not found: ./nope.jsonl"):
        prepare(shp=["./nope.jsonl"], out=tmp_path / "o")


def test_errors(dumps, tmp_path):
    rc, _ = dumps
    with pytest.raises(InputNotFoundError, match=r"input file not found: .*RC_missing.zst \(--comments\)"):
        prepare(comments=[rc, tmp_path / "RC_missing.zst"], out=tmp_path / "o")
    with pytest.raises(ValueError, match="normalize\n  Input should be 'log1p', 'percentile' or 'zscore'"):
        PrepareConfig(comments=[str(rc)], normalize="rank")
    with pytest.raises(ValueError, match="val_frac and test_frac"):
        PrepareConfig(comments=[str(rc)], val_frac=0.6, test_frac=0.5)
    with pytest.raises(ValueError, match="no input"):
        PrepareConfig()
    bad = write_zst(tmp_path / "RC_bad.zst", [b"{oops", c("z", "t3_p", 1, 1, body="[deleted]")])
    with pytest.raises(
        NoUsableDataError,
        match=r"no usable examples: 1 file\(s\), 2 record\(s\) read; skipped (not_json 1, deleted_body 1|deleted_body 1, not_json 1)",
    ):
        prepare(comments=[bad], out=tmp_path / "o2")
    assert not (tmp_path / "o2" / "examples.parquet").exists()


def test_cli_corrupted_dump_exits_0_with_warnings(dumps, tmp_path):
    _, rs = dumps
    good = [json.dumps(r).encode() for r in COMMENTS]
    bad = good[:5] + [
        b"{not json",
        b'{"id": "u1", "body": "\xff"}',
        json.dumps(c("m", "t3_p1", 1, 1) | {"score": None}).encode(),
    ]
    data = zstandard.ZstdCompressor().compress(b"\n".join(bad + good[5:]) + b"\n")
    corrupt = tmp_path / "RC_corrupt.zst"
    corrupt.write_bytes(data[:-7])  # cut inside the only block: nothing of this frame survives
    ok = write_zst(tmp_path / "RC_ok.zst", bad)
    (tmp_path / "RC_empty.zst").write_bytes(b"")
    (tmp_path / "RC_text.zst").write_text("plain text\n")
    args = ["prepare", "--comments", str(ok), "--comments", str(corrupt), "--comments", str(tmp_path / "RC_empty.zst"),
            "--comments", str(tmp_path / "RC_text.zst"), "--submissions", str(rs), "--out", str(tmp_path / "o"),
            "--workers", "1", "--min-pair-score", "1"]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    card = json.loads((tmp_path / "o" / "card.json").read_text())
    assert card["skipped_files"] == {"empty_file": 1, "not_zstd": 1}
    assert card["skipped"]["not_json"] == 1 and card["skipped"]["not_utf8"] == 1
    assert card["skipped"]["missing_field:score"] == 1 and card["skipped"]["truncated_frame"] == 1
    assert [i["status"] for i in card["inputs"]] == ["ok", "truncated_frame", "empty_file", "not_zstd", "ok"]
    for f in card["inputs"]:
        assert f["kept"] + sum(f["skipped"].values()) == f["lines_read"]
    assert card["kept"] + sum(card["skipped"].values()) == card["lines_read"]
    assert card["examples"] == 5 and "warning:" in res.output and "not_zstd" in res.output
    assert "5 examples" in res.output


@pytest.mark.timeout(120)
def test_cli_workers_count_deep_json_and_huge_ints_as_records(dumps, tmp_path, monkeypatch):
    """The input that once crashed prepare (RecursionError, OverflowError) and hung it with --workers 2."""
    from karma.data import decode

    _, rs = dumps
    good = [json.dumps(r).encode() for r in COMMENTS]
    huge = json.dumps(c("h", "t3_p1", 1, 1)).encode().replace(b'"score": 1', b'"score": 1' + b"0" * 29)
    rc = write_zst(tmp_path / "RC_bad.zst", good[:3] + [b"[" * 100_000 + b"]" * 100_000, huge] + good[3:])
    monkeypatch.setattr(decode, "PARALLEL_MIN_BYTES", 0)  # tiny input: still through the worker pool
    args = ["prepare", "--comments", str(rc), "--submissions", str(rs), "--out", str(tmp_path / "o"),
            "--workers", "2", "--min-pair-score", "1"]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    card = json.loads((tmp_path / "o" / "card.json").read_text())
    inp = card["inputs"][0]
    assert inp["skipped"] == {"not_json": 1, "out_of_range:score": 1, "deleted_body": 1, "bot_author": 1,
                              "moderator": 1, "stickied": 1}  # fmt: skip
    assert (inp["lines_read"], inp["kept"]) == (len(COMMENTS) + 2, len(COMMENTS) - 4)
    assert f"{rc}: skipped bad records: not_json 1, out_of_range:score 1" in card["warnings"]
    assert card["examples"] == len(COMMENTS) - 4


def test_integers_at_the_edge_of_int64_pass_every_stage(tmp_path):
    """Scores at ±2**63 and times at years 1 / 9999: no overflow in the relational stage (abs, differences)."""
    top, bottom = 2**63 - 1, -(2**63)
    first, last = -62_135_596_800, 253_402_300_799  # 0001-01-01 and 9999-12-31 23:59:59 UTC
    rc = write_zst(tmp_path / "RC.zst", [c("a", "t3_p1", top, 0) | {"created_utc": first},
                                         c("b", "t3_p1", bottom, 0) | {"created_utc": last},
                                         c("a1", "t1_a", top, 0) | {"created_utc": last}, c("a2", "t1_a", 3, 5)])  # fmt: skip
    posts = [{"id": "p1", "title": "t", "selftext": "x", "subreddit": "S", "score": bottom, "created_utc": last},
             {"id": "p2", "title": "u", "selftext": "y", "subreddit": "S", "score": top, "created_utc": first},
             {"id": "p3", "title": "v", "selftext": "z", "subreddit": "S", "score": 3, "created_utc": last - 10}]  # fmt: skip
    rs = write_zst(tmp_path / "RS.zst", posts)
    card = prepare(comments=[rc], submissions=[rs], out=tmp_path / "c", workers=1, min_pair_score=1)
    assert card["examples"] == 4 and card["skipped"] == {}
    ex = pq.read_table(tmp_path / "c" / "examples.parquet").to_pandas().set_index("example_id")
    assert ex.loc["a", "score"] == top and ex.loc["b", "score"] == bottom
    assert ex.loc["a1", "seconds_since_parent"] == float(last - first)
    assert ex.loc["a", "karma"] == pytest.approx(math.log1p(top))  # sign(s)·ln(1 + |s|), in DOUBLE
    assert ex.loc["b", "karma"] == pytest.approx(-math.log1p(-bottom))
    card = prepare(submissions=[rs], out=tmp_path / "s", workers=1)  # posts as examples: a ±1 hour window
    assert card["examples"] == 3


def test_cli_errors(tmp_path):
    res = CliRunner().invoke(
        app, ["prepare", "--comments", str(tmp_path / "RC_nope.zst"), "--out", str(tmp_path / "o")]
    )
    assert (
        res.exit_code == 2
        and f"error: input file not found: {tmp_path / 'RC_nope.zst'} (--comments)" in res.output
    )
    res = CliRunner().invoke(app, ["prepare", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "config: no input: give --comments" in cli_text(res.output)
    empty = tmp_path / "RC_empty.zst"
    empty.write_bytes(b"")
    res = CliRunner().invoke(app, ["prepare", "--comments", str(empty), "--out", str(tmp_path / "o")])
    assert res.exit_code == 1
    assert res.output.strip().splitlines()[-1] == (
        "error: no usable examples: 1 file(s), 0 record(s) read; RC_empty.zst: empty_file"
    )


def test_cli_a_dead_decode_worker_exits_1(dumps, tmp_path, monkeypatch):
    from karma.data import decode

    def broken(tasks, workers):
        raise decode.DecodeError(f"a decode worker process died (...) while decoding {tasks[0].path}")

    monkeypatch.setattr(decode, "decode_files", broken)
    rc, _ = dumps
    res = CliRunner().invoke(app, ["prepare", "--comments", str(rc), "--out", str(tmp_path / "o")])
    assert res.exit_code == 1
    assert (
        res.output.strip().splitlines()[-1]
        == f"error: a decode worker process died (...) while decoding {rc}"
    )
    assert not (tmp_path / "o" / "examples.parquet").exists()


def test_shp_hub_id_goes_through_datasets(tmp_path, monkeypatch):
    """The hub path (only usable online) is exercised with `datasets.load_dataset` faked at its boundary."""
    import datasets

    from karma.data.shp import ShpHubError

    rows = shp_rows("h1", "askscience_train", [("n1", 20, 30, "Because."), ("n2", 10, 5, "Magic.")])
    monkeypatch.setenv("KARMA_CACHE", str(tmp_path / "cache"))
    seen = []

    def fake_load(name, *a, **kw):
        seen.append(name)
        return datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    card = prepare(shp=["stanfordnlp/SHP"], out=tmp_path / "o", workers=1)
    assert seen == ["stanfordnlp/SHP"] and card["examples"] == 2 and card["pairs"]["total"] == 1
    assert card["inputs"][0]["path"].endswith("stanfordnlp__SHP/train.parquet")

    def offline(name, *a, **kw):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ShpHubError, match="could not load SHP dataset 'other/SHP' from the Hugging Face hub"):
        prepare(shp=["other/SHP"], out=tmp_path / "o2")
