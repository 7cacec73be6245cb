"""Builds the reward service: `create_app(settings)`.

Models load in the lifespan, in a background thread: `/health` answers at once, `/ready` and the scoring
routes answer 503 until every configured model is loaded. Pass `registry=` to serve an already-built
`ModelRegistry` instead (tests, embedding the service in another process).
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI

from karma.rm.compose import is_composition
from services.reward_api.api import deps, errors
from services.reward_api.api.middleware import (
    BodyLimitMiddleware,
    DisconnectMiddleware,
    InternalErrorMiddleware,
    MetricsMiddleware,
)
from services.reward_api.api.routes import health, models, monitor, openrlhf, score, vllm
from services.reward_api.core.config import Settings
from services.reward_api.core.metrics import Metrics
from services.reward_api.engine import ModelRegistry
from services.reward_api.monitor import MonitorCollector, ScoreMonitor

log = logging.getLogger(__name__)


def build_registry(
    settings: Settings, metrics: Metrics | None = None, monitor: ScoreMonitor | None = None
) -> ModelRegistry:
    registry = ModelRegistry(
        settings.limits(), device=settings.device, dtype=settings.dtype, observer=metrics, monitor=monitor
    )
    registry.default = settings.default_model
    for name in settings.models:
        registry.declare(name)
    return registry


def _load_all(registry: ModelRegistry, settings: Settings) -> None:
    # composed rewards last: they read models by name, which must be served by then
    order = sorted(settings.models.items(), key=lambda kv: is_composition(kv[1]))
    for name, path in order:
        try:
            registry.load(name, path)
        except Exception as exc:  # noqa: BLE001 - reported by /ready (status "failed" + the error)
            log.error("model %s failed to load from %s: %s: %s", name, path, type(exc).__name__, exc)


def _document_settings(app: FastAPI, settings: Settings) -> None:
    """Make the OpenAPI document state this server's configuration: the item limit (`maxItems`), and the
    API-key requirement only when a key is configured."""
    from fastapi.openapi.utils import get_openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
            schemas = doc.get("components", {}).get("schemas", {})
            for model, prop in (("ScoreRequest", "items"), ("GetRewardRequest", "query")):
                if model in schemas:
                    schemas[model]["properties"][prop]["maxItems"] = settings.max_client_batch_size
            for variant in (
                schemas.get("ClassifyRequest", {}).get("properties", {}).get("input", {}).get("anyOf", [])
            ):
                if variant.get("type") == "array":
                    variant["maxItems"] = settings.max_client_batch_size
            if settings.api_key is None:
                doc.get("components", {}).get("securitySchemes", {}).pop("ApiKey", None)
                for ops in doc["paths"].values():
                    for op in ops.values():
                        if "security" in op:
                            op["security"] = [s for s in op["security"] if "ApiKey" not in s]
                            if not op["security"]:
                                del op["security"]
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi


def create_app(settings: Settings | None = None, *, registry: ModelRegistry | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = Metrics()
    given = registry.monitor if registry is not None else None
    score_monitor = given if given is not None else ScoreMonitor(settings.monitor_window)
    metrics.watch(MonitorCollector(score_monitor))
    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        own = registry is None
        reg = app.state.registry = registry or build_registry(settings, metrics, score_monitor)
        loader = asyncio.create_task(asyncio.to_thread(_load_all, reg, settings)) if own else None
        try:
            yield
        finally:
            if loader is not None:
                await loader
            if own:
                await asyncio.to_thread(reg.close)

    app = FastAPI(
        title="KARMA reward service",
        version="1",
        summary="Scores (context, response) pairs with KARMA reward models; OpenRLHF and vLLM compatible.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.monitor = score_monitor
    if registry is not None:
        app.state.registry = registry
    errors.install(app, settings.retry_after_s)

    app.include_router(health.router)
    app.include_router(monitor.router)
    for module in (score, openrlhf, vllm):
        app.include_router(module.make_router(deps.default_model))
        app.include_router(module.make_router(deps.named_model), prefix="/models/{name}")
    if settings.admin_token is not None:
        app.include_router(models.router)

    _document_settings(app, settings)
    app.add_middleware(DisconnectMiddleware)
    app.add_middleware(InternalErrorMiddleware)
    app.add_middleware(
        BodyLimitMiddleware,
        max_bytes=settings.max_body_bytes,
        timeout_s=settings.body_timeout_s,
        max_header_bytes=settings.max_header_bytes,
    )
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # outermost: counts 413s from the body limit too
    return app
