"""The pure per-record functions of the decode stage: rows and skip reasons."""

from __future__ import annotations

import copy
import random

import pytest

from karma.data.records import (
    COMMENT_COLUMNS,
    INT64_MAX,
    INT64_MIN,
    POST_COLUMNS,
    SHP_COLUMNS,
    UTC_MAX,
    UTC_MIN,
    Filters,
    comment_record,
    comment_record_checked,
    is_bot,
    post_record,
    shp_record,
)

F = Filters()


def comment(**over):
    c = {
        "id": "c1", "parent_id": "t3_p1", "link_id": "t3_p1", "subreddit": "College", "author": "alice",
        "body": "  hello there \n", "score": 7, "created_utc": 1600000000, "distinguished": None, "stickied": False,
    }  # fmt: skip
    c.update(over)
    return {k: v for k, v in c.items() if v is not ...}


def test_comment_row_fields_in_column_order():
    row, reason = comment_record(comment(depth=2), F)
    assert reason is None
    assert dict(zip([n for n, _ in COMMENT_COLUMNS], row, strict=True)) == {
        "id": "c1", "parent_id": "t3_p1", "thread_id": "p1", "subreddit": "College", "body": "hello there",
        "score": 7, "created_utc": 1600000000, "depth_field": 2, "usable": True,
    }  # fmt: skip


@pytest.mark.parametrize(
    ("over", "reason", "is_node"),
    [
        ({"id": ...}, "missing_field:id", False),
        ({"id": ""}, "missing_field:id", False),
        ({"parent_id": ...}, "missing_field:parent_id", False),
        ({"parent_id": "x_1"}, "missing_field:parent_id", False),
        ({"link_id": ..., "parent_id": "t1_c0"}, "missing_field:link_id", False),
        ({"subreddit": ...}, "missing_field:subreddit", False),
        ({"created_utc": ...}, "missing_field:created_utc", False),
        ({"created_utc": "soon"}, "bad_field:created_utc", False),
        ({"body": ...}, "missing_field:body", True),
        ({"body": 12}, "bad_field:body", True),
        ({"score": ...}, "missing_field:score", True),
        ({"score": "many"}, "bad_field:score", True),
        ({"score": True}, "bad_field:score", True),
        ({"body": "[deleted]"}, "deleted_body", True),
        ({"body": " [removed]\n"}, "deleted_body", True),
        ({"body": "   "}, "empty_body", True),
        ({"author": "AutoModerator"}, "bot_author", True),
        ({"author": "RemindMeBot"}, "bot_author", True),
        ({"distinguished": "moderator"}, "moderator", True),
        ({"stickied": True}, "stickied", True),
    ],
)
def test_comment_skip_reasons(over, reason, is_node):
    row, got = comment_record(comment(**over), F)
    assert got == reason
    assert (row is not None) == is_node
    if row is not None:
        assert row[-1] is False  # a node for its replies, never an example


def test_not_an_object_is_not_json():
    assert comment_record([1, 2], F) == (None, "not_json")
    assert post_record("text", F, True) == (None, "not_json")
    assert shp_record(3) == (None, "not_json")


def test_deleted_parent_stays_a_node_without_text():
    row, reason = comment_record(comment(body="[deleted]"), F)
    assert reason == "deleted_body" and row[4] is None and row[0] == "c1"


def test_filters_can_be_turned_off():
    keep = Filters(drop_deleted=False, drop_bots=False, drop_moderator=False, drop_stickied=False)
    for over in ({"author": "AutoModerator"}, {"distinguished": "moderator"}, {"stickied": True}):
        assert comment_record(comment(**over), keep)[1] is None
    row, reason = comment_record(comment(body="[deleted]"), keep)
    assert reason is None and row[4] == "[deleted]"


def test_old_dump_types_are_normalised():
    # 2005-era dumps: created_utc as a string, ids with a t1_ prefix, no link_id on top-level comments
    row, reason = comment_record(comment(created_utc="1134365188", id="t1_c13", link_id=...), F)
    assert reason is None
    assert (row[0], row[2], row[6]) == ("c13", "p1", 1134365188)


