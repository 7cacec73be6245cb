"""`POST /v1/score`: our scoring route (context, response, metadata → raw or normalised scores; per-component
values and group normalisation on request)."""

import json
from collections.abc import Callable
from typing import Annotated

from fastapi import APIRouter, Depends

from karma.protocol import ScoreRequest, ScoreResponse
from karma.rm.model import RMInput
from services.reward_api.api.deps import SettingsDep, check_items, require_api_key
from services.reward_api.api.errors import responses
from services.reward_api.engine import Handle, group_zscore


def make_router(model_dep: Callable) -> APIRouter:
    # No `from __future__ import annotations` here: the handler's annotations name the closure variable
    # `model_dep`, which FastAPI could not resolve from a string.
    """The route bound to one way of choosing the model (default, or `/models/{name}`)."""
    router = APIRouter(tags=["scoring"], dependencies=[Depends(require_api_key)])

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
        items = [
            RMInput(
                context=it.context if isinstance(it.context, str) else [t.model_dump() for t in it.context],
                response=it.response,
                metadata=it.rm_metadata(),
            )
            for it in body.items
        ]
        check_items(len(items), settings)
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
