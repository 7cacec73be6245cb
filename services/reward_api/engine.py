"""The scoring engine: cross-request dynamic batching over `karma.rm.model.RewardModel`, and the model registry
(load, hot swap, unload). Imports nothing from FastAPI; the HTTP layer only encodes, submits and awaits.

* `BatchingWorker` — one thread per loaded model. Requests submit already-encoded items; the worker takes
  queued items in arrival order up to a token budget (`max_batch_tokens`), waiting at most `max_wait_ms` for
  a batch to fill, sorts them by length to cut padding, splits them into batches whose *padded* size stays
  within the budget, runs `RewardModel.forward` (`torch.inference_mode`) and resolves each request's future.
  A request's items may land in different batches; a score does not depend on its batch (right padding +
  attention mask), within float tolerance.
  Admission is by time: the worker measures its throughput (tokens/s, a moving average over batches) and
  refuses a request (`QueueBusyError`, 429 + Retry-After) when the work queued ahead of it would keep it
  waiting longer than `max_queue_wait_s`; `max_queue_items` stays as a hard cap. Work whose request was
  cancelled (the client went away) leaves the queue's accounting at once and is never forwarded.
* `ModelHandle` — a loaded model + its worker + a lease count + a bounded score cache. A request holds a
  lease from lookup to reply. Items already scored by this version (`ScoreCache`, keyed on a hash of context,
  response, metadata and the truncate flag) are answered without a forward; duplicates inside one request
  are forwarded once.
* `ComposedHandle` — a composed reward (`karma.rm.compose`): Σ weight · component, its model components
  scored through their own (current) handles, so shared batches, admission and caches apply; its version
  hashes the definition and the component versions.
* `ModelRegistry` — name → handle. `swap` loads the new folder beside the old one, switches atomically under
  the registry lock, then (in the background) waits for the old handle's leases to end, drains its worker and
  frees it: no request fails and every reply names the version that produced it.

Every limit comes from one `karma.protocol.Limits` (built by the service's `Settings.limits()`): the engine has
no defaults of its own.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

if TYPE_CHECKING:
    from karma.protocol import Limits
    from karma.rm.compose import CompositionSpec
    from karma.rm.model import Encoded, RewardModel, RMInput
    from services.reward_api.monitor import Reply, ScoreMonitor

    #: what a model is loaded from: a folder, or (a composed reward given to the admin API) its definition
    Source = Path | CompositionSpec

log = logging.getLogger(__name__)


class EngineError(RuntimeError):
    """Base of the engine's errors (the HTTP layer maps each to a status)."""


class QueueFullError(EngineError):
    """Refused at admission (429). `retry_after` (seconds) is the estimated time for the queue to drain to
    its bound, when the throughput is known."""

    retry_after: float | None = None

    def __init__(self, model: str, depth: int, limit: int, wanted: int):
        super().__init__(
            f"model {model!r} is overloaded: {depth} items queued, {wanted} more would exceed max_queue_items={limit}"
        )


class QueueBusyError(QueueFullError):
    """The work ahead of a request — queued, in the running batch, or (`tokenising`) admitted but still waiting
    for the model's tokenising thread — plus the time the request has already waited for that thread
    (`waited_s`) would exceed `max_queue_wait_s`. `retry_after` is when the work ahead would be back under the
    bound for a new request."""

    def __init__(
        self,
        model: str,
        wait_s: float,
        limit_s: float,
        depth: int,
        *,
        waited_s: float = 0.0,
        tokenising: int = 0,
    ):
        after = f"after {waited_s:.1f}s waiting to be tokenised, " if waited_s else ""
        still = f" ({tokenising} of them still to tokenise)" if tokenising else ""
        EngineError.__init__(
            self,
            f"model {model!r} is overloaded: {after}the {depth} items queued ahead{still} need an estimated "
            f"{wait_s:.1f}s, more than max_queue_wait_s={limit_s:g}",
        )
        self.retry_after = max(wait_s - limit_s, 0.0)


class WorkerClosedError(EngineError):
    pass


class UnknownModelError(EngineError):
    def __init__(self, name: str, known: Sequence[str]):
        self.name, self.known = name, list(known)
        super().__init__(f"unknown model {name!r}; known models: {', '.join(self.known) or 'none'}")


class ModelNotReadyError(EngineError):
    pass


class ModelExistsError(EngineError):
    pass


class CompositionError(ValueError):
    """A composed reward that cannot be built: a component that is not served, or is itself composed. Like any
    folder that does not load, it fails the model at start and is a 422 `model_load` on the admin routes."""


class ItemTooLongError(EngineError):
    """An item over the model's max_length with truncate=False (the HTTP layer answers 422)."""

    def __init__(self, index: int, reason: str):
        super().__init__(f"item {index}: {reason} (send truncate=true to cut the context from the left)")


