"""`POST /get_reward`: OpenRLHF's remote reward-model protocol (`--reward.remote_url`)."""

from collections.abc import Callable
from typing import Annotated

from fastapi import APIRouter, Depends

from karma.protocol import GetRewardRequest, GetRewardResponse
from karma.rm.model import RMInput
from services.reward_api.api import scoring
from services.reward_api.api.deps import MetricsDep, SettingsDep, require_api_key
from services.reward_api.api.errors import ServiceError, responses
from services.reward_api.engine import ModelHandle


def split_query(query: str, prompt: str | None) -> tuple[str, str, bool]:
    """(context, response, matched) of an OpenRLHF query: the response is the query minus its prompt prefix.

    A query that does not start with its prompt (decoding differences) is scored whole as the response, with
    the prompt as context, and reported as `matched=False` (extra_logs `karma_prompt_mismatch`).
    """
    if not prompt:
        return "", query, True
    if query.startswith(prompt):
        return prompt, query[len(prompt) :], True
    stripped = prompt.rstrip()  # decoding can differ in whitespace at the seam
    if stripped and query.startswith(stripped):
        return prompt, query[len(stripped) :], True
    return prompt, query, False


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
        handle: Annotated[ModelHandle, Depends(model_dep)],
        settings: SettingsDep,
        metrics: MetricsDep,
    ) -> GetRewardResponse:
        """`{"query", "prompts", "labels"}` → `{"rewards", "scores", "extra_logs"}`. The response scored is
        `query[len(prompt):]` with the prompt as context; `rewards` are raw model scores (normalised when the
        body says `"normalize": true`), `scores` are `sigmoid(rewards)` in [0, 1]; `labels` are ignored."""
        scoring.check_count(len(body.query), settings, "queries")
        prompts = body.prompts
        if prompts is not None and len(prompts) != len(body.query):
            raise ServiceError(
                422, f"{len(prompts)} prompts for {len(body.query)} queries; they must pair up"
            )
        items, mismatched = [], []
        for i, query in enumerate(body.query):
            context, response, matched = split_query(query, prompts[i] if prompts else None)
            items.append(RMInput(context=context, response=response))
            mismatched.append(0.0 if matched else 1.0)
        out = await scoring.score(handle, items, settings=settings, metrics=metrics, normalize=body.normalize)
        return GetRewardResponse(
            rewards=out.scores,
            scores=[scoring.sigmoid(s) for s in out.scores],
            extra_logs={
                "karma_truncated": [float(t) for t in out.truncated],
                "karma_prompt_mismatch": mismatched,
            },
        )

    return router
