"""Typed async client of the reward service, and a TRL reward-function adapter.

    async with RewardClient("http://127.0.0.1:8000") as rm:
        await rm.wait_ready(60)
        result = await rm.score([{"context": "Why is the sky blue?", "response": "Rayleigh scattering."}])
        result.scores, result.version

One long-lived `httpx.AsyncClient` (one connection pool) serves every call. Several URLs are used
round-robin; a request that fails on one URL is retried on the next. Only connection failures (the
connection could not be made, or broke before a response), 5xx and 429 are retried — with exponential
backoff and full jitter, honouring `Retry-After` — until `max_retries` or the `deadline_s` of the call
runs out; then `RewardServiceError` names the URL(s) and the last cause. A 4xx other than 429 is the
caller's mistake and raises at once. Read timeouts are not retried (a slow server would get the same
work twice).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Self

import httpx

from karma.protocol import ScoreItem, ScoreResponse, as_score_item

log = logging.getLogger(__name__)

#: failures after which no response arrived: safe to send the (idempotent) scoring request again
_RETRYABLE_TRANSPORT = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.RemoteProtocolError,
    httpx.ReadError,
    httpx.WriteError,
)


class RewardServiceError(RuntimeError):
    """The reward service could not score: final failure after retries, or a request it refused (4xx)."""

    def __init__(
        self,
        message: str,
        *,
        urls: Sequence[str] = (),
        status: int | None = None,
        error_type: str | None = None,
        cause: BaseException | str | None = None,
    ):
        super().__init__(message)
        self.urls = list(urls)
        self.status = status
        self.error_type = error_type
        self.cause = cause


@dataclass
class ScoreResult:
    scores: list[float]
    model: str
    version: str
    truncated: list[bool]
    #: version per item; differs from `version` only if a hot swap landed between the chunks of one call
    versions: list[str] = field(default_factory=list)


def _normalise_urls(urls: str | Sequence[str]) -> list[str]:
    if isinstance(urls, str):
        urls = urls.split(",")
    out = [u.strip().rstrip("/") for u in urls if u and u.strip()]
    if not out:
        raise ValueError("RewardClient needs at least one URL")
    for u in out:
        if not u.startswith(("http://", "https://")):
            raise ValueError(f"reward service URL must start with http:// or https://, got {u!r}")
    return out


def _retry_after(resp: httpx.Response) -> float | None:
    value = resp.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff


class RewardClient:
    """Async client of one or more reward-service replicas (see the module docstring)."""

    _sleep = staticmethod(asyncio.sleep)  # tests replace it to record backoff without waiting

    def __init__(
        self,
        urls: str | Sequence[str],
        api_key: str | None = None,
        model: str | None = None,
        timeout: float = 60.0,
        max_retries: int = 5,
        deadline_s: float = 300.0,
        *,
        batch_size: int = 256,
        max_connections: int = 64,
        backoff_s: float = 0.25,
        max_backoff_s: float = 8.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ):
        if max_retries < 0 or deadline_s <= 0 or timeout <= 0 or batch_size < 1:
            raise ValueError("max_retries >= 0, deadline_s > 0, timeout > 0 and batch_size >= 1 are required")
        self.urls = _normalise_urls(urls)
        self.model = model
        self.timeout = timeout
        self.max_retries = max_retries
        self.deadline_s = deadline_s
        self.batch_size = batch_size
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._prefix = f"/models/{model}" if model else ""
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            transport=transport,
        )
        self._next = 0
        self._down_until: dict[str, float] = {}

    # -------------------------------------------------------------------------------- lifecycle
    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    # -------------------------------------------------------------------------------- API
    async def score(
        self,
        items: Iterable[ScoreItem | Mapping[str, Any] | Any],
        normalize: bool = False,
        truncate: bool = True,
    ) -> ScoreResult:
        """Scores in input order. Lists longer than `batch_size` are sent as concurrent chunks."""
        parsed = [as_score_item(it) for it in items]
        if not parsed:
            return ScoreResult([], self.model or "", "", [], [])
        chunks = [parsed[i : i + self.batch_size] for i in range(0, len(parsed), self.batch_size)]
        bodies = await asyncio.gather(*(self._score_chunk(c, normalize, truncate) for c in chunks))
        result = ScoreResult([], bodies[0].model, bodies[-1].version, [], [])
        for body in bodies:
            result.scores.extend(body.scores)
            result.truncated.extend(body.truncated)
            result.versions.extend([body.version] * len(body.scores))
        return result

    async def _score_chunk(self, chunk: list[ScoreItem], normalize: bool, truncate: bool) -> ScoreResponse:
        payload = {
            "items": [it.model_dump(mode="json", exclude_none=True) for it in chunk],
            "normalize": normalize,
            "truncate": truncate,
        }
        data = await self._request("POST", f"{self._prefix}/v1/score", payload)
        body = ScoreResponse.model_validate(data)
        if len(body.scores) != len(chunk):
            raise RewardServiceError(
                f"the service returned {len(body.scores)} scores for {len(chunk)} items", urls=self.urls
            )
        return body

    async def info(self) -> dict[str, Any]:
        """`GET /info` of the next replica (models, versions, limits)."""
        return await self._request("GET", "/info", None)

    async def wait_ready(self, deadline_s: float | None = None, interval_s: float = 0.5) -> None:
        """Block until every URL answers 200 on its readiness route (`/ready`, or `/models/{model}/ready`)."""
        deadline = time.monotonic() + (self.deadline_s if deadline_s is None else deadline_s)
        pending = list(self.urls)
        causes: dict[str, str] = {}
        while True:
            for url in list(pending):
                try:
                    resp = await self._http.get(f"{url}{self._prefix}/ready", timeout=min(self.timeout, 10.0))
                except httpx.TransportError as exc:
                    causes[url] = f"{type(exc).__name__}: {exc}"
                    continue
                if resp.status_code == 200:
                    pending.remove(url)
                elif resp.status_code == 404:
                    raise RewardServiceError(
                        f"{url}: {_error_text(resp)}", urls=[url], status=404, error_type="not_found"
                    )
                else:
                    causes[url] = f"HTTP {resp.status_code}: {_error_text(resp)}"
            if not pending:
                return
            if time.monotonic() + interval_s > deadline:
                detail = "; ".join(f"{u}: {causes.get(u, 'no answer')}" for u in pending)
                raise RewardServiceError(
                    f"reward service not ready before the deadline: {detail}", urls=pending
                )
            await self._sleep(interval_s)

    # -------------------------------------------------------------------------------- transport
    def _pick(self) -> str:
        now = time.monotonic()
        n = len(self.urls)
        for k in range(n):
            url = self.urls[(self._next + k) % n]
            if self._down_until.get(url, 0.0) <= now:
                self._next = (self._next + k + 1) % n
                return url
        url = self.urls[self._next % n]  # all marked down: plain round robin
        self._next = (self._next + 1) % n
        return url

    def _backoff(self, attempt: int) -> float:
        return random.uniform(0, min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1)))

    async def _request(self, method: str, path: str, payload: Any) -> Any:
        start = time.monotonic()
        deadline = start + self.deadline_s
        attempt, last_cause, last_exc, tried = 0, "no attempt made", None, []
        while True:
            url = self._pick()
            tried.append(url)
            left = deadline - time.monotonic()
            wait: float | None = None
            try:
                resp = await self._http.request(
                    method,
                    url + path,
                    json=payload,
                    timeout=httpx.Timeout(max(min(self.timeout, left), 0.001)),
                )
            except _RETRYABLE_TRANSPORT as exc:
                last_cause, last_exc = f"{url}: {type(exc).__name__}: {exc}", exc
                self._down_until[url] = time.monotonic() + min(
                    self.max_backoff_s, self.backoff_s * 2**attempt
                )
                if len(self.urls) > 1:
                    wait = 0.0  # fail over to the next replica at once
            except httpx.TimeoutException as exc:
                raise RewardServiceError(
                    f"{method} {url}{path} timed out after {min(self.timeout, left):.1f}s ({type(exc).__name__}); "
                    "not retried",
                    urls=[url],
                    cause=exc,
                ) from exc
            else:
                if resp.status_code < 400:
                    return resp.json()
                err_type = _error_type(resp)
                if resp.status_code != 429 and resp.status_code < 500:
                    raise RewardServiceError(
                        f"{method} {url}{path} answered {resp.status_code}: {_error_text(resp)}",
                        urls=[url],
                        status=resp.status_code,
                        error_type=err_type,
                    )
                last_cause, last_exc = f"{url}: HTTP {resp.status_code}: {_error_text(resp)}", None
                ra = _retry_after(resp)
                if ra is not None:
                    wait = ra + random.uniform(0, self.backoff_s)
            attempt += 1
            if attempt > self.max_retries:
                break
            wait = self._backoff(attempt) if wait is None else wait
            if time.monotonic() + wait >= deadline:
                break
            log.debug("reward service attempt %d failed (%s); retrying in %.2fs", attempt, last_cause, wait)
            await self._sleep(wait)
        urls = list(dict.fromkeys(tried))
        raise RewardServiceError(
            f"reward service failed after {attempt} attempt(s) in {time.monotonic() - start:.1f}s "
            f"({', '.join(urls)}); last error: {last_cause}",
            urls=urls,
            cause=last_exc or last_cause,
        )


def _error_body(resp: httpx.Response) -> dict:
    try:
        body = resp.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _error_text(resp: httpx.Response) -> str:
    body = _error_body(resp)
    return str(body.get("error") or body.get("detail") or resp.text[:300] or resp.reason_phrase)


def _error_type(resp: httpx.Response) -> str | None:
    return _error_body(resp).get("error_type")


# --------------------------------------------------------------------------------------------- TRL adapter
def _text(content: Any) -> str:
    """Message content as text: a string, or the text parts of a multimodal content list."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            str(p.get("text", "")) for p in content if isinstance(p, Mapping) and p.get("type") == "text"
        )
    return str(content)


