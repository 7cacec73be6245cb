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
* `ModelHandle` — a loaded model + its worker + a lease count. A request holds a lease from lookup to reply.
* `ModelRegistry` — name → handle. `swap` loads the new folder beside the old one, switches atomically under
  the registry lock, then (in the background) waits for the old handle's leases to end, drains its worker and
  frees it: no request fails and every reply names the version that produced it.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

if TYPE_CHECKING:
    from karma.rm.model import Encoded, RewardModel, RMInput

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
    """The work already queued would keep a new request waiting longer than `max_queue_wait_s`."""

    def __init__(self, model: str, wait_s: float, limit_s: float, depth: int):
        EngineError.__init__(
            self,
            f"model {model!r} is overloaded: the {depth} items queued ahead need an estimated {wait_s:.1f}s, "
            f"more than max_queue_wait_s={limit_s:g}",
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


class _NullObserver:
    def observe_batch(self, *a, **k) -> None: ...
    def observe_queue_wait(self, *a, **k) -> None: ...
    def set_queue_depth(self, *a, **k) -> None: ...
    def model_loaded(self, *a, **k) -> None: ...
    def observe_truncated(self, *a, **k) -> None: ...


@dataclass
class Scored:
    """One request's result: a float score, a truncated flag per item, and the tokens they took."""

    scores: list[float]
    truncated: list[bool]
    tokens: int


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

    def __init__(
        self,
        model: RewardModel,
        *,
        name: str = "model",
        max_batch_tokens: int = 16384,
        max_wait_ms: float = 2.0,
        max_queue_items: int = 4096,
        max_queue_wait_s: float | None = None,
        padding_tolerance: float = math.inf,
        observer: Observer | None = None,
    ):
        self.model = model
        self.max_queue_wait_s = max_queue_wait_s
        self.padding_tolerance = padding_tolerance
        self.name = name
        self.max_batch_tokens = max_batch_tokens
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_queue_items = max_queue_items
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

    def admit(self, n_items: int = 0) -> None:
        """Raise QueueBusyError / QueueFullError if a request of `n_items` would be refused now (a cheap check
        before encoding; `submit` checks again)."""
        with self._cond:
            self._check_admission(n_items)

    def _check_admission(self, n_items: int) -> None:  # under self._cond
        if self._queued_items + n_items > self.max_queue_items:
            exc = QueueFullError(self.name, self._queued_items, self.max_queue_items, n_items)
            exc.retry_after = self.estimated_wait() or None
            raise exc
        if self.max_queue_wait_s is not None and self._queued_items:
            wait = self.estimated_wait()
            if wait > self.max_queue_wait_s:
                raise QueueBusyError(self.name, wait, self.max_queue_wait_s, self._queued_items)

    def submit(self, items: Sequence[Encoded]) -> Future:
        """Queue items; the future resolves to their scores in order. Cancelling the future drops its queued
        items. Raises QueueBusyError / QueueFullError / WorkerClosedError."""
        fut: Future = Future()
        if not items:
            fut.set_result([])
            return fut
        job = _Job(len(items), fut)
        now = time.perf_counter()
        with self._cond:
            if self._closed:
                raise WorkerClosedError(f"model {self.name!r} is shutting down")
            self._check_admission(len(items))
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


class ModelHandle:
    """A loaded reward model, its batching worker, its tokenising thread, and the leases of the requests
    using it. The model's tokenizer is serialised by a lock, so one tokenising thread per model is enough.

    `await handle.score(items)` is the one scoring path of every route: admission, encoding off the event loop,
    the shared batch, normalisation."""

    def __init__(
        self,
        name: str,
        path: Path,
        model: RewardModel,
        worker: BatchingWorker,
        observer: Observer | None = None,
    ):
        self.name = name
        self.observer = observer or worker.observer
        self.path = path
        self.model = model
        self.worker = worker
        self.encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"karma-encode-{name}")
        self.version = model.version
        self.loaded_at = time.time()
        self._leases = 0
        self._retired = False
        self._lock = threading.Lock()
        self._drained = threading.Event()
        self.closed = threading.Event()

    @property
    def leases(self) -> int:
        return self._leases

    async def score(
        self, items: Sequence[RMInput], *, truncate: bool = True, normalize: bool = False
    ) -> Scored:
        """Score `items` in the model's shared batches. Raises QueueBusyError / QueueFullError (refused before
        any work), ItemTooLongError (truncate=False), WorkerClosedError; cancelling the awaiting task drops
        the request's queued items."""
        import asyncio

        self.worker.admit(len(items))  # refuse before encoding when the queue is already too long
        loop = asyncio.get_running_loop()
        encoded = await loop.run_in_executor(self.encoder, self._encode_all, items, truncate)
        scores = await asyncio.wrap_future(self.worker.submit(encoded))
        truncated = [e.truncated for e in encoded]
        if any(truncated):
            self.observer.observe_truncated(self.name, sum(truncated))
        if normalize:
            scores = self.model.normalize(scores)
        return Scored([float(s) for s in scores], truncated, sum(len(e) for e in encoded))

    def _encode_all(self, items: Sequence[RMInput], truncate: bool) -> list[Encoded]:
        from karma.rm.model import InputTooLongError

        out = []
        for i, item in enumerate(items):
            try:
                out.append(self.model.encode(item, truncate=truncate))
            except InputTooLongError as exc:
                raise ItemTooLongError(i, str(exc)) from None
        return out

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


