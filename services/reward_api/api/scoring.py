"""The one request path every scoring route shares: check limits and admission, encode off the event loop,
submit to the model's batching worker, await the scores. A request whose client disconnects is cancelled
(`DisconnectMiddleware`), which drops its queued items."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from dataclasses import dataclass

from karma.rm.model import Encoded, InputTooLongError, RMInput
from services.reward_api.api.errors import ServiceError
from services.reward_api.core.config import Settings
from services.reward_api.core.metrics import Metrics
from services.reward_api.engine import ModelHandle


@dataclass
class Scored:
    scores: list[float]
    truncated: list[bool]
    tokens: int


def check_count(n: int, settings: Settings, what: str = "items") -> None:
    """422: the OpenAPI document states the limit as `maxItems`, so more items is a schema violation (the body
    byte limit, which no schema states, is the 413)."""
    if n > settings.max_client_batch_size:
        raise ServiceError(
            422,
            f"{n} {what} in one request; the limit is max_client_batch_size={settings.max_client_batch_size}",
        )


def _encode_all(handle: ModelHandle, items: Sequence[RMInput], truncate: bool) -> list[Encoded]:
    out = []
    for i, item in enumerate(items):
        try:
            out.append(handle.model.encode(item, truncate=truncate))
        except InputTooLongError as exc:
            raise ServiceError(
                422, f"item {i}: {exc} (send truncate=true to cut the context from the left)"
            ) from None
    return out


async def score(
    handle: ModelHandle,
    items: Sequence[RMInput],
    *,
    settings: Settings,
    metrics: Metrics,
    truncate: bool = True,
    normalize: bool = False,
) -> Scored:
    check_count(len(items), settings)
    handle.worker.admit(len(items))  # refuse before encoding when the queue is already too long
    loop = asyncio.get_running_loop()
    encoded = await loop.run_in_executor(handle.encoder, _encode_all, handle, items, truncate)
    scores = await asyncio.wrap_future(handle.worker.submit(encoded))
    truncated = [e.truncated for e in encoded]
    if any(truncated):
        metrics.truncated.labels(handle.name).inc(sum(truncated))
    if normalize:
        scores = handle.model.normalize(scores)
    return Scored(scores=[float(s) for s in scores], truncated=truncated, tokens=sum(len(e) for e in encoded))


def sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)
