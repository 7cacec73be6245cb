"""Pure per-record functions: one parsed JSON object in, one row (or a skip reason) out.

Nothing here does I/O. Each function returns ``(row, reason)``:

* ``reason is None`` — the record is usable as a training example;
* ``reason`` is a string — why it is not (counted in ``card.json``); ``row`` may still be returned, because
  a comment that cannot be an example (deleted text, a bot, a moderator) is still a node of its thread: its
  replies need it to find their way up to the post.

Integers go into int64 columns: a score outside the int64 range (``1e30``, ``1e400`` = infinity, a 30-digit
number), or a time that is not a Unix time of the years 1–9999 (what a ``datetime`` holds), is
``out_of_range:<name>``, never an overflow in a later stage; a ``depth`` outside int32 is ignored, like a
``depth`` that is not an integer.

Rows are tuples in the column order of :data:`COMMENT_COLUMNS` / :data:`POST_COLUMNS` (tuples, not dicts:
the decode stage transposes a batch of them with ``zip(*rows)``, which is what keeps it near the speed of
``json.loads`` alone).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

DELETED_TEXTS = frozenset({"[deleted]", "[removed]"})
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
UTC_MIN, UTC_MAX = -62_135_596_800, 253_402_300_799  # 0001-01-01 .. 9999-12-31 23:59:59 UTC, in Unix seconds
_PARENT_PREFIXES = ("t1_", "t3_")

#: accounts that post automatically but do not end in "bot"
KNOWN_BOTS = frozenset(
    {
        "automoderator",
        "transcribersofreddit",
        "tweetposter",
        "totesmessenger",
        "timestamp_bot",
        "savevideo",
        "repostsleuthbot",
        "vredditdownloader",
        "converter-bot",
        "tip-bot",
        "autotldr",
        "sneakpeekbot",
        "userleansbot",
        "gifv-bot",
        "steam_bot",
        "image_linker_bot",
        "imguralbumbot",
        "stabbot",
        "alternate-source-bot",
        "helperbot_",
        "ttumblrbots",
        "youtubot",
        "video_descriptionbot",
    }
)

#: (name, arrow type) of the rows comment_record returns; file_idx and line_no are appended by the driver
COMMENT_COLUMNS: tuple[tuple[str, str], ...] = (
    ("id", "string"),
    ("parent_id", "string"),  # raw t1_/t3_ id
    ("thread_id", "string"),  # link id without t3_
    ("subreddit", "string"),
    ("body", "string"),  # stripped; None when deleted / missing
    ("score", "int64"),
    ("created_utc", "int64"),
    ("depth_field", "int32"),  # the record's own `depth` when the dump has one
    ("usable", "bool_"),
)

POST_COLUMNS: tuple[tuple[str, str], ...] = (
    ("id", "string"),
    ("subreddit", "string"),
    ("title", "string"),
    ("selftext", "string"),  # stripped; None when deleted / removed
    ("score", "int64"),
    ("created_utc", "int64"),
    ("flair", "string"),
    ("usable", "bool_"),  # usable as an example in submissions-only mode
)


@dataclass(frozen=True)
class Filters:
    """Which comments are dropped as examples (they stay in the thread as context)."""

    drop_deleted: bool = True
    drop_bots: bool = True
    drop_moderator: bool = True
    drop_stickied: bool = True


def is_bot(author: Any) -> bool:
    """Reddit bot heuristic: a known bot account, or a user name ending in 'bot' (RemindMeBot, WikiTextBot…)."""
    if type(author) is not str or not author:
        return False
    name = author.lower()
    return name in KNOWN_BOTS or name.endswith("bot")


def _as_int(value: Any, name: str, lo: int = INT64_MIN, hi: int = INT64_MAX) -> tuple[int | None, str | None]:
    """(integer, None) from an int, an integral float or a decimal string (old dumps store created_utc as a
    string), else (None, ``bad_field:<name>``), or (None, ``out_of_range:<name>``) outside [lo, hi] (±infinity
    included: JSON ``1e400`` parses as infinity)."""
    if isinstance(value, str):
        try:
            value = int(value)
        except ValueError:  # "1.6e9", "12.0", or more than 4300 digits
            try:
                value = float(value)
            except ValueError:
                return None, f"bad_field:{name}"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None, f"bad_field:{name}"
    if isinstance(value, float):
        if math.isinf(value):
            return None, f"out_of_range:{name}"
        if not value.is_integer():  # NaN too
            return None, f"bad_field:{name}"
        value = int(value)
    if not lo <= value <= hi:
        return None, f"out_of_range:{name}"
    return value, None


def _text(value: Any) -> tuple[str | None, bool]:
    """(stripped text or None, deleted?) for a body / selftext value."""
    if not isinstance(value, str):
        return None, False
    text = value.strip()
    if text in DELETED_TEXTS:
        return None, True
    return text, False


def comment_record(obj: Any, filters: Filters) -> tuple[tuple | None, str | None]:
    """One Pushshift comment object → (node row or None, skip reason or None).

    The common case (every field present with its usual type) takes a short path; anything unusual goes
    through :func:`comment_record_checked`, which gives the same answer for the common case (a test holds
    the two together) and the precise skip reason otherwise.
    """
    try:
        cid = obj["id"]
        parent = obj["parent_id"]
        link = obj["link_id"]
        sub = obj["subreddit"]
        created = obj["created_utc"]
        body = obj["body"]
        score = obj["score"]
    except (KeyError, TypeError):
        return comment_record_checked(obj, filters)
    if (
        type(cid) is not str
        or type(parent) is not str
        or type(link) is not str
        or type(sub) is not str
        or type(created) is not int
        or type(body) is not str
        or type(score) is not int
        or not UTC_MIN <= created <= UTC_MAX
        or not INT64_MIN <= score <= INT64_MAX
        or not cid
        or not sub
        or cid.startswith("t1_")
        or not link.startswith("t3_")
        or not parent.startswith(_PARENT_PREFIXES)
    ):
        return comment_record_checked(obj, filters)
    depth = obj.get("depth")
    if type(depth) is not int or not INT32_MIN <= depth <= INT32_MAX:
        depth = None
    text = body.strip()
    reason = None
    if text in DELETED_TEXTS:
        if filters.drop_deleted:
            reason = "deleted_body"
            text = None
    elif not text:
        reason = "empty_body"
    else:
        reason = _author_filters(obj, filters)
    return (cid, parent, link[3:], sub, text, score, created, depth, reason is None), reason


def _author_filters(obj: dict, filters: Filters) -> str | None:
    if filters.drop_bots and is_bot(obj.get("author")):
        return "bot_author"
    if filters.drop_moderator and obj.get("distinguished"):
        return "moderator"
    if filters.drop_stickied and obj.get("stickied") is True:
        return "stickied"
    return None


def comment_record_checked(obj: Any, filters: Filters) -> tuple[tuple | None, str | None]:
    """comment_record for any input: validates every field and names the first problem."""
    if not isinstance(obj, dict):
        return None, "not_json"  # valid JSON, but not an object
    cid = obj.get("id")
    if not isinstance(cid, str) or not cid:
        return None, "missing_field:id"
    cid = cid.removeprefix("t1_")
    parent = obj.get("parent_id")
    if not isinstance(parent, str) or not parent.startswith(_PARENT_PREFIXES):
        return None, "missing_field:parent_id"
    link = obj.get("link_id")
    if isinstance(link, str) and link.startswith("t3_"):
        thread = link[3:]
    elif parent.startswith("t3_"):
        thread = parent[3:]
    else:
        return None, "missing_field:link_id"
    subreddit = obj.get("subreddit")
    if not isinstance(subreddit, str) or not subreddit:
        return None, "missing_field:subreddit"
    if "created_utc" not in obj:
        return None, "missing_field:created_utc"
    created, why = _as_int(obj["created_utc"], "created_utc", UTC_MIN, UTC_MAX)
    if why is not None:
        return None, why
    depth = obj.get("depth")
    if not isinstance(depth, int) or isinstance(depth, bool) or not INT32_MIN <= depth <= INT32_MAX:
        depth = None
    raw_body = obj.get("body")
    body, deleted = _text(raw_body)
    raw_score = obj.get("score")
    score, score_why = _as_int(raw_score, "score")

    reason = None
    if raw_body is None:
        reason = "missing_field:body"
    elif not isinstance(raw_body, str):
        reason = "bad_field:body"
    elif raw_score is None:
        reason = "missing_field:score"
    elif score_why is not None:
        reason = score_why
    elif deleted and filters.drop_deleted:
        reason = "deleted_body"
    elif not deleted and not body:
        reason = "empty_body"
    else:
        reason = _author_filters(obj, filters)
    if deleted and reason is None:  # --keep-deleted: the response is the marker text itself
        body = raw_body.strip()
    return (cid, parent, thread, subreddit, body, score, created, depth, reason is None), reason


def post_record(obj: Any, filters: Filters, as_example: bool) -> tuple[tuple | None, str | None]:
    """One Pushshift submission → (post row or None, skip reason or None).

    With ``as_example`` false (comments present) a post is only context: it is kept whenever it has an id
    and a title. With ``as_example`` true (submissions-only mode) the comment filters apply to it too; a post
    whose selftext was deleted/removed is still an example (its response is the title alone).
    """
    if not isinstance(obj, dict):
        return None, "not_json"
    pid = obj.get("id")
    if not isinstance(pid, str) or not pid:
        return None, "missing_field:id"
    pid = pid.removeprefix("t3_")
    title = obj.get("title")
    if not isinstance(title, str):
        return None, "missing_field:title"
    subreddit = obj.get("subreddit")
    if not isinstance(subreddit, str) or not subreddit:
        return None, "missing_field:subreddit"
    if "created_utc" not in obj:
        return None, "missing_field:created_utc"
    created, why = _as_int(obj["created_utc"], "created_utc", UTC_MIN, UTC_MAX)
    if why is not None:
        return None, why
    selftext, _deleted = _text(obj.get("selftext", ""))  # link posts may have no selftext at all
    raw_score = obj.get("score")
    score, score_why = _as_int(raw_score, "score")
    flair = obj.get("link_flair_text")
    flair = flair.strip() or None if isinstance(flair, str) else None
    title = title.strip()

    reason = None
    if as_example:
        if raw_score is None:
            reason = "missing_field:score"
        elif score_why is not None:
            reason = score_why
        elif not title:
            reason = "empty_body"
        else:
            reason = _author_filters(obj, filters)
    return (pid, subreddit, title, selftext, score, created, flair, reason is None), reason


#: SHP row → (post row, comment A row, comment B row); see karma.data.shp
SHP_FIELDS = ("post_id", "domain", "history", "c_root_id_A", "c_root_id_B", "created_at_utc_A",
              "created_at_utc_B", "score_A", "score_B", "human_ref_A", "human_ref_B")  # fmt: skip

SHP_COLUMNS: tuple[tuple[str, str], ...] = (
    ("post_id", "string"),
    ("subreddit", "string"),
    ("shp_split", "string"),  # train / val / test from SHP's own domain suffix, else None
    ("history", "string"),
    ("id", "string"),
    ("body", "string"),
    ("score", "int64"),
    ("created_utc", "int64"),
)

SHP_SPLIT_NAMES = {"train": "train", "validation": "val", "valid": "val", "val": "val", "test": "test"}


def shp_record(obj: Any, split_hint: str | None = None) -> tuple[list[tuple] | None, str | None]:
    """One SHP row → ([comment-A row, comment-B row], reason). The post text travels on each comment row."""
    if not isinstance(obj, dict):
        return None, "not_json"
    for name in SHP_FIELDS:
        if obj.get(name) is None:
            return None, f"missing_field:{name}"
    domain = str(obj["domain"])
    sub, _, suffix = domain.rpartition("_")
    if not sub or suffix not in SHP_SPLIT_NAMES:
        sub, suffix = domain, ""
    split = SHP_SPLIT_NAMES.get(suffix) or split_hint
    history = str(obj["history"]).strip()
    rows = []
    for side in ("A", "B"):
        score, why = _as_int(obj[f"score_{side}"], f"score_{side}")
        if why is not None:
            return None, why
        created, why = _as_int(obj[f"created_at_utc_{side}"], f"created_at_utc_{side}", UTC_MIN, UTC_MAX)
        if why is not None:
            return None, why
        body, deleted = _text(obj[f"human_ref_{side}"])
        if deleted or not body:
            return None, "deleted_body" if deleted else "empty_body"
        rows.append(
            (str(obj["post_id"]), sub, split, history, str(obj[f"c_root_id_{side}"]), body, score, created)
        )
    return rows, None
