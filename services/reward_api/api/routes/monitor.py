"""`GET /v1/monitor`: reward-hacking monitors — rolling statistics of what each model scored (see
`services.reward_api.monitor`); the same figures are Prometheus gauges `karma_monitor_<figure>{model}`."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends

from karma.protocol import MonitorResponse
from services.reward_api.api.deps import MonitorDep, require_api_key
from services.reward_api.api.errors import TRANSPORT_ERRORS, responses

router = APIRouter(
    tags=["operations"], dependencies=[Depends(require_api_key)], responses=responses(*TRANSPORT_ERRORS)
)


@router.get(
    "/v1/monitor",
    response_model=MonitorResponse,
    responses=responses(401),
    summary="Rolling statistics of the scored items, per model",
)
async def monitor(mon: MonitorDep) -> MonitorResponse:
    """Per model, over its last `monitor_window` scored items of its current version: score mean / std,
    Pearson correlation of score with response length (words), distinct-1 / distinct-2 of the responses,
    duplicate rate, share of truncated inputs. A model that has scored nothing yet is absent."""
    return MonitorResponse(models=await asyncio.to_thread(mon.all_stats))