class Observer(Protocol):
    """What the engine reports (`core.metrics.Metrics` implements it)."""

    def observe_batch(
        self, model: str, n_items: int, n_tokens: int, padded_tokens: int, seconds: float
    ) -> None: ...
    def observe_queue_wait(self, model: str, seconds: float) -> None: ...
    def set_queue_depth(self, model: str, depth: int) -> None: ...
    def model_loaded(self, model: str, version: str, loaded: bool) -> None: ...
    def observe_truncated(self, model: str, n_items: int) -> None: ...
    def observe_cache(self, model: str, hits: int, misses: int, size: int) -> None: ...
    def observe_components(self, model: str, values: Mapping[str, Sequence[float]]) -> None: ...


class _NullObserver:
    def observe_batch(self, *a, **k) -> None: ...
    def observe_queue_wait(self, *a, **k) -> None: ...
    def set_queue_depth(self, *a, **k) -> None: ...
    def model_loaded(self, *a, **k) -> None: ...
    def observe_truncated(self, *a, **k) -> None: ...
    def observe_cache(self, *a, **k) -> None: ...
    def observe_components(self, *a, **k) -> None: ...


@dataclass
class Scored:
    """One request's result: a float score, a truncated flag per item, the tokens they took, the version that
    scored every item, and (composed rewards; a plain model is its own one component) each component's values."""

    scores: list[float]
    truncated: list[bool]
    tokens: int
    version: str = ""
    components: dict[str, list[float]] | None = None


