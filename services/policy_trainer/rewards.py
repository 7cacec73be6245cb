"""Where the trainer's rewards come from: the `RewardSource` protocol and its two implementations.

The reward model sees the *conversation* — the context text and the decoded response — never the policy's
chat-template tokens, so policy and reward-model tokenizers may differ. One item type travels from the
trainer's rollouts to the reward model: `karma.protocol.ScoreItem`, the wire type (its metadata validated
and made plain — numpy scalars to Python, NaN to null — once, when it is built).

- `HTTPRewardSource`: the reward service through `karma.client.RewardClient` (several URLs are replicas: a
  failing one is skipped and the request fails over at once; retries with backoff up to a deadline; an
  invalid answer — not JSON, no version, null or string scores — is a named error, never coerced).
- `LocalRewardSource`: a `karma.rm.model.RewardModel` in this process (benchmarks, tests, no server).

`RewardDispatcher` runs a source on its own event-loop thread so the trainer can ask for the rewards of
finished rollouts while the rest of the batch is still generating.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from karma.protocol import ScoreItem


class RewardUnavailableError(RuntimeError):
    """Rewards could not be obtained (service down or failing past its deadline, or answering invalid or
    non-finite scores). Never replaced by 0/None."""


@runtime_checkable
class RewardSource(Protocol):
    """Scores `ScoreItem`s, one float per item, in order; its whole lifecycle is here.

    `version` is the reward model's version (content hash) that produced the latest scores — None before
    the first answer when the source cannot know it earlier; it changes when the model is hot-swapped."""

    version: str | None

    async def wait_ready(self, deadline_s: float) -> None: ...

    async def score(self, items: Sequence[ScoreItem]) -> list[float]: ...

    async def aclose(self) -> None: ...


class HTTPRewardSource:
    """The reward service over HTTP (`karma.client.RewardClient`); failures raise `RewardUnavailableError`."""

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        api_key: str | None = None,
        model: str | None = None,
        normalize: bool = True,
        timeout_s: float = 60.0,
        deadline_s: float = 120.0,
        max_retries: int = 1000,
        **client_kwargs: Any,
    ):
        from karma.client import RewardClient

        self.normalize = normalize
        # the deadline, not a retry count, bounds how long a dead service is retried
        self.client = RewardClient(
            urls,
            api_key=api_key,
            model=model,
            timeout=timeout_s,
            deadline_s=deadline_s,
            max_retries=max_retries,
            **client_kwargs,
        )
        self.version: str | None = None

    async def wait_ready(self, deadline_s: float) -> None:
        from karma.client import RewardServiceError

        try:
            await self.client.wait_ready(deadline_s)
        except RewardServiceError as exc:
            raise RewardUnavailableError(f"reward service unreachable at start: {exc}") from exc

    async def score(self, items: Sequence[ScoreItem]) -> list[float]:
        from karma.client import RewardServiceError

        try:
            result = await self.client.score(items, normalize=self.normalize)
        except RewardServiceError as exc:
            raise RewardUnavailableError(str(exc)) from exc
        if result.version:  # an empty call has no version
            self.version = result.version
        return [float(s) for s in result.scores]

    async def aclose(self) -> None:
        await self.client.aclose()


class LocalRewardSource:
    """A KARMA reward model in this process; the forward pass runs in a worker thread, off the event loop."""

    def __init__(self, model: Any, *, normalize: bool = True, batch_size: int = 32):
        self.rm = model
        self.normalize = normalize
        self.batch_size = batch_size
        self.version: str | None = model.version or None
        self._lock = threading.Lock()  # one forward at a time on the shared model

    @classmethod
    def load(
        cls, path: str | Path, *, normalize: bool = True, device: str = "cpu", dtype: str | None = None
    ) -> LocalRewardSource:
        from karma.rm.model import RewardModel

        return cls(RewardModel.load(path, device=device, dtype=dtype), normalize=normalize)

    async def wait_ready(self, deadline_s: float) -> None:  # loaded already
        return None

    def score_sync(self, items: Sequence[ScoreItem]) -> list[float]:
        """The scores of `items`, as the service computes them from the same items (`/v1/score`)."""
        from karma.rm.model import RMInput

        inputs = [
            RMInput(
                it.context if isinstance(it.context, str) else [t.model_dump() for t in it.context],
                it.response,
                it.rm_metadata(),
            )
            for it in items
        ]
        with self._lock:
            return self.rm.score(inputs, normalize=self.normalize, batch_size=self.batch_size)

    async def score(self, items: Sequence[ScoreItem]) -> list[float]:
        return await asyncio.to_thread(self.score_sync, items)

    async def aclose(self) -> None:
        return None


class RewardDispatcher:
    """Runs a `RewardSource` on a private event loop in a daemon thread.

    `submit()` returns at once with a `concurrent.futures.Future`, so scoring overlaps generation and the
    trainer's own forward passes; `close()` closes the source and stops the loop.
    """

    def __init__(self, source: RewardSource):
        if not isinstance(source, RewardSource):
            raise TypeError(
                f"{type(source).__name__} is not a RewardSource (needs version, wait_ready, score, aclose)"
            )
        self.source = source
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="karma-rewards", daemon=True)
        self._thread.start()

    def submit(self, items: Sequence[ScoreItem]) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(self.source.score(items), self._loop)

    def wait_ready(self, deadline_s: float) -> None:
        """Block until the source is ready (`RewardUnavailableError` past `deadline_s`)."""
        self.call(self.source.wait_ready, deadline_s)

    def call(self, coro_fn, *args, timeout: float | None = None):
        """Run `await coro_fn(*args)` on the dispatcher's loop and wait for it (e.g. `wait_ready`)."""
        return asyncio.run_coroutine_threadsafe(coro_fn(*args), self._loop).result(timeout)

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        try:
            asyncio.run_coroutine_threadsafe(self.source.aclose(), self._loop).result(30)
        except concurrent.futures.TimeoutError:  # a hung close must not block shutdown
            pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self._loop.close()
