"""Reward-hacking monitors: rolling statistics of what each served model scores.

`ScoreMonitor(window)` keeps, per model, the last `window` scored items of its current version (the window
restarts when the version changes — a hot swap, or a swapped component of a composed model): the score as
served (after `normalize`, before group normalisation), the response, and whether the input was cut. From
them `stats(model)` computes

* `score_mean`, `score_std` (population, ddof 0), `length_mean`;
* `score_length_corr` — Pearson correlation of score and response length in *words* (whitespace-separated,
  as the rules count them); None when fewer than 2 items or either side is constant;
* `distinct_1`, `distinct_2` — distinct lower-cased word n-grams / all n-grams over the window's responses
  (corpus-level distinct-n); `duplicate_rate` = 1 − distinct responses / responses;
* `truncated_share`.

They are served as `GET /v1/monitor` and, through `MonitorCollector`, as Prometheus gauges
`karma_monitor_<figure>{model}` computed at scrape time. No FastAPI, no torch: the engine feeds it
(`ModelHandle.score`, `ComposedHandle.score`).
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from karma.protocol import MonitorStats
from karma.rm.rule import count_words, distinct_n, duplicate_rate, pearson

FIGURES = (
    "score_mean",
    "score_std",
    "length_mean",
    "score_length_corr",
    "distinct_1",
    "distinct_2",
    "duplicate_rate",
    "truncated_share",
)


@dataclass(frozen=True, slots=True)
class _Seen:
    score: float
    response: str
    truncated: bool


def window_stats(
    scores: Sequence[float], responses: Sequence[str], truncated: Sequence[bool], *, version: str, window: int
) -> MonitorStats:
    """The monitor's figures of one window of items (see the module docstring)."""
    n = len(scores)
    lengths = [float(count_words(r)) for r in responses]
    mean = math.fsum(scores) / n if n else None
    std = math.sqrt(math.fsum((s - mean) ** 2 for s in scores) / n) if mean is not None else None
    return MonitorStats(
        version=version,
        window=window,
        n=n,
        score_mean=mean,
        score_std=std,
        length_mean=math.fsum(lengths) / n if n else None,
        score_length_corr=pearson(scores, lengths),
        distinct_1=distinct_n(responses, 1),
        distinct_2=distinct_n(responses, 2),
        duplicate_rate=duplicate_rate(responses),
        truncated_share=sum(truncated) / n if n else None,
    )


class ScoreMonitor:
    """Per model, the last `window` items of its current version (thread-safe; `window=0` records nothing)."""

    def __init__(self, window: int):
        self.window = window
        self._items: dict[str, deque[_Seen]] = {}
        self._versions: dict[str, str] = {}
        self._lock = threading.Lock()

    def observe(
        self,
        model: str,
        version: str,
        responses: Sequence[str],
        scores: Sequence[float],
        truncated: Sequence[bool],
    ) -> None:
        if not self.window:
            return
        with self._lock:
            items = self._items.get(model)
            if items is None or self._versions.get(model) != version:
                items = self._items[model] = deque(maxlen=self.window)
                self._versions[model] = version
            items.extend(
                _Seen(float(s), r, bool(t)) for s, r, t in zip(scores, responses, truncated, strict=True)
            )

    def forget(self, model: str) -> None:
        with self._lock:
            self._items.pop(model, None)
            self._versions.pop(model, None)

    def stats(self, model: str) -> MonitorStats | None:
        with self._lock:
            items = list(self._items.get(model, ()))
            version = self._versions.get(model)
        if version is None:
            return None
        return window_stats(
            [i.score for i in items],
            [i.response for i in items],
            [i.truncated for i in items],
            version=version,
            window=self.window,
        )

    def all_stats(self) -> dict[str, MonitorStats]:
        with self._lock:
            names = list(self._items)
        return {name: s for name in names if (s := self.stats(name)) is not None}


class MonitorCollector:
    """Prometheus collector: one gauge per figure, `karma_monitor_<figure>{model}` (NaN where undefined), and
    `karma_monitor_items{model}`, computed when scraped."""

    def __init__(self, monitor: ScoreMonitor):
        self.monitor = monitor

    def describe(self) -> Iterator:
        return iter(())  # no fixed samples: computed at collect time

    def collect(self) -> Iterator:
        from prometheus_client.core import GaugeMetricFamily

        stats = self.monitor.all_stats()
        items = GaugeMetricFamily("karma_monitor_items", "items in the monitor's window", labels=["model"])
        families = {
            f: GaugeMetricFamily(f"karma_monitor_{f}", f"rolling {f} of scored items", labels=["model"])
            for f in FIGURES
        }
        for model, s in stats.items():
            items.add_metric([model], s.n)
            for figure, family in families.items():
                value = getattr(s, figure)
                family.add_metric([model], math.nan if value is None else value)
        yield items
        yield from families.values()
