"""`POST /get_reward`: OpenRLHF's remote reward-model protocol (`--reward.remote_url`)."""

import asyncio
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from pydantic import ValidationError

from karma import chat
from karma.protocol import GetRewardRequest, GetRewardResponse, Metadata, sigmoid
from karma.rm.model import RMInput
from services.reward_api.api.deps import SettingsDep, check_items, check_text, require_api_key
from services.reward_api.api.errors import TRANSPORT_ERRORS, ServiceError, responses
from services.reward_api.engine import Handle

log = logging.getLogger(__name__)


def label_metadata(label: Any, index: int) -> tuple[dict[str, Any] | None, str | None]:
    """(metadata, problem): the `metadata` a label carries (a JSON object, or a string holding one), validated
    like /v1/score's metadata. A label is advice, not a contract: metadata that does not validate (or holds
    text that is not valid Unicode) is not used, and `problem` names why; any other label has none."""
    if isinstance(label, str) and label.lstrip().startswith("{"):
        try:
            label = json.loads(label)
        except ValueError:
            return None, None  # a label that merely looks like JSON is still just a label
    if not isinstance(label, dict) or label.get("metadata") is None:
        return None, None
    try:
        meta = Metadata.model_validate(label["metadata"]).model_dump(exclude_none=True)
        check_text((f"labels.{index}.metadata.{k}", v) for k, v in meta.items())
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(x) for x in ("labels", index, "metadata", *err["loc"]))
        return None, f"{where}: {err['msg']}"
    except ServiceError as exc:
        return None, exc.message
    return meta, None


@dataclass
class Read:
    """What the queries, prompts and labels of one request say, item by item."""

    items: list[RMInput] = field(default_factory=list)
    mismatched: list[float] = field(default_factory=list)
    markup: list[float] = field(default_factory=list)
    bad_labels: list[str | None] = field(default_factory=list)


def read_queries(
    query: Sequence[str],
    prompts: Sequence[str] | None,
    labels: Sequence[Any] | None,
    template: chat.ChatFormat | str,
    prompts_unpaired: bool,
) -> Read:
    """Each query → (context, response, metadata) (`karma.chat`); 422 for a query or prompt that is not valid
    Unicode. O(text): called in a thread, off the event loop."""
    check_text((f"query.{i}", q) for i, q in enumerate(query))
    check_text((f"prompts.{i}", p) for i, p in enumerate(prompts or ()))
    out = Read()
    for i, q in enumerate(query):
        conv = chat.conversation(q, prompts[i] if prompts else None, template)
        meta, problem = label_metadata(labels[i], i) if labels else (None, None)
        out.items.append(RMInput(context=conv.context, response=conv.response, metadata=meta))
        out.mismatched.append(0.0 if conv.prompt_matched and not prompts_unpaired else 1.0)
        out.markup.append(0.0 if conv.template is None else 1.0)
        out.bad_labels.append(problem)
    return out


def make_router(model_dep: Callable) -> APIRouter:
    # No `from __future__ import annotations` here: the handler's annotations name the closure variable
    # `model_dep`, which FastAPI could not resolve from a string.
    router = APIRouter(
        tags=["compatibility"],
        dependencies=[Depends(require_api_key)],
        responses=responses(*TRANSPORT_ERRORS),
    )

    @router.post(
        "/get_reward",
        response_model=GetRewardResponse,
        responses=responses(401, 404, 413, 422, 429, 503),
        summary="OpenRLHF remote reward model",
    )
    async def get_reward(
        body: GetRewardRequest,
        handle: Annotated[Handle, Depends(model_dep)],
        settings: SettingsDep,
    ) -> GetRewardResponse:
        """`{"query", "prompts", "labels"}` → `{"rewards", "scores", "extra_logs"}`. Chat markup and special
        tokens are read off each query (`karma.chat`, template per `--chat-template`, auto-detected by
        default): the response is the query minus its prompt (or, without `prompts`, its last assistant turn)
        and the prompt's non-system turns are the context. `rewards` are raw model scores — normalised when
        the body says `"normalize": true` or, when it does not say, for the models in `--normalize-model`;
        `scores` are `sigmoid(rewards)` in [0, 1]. `labels` may be any JSON; an object label's `metadata`
        feeds the `full` variant, the rest is ignored. Labels are advice: metadata that does not validate is
        not used for its item, which is flagged in `extra_logs.karma_label_metadata_invalid` (and logged) —
        never a 422 that would cost a training step."""
        check_items(len(body.query), settings, "queries")
        prompts, labels = body.prompts, body.labels
        unpaired = {}  # a list that does not pair up with `query` is not used (and said so in extra_logs)
        for name, given in (("prompts", prompts), ("labels", labels)):
            if given is not None and len(given) != len(body.query):
                log.warning(
                    "/get_reward: %d %s for %d queries; ignoring them", len(given), name, len(body.query)
                )
                unpaired[name] = True
        if unpaired.get("prompts"):
            prompts = None
        if unpaired.get("labels"):
            labels = None
        template = chat.resolve(settings.chat_template(handle.name))
        read = await asyncio.to_thread(
            read_queries, body.query, prompts, labels, template, bool(unpaired.get("prompts"))
        )
        bad = [(i, p) for i, p in enumerate(read.bad_labels) if p is not None]
        if bad:
            log.warning(
                "/get_reward: label metadata of %d of %d items does not validate; scored without it (first: %s)",
                len(bad),
                len(read.items),
                bad[0][1],
            )
        normalize = settings.normalize_default(handle.name) if body.normalize is None else body.normalize
        out = await handle.score(read.items, normalize=normalize)
        return GetRewardResponse(
            rewards=out.scores,
            scores=[sigmoid(s) for s in out.scores],
            extra_logs={
                "karma_truncated": [float(t) for t in out.truncated],
                "karma_prompt_mismatch": read.mismatched,
                "karma_chat_markup": read.markup,
                "karma_labels_ignored": [1.0 if unpaired.get("labels") else 0.0] * len(read.items),
                "karma_label_metadata_invalid": [0.0 if p is None else 1.0 for p in read.bad_labels],
            },
        )

    return router
