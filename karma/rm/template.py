"""How (context, response, metadata) becomes reward-model input text — one template per variant.

Every variant renders two segments, encoded as a tokenizer *pair*:

* segment A — the conversational context (post title, post body, ancestor comments, joined by blank
  lines). When the pair is too long, tokens are dropped **from the left of segment A** (the oldest
  context), never from segment B.
* segment B — the response, preceded for the `full` variant by a one-line metadata header.

| variant    | segment A | segment B                                  |
|------------|-----------|--------------------------------------------|
| `full`     | context   | `[r/SUB | depth D | T after post | T after parent | HHh UTC | N siblings]\n` + response |
| `context`  | context   | response                                   |
| `response` | (empty)   | response                                   |

The template name and version are saved in `karma_rm.json`; the reward service renders requests with
exactly this module, so training and serving cannot drift apart.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Literal

Variant = Literal["full", "context", "response"]
VARIANTS: tuple[str, ...] = ("full", "context", "response")
TEMPLATE_VERSION = 1

#: metadata keys the `full` variant reads (all optional at serving time; missing ones render as "?")
METADATA_KEYS = (
    "subreddit",
    "depth",
    "seconds_since_post",
    "seconds_since_parent",
    "created_utc",
    "sibling_count",
)

TEMPLATE_DOC = {
    "full": "A: {context} || B: [r/{subreddit} | depth {depth} | {since_post} after post | "
    "{since_parent} after parent | {hour:02d}h UTC | {sibling_count} siblings]\\n{response}",
    "context": "A: {context} || B: {response}",
    "response": "B: {response}",
}


def context_text(context: str | Sequence[str] | Sequence[Mapping[str, Any]] | None) -> str:
    """Canonical context string: a str as is; a list of turns (str or {role, content}) joined by blank lines."""
    if context is None:
        return ""
    if isinstance(context, str):
        return context.strip()
    parts = []
    for turn in context:
        text = turn["content"] if isinstance(turn, Mapping) else turn
        if text is not None and str(text).strip():
            parts.append(str(text).strip())
    return "\n\n".join(parts)


def _duration(seconds: Any) -> str:
    if seconds is None or (isinstance(seconds, float) and math.isnan(seconds)):
        return "?"
    s = max(float(seconds), 0.0)
    if s < 3600:
        return f"{s / 60:.0f}m"
    if s < 86400 * 2:
        return f"{s / 3600:.1f}h"
    return f"{s / 86400:.0f}d"


def _plain(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "?"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def metadata_header(metadata: Mapping[str, Any] | None) -> str:
    m = metadata or {}
    created = m.get("created_utc")
    hour = "?"
    if created is not None and not (isinstance(created, float) and math.isnan(created)):
        hour = f"{datetime.fromtimestamp(int(created), tz=UTC).hour:02d}"
    sub = m.get("subreddit") or "?"
    return (
        f"[r/{sub} | depth {_plain(m.get('depth'))} | {_duration(m.get('seconds_since_post'))} after post | "
        f"{_duration(m.get('seconds_since_parent'))} after parent | {hour}h UTC | "
        f"{_plain(m.get('sibling_count'))} siblings]"
    )


def render(
    variant: str, context: Any, response: str, metadata: Mapping[str, Any] | None = None
) -> tuple[str, str]:
    """Return (segment_a, segment_b) for one item. Raises ValueError on an unknown variant."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {', '.join(VARIANTS)}")
    response = (response or "").strip()
    if variant == "response":
        return "", response
    ctx = context_text(context)
    if variant == "context":
        return ctx, response
    return ctx, f"{metadata_header(metadata)}\n{response}"
