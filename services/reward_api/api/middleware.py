"""Pure-ASGI middleware: the request-body limits (413 before the body is parsed, 408 for a body that does not
arrive in time), cancelling a request whose client went away, and request metrics."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from services.reward_api.core.metrics import Metrics


async def _send_error(send, status: int, message: str, error_type: str, headers=None) -> None:
    """The one error body (`errors.error_response`), sent from pure ASGI code before any route ran."""
    from services.reward_api.api.errors import error_response

    response = error_response(status, message, error_type, headers)  # type: ignore[arg-type]
    await response({"type": "http"}, _no_receive, send)


async def _no_receive():  # a response never reads the request
    return {"type": "http.disconnect"}


class BodyLimitMiddleware:
    """431 for headers over `max_header_bytes`; 413 for a body over `max_bytes`: from Content-Length when given (before reading it), else by counting a
    chunked body; 408 (and the connection closed) for a body not whole within `timeout_s` of the headers —
    uvicorn has no such deadline, and a body shorter than its Content-Length held a connection for good. The
    body is read here, whole, and replayed to the app (the JSON routes read it whole anyway)."""

    def __init__(
        self, app, max_bytes: int, timeout_s: float | None = None, max_header_bytes: int | None = None
    ):
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.max_header_bytes = max_header_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.max_header_bytes is not None:  # uvicorn's h11 cap holds only for a head that came in pieces
            size = len(scope.get("raw_path") or b"") + sum(len(k) + len(v) + 4 for k, v in scope["headers"])
            if size > self.max_header_bytes:
                message = f"request headers of {size} bytes exceed max_header_bytes={self.max_header_bytes}"
                return await _send_error(send, 431, message, "payload_too_large", {"Connection": "close"})
        for key, value in scope["headers"]:
            if key == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    return await _send_error(send, 422, "invalid Content-Length", "validation")
                if length > self.max_bytes:
                    return await _send_error(
                        send,
                        413,
                        f"request body exceeds max_body_bytes={self.max_bytes}",
                        "payload_too_large",
                    )
                break
        try:
            async with asyncio.timeout(self.timeout_s):
                first = await self._read(receive)
        except TimeoutError:
            log.info(
                "no whole body within %gs: 408 to %s %s",
                self.timeout_s,
                scope.get("method"),
                scope.get("path"),
            )
            message = f"request body not received within body_timeout_s={self.timeout_s:g}"
            return await _send_error(send, 408, message, "timeout", {"Connection": "close"})
        if first is None:
            return await _send_error(
                send, 413, f"request body exceeds max_body_bytes={self.max_bytes}", "payload_too_large"
            )
        return await self.app(scope, _replay([first], receive), send)

    async def _read(self, receive) -> dict | None:
        """The whole body as one `http.request` message (or the disconnect that cut it); None over the limit."""
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return message
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                return None
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        return {"type": "http.request", "body": b"".join(chunks), "more_body": False}


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