@pytest.mark.parametrize(
    ("over", "reason", "is_node"),
    [
        ({"score": 123456789012345678901234567890}, "out_of_range:score", True),
        ({"score": -123456789012345678901234567890}, "out_of_range:score", True),
        ({"score": INT64_MAX + 1}, "out_of_range:score", True),
        ({"score": INT64_MIN - 1}, "out_of_range:score", True),
        ({"score": 1e30}, "out_of_range:score", True),
        ({"score": float("inf")}, "out_of_range:score", True),  # what JSON 1e400 parses to
        ({"score": float("-inf")}, "out_of_range:score", True),
        ({"score": "9" * 30}, "out_of_range:score", True),
        ({"score": "9" * 5000}, "out_of_range:score", True),  # past int()'s 4300-digit limit
        ({"score": float("nan")}, "bad_field:score", True),  # not a number, not a large one
        ({"created_utc": 2**63}, "out_of_range:created_utc", False),
        ({"created_utc": 1e400}, "out_of_range:created_utc", False),
        ({"created_utc": -1e30}, "out_of_range:created_utc", False),
        ({"created_utc": UTC_MAX + 1}, "out_of_range:created_utc", False),  # year 10000: no datetime holds it
        ({"created_utc": UTC_MIN - 1}, "out_of_range:created_utc", False),
        ({"created_utc": "1e400"}, "out_of_range:created_utc", False),
        ({"created_utc": float("nan")}, "bad_field:created_utc", False),
    ],
)
def test_integers_outside_their_column_are_out_of_range(over, reason, is_node):
    for record in (comment_record, comment_record_checked):
        row, why = record(comment(**over), F)
        assert why == reason and (row is not None) == is_node
        if row is not None:
            assert row[5] is None and row[-1] is False  # no score, not an example: a node for its replies


def test_integers_at_the_edge_of_their_column_are_kept():
    for score, created in ((INT64_MAX, UTC_MAX), (INT64_MIN, UTC_MIN)):
        for record in (comment_record, comment_record_checked):
            row, why = record(comment(score=score, created_utc=created), F)
            assert why is None and (row[5], row[6]) == (score, created)
    # depth is optional metadata: one that does not fit its int32 column is ignored, like a non-integer one
    assert comment_record(comment(depth=2**31), F) == comment_record(comment(), F)
    assert comment_record(comment(depth=2**31 - 1), F)[0][7] == 2**31 - 1


def test_is_bot():
    assert is_bot("AutoModerator") and is_bot("WikiTextBot") and is_bot("sneakpeekbot")
    assert not is_bot("alice") and not is_bot(None) and not is_bot("") and not is_bot("[deleted]")


def test_fast_path_agrees_with_checked_path():
    """comment_record's short path must give exactly what the careful path gives, for any record."""
    rng = random.Random(0)
    variants = [
        {}, {"body": "[deleted]"}, {"body": ""}, {"author": "somebot"}, {"author": None}, {"distinguished": "admin"},
        {"stickied": True}, {"depth": 3}, {"depth": "3"}, {"depth": True}, {"parent_id": "t1_x"}, {"id": "t1_c9"},
        {"score": 2.0}, {"score": -4}, {"created_utc": 1.5e9}, {"created_utc": "12"}, {"link_id": None},
        {"subreddit": ""}, {"body": " x "}, {"score": None}, {"id": None}, {"score": 2**63}, {"score": -(2**63)},
        {"created_utc": UTC_MAX + 1}, {"created_utc": UTC_MAX}, {"depth": 2**31}, {"depth": -(2**31)},
    ]  # fmt: skip
    for filters in (F, Filters(False, False, False, False)):
        for _ in range(300):
            over = {}
            for v in rng.sample(variants, rng.randint(0, 3)):
                over.update(v)
            obj = comment(**over)
            assert comment_record(copy.deepcopy(obj), filters) == comment_record_checked(obj, filters), obj