def group_zscore(scores: Sequence[float], groups: Sequence[object]) -> list[float]:
    """Group normalisation (GRPO / RLOO style): within the items sharing a group key (the context),
    `z_i = (s_i - mean_g) / std_g` with the population std (ddof = 0). A group whose scores are all equal —
    a group of one item included — has std 0 and gets z = 0 for every item (no signal, no division by 0)."""
    members: dict[object, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    out = [0.0] * len(scores)
    for idx in members.values():
        vals = [float(scores[i]) for i in idx]
        mean = math.fsum(vals) / len(vals)
        std = math.sqrt(math.fsum((v - mean) ** 2 for v in vals) / len(vals))
        if std > 1e-12 * max(1.0, abs(mean)):
            for i, v in zip(idx, vals, strict=True):
                out[i] = (v - mean) / std
    return out


# --------------------------------------------------------------------------------------------- cache
def item_key(item: RMInput, truncate: bool) -> bytes:
    """What identifies an item's score under one model version: a 16-byte hash of (context, response, metadata,
    truncate) — so the cache holds 16 bytes a key, not the texts."""
    text = json.dumps([item.context, item.response, item.metadata, truncate], sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


@dataclass(frozen=True, slots=True)
class _Cached:
    score: float
    truncated: bool
    tokens: int


class ScoreCache:
    """A bounded LRU of recent raw scores of one model version: item key → (score, truncated, tokens).
    `max_items=0` turns it off (duplicates inside one request are still forwarded once). Thread-safe."""

    def __init__(self, max_items: int):
        self.max_items = max_items
        self._data: OrderedDict[bytes, _Cached] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._data)

    def get_many(self, keys: Sequence[bytes]) -> dict[bytes, _Cached]:
        found: dict[bytes, _Cached] = {}
        if not self.max_items:
            return found
        with self._lock:
            for key in keys:
                hit = self._data.get(key)
                if hit is not None:
                    self._data.move_to_end(key)
                    found[key] = hit
        return found

    def put_many(self, entries: Mapping[bytes, _Cached]) -> None:
        if not self.max_items:
            return
        with self._lock:
            for key, value in entries.items():
                self._data[key] = value
                self._data.move_to_end(key)
            while len(self._data) > self.max_items:
                self._data.popitem(last=False)


# --------------------------------------------------------------------------------------------- batching
@dataclass(eq=False)
class _Job:
    n: int
    future: Future
    scores: list[float] = field(default_factory=list)
    remaining: int = 0
    queued_items: int = 0  # of this job's items, how many are still in the queue
    queued_tokens: int = 0
    dropped: bool = False  # cancelled: its queued items no longer count

    def __post_init__(self) -> None:
        self.scores = [0.0] * self.n
        self.remaining = self.n


@dataclass(eq=False, slots=True)
class _Slot:
    job: _Job
    index: int
    item: Encoded
    enqueued: float


def plan_batches(
    lengths: Sequence[int], max_batch_tokens: int, padding_tolerance: float = math.inf
) -> list[list[int]]:
    """Split items (by index) into length-sorted batches whose padded size (n × longest) fits the budget and
    whose longest item is at most `padding_tolerance` × longer than its shortest (little compute on padding).

    An item longer than the budget on its own still gets a batch of one.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:  # ascending: the newest item is the longest of its batch
        too_big = (len(current) + 1) * lengths[i] > max_batch_tokens
        too_uneven = lengths[i] > (1 + padding_tolerance) * lengths[current[0]] if current else False
        if current and (too_big or too_uneven):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


class BatchingWorker:
    """One thread that forwards queued items of one model in dynamic batches."""

    def __init__(self, model: RewardModel, *, name: str, limits: Limits, observer: Observer | None = None):
        self.model = model
        self.max_queue_wait_s = limits.max_queue_wait_s
        self.padding_tolerance = limits.padding_tolerance
        self.name = name
        self.max_batch_tokens = limits.max_batch_tokens
        self.max_wait_s = limits.max_wait_ms / 1000.0
        self.max_queue_items = limits.max_queue_items
        self.observer = observer or _NullObserver()
        self._queue: deque[_Slot] = deque()
        self._queued_tokens = 0  # of live (not cancelled) items
        self._queued_items = 0
        self._busy_tokens = 0  # taken from the queue, not yet forwarded
        self.tokens_per_s: float | None = None  # measured throughput (moving average over batches)
        self.cancelled_items = 0
        self._trimmed_at = 0.0
        self._cond = threading.Condition()
        self._closed = False
        self.batches_run = 0
        self._thread = threading.Thread(target=self._run, name=f"karma-batcher-{name}", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        """Items waiting (cancelled ones excluded)."""
        return self._queued_items

    def estimated_wait(self) -> float:
        """Seconds the work queued and in flight needs at the measured throughput (0 before any batch ran)."""
        rate = self.tokens_per_s
        return (self._queued_tokens + self._busy_tokens) / rate if rate else 0.0

    def admit(
        self, n_items: int = 0, *, waited_s: float = 0.0, ahead_s: float = 0.0, ahead_items: int = 0
    ) -> None:
        """Raise QueueBusyError / QueueFullError if a request of `n_items` would be refused now (a cheap check
        before encoding; `submit` checks again). `waited_s`: how long the request has already waited (for the
        tokenising thread); `ahead_items` / `ahead_s`: work admitted before it that is not queued here yet
        (still to tokenise) and its estimated seconds — it will be forwarded first."""
        with self._cond:
            self._check_admission(n_items, waited_s, ahead_s, ahead_items)

    def _check_admission(
        self, n_items: int, waited_s: float = 0.0, ahead_s: float = 0.0, ahead_items: int = 0
    ) -> None:  # under self._cond
        if self._queued_items + n_items > self.max_queue_items:
            exc = QueueFullError(self.name, self._queued_items, self.max_queue_items, n_items)
            exc.retry_after = self.estimated_wait() or None
            raise exc
        # a request alone (nothing queued or waiting ahead, no time lost yet) is never refused for the running batch
        if self.max_queue_wait_s is not None and (self._queued_items or ahead_items or waited_s > 0):
            wait = self.estimated_wait() + ahead_s
            if waited_s + wait > self.max_queue_wait_s:
                raise QueueBusyError(
                    self.name,
                    wait,
                    self.max_queue_wait_s,
                    self._queued_items + ahead_items,
                    waited_s=waited_s,
                    tokenising=ahead_items,
                )

    def submit(self, items: Sequence[Encoded], *, waited_s: float = 0.0) -> Future:
        """Queue items; the future resolves to their scores in order. Cancelling the future drops its queued
        items. `waited_s`: how long the request already waited before its own work (it counts against
        `max_queue_wait_s`). Raises QueueBusyError / QueueFullError / WorkerClosedError."""
        fut: Future = Future()
        if not items:
            fut.set_result([])
            return fut
        job = _Job(len(items), fut)
        now = time.perf_counter()
        with self._cond:
            if self._closed:
                raise WorkerClosedError(f"model {self.name!r} is shutting down")
            self._check_admission(len(items), waited_s)
            for i, item in enumerate(items):
                self._queue.append(_Slot(job, i, item, now))
            job.queued_items, job.queued_tokens = len(items), sum(len(it) for it in items)
            self._queued_items += job.queued_items
            self._queued_tokens += job.queued_tokens
            self.observer.set_queue_depth(self.name, self._queued_items)
            self._cond.notify()
        fut.add_done_callback(lambda f: f.cancelled() and self._drop(job))
        return fut

    def _drop(self, job: _Job) -> None:
        """A cancelled job's queued items stop counting now; `_take` discards their slots when it meets them."""
        with self._cond:
            if job.dropped:
                return
            job.dropped = True
            self._queued_items -= job.queued_items
            self._queued_tokens -= job.queued_tokens
            self.cancelled_items += job.queued_items
            if job.queued_items:
                log.info(
                    "model %s: dropped %d queued items of a cancelled request", self.name, job.queued_items
                )
            job.queued_items = job.queued_tokens = 0
            self.observer.set_queue_depth(self.name, self._queued_items)

    def close(self, timeout: float | None = None) -> None:
        """Refuse new items, finish the queued ones, stop the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)

    # -------------------------------------------------------------------------------- worker thread
    def _take(self) -> list[_Slot] | None:
        """Block until a batch window is ready; pop it (FIFO, up to the token budget). None = stop."""
        with self._cond:
            while not self._queue:
                if self._closed:
                    return None
                self._cond.wait()
            deadline = self._queue[0].enqueued + self.max_wait_s
            while self._queued_tokens < self.max_batch_tokens and not self._closed:
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                self._cond.wait(left)
            taken: list[_Slot] = []
            tokens = 0
            while self._queue:
                slot = self._queue[0]
                job = slot.job
                if job.dropped or job.future.done():  # cancelled (client went away) or already failed
                    self._queue.popleft()
                    if not job.dropped:  # failed: still counted
                        self._unqueue(job, len(slot.item))
                    continue
                if taken and tokens + len(slot.item) > self.max_batch_tokens:
                    break
                self._queue.popleft()
                self._unqueue(job, len(slot.item))
                taken.append(slot)
                tokens += len(slot.item)
            self._busy_tokens = tokens
            self.observer.set_queue_depth(self.name, self._queued_items)
            return taken

    def _unqueue(self, job: _Job, n_tokens: int) -> None:  # under self._cond
        job.queued_items -= 1
        job.queued_tokens -= n_tokens
        self._queued_items -= 1
        self._queued_tokens -= n_tokens

    def _run(self) -> None:
        while (taken := self._take()) is not None:
            if not taken:
                continue
            now = time.perf_counter()
            for slot in taken:
                self.observer.observe_queue_wait(self.name, now - slot.enqueued)
            for idx in plan_batches(
                [len(s.item) for s in taken], self.max_batch_tokens, self.padding_tolerance
            ):
                self._forward([taken[i] for i in idx])
            if not self._queued_items and time.monotonic() - self._trimmed_at > 2.0:
                self._trimmed_at = time.monotonic()
                _release_free_memory()

    def _forward(self, batch: list[_Slot]) -> None:
        t0 = time.perf_counter()
        lengths = [len(s.item) for s in batch]
        try:
            scores = self.model.forward([s.item for s in batch])
        except Exception as exc:  # delivered to every waiting request, which answers 500
            log.exception("forward failed on model %s (batch of %d)", self.name, len(batch))
            for slot in batch:
                _settle(slot.job.future, exc=exc)
            return
        finally:
            with self._cond:
                self._busy_tokens = max(self._busy_tokens - sum(lengths), 0)
        seconds = time.perf_counter() - t0
        with self._cond:
            rate = sum(lengths) / max(seconds, 1e-6)
            self.tokens_per_s = rate if self.tokens_per_s is None else 0.7 * self.tokens_per_s + 0.3 * rate
        self.batches_run += 1
        self.observer.observe_batch(self.name, len(batch), sum(lengths), len(batch) * max(lengths), seconds)
        for slot, score in zip(batch, scores, strict=True):
            job = slot.job
            job.scores[slot.index] = score
            job.remaining -= 1
            if job.remaining == 0:
                _settle(job.future, result=job.scores)


def _release_free_memory() -> None:
    """Give the heap's free pages back to the OS (glibc `malloc_trim`) when a queue runs dry, so the resident
    memory a burst's request bodies and activations took comes back down; a no-op elsewhere."""
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None


def _summaries(monitor: ScoreMonitor | None, items: Sequence[RMInput]) -> list[Reply] | None:
    """The monitor's bounded summary of each item's response (O(text): in a thread, never on the event loop);
    None when nothing is monitored."""
    if monitor is None or not monitor.window:
        return None
    from services.reward_api.monitor import summarize

    return [summarize(str(it.response)) for it in items]


@dataclass(eq=False, slots=True)
class _Ticket:
    """A request between its admission and its submit to the worker: its items count as still to tokenise."""

    n: int
    arrived: float  # the handle's clock
    pending: bool = True


def _cancel_submitted(prepared: Future) -> None:
    """Done-callback of a cancelled request's preparation: cancel what it submitted (its items leave the queue)."""
    if not prepared.cancelled() and prepared.exception() is None and (submitted := prepared.result()[4]):
        submitted.cancel()


def _ema(old: float | None, new: float, weight: float = 0.3) -> float:
    return new if old is None else (1 - weight) * old + weight * new


def _settle(fut: Future, result=None, exc: BaseException | None = None) -> None:
    if fut.done():
        return
    with contextlib.suppress(InvalidStateError):  # cancelled between the check and the set
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)


