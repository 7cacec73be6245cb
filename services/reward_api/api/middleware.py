"""Pure-ASGI middleware: the request-body limit (413 before the body is parsed), cancelling a request whose
client went away, and request metrics."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from services.reward_api.core.metrics import Metrics


async def _send_error(send, status: int, message: str, error_type: str) -> None:
    """The one error body (`errors.error_response`), sent from pure ASGI code before any route ran."""
    from services.reward_api.api.errors import error_response

    response = error_response(status, message, error_type)  # type: ignore[arg-type]
    await response({"type": "http"}, _no_receive, send)


async def _no_receive():  # a response never reads the request
    return {"type": "http.disconnect"}


class BodyLimitMiddleware:
    """413 for a body over `max_bytes`: from Content-Length when given, else by counting a chunked body."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = None
        for key, value in scope["headers"]:
            if key == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    return await _send_error(send, 422, "invalid Content-Length", "validation")
                break
        too_large = f"request body exceeds max_body_bytes={self.max_bytes}"
        if length is not None:
            if length > self.max_bytes:
                return await _send_error(send, 413, too_large, "payload_too_large")
            return await self.app(scope, receive, send)
        # No Content-Length (chunked): buffer up to the limit, then replay.
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return await self.app(scope, _replay([message]), send)
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                return await _send_error(send, 413, too_large, "payload_too_large")
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        return await self.app(scope, _replay([body], receive), send)


def _replay(messages, then=None):
    queue = list(messages)

    async def receive():
        if queue:
            return queue.pop(0)
        if then is not None:
            return await then()
        return {"type": "http.disconnect"}

    return receive


log = logging.getLogger(__name__)


class InternalErrorMiddleware:
    """An unhandled exception becomes a 500 with the one error body, and the connection stays usable.

    Starlette's own handler for `Exception` sends its response and then re-raises, and uvicorn answers a
    raise after the response by closing the connection: the client's next keep-alive request got ECONNRESET.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def _send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, _send)
        except Exception as exc:  # logged with its traceback, answered with a typed 500
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            if not started:
                await _send_error(send, 500, f"internal error ({type(exc).__name__})", "internal")


class DisconnectMiddleware:
    """Cancel the handler when the client disconnects before its response starts, so queued work of a client
    that timed out is dropped instead of scored (uvicorn does not cancel handlers on its own).

    Once the app has read the whole body, a watcher task waits on `receive()` for `http.disconnect`; the app
    must not read `receive` itself after the body (our JSON routes do not; a streaming response would).
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        body_read = asyncio.Event()
        started = False

        async def _receive():
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_read.set()
            return message

        async def _send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        task = asyncio.ensure_future(self.app(scope, _receive, _send))

        async def _watch():
            await body_read.wait()
            while not task.done():
                message = await receive()
                if message["type"] == "http.disconnect":
                    if not started and not task.done():
                        log.info("client went away: cancelling %s %s", scope.get("method"), scope.get("path"))
                        scope.setdefault("state", {})["karma_disconnected"] = True
                        task.cancel()
                    return

        watcher = asyncio.ensure_future(_watch())
        try:
            await task
        except asyncio.CancelledError:
            if not scope.get("state", {}).get("karma_disconnected"):
                raise  # the server itself is cancelling us (shutdown)
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher


class MetricsMiddleware:
    """Counts requests by route template (not raw path: no label explosion) and status; times them."""

    def __init__(self, app, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = None

        async def _send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, _send)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            if (
                status is None
            ):  # nothing sent: 499 (nginx's "client closed request") if it went away, else 500
                status = 499 if scope.get("state", {}).get("karma_disconnected") else 500
            self.metrics.requests.labels(template, scope.get("method", ""), str(status)).inc()
            self.metrics.latency.labels(template).observe(time.perf_counter() - t0)