def post(**over):
    p = {"id": "p1", "title": " A title ", "selftext": "the body\n", "subreddit": "AskMen", "score": 12,
         "created_utc": 1570000000, "author": "bob", "link_flair_text": "Serious"}  # fmt: skip
    p.update(over)
    return {k: v for k, v in p.items() if v is not ...}


def test_post_row_and_deleted_selftext():
    row, reason = post_record(post(), F, True)
    assert reason is None
    assert dict(zip([n for n, _ in POST_COLUMNS], row, strict=True)) == {
        "id": "p1", "subreddit": "AskMen", "title": "A title", "selftext": "the body", "score": 12,
        "created_utc": 1570000000, "flair": "Serious", "usable": True,
    }  # fmt: skip
    row, reason = post_record(post(selftext="[removed]"), F, True)
    assert reason is None and row[3] is None  # still an example: the title is the response
    row, reason = post_record(post(selftext=...), F, True)
    assert row[3] == ""  # a link post has no selftext: empty, not missing


def test_post_filters_apply_only_to_example_posts():
    assert post_record(post(author="AutoModerator"), F, True)[1] == "bot_author"
    assert post_record(post(author="AutoModerator"), F, False)[1] is None  # context for comments: kept
    assert post_record(post(distinguished="moderator"), F, True)[1] == "moderator"
    assert post_record(post(score=...), F, True)[1] == "missing_field:score"
    assert post_record(post(score=...), F, False)[1] is None
    assert post_record(post(title=...), F, False) == (None, "missing_field:title")


def test_post_integers_out_of_range():
    assert post_record(post(score=10**30), F, True)[1] == "out_of_range:score"
    row, reason = post_record(post(score=10**30), F, False)  # context for comments: kept, without a score
    assert reason is None and row[4] is None
    for as_example in (True, False):
        assert post_record(post(created_utc=1e400), F, as_example) == (None, "out_of_range:created_utc")


def shp(**over):
    r = {"post_id": "q1", "domain": "askculinary_train", "history": "How do I boil an egg?", "c_root_id_A": "a1",
         "c_root_id_B": "b1", "created_at_utc_A": 100, "created_at_utc_B": 200, "score_A": 30, "score_B": 5,
         "human_ref_A": "Ten minutes.", "human_ref_B": "Microwave it.", "labels": 1, "score_ratio": 6.0}  # fmt: skip
    r.update(over)
    return {k: v for k, v in r.items() if v is not ...}


def test_shp_row_gives_two_comments_with_the_split_from_the_domain():
    rows, reason = shp_record(shp())
    assert reason is None
    names = [n for n, _ in SHP_COLUMNS]
    a, b = (dict(zip(names, r, strict=True)) for r in rows)
    assert (a["subreddit"], a["shp_split"], a["id"], a["score"], a["body"]) == (
        "askculinary",
        "train",
        "a1",
        30,
        "Ten minutes.",
    )
    assert (b["id"], b["score"], b["created_utc"]) == ("b1", 5, 200)
    assert shp_record(shp(domain="askculinary_validation"))[0][0][2] == "val"
    assert shp_record(shp(domain="askculinary"), split_hint="test")[0][0][2] == "test"
    assert shp_record(shp(domain="askculinary"))[0][0][2] is None


@pytest.mark.parametrize(
    ("over", "reason"),
    [({"score_A": ...}, "missing_field:score_A"), ({"score_B": "x"}, "bad_field:score_B"),
     ({"human_ref_B": "[deleted]"}, "deleted_body"), ({"history": ...}, "missing_field:history"),
     ({"score_A": 10**30}, "out_of_range:score_A"), ({"created_at_utc_B": 1e30}, "out_of_range:created_at_utc_B")],
)  # fmt: skip
def test_shp_skip_reasons(over, reason):
    assert shp_record(shp(**over)) == (None, reason)
