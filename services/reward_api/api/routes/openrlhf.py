"""`POST /get_reward`: OpenRLHF's remote reward-model protocol (`--reward.remote_url`)."""

import json
import logging
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from pydantic import ValidationError

from karma import chat
from karma.protocol import GetRewardRequest, GetRewardResponse, Metadata, sigmoid
from karma.rm.model import RMInput
from services.reward_api.api.deps import SettingsDep, check_items, require_api_key
from services.reward_api.api.errors import ServiceError, responses
from services.reward_api.engine import Handle

log = logging.getLogger(__name__)


def label_metadata(label: Any, index: int) -> dict[str, Any] | None:
    """The `metadata` a label carries (a JSON object, or a string holding one), validated like /v1/score's
    metadata; None for any other label. Invalid metadata is a 422 naming the label."""
    if isinstance(label, str) and label.lstrip().startswith("{"):
        try:
            label = json.loads(label)
        except ValueError:
            return None  # a label that merely looks like JSON is still just a label
    if not isinstance(label, dict) or label.get("metadata") is None:
        return None
    try:
        meta = Metadata.model_validate(label["metadata"])
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(x) for x in ("labels", index, "metadata", *err["loc"]))
        raise ServiceError(422, f"{where}: {err['msg']}") from None
    return meta.model_dump(exclude_none=True)


def make_router(model_dep: Callable) -> APIRouter:
    # No `from __future__ import annotations` here: the handler's annotations name the closure variable
    # `model_dep`, which FastAPI could not resolve from a string.
    router = APIRouter(tags=["compatibility"], dependencies=[Depends(require_api_key)])

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
        feeds the `full` variant, the rest is ignored."""
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
        items, mismatched, markup = [], [], []
        for i, query in enumerate(body.query):
            conv = chat.conversation(query, prompts[i] if prompts else None, template)
            meta = label_metadata(labels[i], i) if labels else None
            items.append(RMInput(context=conv.context, response=conv.response, metadata=meta))
            mismatched.append(0.0 if conv.prompt_matched and not unpaired.get("prompts") else 1.0)
            markup.append(0.0 if conv.template is None else 1.0)
        normalize = settings.normalize_default(handle.name) if body.normalize is None else body.normalize
        out = await handle.score(items, normalize=normalize)
        return GetRewardResponse(
            rewards=out.scores,
            scores=[sigmoid(s) for s in out.scores],
            extra_logs={
                "karma_truncated": [float(t) for t in out.truncated],
                "karma_prompt_mismatch": mismatched,
                "karma_chat_markup": markup,
                "karma_labels_ignored": [1.0 if unpaired.get("labels") else 0.0] * len(items),
            },
        )

    return router
