"""Reward-hacking monitors: rolling statistics of what each served model scores.

`ScoreMonitor(window)` keeps, per model, the last `window` scored items of its current version (the window
restarts when the version changes — a hot swap, or a swapped component of a composed model). Of each item it
keeps a bounded `Reply` (`summarize`): the score as served (after `normalize`, before group normalisation),
the response's length in words and a 16-byte digest of it (both of the whole text), its first `HEAD_CHARS`
characters (cut at a word boundary), and whether the input was cut — never the whole response. From them
`stats(model)` reads

* `score_mean`, `score_std` (population, ddof 0), `length_mean`;
* `score_length_corr` — Pearson correlation of score and response length in *words* (whitespace-separated,
  as the rules count them); None when fewer than 2 items or either side is constant;
* `distinct_1`, `distinct_2` — distinct lower-cased word n-grams / all n-grams over the window's responses
  (corpus-level distinct-n) — of each response's first `HEAD_CHARS` characters, so a reply's cost is bounded;
  identical to the whole-text figure for replies up to that length; `duplicate_rate` = 1 − distinct
  responses / responses (by digest of the whole text);
* `truncated_share`.

Nothing of this runs on the event loop: the engine summarises responses in its own threads (`summarize`:
O(reply), paid by the request that sent it), and `observe` hands the bounded replies to the monitor's one
recording thread, which keeps the window's n-gram counts up to date as items enter and leave. A read
(`stats`, `GET /v1/monitor`, `MonitorCollector` at a Prometheus scrape) waits for that thread to catch up
and then costs O(window) floats plus O(1) counts, whatever the replies' size. No FastAPI, no torch: the
engine feeds it (`ModelHandle.score`, `ComposedHandle.score`).
"""

from __future__ import annotations

import hashlib
import itertools
import math
import threading
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from karma.protocol import MonitorStats
from karma.rm.rule import count_words, pearson

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

#: characters of each response the distinct-n figures read (a 300-word reply is ~1,700)
HEAD_CHARS = 2048
_NS = (1, 2)  # the n of distinct-n (`_grams`)


@dataclass(frozen=True, slots=True)
class Reply:
    """What the monitor keeps of one response: its length in words and a 16-byte digest (of the whole text),
    and its first `HEAD_CHARS` characters, cut at a word boundary."""

    words: int
    digest: bytes
    head: str


def summarize(response: str) -> Reply:
    """The bounded summary of one response: O(len(response)), so call it off the event loop."""
    head = response[:HEAD_CHARS]
    if len(response) > HEAD_CHARS and not response[HEAD_CHARS].isspace():
        cut = max(head.rfind(" "), head.rfind("\n"), head.rfind("\t"))
        if cut > 0:  # drop the word cut in two (a head with no space stays as it is)
            head = head[:cut]
    digest = hashlib.blake2b(response.encode("utf-8", "surrogatepass"), digest_size=16).digest()
    return Reply(count_words(response), digest, head)


@dataclass(frozen=True, slots=True)
class _Seen:
    score: float
    reply: Reply
    truncated: bool


def _grams(head: str) -> tuple[list[str], list[int]]:
    """The lower-cased word 1-grams and 2-grams of a head (as `karma.rm.rule.word_ngrams` splits them), the
    2-grams as their 64-bit hash: a window holds fewer objects, and a collision among its ~10^5 bigrams has a
    chance of ~10^-9."""
    words = head.lower().split()
    return words, list(map(hash, itertools.pairwise(words)))


def _move(counts: Counter, keys: Sequence, sign: int) -> None:
    """Add (sign +1) or take away (-1) one occurrence of each key; a count that reaches 0 is deleted."""
    if sign > 0:
        counts.update(keys)
        return
    for key in keys:
        left = counts[key] - 1
        if left:
            counts[key] = left
        else:
            del counts[key]


