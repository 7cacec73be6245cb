"""Prometheus metrics of one app, on its own `CollectorRegistry` (several apps in one process do not clash)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Summary, generate_latest
from prometheus_client.registry import Collector

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_TOKENS = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)


class Metrics:
    """Request metrics (filled by the HTTP middleware) and engine metrics (filled by the batching workers)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "karma_requests",
            "HTTP requests by route template and status",
            ["route", "method", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "karma_request_duration_seconds", "HTTP request latency", ["route"], buckets=_LATENCY, registry=r
        )
        self.items = Counter("karma_items_scored", "items scored", ["model"], registry=r)
        self.truncated = Counter(
            "karma_items_truncated", "items whose context was cut", ["model"], registry=r
        )
        self.tokens = Counter(
            "karma_tokens", "input tokens forwarded (without padding)", ["model"], registry=r
        )
        self.queue_depth = Gauge("karma_queue_depth", "items waiting for a batch", ["model"], registry=r)
        self.batch_size = Histogram(
            "karma_batch_size", "items per forward", ["model"], buckets=_SIZES, registry=r
        )
        self.batch_tokens = Histogram(
            "karma_batch_tokens", "padded tokens per forward", ["model"], buckets=_TOKENS, registry=r
        )
        self.forward_seconds = Histogram(
            "karma_forward_seconds", "forward time per batch", ["model"], buckets=_LATENCY, registry=r
        )
        self.queue_seconds = Histogram(
            "karma_queue_wait_seconds",
            "time an item waits before its forward",
            ["model"],
            buckets=_LATENCY,
            registry=r,
        )
        self.model_info = Gauge(
            "karma_model_info", "loaded models (value 1)", ["model", "version"], registry=r
        )
        self.cache_hits = Counter(
            "karma_cache_hits",
            "items answered without a forward of their own (cached, or repeated in the request)",
            ["model"],
            registry=r,
        )
        self.cache_misses = Counter(
            "karma_cache_misses", "distinct uncached items sent to a forward", ["model"], registry=r
        )
        self.cache_entries = Gauge("karma_cache_entries", "scores held in the cache", ["model"], registry=r)
        self.component_values = Summary(
            "karma_component_value",
            "values of each component of a composed reward, unweighted (_count: items, _sum / _count: mean)",
            ["model", "component"],
            registry=r,
        )

    # called by engine workers (thread-safe: prometheus_client metrics lock internally)
    def observe_batch(
        self, model: str, n_items: int, n_tokens: int, padded_tokens: int, seconds: float
    ) -> None:
        self.batch_size.labels(model).observe(n_items)
        self.batch_tokens.labels(model).observe(padded_tokens)
        self.tokens.labels(model).inc(n_tokens)
        self.items.labels(model).inc(n_items)
        self.forward_seconds.labels(model).observe(seconds)

    def observe_queue_wait(self, model: str, seconds: float) -> None:
        self.queue_seconds.labels(model).observe(seconds)

    def set_queue_depth(self, model: str, depth: int) -> None:
        self.queue_depth.labels(model).set(depth)

    def observe_truncated(self, model: str, n_items: int) -> None:
        self.truncated.labels(model).inc(n_items)

    def observe_cache(self, model: str, hits: int, misses: int, size: int) -> None:
        self.cache_hits.labels(model).inc(hits)
        self.cache_misses.labels(model).inc(misses)
        self.cache_entries.labels(model).set(size)

    def observe_components(self, model: str, values: Mapping[str, Sequence[float]]) -> None:
        for component, vals in values.items():
            summary = self.component_values.labels(model, component)
            for v in vals:
                summary.observe(v)

    def watch(self, collector: Collector) -> None:
        """Export a collector's figures (the score monitor's gauges) with this app's metrics."""
        self.registry.register(collector)

    def model_loaded(self, model: str, version: str, loaded: bool) -> None:
        if loaded:
            self.model_info.labels(model, version).set(1)
        else:
            self.model_info.remove(model, version)

    def render(self) -> bytes:
        return generate_latest(self.registry)
