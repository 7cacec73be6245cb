"""How `karma serve` runs uvicorn: the connection limits a client cannot stretch (issue 20).

uvicorn's own settings cover two of them: `h11_max_incomplete_event_size` caps a request's line and headers
(`max_header_bytes`; the h11 parser is chosen because httptools, uvicorn's default when installed, has no
such cap: ten 50 MB headers were answered), and `timeout_keep_alive` closes an idle kept-alive connection.
uvicorn has no deadline for a request's head (a client trickling one header line every 2 s kept its
connection open 30-40 s and more, each byte restarting the keep-alive timer) nor for its body: the head
deadline is `GuardedH11Protocol` here (`header_timeout_s`, from the connection's start or its previous
response), the body deadline is `BodyLimitMiddleware` (`body_timeout_s`, answered 408).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from services.reward_api.core.config import Settings

log = logging.getLogger(__name__)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, plus a deadline for each request's line and headers: a connection that has not
    sent a whole head within `header_timeout_s` of connecting (or of its previous response) is closed."""

    header_timeout_s: float = 10.0
    _head_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_deadline()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the head is in (or the connection is done with)
            self._cancel_head_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.conn.their_state is h11.IDLE:  # waiting for the next request's head
            self._arm_head_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_deadline()
        super().connection_lost(exc)

    def _arm_head_deadline(self) -> None:
        self._cancel_head_deadline()
        if not self.transport.is_closing():
            self._head_deadline = self.loop.call_later(self.header_timeout_s, self._head_too_slow)

    def _cancel_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_too_slow(self) -> None:
        self._head_deadline = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            log.info(
                "closing a connection from %s: no request head within %gs", self.client, self.header_timeout_s
            )
            self.conn.send(h11.ConnectionClosed())
            self.transport.close()


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """The `uvicorn.Config` keywords of the connection limits in `settings` (everything but app, host, port
    and logging)."""
    protocol = type(
        "GuardedH11Protocol", (GuardedH11Protocol,), {"header_timeout_s": settings.header_timeout_s}
    )
    return {
        "http": protocol,
        "h11_max_incomplete_event_size": settings.max_header_bytes,
        "timeout_keep_alive": settings.keep_alive_s,
    }
