"""Progress lines for long loops that have no bar of their own: a line when the loop starts, then at most every
`every_s` seconds and at the end, through the caller's logger (so they land in the run's log)."""

from __future__ import annotations

import logging
import time


class Progress:
    """`Progress(log, "scoring replies", 1000, "texts")`, then `.update(n)` after each chunk of work."""

    def __init__(self, logger: logging.Logger, what: str, total: int, unit: str, every_s: float = 10.0):
        self.log, self.what, self.total, self.unit, self.every_s = logger, what, total, unit, every_s
        self.done, self.start = 0, time.perf_counter()
        self.last = self.start
        logger.info("%s: %d %s ...", what, total, unit)

    def update(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if self.done >= self.total or now - self.last >= self.every_s:
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            self.log.info(
                "%s: %d/%d %s (%.0f s, %.1f %s/s)",
                self.what,
                self.done,
                self.total,
                self.unit,
                now - self.start,
                rate,
                self.unit,
            )
