"""`POST /classify`: vLLM's pooling classification API, as verl's reward loop calls a discriminative RM."""

import asyncio
from collections.abc import Callable
from typing import Annotated

from fastapi import APIRouter, Depends

from karma import chat
from karma.protocol import ClassifyData, ClassifyRequest, ClassifyResponse, ClassifyUsage, sigmoid
from karma.rm.model import RMInput
from services.reward_api.api.deps import SettingsDep, check_items, check_text, require_api_key
from services.reward_api.api.errors import TRANSPORT_ERRORS, ServiceError, responses
from services.reward_api.engine import Handle


def classify_items(body: ClassifyRequest, template: str | chat.ChatFormat = chat.AUTO) -> list[RMInput]:
    """`input` texts → responses without context, or (chat-templated text, e.g. what verl renders with the
    RM folder's chat template) its last assistant turn with the earlier turns as context; `messages` → the
    last message is the response. 422 for text that is not valid Unicode. O(text): called in a thread."""
    if (body.input is None) == (body.messages is None):
        raise ServiceError(422, "send exactly one of `input` (text or list of texts) and `messages`")
    if body.messages is not None:
        check_text((f"messages.{i}.content", t.content) for i, t in enumerate(body.messages))
        *context, last = body.messages
        turns = [{"role": t.role, "content": t.content} for t in context if t.role != "system"]
        return [RMInput(context=turns, response=last.content)]
    texts = [body.input] if isinstance(body.input, str) else body.input
    if not texts:
        raise ServiceError(422, "`input` is an empty list")
    check_text((f"input.{i}" if isinstance(body.input, list) else "input", t) for i, t in enumerate(texts))
    items = []
    for text in texts:
        conv = chat.conversation(text, None, template)
        items.append(RMInput(context=conv.context, response=conv.response))
    return items


def make_router(model_dep: Callable) -> APIRouter:
    # No `from __future__ import annotations` here: the handler's annotations name the closure variable
    # `model_dep`, which FastAPI could not resolve from a string.
    router = APIRouter(
        tags=["compatibility"],
        dependencies=[Depends(require_api_key)],
        responses=responses(*TRANSPORT_ERRORS),
    )

    @router.post(
        "/classify",
        response_model=ClassifyResponse,
        responses=responses(401, 404, 413, 422, 429, 503),
        summary="vLLM-compatible classification (verl reward loop)",
    )
    async def classify(
        body: ClassifyRequest,
        handle: Annotated[Handle, Depends(model_dep)],
        settings: SettingsDep,
    ) -> ClassifyResponse:
        """One `data[i].probs = [p]` per input: `p = sigmoid(score)` unless `use_activation` is false, then the
        raw score (verl reads `data[-1].probs[-1]`). The score is normalised first when `normalize` says so
        or, when it does not say, for the models in `--normalize-model`. Chat-templated `input` is read as a
        conversation (`--chat-template`). `model` in the body is ignored: choose the model by URL."""
        if isinstance(body.input, list):
            check_items(len(body.input), settings)
        items = await asyncio.to_thread(
            classify_items, body, chat.resolve(settings.chat_template(handle.name))
        )
        normalize = settings.normalize_default(handle.name) if body.normalize is None else body.normalize
        check_items(len(items), settings)
        out = await handle.score(items, normalize=normalize)
        activate = body.use_activation if body.use_activation is not None else body.activation
        activate = True if activate is None else activate
        data = [
            ClassifyData(index=i, label="LABEL_0", probs=[sigmoid(s) if activate else s], num_classes=1)
            for i, s in enumerate(out.scores)
        ]
        usage = ClassifyUsage(prompt_tokens=out.tokens, total_tokens=out.tokens)
        return ClassifyResponse(model=handle.name, data=data, usage=usage)

    return router