# --------------------------------------------------------------------------------------------- models
def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype: str, device: str) -> str:
    """auto: float32 on CPU (bf16 matmuls are slow there and change scores), bfloat16 on CUDA."""
    if dtype != "auto":
        return dtype
    if device.startswith("cuda"):
        import torch

        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "float32"


class _Leased:
    """The lease count of a handle: requests hold a lease from lookup to reply; `retire` stops new leases and
    `_drained` is set once the current ones have ended."""

    name: str
    version: str

    def _init_leases(self) -> None:
        self._leases = 0
        self._retired = False
        self._lock = threading.Lock()
        self._drained = threading.Event()
        self.closed = threading.Event()
        self.loaded_at = time.time()

    @property
    def leases(self) -> int:
        return self._leases

    def _acquire(self) -> None:  # under the registry lock
        with self._lock:
            if self._retired:
                raise WorkerClosedError(f"model {self.name!r} version {self.version} is retired")
            self._leases += 1

    def _release(self) -> None:
        with self._lock:
            self._leases -= 1
            if self._retired and self._leases == 0:
                self._drained.set()

    def retire(self) -> None:
        """No new leases; `close()` then waits for the current ones."""
        with self._lock:
            self._retired = True
            if self._leases == 0:
                self._drained.set()


class ModelHandle(_Leased):
    """A loaded reward model, its batching worker, its tokenising thread, its score cache, and the leases of
    the requests using it. The model's tokenizer is serialised by a lock, so one tokenising thread per model
    is enough.

    `await handle.score(items)` is the one scoring path of every route: cache, admission, encoding off the
    event loop, the shared batch, normalisation.

    Admission counts every wait, so an admitted request waits at most about `max_queue_wait_s` before its own
    compute: at arrival, the work queued in the worker plus the items admitted before it and still waiting for
    the tokenising thread (at the measured tokens per item); when its turn to tokenise comes, the time it
    waited for that thread plus the work queued then (refused there, nothing is tokenised); on submit (from
    the tokenising thread, so the next request's check sees this one's work), the same again. `clock`
    (seconds) is injectable for tests."""

    def __init__(
        self,
        name: str,
        path: Path,
        model: RewardModel,
        worker: BatchingWorker,
        observer: Observer | None = None,
        *,
        cache_items: int = 0,
        monitor: ScoreMonitor | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ):
        self.name = name
        self.clock = clock
        self.tokenising = 0  # items admitted, not yet submitted to the worker (nor refused)
        self._count_lock = threading.Lock()
        self.tokens_per_item: float | None = None  # measured, a moving average over encoded requests
        self.observer = observer or worker.observer
        self.path = path
        self.model = model
        self.worker = worker
        self.encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"karma-encode-{name}")
        self.version = model.version
        self.cache = ScoreCache(cache_items)  # per handle, so per model version
        self.monitor = monitor
        self._init_leases()

    async def score(
        self, items: Sequence[RMInput], *, truncate: bool = True, normalize: bool = False
    ) -> Scored:
        """Score `items` in the model's shared batches; items in the cache (or repeated in this request) cost
        no forward of their own. Raises QueueBusyError / QueueFullError (refused before any work),
        ItemTooLongError (truncate=False), WorkerClosedError; cancelling the awaiting task drops the request's
        queued items."""
        import asyncio

        ticket = _Ticket(len(items), self.clock())
        # refuse before encoding when the work ahead (queued, or still to tokenise) is already too long
        self.worker.admit(len(items), ahead_s=self._tokenising_s(), ahead_items=self.tokenising)
        with self._count_lock:
            self.tokenising += ticket.n
        prepared = self.encoder.submit(self._prepare, items, truncate, ticket)
        try:
            keys, known, todo, replies, submitted = await asyncio.wrap_future(prepared)
        except asyncio.CancelledError:  # if it was already tokenising, its items leave the queue once queued
            prepared.add_done_callback(_cancel_submitted)
            raise
        finally:
            self._tokenised(ticket)
        if submitted is not None:
            raw = await asyncio.wrap_future(submitted)
            fresh = {k: _Cached(float(s), e.truncated, len(e)) for (k, e), s in zip(todo, raw, strict=True)}
            self.cache.put_many(fresh)
            known.update(fresh)
        self.observer.observe_cache(self.name, len(items) - len(todo), len(todo), len(self.cache))
        results = [known[k] for k in keys]
        scores = [r.score for r in results]
        truncated = [r.truncated for r in results]
        if any(truncated):
            self.observer.observe_truncated(self.name, sum(truncated))
        if normalize:
            scores = [float(s) for s in self.model.normalize(scores)]
        if replies is not None:
            self.monitor.observe(self.name, self.version, replies, scores, truncated)
        return Scored(scores, truncated, sum(r.tokens for r in results), self.version, {self.name: scores})

    def _tokenising_s(self) -> float:
        """Estimated seconds of forward of the items admitted but still to tokenise, at the measured tokens per
        item and throughput (0 until both are measured). Their tokenising time is left out: a first, cold
        measurement of it overestimates, and an underestimate here only moves the refusal to the request's
        turn to tokenise, where the time it waited is known."""
        per_item, rate = self.tokens_per_item, self.worker.tokens_per_s
        if not self.tokenising or per_item is None or not rate:
            return 0.0
        return self.tokenising * per_item / rate

    def _tokenised(self, ticket: _Ticket) -> None:
        """The ticket's items stop counting as still to tokenise (once: submitted, refused, failed or cancelled)."""
        with self._count_lock:
            if ticket.pending:
                ticket.pending = False
                self.tokenising -= ticket.n

    def _prepare(
        self, items: Sequence[RMInput], truncate: bool, ticket: _Ticket
    ) -> tuple[
        list[bytes], dict[bytes, _Cached], list[tuple[bytes, Encoded]], list[Reply] | None, Future | None
    ]:
        """(each item's key, the cached results, the distinct uncached items encoded, the monitor's summary of
        each response, the worker's future of their scores) — in the encoder thread, which also submits, so the
        next request's checks see this one's work queued. Refuses (QueueBusyError) before tokenising when the
        time the request waited for this thread plus the work queued now exceeds the bound."""
        from karma.rm.model import InputTooLongError

        try:
            waited = max(self.clock() - ticket.arrived, 0.0)
            keys = [item_key(it, truncate) for it in items]
            known = self.cache.get_many(keys)
            fresh: list[int] = []  # distinct uncached items (a repeat inside the request is forwarded once)
            seen: set[bytes] = set()
            for i, key in enumerate(keys):
                if key not in known and key not in seen:
                    seen.add(key)
                    fresh.append(i)
            if fresh:
                self.worker.admit(len(fresh), waited_s=waited)
            todo: list[tuple[bytes, Encoded]] = []
            for i in fresh:
                try:
                    todo.append((keys[i], self.model.encode(items[i], truncate=truncate)))
                except InputTooLongError as exc:
                    raise ItemTooLongError(i, str(exc)) from None
            submitted = None
            if todo:
                self.tokens_per_item = _ema(self.tokens_per_item, sum(len(e) for _, e in todo) / len(todo))
                submitted = self.worker.submit([e for _, e in todo], waited_s=waited)
        finally:
            self._tokenised(ticket)
        return keys, known, todo, _summaries(self.monitor, items), submitted

    def close(self, timeout: float | None = None) -> None:
        """Wait for in-flight requests, drain the worker, free the weights."""
        self.retire()
        self._drained.wait(timeout)
        self.encoder.shutdown(wait=True)
        self.worker.close()
        device = str(self.model.device)
        self.worker.model = None  # type: ignore[assignment]
        self.model = None  # type: ignore[assignment]
        gc.collect()
        if device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()
        self.closed.set()
        log.info("model %s version %s unloaded", self.name, self.version)


