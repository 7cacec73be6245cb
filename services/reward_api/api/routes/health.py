"""Operations: `/health` (alive), `/ready` (every configured model loaded), `/info`, `/metrics` (Prometheus)."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from karma.protocol import MODEL_NAME_PATTERN, HealthResponse, InfoResponse, ModelInfo, ReadyResponse
from services.reward_api.api.deps import MetricsDep, RegistryDep, SettingsDep, require_api_key
from services.reward_api.api.errors import TRANSPORT_ERRORS, responses
from services.reward_api.engine import Handle, ModelRegistry, UnknownModelError

router = APIRouter(tags=["operations"], responses=responses(*TRANSPORT_ERRORS))


def model_info(handle: Handle, registry: ModelRegistry, with_path: bool = False) -> ModelInfo:
    cfg = handle.model.config
    return ModelInfo(
        name=handle.name,
        version=handle.version,
        variant=cfg.variant,
        objective=cfg.objective,
        backbone=cfg.backbone,
        template_version=cfg.template_version,
        max_length=handle.model.max_length,
        dtype=str(handle.model.dtype).removeprefix("torch."),
        device=str(handle.model.device),
        default=handle.name == registry.default,
        loaded_at=handle.loaded_at,
        path=str(handle.path) if with_path and handle.path is not None else None,
    )


def _ready_body(registry: ModelRegistry, names: list[str]) -> tuple[int, ReadyResponse]:
    states = {n: registry.status[n] for n in names if n in registry.status}
    errors = {n: registry.errors[n] for n in states if n in registry.errors}
    ready = bool(states) and all(s == "ready" for s in states.values())
    return (200 if ready else 503), ReadyResponse(ready=ready, models=states, errors=errors)


@router.get("/health", response_model=HealthResponse, summary="Liveness")
async def health() -> HealthResponse:
    """200 while the process serves HTTP, loaded models or not."""
    return HealthResponse()


@router.get(
    "/ready",
    response_model=ReadyResponse,
    responses={503: {"model": ReadyResponse, "description": "some configured model is not loaded"}},
    summary="Readiness",
)
async def ready(registry: RegistryDep) -> JSONResponse:
    """200 when every configured model is loaded, else 503 with each model's state."""
    status, body = _ready_body(registry, registry.names())
    return JSONResponse(body.model_dump(), status_code=status)


@router.get(
    "/models/{name}/health", response_model=HealthResponse, responses=responses(404, 422), summary="Liveness"
)
async def model_health(
    registry: RegistryDep, name: Annotated[str, Path(pattern=MODEL_NAME_PATTERN)]
) -> HealthResponse:
    """200 when the service is alive and knows `name` (so a client given a `/models/{name}` URL can probe it)."""
    if name not in registry.status:
        raise UnknownModelError(name, registry.names())
    return HealthResponse()


@router.get(
    "/models/{name}/ready",
    response_model=ReadyResponse,
    responses={**responses(404, 422), 503: {"model": ReadyResponse, "description": "not loaded yet"}},
    summary="Readiness of one model",
)
async def model_ready(
    registry: RegistryDep, name: Annotated[str, Path(pattern=MODEL_NAME_PATTERN)]
) -> JSONResponse:
    if name not in registry.status:
        raise UnknownModelError(name, registry.names())
    status, body = _ready_body(registry, [name])
    return JSONResponse(body.model_dump(), status_code=status)


@router.get(
    "/info",
    response_model=InfoResponse,
    responses=responses(401),
    dependencies=[Depends(require_api_key)],
    summary="Models, versions, dtype, device, limits",
)
async def info(registry: RegistryDep, settings: SettingsDep) -> InfoResponse:
    return InfoResponse(
        default_model=registry.default,
        models=[model_info(h, registry) for h in registry.handles()],
        limits=settings.limits(),
        auth={"api_key": settings.api_key is not None, "admin": settings.admin_token is not None},
    )


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}}}},
    summary="Prometheus metrics",
)
async def metrics(m: MetricsDep) -> Response:
    """Rendered in a thread: the score monitor's gauges wait for its recording thread to catch up."""
    return Response(await asyncio.to_thread(m.render), media_type=CONTENT_TYPE_LATEST)
