"""SIGINT / SIGTERM during training: note the signal, let the current step finish, then checkpoint and stop."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)


class StopRequested(Exception):
    """Internal: a signal asked the run to stop after the current step."""


class StopSignals:
    """`with stop.installed(): ...` turns SIGINT / SIGTERM into `stop.name` (e.g. "SIGTERM"); `check()` then
    raises `StopRequested`. A second SIGINT aborts at once (`KeyboardInterrupt`). Off the main thread, where
    Python cannot install handlers, nothing is installed."""

    def __init__(self) -> None:
        self.name: str | None = None

    def check(self) -> None:
        if self.name:
            raise StopRequested

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.name and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.name = name
        log.warning("%s received: stopping after this step", name)

    @contextmanager
    def installed(self) -> Iterator[StopSignals]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