# --------------------------------------------------------------------------------------------- composed
VARIANT_ORDER = ("response", "context", "full")  # what a composition reads: the most its components read


@dataclass
class ComposedConfig:
    """What `/info` reports of a composed model (the fields a `KarmaRMConfig` has there)."""

    variant: str
    backbone: str
    objective: str = "compose"
    template_version: int = 0


class ComposedModel:
    """The `model` of a composed handle, as `/info` reads it (no weights: its components have them)."""

    dtype = "float64"
    device = "cpu"

    def __init__(self, spec: CompositionSpec, registry: ModelRegistry):
        self.spec = spec
        self._registry = registry

    @property
    def config(self) -> ComposedConfig:
        return ComposedConfig(
            variant=self._registry.composition_variant(self.spec),
            backbone=f"compose:{self.spec.describe()}",
        )

    @property
    def max_length(self) -> int:
        lengths = [self._registry.get(m).model.max_length for m in self.spec.models]
        return max(lengths, default=0)


class ComposedHandle(_Leased):
    """A composed reward: `score = Σ weight_i · component_i`. Model components are looked up by name at every
    request (a hot swap of a component takes effect at once) and scored through their own handles, each
    under a lease held for the request; rule components run in a thread. `version` hashes the definition and
    the component versions that scored the reply."""

    def __init__(self, name: str, path: Path | None, spec: CompositionSpec, registry: ModelRegistry):
        from karma.rm.compose import ModelComponent

        self.name = name
        self.path = path
        self.spec = spec
        self.registry = registry
        self.model = ComposedModel(spec, registry)
        self.observer = registry.observer
        self.monitor = registry.monitor
        self._model_parts = [c for c in spec.components if isinstance(c, ModelComponent)]
        self._rule_parts = [c for c in spec.components if not isinstance(c, ModelComponent)]
        self._init_leases()

    @property
    def version(self) -> str:  # type: ignore[override]
        """The version a request would get now (the current component versions). Reads the registry without
        its lock (a dict read), so it is safe where the lock is held (the retired-lease error message)."""
        return self.spec.served_version(self.registry.current_versions(self.spec.models))

    async def score(
        self, items: Sequence[RMInput], *, truncate: bool = True, normalize: bool = False
    ) -> Scored:
        """Σ weight · component per item; `normalize` standardises each model component with its own saved
        statistics before weighting (rules are never rescaled)."""
        import asyncio

        with contextlib.ExitStack() as stack:
            handles = {
                m: stack.enter_context(self.registry.lease(m)) for m in dict.fromkeys(self.spec.models)
            }
            tasks = [
                asyncio.ensure_future(h.score(items, truncate=truncate, normalize=normalize))
                for h in handles.values()
            ]
            if self._rule_parts:
                tasks.append(asyncio.ensure_future(asyncio.to_thread(self._rule_values, items)))
            if self.monitor is not None and self.monitor.window:
                tasks.append(asyncio.ensure_future(asyncio.to_thread(_summaries, self.monitor, items)))
            try:
                results = await asyncio.gather(*tasks)
            except BaseException:
                for t in tasks:
                    t.cancel()
                raise
            by_model: dict[str, Scored] = dict(zip(handles, results, strict=False))
            version = self.spec.served_version({m: h.version for m, h in handles.items()})
        components: dict[str, list[float]] = {c.label: by_model[c.model].scores for c in self._model_parts}
        replies = results.pop() if self.monitor is not None and self.monitor.window else None
        if self._rule_parts:
            components.update(results[-1])
        ordered = {c.label: components[c.label] for c in self.spec.components}
        total = [
            math.fsum(c.weight * ordered[c.label][i] for c in self.spec.components) for i in range(len(items))
        ]
        truncated = [any(s.truncated[i] for s in by_model.values()) for i in range(len(items))]
        tokens = sum(s.tokens for s in by_model.values())
        self.observer.observe_components(self.name, ordered)
        if replies is not None:
            self.monitor.observe(self.name, version, replies, total, truncated)
        return Scored(total, truncated, tokens, version, ordered)

    def _rule_values(self, items: Sequence[RMInput]) -> dict[str, list[float]]:
        return {c.label: [c.rule.value(str(it.response)) for it in items] for c in self._rule_parts}

    def close(self, timeout: float | None = None) -> None:
        """Wait for in-flight requests (the components are models of their own and stay)."""
        self.retire()
        self._drained.wait(timeout)
        self.closed.set()
        log.info("composed model %s unloaded", self.name)


