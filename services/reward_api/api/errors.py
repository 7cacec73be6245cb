"""One error body everywhere: `{"error": str, "error_type": str}` (TEI's shape), and the status of each error."""

from __future__ import annotations

import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from karma.protocol import ErrorBody, ErrorType
from services.reward_api.engine import (
    CompositionError,
    EngineError,
    ItemTooLongError,
    ModelExistsError,
    ModelNotReadyError,
    QueueFullError,
    UnknownModelError,
    WorkerClosedError,
)

log = logging.getLogger(__name__)

_BY_STATUS: dict[int, ErrorType] = {
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "timeout",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation",
    429: "overloaded",
    431: "payload_too_large",
    503: "not_ready",
}

_DESCRIPTIONS = {
    401: "missing or wrong credentials (`Authorization: Bearer ...`)",
    403: "credentials valid but not allowed here",
    404: "unknown model or route",
    408: "the request body did not arrive whole within body_timeout_s of the headers (the connection is closed)",
    409: "conflict with the current models",
    413: "body larger than max_body_bytes",
    422: "malformed request, empty items, more items than maxItems, unknown fields, or input too long with "
    "truncate=false; a folder (or composition) that does not load",
    429: "overloaded (the queued work would wait longer than max_queue_wait_s, or the queue is full); "
    "retry after the Retry-After header (seconds, from the measured throughput)",
    431: "request headers larger than max_header_bytes (the connection is closed)",
    503: "model not loaded yet",
}

#: what the body/header middleware (`middleware.BodyLimitMiddleware`) can answer on any route, before it runs:
#: every router declares them
TRANSPORT_ERRORS = (408, 431)


#: every engine error's status, in one place (the most specific class in an error's MRO wins)
ENGINE_STATUS: dict[type[EngineError], int] = {
    UnknownModelError: 404,
    ModelExistsError: 409,
    ItemTooLongError: 422,
    QueueFullError: 429,  # and QueueBusyError
    ModelNotReadyError: 503,
    WorkerClosedError: 503,
}


def engine_status(exc: EngineError) -> int:
    for cls in type(exc).__mro__:
        if cls in ENGINE_STATUS:
            return ENGINE_STATUS[cls]
    return 500


class ServiceError(Exception):
    """An error with its HTTP status; rendered as ErrorBody."""

    def __init__(
        self, status: int, message: str, error_type: ErrorType | None = None, headers: dict | None = None
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type: ErrorType = error_type or _BY_STATUS.get(status, "internal")
        self.headers = headers


def error_response(
    status: int, message: str, error_type: ErrorType | None = None, headers=None
) -> JSONResponse:
    body = ErrorBody(error=message, error_type=error_type or _BY_STATUS.get(status, "internal"))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` entries for the error codes a route can return."""
    return {code: {"model": ErrorBody, "description": _DESCRIPTIONS.get(code, "error")} for code in codes}


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or "body"
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    more = len(exc.errors()) - 5
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def _allowed_methods(app: FastAPI, scope) -> list[str]:
    from starlette.routing import Match

    methods: set[str] = set()
    for route in app.router.routes:
        match, _ = route.matches({**scope, "method": "__none__"})
        if match != Match.NONE and getattr(route, "methods", None):
            methods |= set(route.methods)
    return sorted(methods)


def install(app: FastAPI, retry_after_s: int) -> None:
    @app.exception_handler(ServiceError)
    async def _service(_: Request, exc: ServiceError):
        return error_response(exc.status, exc.message, exc.error_type, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError):
        return error_response(422, _validation_message(exc), "validation")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        headers = getattr(exc, "headers", None)
        if exc.status_code == 400:  # FastAPI: a body it could not decode — malformed, like any other 422
            return error_response(422, f"could not parse the request body: {exc.detail}", "validation")
        if exc.status_code == 405:  # Starlette lists only the first matching route's methods
            headers = {**(headers or {}), "Allow": ", ".join(_allowed_methods(app, request.scope))}
        return error_response(exc.status_code, str(exc.detail), None, headers)

    @app.exception_handler(CompositionError)
    async def _composition(_: Request, exc: CompositionError):
        return error_response(422, str(exc), "model_load")

    @app.exception_handler(EngineError)
    async def _engine(_: Request, exc: EngineError):
        status = engine_status(exc)
        headers = None
        if status == 429:
            estimate = getattr(exc, "retry_after", None)
            wait = retry_after_s if estimate is None else max(1, math.ceil(estimate))
            headers = {"Retry-After": str(wait)}
        elif status == 503:
            headers = {"Retry-After": str(retry_after_s)}
        return error_response(status, str(exc), None, headers)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        log.error(
            "unhandled error on %s %s: %s: %s", request.method, request.url.path, type(exc).__name__, exc
        )
        return error_response(500, f"internal error ({type(exc).__name__})", "internal")