class _Window:
    """One model's window and its running counts (n-gram occurrences, distinct digests). Under the lock."""

    def __init__(self, version: str, size: int):
        self.version = version
        self.items: deque[_Seen] = deque()
        self.size = size
        self.grams: dict[int, Counter] = {n: Counter() for n in _NS}
        self.totals: dict[int, int] = dict.fromkeys(_NS, 0)
        self.digests: Counter = Counter()

    def add(self, seen: _Seen) -> None:
        if len(self.items) == self.size:
            self._count(self.items.popleft(), -1)
        self.items.append(seen)
        self._count(seen, +1)

    def _count(self, seen: _Seen, sign: int) -> None:
        for n, grams in enumerate(_grams(seen.reply.head), start=1):
            _move(self.grams[n], grams, sign)
            self.totals[n] += sign * len(grams)
        _move(self.digests, [seen.reply.digest], sign)

    def stats(self, window: int) -> MonitorStats:
        items = self.items
        n = len(items)
        scores = [i.score for i in items]
        lengths = [float(i.reply.words) for i in items]
        mean = math.fsum(scores) / n if n else None
        std = math.sqrt(math.fsum((s - mean) ** 2 for s in scores) / n) if mean is not None else None
        distinct = {k: len(self.grams[k]) / self.totals[k] if self.totals[k] else None for k in _NS}
        return MonitorStats(
            version=self.version,
            window=window,
            n=n,
            score_mean=mean,
            score_std=std,
            length_mean=math.fsum(lengths) / n if n else None,
            score_length_corr=pearson(scores, lengths),
            distinct_1=distinct[1],
            distinct_2=distinct[2],
            duplicate_rate=1 - len(self.digests) / n if n else None,
            truncated_share=sum(i.truncated for i in items) / n if n else None,
        )


class ScoreMonitor:
    """Per model, the last `window` items of its current version (thread-safe; `window=0` records nothing)."""

    def __init__(self, window: int):
        self.window = window
        self._windows: dict[str, _Window] = {}
        self._lock = threading.Lock()
        self._recorder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="karma-monitor")

    def observe(
        self,
        model: str,
        version: str,
        responses: Sequence[Reply | str],
        scores: Sequence[float],
        truncated: Sequence[bool],
    ) -> Future | None:
        """Record scored items (in the recording thread; returns at once). Pass `summarize`d replies from
        the event loop: a plain string is summarised in the recording thread, which a read then waits for."""
        if not self.window:
            return None
        if not len(responses) == len(scores) == len(truncated):
            raise ValueError(
                f"observe: {len(responses)} responses, {len(scores)} scores, {len(truncated)} truncated flags"
            )
        seen = [(float(s), r, bool(t)) for r, s, t in zip(responses, scores, truncated, strict=True)]
        return self._recorder.submit(self._record, model, version, seen)

    def _record(self, model: str, version: str, seen: list[tuple[float, Reply | str, bool]]) -> None:
        items = [_Seen(s, r if isinstance(r, Reply) else summarize(r), t) for s, r, t in seen]
        with self._lock:
            win = self._windows.get(model)
            if win is None or win.version != version:
                win = self._windows[model] = _Window(version, self.window)
            for item in items[-self.window :]:
                win.add(item)

    def flush(self) -> None:
        """Wait until every item observed so far is recorded."""
        self._recorder.submit(lambda: None).result()

    def forget(self, model: str) -> None:
        self.flush()
        with self._lock:
            self._windows.pop(model, None)

    def stats(self, model: str) -> MonitorStats | None:
        self.flush()
        with self._lock:
            win = self._windows.get(model)
            return win.stats(self.window) if win is not None else None

    def all_stats(self) -> dict[str, MonitorStats]:
        self.flush()
        with self._lock:
            return {name: win.stats(self.window) for name, win in self._windows.items()}

    def kept_chars(self) -> int:
        """Characters of response text the monitor holds, over every model (≤ models × window × HEAD_CHARS)."""
        self.flush()
        with self._lock:
            return sum(len(i.reply.head) for win in self._windows.values() for i in win.items)


class MonitorCollector:
    """Prometheus collector: one gauge per figure, `karma_monitor_<figure>{model}` (NaN where undefined), and
    `karma_monitor_items{model}`, read when scraped (O(window) each, see `ScoreMonitor`)."""

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
