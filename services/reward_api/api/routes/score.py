"""`POST /v1/score`: our scoring route (context, response, metadata → raw or normalised scores; per-component
values and group normalisation on request)."""

import asyncio
import json
from collections.abc import Callable, Iterator
from typing import Annotated

from fastapi import APIRouter, Depends

from karma.protocol import ScoreRequest, ScoreResponse
from karma.rm.model import RMInput
from services.reward_api.api.deps import SettingsDep, check_items, check_text, require_api_key
from services.reward_api.api.errors import TRANSPORT_ERRORS, responses
from services.reward_api.engine import Handle, group_zscore


def _texts(body: ScoreRequest) -> Iterator[tuple[str, object]]:
    """(where, value) of every text in the request: responses, contexts, metadata values."""
    for i, it in enumerate(body.items):
        yield f"items.{i}.response", it.response
        if isinstance(it.context, str):
            yield f"items.{i}.context", it.context
        else:
            yield from ((f"items.{i}.context.{j}.content", t.content) for j, t in enumerate(it.context))
        if it.metadata is not None:
            yield from ((f"items.{i}.metadata.{k}", v) for k, v in it.metadata.model_dump().items())


def score_items(body: ScoreRequest) -> list[RMInput]:
    """The request's items as the engine takes them; 422 for text that is not valid Unicode (`check_text`).
    O(text): called in a thread, off the event loop."""
    check_text(_texts(body))
    return [
        RMInput(
            context=it.context if isinstance(it.context, str) else [t.model_dump() for t in it.context],
            response=it.response,
            metadata=it.rm_metadata(),
        )
        for it in body.items
    ]


def make_router(model_dep: Callable) -> APIRouter:
    # No `from __future__ import annotations` here: the handler's annotations name the closure variable
    # `model_dep`, which FastAPI could not resolve from a string.
    """The route bound to one way of choosing the model (default, or `/models/{name}`)."""
    router = APIRouter(
        tags=["scoring"], dependencies=[Depends(require_api_key)], responses=responses(*TRANSPORT_ERRORS)
    )

    @router.post(
        "/v1/score",
        response_model=ScoreResponse,
        responses=responses(401, 404, 413, 422, 429, 503),
        summary="Score (context, response) items",
    )
    async def score(
        body: ScoreRequest,
        handle: Annotated[Handle, Depends(model_dep)],
        settings: SettingsDep,
    ) -> ScoreResponse:
        """Renders every item with the model's own template (`karma_rm.json`), scores it in a shared batch, and
        returns raw scores (or standardised with the saved validation mean/std when `normalize` is true).
        Over-long context is cut from the left and flagged in `truncated`, or rejected with 422 when
        `truncate` is false. A composed reward returns Σ weight · component (each component with `components:
        true`); `group_normalize: true` z-scores the scores within the items sharing one context."""
        check_items(len(body.items), settings)
        items = await asyncio.to_thread(score_items, body)
        out = await handle.score(
            items,
            truncate=body.truncate,
            # a body that does not say gets the server's per-model default (`--normalize-model`)
            normalize=body.normalize
            if "normalize" in body.model_fields_set
            else settings.normalize_default(handle.name),
        )
        scores = out.scores
        if body.group_normalize:
            scores = group_zscore(scores, [json.dumps(it.context, sort_keys=True) for it in items])
        return ScoreResponse(
            model=handle.name,
            version=out.version,
            scores=scores,
            truncated=out.truncated,
            components=out.components if body.components else None,
        )

    return router