def _context(prompt: Any) -> str | list[dict[str, str]]:
    """A TRL prompt (str, or conversational messages) as our context; system messages are not context."""
    if isinstance(prompt, str):
        return prompt
    return [
        {"role": str(m.get("role", "user")), "content": _text(m.get("content"))}
        for m in prompt
        if m.get("role") != "system"
    ]


def _response(completion: Any) -> str:
    """A TRL completion (str, or a list of messages) as the response text: the assistant messages joined."""
    if isinstance(completion, str):
        return completion
    msgs = [m for m in completion if m.get("role", "assistant") == "assistant"] or list(completion)
    return "\n\n".join(_text(m.get("content")) for m in msgs)


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") and callable(value.item) else value


def trl_reward_func(
    url: str | Sequence[str],
    *,
    api_key: str | None = None,
    model: str | None = None,
    normalize: bool = False,
    name: str = "karma_reward",
    metadata_column: str | None = "metadata",
    metadata_columns: Sequence[str] = (),
    **client_kwargs: Any,
):
    """A TRL reward function (`GRPOTrainer(reward_funcs=[trl_reward_func(url)])`) scoring through the service.

    The returned `async def f(prompts, completions, completion_ids=None, **columns) -> list[float]` takes
    TRL 1.16's keyword arguments (`trainer_state`, `log_extra`, `log_metric` and the dataset columns) and
    handles standard (str) and conversational (list of messages) prompts/completions. Per-row metadata for
    the `full` variant comes from a dict column `metadata_column` and/or flat columns `metadata_columns`.
    One `RewardClient` per event loop (TRL awaits async rewards on its own loop thread); `await f.aclose()`
    closes them. The name TRL logs under is `name`.
    """
    clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, RewardClient] = weakref.WeakKeyDictionary()

    def client() -> RewardClient:
        loop = asyncio.get_running_loop()
        if loop not in clients:
            clients[loop] = RewardClient(url, api_key=api_key, model=model, **client_kwargs)
        return clients[loop]

    async def reward(prompts, completions, completion_ids=None, **columns) -> list[float]:
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions")
        items = []
        for i, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
            meta: dict[str, Any] = {}
            if metadata_column and isinstance(columns.get(metadata_column), list):
                meta.update(columns[metadata_column][i] or {})
            for col in metadata_columns:
                meta[col] = columns[col][i]
            items.append(
                ScoreItem(
                    context=_context(prompt),
                    response=_response(completion),
                    metadata={k: _plain(v) for k, v in meta.items()} or None,
                )
            )
        result = await client().score(items, normalize=normalize)
        log_metric = columns.get("log_metric")
        if callable(log_metric) and result.truncated:
            log_metric(f"{name}/truncated_frac", sum(result.truncated) / len(result.truncated))
        return result.scores

    async def aclose() -> None:
        for c in list(clients.values()):
            await c.aclose()
        clients.clear()

    reward.__name__ = reward.__qualname__ = name
    reward.aclose = aclose  # type: ignore[attr-defined]
    return reward