Handle = ModelHandle | ComposedHandle
Status = Literal["loading", "ready", "failed"]


class ModelRegistry:
    """name → handle, with atomic hot swap. Blocking methods (load/add/swap/remove) belong in a thread.

    `limits` (from `Settings.limits()`) sets every worker's batching and admission, the cache size and the
    monitor window; `monitor`, if given, records what every model scores."""

    def __init__(
        self,
        limits: Limits,
        *,
        device: str,
        dtype: str,
        observer: Observer | None = None,
        monitor: ScoreMonitor | None = None,
    ):
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.limits = limits
        self.observer = observer or _NullObserver()
        self.monitor = monitor
        self.default: str | None = None
        self._handles: dict[str, Handle] = {}
        self.status: dict[str, Status] = {}
        self.errors: dict[str, str] = {}
        self._lock = threading.Lock()
        self._admin_lock = threading.Lock()  # one load / swap / remove at a time
        self._retiring: list[threading.Thread] = []

    # ------------------------------------------------------------------------------------ lookup
    def names(self) -> list[str]:
        return list(self.status)

    def handles(self) -> list[Handle]:
        with self._lock:
            return list(self._handles.values())

    def get(self, name: str | None = None) -> Handle:
        name = self.default if name is None else name
        with self._lock:
            return self._lookup(name)

    def _lookup(self, name: str | None) -> Handle:
        if name is None:
            raise ModelNotReadyError("no model is configured")
        handle = self._handles.get(name)
        if handle is None:
            state = self.status.get(name)
            if state == "loading":
                raise ModelNotReadyError(f"model {name!r} is still loading")
            if state == "failed":
                raise ModelNotReadyError(f"model {name!r} failed to load: {self.errors.get(name, '')}")
            raise UnknownModelError(name, self.names())
        return handle

    @contextmanager
    def lease(self, name: str | None = None) -> Iterator[Handle]:
        """The current handle of `name` (default model if None), kept alive until the block ends."""
        with self._lock:
            handle = self._lookup(self.default if name is None else name)
            handle._acquire()
        try:
            yield handle
        finally:
            handle._release()

    @property
    def ready(self) -> bool:
        return bool(self.status) and all(s == "ready" for s in self.status.values())

    def current_versions(self, names: Sequence[str]) -> dict[str, str]:
        """The served version of each name ("?" for one not served), without taking the registry lock."""
        handles = self._handles
        return {n: h.version if (h := handles.get(n)) is not None else "?" for n in names}

    def dependents(self, name: str) -> list[str]:
        """The composed models that read model `name`."""
        with self._lock:
            return [
                h.name
                for h in self._handles.values()
                if isinstance(h, ComposedHandle) and name in h.spec.models
            ]

    # ------------------------------------------------------------------------------------ loading
    def _build(self, name: str, path: Source) -> Handle:
        from karma.rm.compose import CompositionSpec, is_composition
        from karma.rm.model import RewardModel

        if isinstance(path, CompositionSpec):
            return self._build_composed(name, None, path)
        if is_composition(path):
            return self._build_composed(name, Path(path), CompositionSpec.load(path))
        t0 = time.perf_counter()
        model = RewardModel.load(
            path, device=self.device, dtype=None if self.dtype == "float32" else self.dtype
        )
        worker = BatchingWorker(model, name=name, limits=self.limits, observer=self.observer)
        log.info(
            "loaded model %s (version %s) from %s in %.1fs",
            name,
            model.version,
            path,
            time.perf_counter() - t0,
        )
        self.observer.model_loaded(name, model.version, True)
        return ModelHandle(
            name,
            Path(path),
            model,
            worker,
            self.observer,
            cache_items=self.limits.score_cache_items,
            monitor=self.monitor,
        )

    def _components(self, name: str, spec: CompositionSpec) -> dict[str, Handle]:
        """The served handles of a composition's model components; CompositionError naming what is wrong."""
        out: dict[str, Handle] = {}
        for model in spec.models:
            if model == name:
                raise CompositionError(f"composed model {name!r} cannot be a component of itself")
            try:
                handle = self.get(model)
            except EngineError as exc:
                served = ", ".join(n for n, s in self.status.items() if s == "ready" and n != name) or "none"
                raise CompositionError(
                    f"composed model {name!r}: component model {model!r} is not served ({exc}; served: {served})"
                ) from None
            if isinstance(handle, ComposedHandle):
                raise CompositionError(
                    f"composed model {name!r}: component model {model!r} is itself composed; compositions "
                    "do not nest (list its components instead)"
                )
            out[model] = handle
        return out

    def composition_variant(self, spec: CompositionSpec) -> str:
        """What a composition reads: the widest variant among its model components (rules read the response)."""
        variants = [self.get(m).model.config.variant for m in spec.models]
        return max(variants, key=VARIANT_ORDER.index, default="response")

    def _build_composed(self, name: str, path: Path | None, spec: CompositionSpec) -> ComposedHandle:
        self._components(name, spec)
        handle = ComposedHandle(name, path, spec, self)
        log.info(
            "loaded composed model %s (%s, version %s) from %s",
            name,
            spec.describe(),
            handle.version,
            path or "the admin API",
        )
        self.observer.model_loaded(name, handle.version, True)
        return handle

    def _variant_at(self, path: Source) -> str:
        from karma.rm.compose import CompositionSpec, is_composition
        from karma.rm.folder import load_config

        if isinstance(path, CompositionSpec) or is_composition(path):
            spec = path if isinstance(path, CompositionSpec) else CompositionSpec.load(path)
            self._components("?", spec)
            return self.composition_variant(spec)
        return load_config(path).variant

    def declare(self, name: str) -> None:
        """Mark a configured model as loading (so /ready reports it before load() runs)."""
        with self._lock:
            self.status.setdefault(name, "loading")

    def load(self, name: str, path: Source) -> Handle:
        """Load a configured model at startup (status loading → ready | failed)."""
        self.declare(name)
        try:
            handle = self._build(name, path)
        except Exception as exc:
            with self._lock:
                self.status[name] = "failed"
                self.errors[name] = f"{type(exc).__name__}: {exc}"
            raise
        with self._lock:
            self._handles[name] = handle
            self.status[name] = "ready"
            self.errors.pop(name, None)
        return handle

    def add(self, name: str, path: Source) -> Handle:
        """Admin load of a new name; ModelExistsError if the name is taken."""
        with self._admin_lock:
            with self._lock:
                if name in self.status:
                    raise ModelExistsError(
                        f"model {name!r} already exists; use PUT /v1/models/{name} to swap it"
                    )
            handle = self._build(name, path)
            with self._lock:
                self._handles[name] = handle
                self.status[name] = "ready"
                if self.default is None:
                    self.default = name
            return handle

    def set_default(self, name: str) -> Handle:
        """Make `name` the model behind the un-prefixed routes (requests already leased keep theirs)."""
        with self._lock:
            handle = self._lookup(name)
            self.default = name
        log.info("default model is now %s", name)
        return handle

    def swap(self, name: str, path: Source, *, force: bool = False) -> tuple[Handle, Handle]:
        """Hot swap: load beside the old, switch atomically, retire the old in the background. A swap that would
        change the variant (what the model reads) under the name is refused (ModelExistsError) unless `force`:
        a client that chose this name would silently get another kind of reward. Swapping a component of a
        composed model changes the composed model's version and scores from the next request on."""
        from karma.rm.compose import CompositionSpec, is_composition

        with self._admin_lock:
            with self._lock:
                old = self._lookup(name)
            users = self.dependents(name)
            if users and (isinstance(path, CompositionSpec) or is_composition(path)):
                raise CompositionError(
                    f"model {name!r} is a component of composed model(s) {', '.join(users)}; compositions do "
                    "not nest, so it cannot become one"
                )
            if not force:
                was, new_variant = old.model.config.variant, self._variant_at(path)
                if new_variant != was:
                    raise ModelExistsError(
                        f"swapping model {name!r} would change its variant from {was!r} to {new_variant!r}; "
                        "send force=true to swap anyway, or load it under a new name"
                    )
            before = {u: self.get(u).version for u in users}
            new = self._build(name, path)
            with self._lock:
                self._handles[name] = new
                self.status[name] = "ready"
                old.retire()
            for user, version in before.items():  # their version moved with the component's
                self.observer.model_loaded(user, version, False)
                self.observer.model_loaded(user, self.get(user).version, True)
            self._close_later(old)
            return new, old

    def remove(self, name: str) -> Handle:
        with self._admin_lock:
            users = self.dependents(name)
            with self._lock:
                handle = self._lookup(name)
                if name == self.default:
                    raise ModelExistsError(f"model {name!r} is the default model and cannot be removed")
                if users:
                    raise ModelExistsError(
                        f"model {name!r} is a component of composed model(s) {', '.join(users)}; remove or "
                        "swap them first"
                    )
                del self._handles[name]
                self.status.pop(name, None)
                handle.retire()
            self._close_later(handle)
            return handle

    def _close_later(self, handle: Handle) -> None:
        self.observer.model_loaded(handle.name, handle.version, False)
        t = threading.Thread(target=handle.close, name=f"karma-retire-{handle.name}", daemon=True)
        t.start()
        self._retiring = [x for x in self._retiring if x.is_alive()] + [t]

    def close(self, timeout: float | None = 30.0) -> None:
        """Stop every worker (lifespan shutdown): composed models first, then the models they read."""
        with self._lock:
            handles = sorted(self._handles.values(), key=lambda h: not isinstance(h, ComposedHandle))
            self._handles.clear()
        for h in handles:
            h.close(timeout)
        for t in self._retiring:
            t.join(timeout)