Status = Literal["loading", "ready", "failed"]


class ModelRegistry:
    """name → ModelHandle, with atomic hot swap. Blocking methods (load/add/swap/remove) belong in a thread."""

    def __init__(
        self,
        *,
        device: str = "auto",
        dtype: str = "auto",
        max_batch_tokens: int = 16384,
        max_wait_ms: float = 2.0,
        max_queue_items: int = 4096,
        max_queue_wait_s: float | None = None,
        padding_tolerance: float = math.inf,
        observer: Observer | None = None,
    ):
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.worker_args = {
            "max_batch_tokens": max_batch_tokens,
            "max_wait_ms": max_wait_ms,
            "max_queue_items": max_queue_items,
            "max_queue_wait_s": max_queue_wait_s,
            "padding_tolerance": padding_tolerance,
        }
        self.observer = observer or _NullObserver()
        self.default: str | None = None
        self._handles: dict[str, ModelHandle] = {}
        self.status: dict[str, Status] = {}
        self.errors: dict[str, str] = {}
        self._lock = threading.Lock()
        self._admin_lock = threading.Lock()  # one load / swap / remove at a time
        self._retiring: list[threading.Thread] = []

    # ------------------------------------------------------------------------------------ lookup
    def names(self) -> list[str]:
        return list(self.status)

    def handles(self) -> list[ModelHandle]:
        with self._lock:
            return list(self._handles.values())

    def get(self, name: str | None = None) -> ModelHandle:
        name = self.default if name is None else name
        with self._lock:
            return self._lookup(name)

    def _lookup(self, name: str | None) -> ModelHandle:
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
    def lease(self, name: str | None = None) -> Iterator[ModelHandle]:
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

    # ------------------------------------------------------------------------------------ loading
    def _build(self, name: str, path: Path) -> ModelHandle:
        from karma.rm.model import RewardModel

        t0 = time.perf_counter()
        model = RewardModel.load(
            path, device=self.device, dtype=None if self.dtype == "float32" else self.dtype
        )
        worker = BatchingWorker(model, name=name, observer=self.observer, **self.worker_args)
        log.info(
            "loaded model %s (version %s) from %s in %.1fs",
            name,
            model.version,
            path,
            time.perf_counter() - t0,
        )
        self.observer.model_loaded(name, model.version, True)
        return ModelHandle(name, Path(path), model, worker, self.observer)

    def _variant_at(self, path: Path) -> str:
        from karma.rm.model import load_config

        return load_config(path).variant

    def declare(self, name: str) -> None:
        """Mark a configured model as loading (so /ready reports it before load() runs)."""
        with self._lock:
            self.status.setdefault(name, "loading")

    def load(self, name: str, path: Path) -> ModelHandle:
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

    def add(self, name: str, path: Path) -> ModelHandle:
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

    def set_default(self, name: str) -> ModelHandle:
        """Make `name` the model behind the un-prefixed routes (requests already leased keep theirs)."""
        with self._lock:
            handle = self._lookup(name)
            self.default = name
        log.info("default model is now %s", name)
        return handle

    def swap(self, name: str, path: Path, *, force: bool = False) -> tuple[ModelHandle, ModelHandle]:
        """Hot swap: load beside the old, switch atomically, retire the old in the background. A swap that would
        change the variant (what the model reads) under the name is refused (ModelExistsError) unless `force`:
        a client that chose this name would silently get another kind of reward."""
        with self._admin_lock:
            with self._lock:
                old = self._lookup(name)
            if not force:
                was, new_variant = old.model.config.variant, self._variant_at(path)
                if new_variant != was:
                    raise ModelExistsError(
                        f"swapping model {name!r} would change its variant from {was!r} to {new_variant!r}; "
                        "send force=true to swap anyway, or load it under a new name"
                    )
            new = self._build(name, path)
            with self._lock:
                self._handles[name] = new
                self.status[name] = "ready"
                old.retire()
            self._close_later(old)
            return new, old

    def remove(self, name: str) -> ModelHandle:
        with self._admin_lock:
            with self._lock:
                handle = self._lookup(name)
                if name == self.default:
                    raise ModelExistsError(f"model {name!r} is the default model and cannot be removed")
                del self._handles[name]
                self.status.pop(name, None)
                handle.retire()
            self._close_later(handle)
            return handle

    def _close_later(self, handle: ModelHandle) -> None:
        self.observer.model_loaded(handle.name, handle.version, False)
        t = threading.Thread(target=handle.close, name=f"karma-retire-{handle.name}", daemon=True)
        t.start()
        self._retiring = [x for x in self._retiring if x.is_alive()] + [t]

    def close(self, timeout: float | None = 30.0) -> None:
        """Stop every worker (lifespan shutdown)."""
        with self._lock:
            handles = list(self._handles.values())
            self._handles.clear()
        for h in handles:
            h.close(timeout)
        for t in self._retiring:
            t.join(timeout)
