"""Typed async client of the reward service (TRL's reward-function adapter is `karma.integrations.trl`).

    async with RewardClient(["http://rm1:8000", "http://rm2:8000"]) as rm:
        await rm.wait_ready(60)
        result = await rm.score([{"context": "Why is the sky blue?", "response": "Rayleigh scattering."}])
        result.scores, result.version

One long-lived `httpx.AsyncClient` (one connection pool) serves every call. Several URLs are replicas, used
round-robin. A replica that fails — the connection could not be made or broke before a response, or it
answered 5xx / 429 — is marked down for a back-off (its `Retry-After`, else `backoff_s` x 2^n capped by
`max_backoff_s`) and the request goes to another replica at once; only when every replica is down does the
client wait (exponential backoff with full jitter, or `Retry-After` plus jitter). This goes on until
`max_retries` or the call's `deadline_s` runs out; then `RewardServiceError` names the URL(s) and the last
cause. So a request sent while one of two replicas restarts is answered by the other. A 4xx other than 429
is the caller's mistake and raises at once; so does a 2xx whose body is not a valid response (not JSON, no
`version`, null or string scores). Read timeouts are not retried (a slow server would get the same work
twice). While retrying, the client logs at INFO at most every `log_interval_s` (the rest at DEBUG).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Self

import httpx
from pydantic import ValidationError

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
    """The reward service could not score: final failure after retries, a request it refused (4xx), or a
    response that is not a valid answer (`error_type="bad_response"`)."""

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


@dataclass
class _Reply:
    """A 2xx answer, its JSON body decoded."""

    url: str  # the replica that answered
    where: str  # "POST http://rm1:8000/v1/score", for messages
    status: int
    data: Any


@dataclass
class _Failure:
    """A retryable failure of one attempt."""

    cause: str  # "http://rm1:8000: HTTP 503: model 'a' is still loading"
    exc: BaseException | None
    retry_after: float | None  # the server's Retry-After (s), if it sent one


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
    _clock = staticmethod(time.monotonic)  # and this, to let fake time pass
    #: while a call is retrying, an INFO line at most this often (per client); the other retries log at DEBUG
    log_interval_s: float = 5.0

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
        self._last_info = -math.inf

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
        reply = await self._request("POST", f"{self._prefix}/v1/score", payload)
        body = _score_response(reply)
        if len(body.scores) != len(chunk):
            raise RewardServiceError(
                f"the service returned {len(body.scores)} scores for {len(chunk)} items ({reply.where})",
                urls=[reply.url],
                status=reply.status,
                error_type="bad_response",
            )
        return body

    async def info(self) -> dict[str, Any]:
        """`GET /info` of the next replica (models, versions, limits)."""
        return (await self._request("GET", "/info", None)).data

    async def wait_ready(self, deadline_s: float | None = None, interval_s: float = 0.5) -> None:
        """Block until every URL answers 200 on its readiness route (`/ready`, or `/models/{model}/ready`)."""
        start = self._clock()
        budget = self.deadline_s if deadline_s is None else deadline_s
        pending = list(self.urls)
        causes: dict[str, str] = {}
        while True:
            for url in list(pending):
                cause = await self._ready_cause(url)
                if cause is None:
                    pending.remove(url)
                else:
                    causes[url] = cause
            if not pending:
                return
            detail = "; ".join(f"{u}: {causes.get(u, 'no answer')}" for u in pending)
            elapsed = self._clock() - start
            if elapsed + interval_s > budget:
                raise RewardServiceError(
                    f"reward service not ready before the deadline: {detail}", urls=pending
                )
            self._log_rate_limited(
                "waiting for the reward service to be ready (%.1fs elapsed, deadline %.0fs): %s",
                elapsed,
                budget,
                detail,
            )
            await self._sleep(interval_s)

    async def _ready_cause(self, url: str) -> str | None:
        """None when `url` is ready, else why not; a 404 (unknown model) raises."""
        try:
            resp = await self._http.get(f"{url}{self._prefix}/ready", timeout=min(self.timeout, 10.0))
        except httpx.TransportError as exc:
            return f"{type(exc).__name__}: {exc}"
        if resp.status_code == 200:
            return None
        if resp.status_code == 404:
            raise RewardServiceError(
                f"{url}: {_error_text(resp)}", urls=[url], status=404, error_type="not_found"
            )
        return f"HTTP {resp.status_code}: {_error_text(resp)}"

    # -------------------------------------------------------------------------------- replicas
    def _is_up(self, url: str, now: float) -> bool:
        return self._down_until.get(url, 0.0) <= now

    def _pick(self) -> str:
        """The next replica round-robin that is not marked down; if all are, the one back soonest."""
        now = self._clock()
        n = len(self.urls)
        for k in range(n):
            url = self.urls[(self._next + k) % n]
            if self._is_up(url, now):
                self._next = (self._next + k + 1) % n
                return url
        return min(self.urls, key=lambda u: self._down_until[u])

    def _mark_down(self, url: str, attempt: int, retry_after: float | None) -> None:
        pause = retry_after if retry_after else self._backoff_cap(attempt)  # None or 0: no hint
        self._down_until[url] = self._clock() + pause

    def _backoff_cap(self, attempt: int) -> float:
        return min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1))

    def _wait_before_retry(self, attempt: int, retry_after: float | None) -> float:
        """0 while another replica is up (fail over at once); else full-jitter backoff or Retry-After + jitter."""
        now = self._clock()
        if any(self._is_up(u, now) for u in self.urls):
            return 0.0
        if retry_after is not None:
            return retry_after + random.uniform(0, self.backoff_s)
        return random.uniform(0, self._backoff_cap(attempt))

    # -------------------------------------------------------------------------------- transport
    async def _request(self, method: str, path: str, payload: Any) -> _Reply:
        """Send to replicas until one answers 2xx with JSON, or retries / the deadline run out."""
        start = self._clock()
        deadline = start + self.deadline_s
        attempt, tried = 0, []
        failure = _Failure("no attempt made", None, None)
        while True:
            url = self._pick()
            tried.append(url)
            outcome = await self._attempt(method, url, path, payload, deadline)
            if isinstance(outcome, _Reply):
                self._down_until.pop(url, None)
                return outcome
            failure = outcome
            attempt += 1
            self._mark_down(url, attempt, failure.retry_after)
            wait = self._wait_before_retry(attempt, failure.retry_after)
            elapsed = self._clock() - start
            if attempt > self.max_retries or elapsed + wait >= self.deadline_s:
                break
            self._log_rate_limited(
                "reward service: %s %s attempt %d failed (%s); retrying in %.2fs (%.1fs elapsed, deadline %.0fs)",
                method,
                path,
                attempt,
                failure.cause,
                wait,
                elapsed,
                self.deadline_s,
            )
            await self._sleep(wait)
        urls = list(dict.fromkeys(tried))
        raise RewardServiceError(
            f"reward service failed after {attempt} attempt(s) in {self._clock() - start:.1f}s "
            f"({', '.join(urls)}); last error: {failure.cause}",
            urls=urls,
            cause=failure.exc or failure.cause,
        )

    async def _attempt(
        self, method: str, url: str, path: str, payload: Any, deadline: float
    ) -> _Reply | _Failure:
        """One request to one replica: the reply, a retryable failure, or a `RewardServiceError` for the rest."""
        where = f"{method} {url}{path}"
        timeout = max(min(self.timeout, deadline - self._clock()), 0.001)
        try:
            resp = await self._http.request(method, url + path, json=payload, timeout=httpx.Timeout(timeout))
        except _RETRYABLE_TRANSPORT as exc:
            return _Failure(f"{url}: {type(exc).__name__}: {exc}", exc, None)
        except httpx.TimeoutException as exc:
            raise RewardServiceError(
                f"{where} timed out after {timeout:.1f}s ({type(exc).__name__}); not retried",
                urls=[url],
                cause=exc,
            ) from exc
        if resp.status_code == 429 or resp.status_code >= 500:
            return _Failure(f"{url}: HTTP {resp.status_code}: {_error_text(resp)}", None, _retry_after(resp))
        if resp.status_code >= 400:
            raise RewardServiceError(
                f"{where} answered {resp.status_code}: {_error_text(resp)}",
                urls=[url],
                status=resp.status_code,
                error_type=_error_type(resp),
            )
        try:
            data = resp.json()
        except ValueError as exc:  # JSONDecodeError, or bytes that are not text
            raise RewardServiceError(
                f"{where} answered {resp.status_code} with a body that is not JSON: {resp.text[:200]!r}",
                urls=[url],
                status=resp.status_code,
                error_type="bad_response",
                cause=exc,
            ) from exc
        return _Reply(url, where, resp.status_code, data)

    def _log_rate_limited(self, msg: str, *args: Any) -> None:
        now = self._clock()
        if now - self._last_info >= self.log_interval_s:
            self._last_info = now
            log.info(msg, *args)
        else:
            log.debug(msg, *args)


def _json_kind(value: Any) -> str:
    kinds = {str: "a string", bool: "a boolean", dict: "an object", list: "an array", type(None): "null"}
    return kinds.get(type(value), type(value).__name__)


def _score_body_problem(data: Any) -> str | None:
    """What makes `data` an invalid score response, in words; None when the checks pass. Stricter than
    `ScoreResponse`: a score must be a JSON number ("0.5" is not coerced, null is not 0)."""
    if not isinstance(data, dict):
        return f"{_json_kind(data)} instead of a JSON object"
    if data.get("version") is None:
        return "no 'version' (the model version that produced the scores)"
    scores = data.get("scores")
    if not isinstance(scores, list):
        return (
            "no 'scores'" if "scores" not in data else f"'scores' that is {_json_kind(scores)}, not an array"
        )
    for i, s in enumerate(scores):
        if s is None:
            return f"scores[{i}] is null, not a number"
        if isinstance(s, bool) or not isinstance(s, (int, float)):
            return f"scores[{i}] is {json.dumps(s)[:100]} ({_json_kind(s)}), not a number"
    return None


def _score_response(reply: _Reply) -> ScoreResponse:
    problem = _score_body_problem(reply.data)
    if problem is None:
        try:
            return ScoreResponse.model_validate(reply.data, strict=True)
        except ValidationError as exc:
            problem = "a body that is not a score response: " + "; ".join(
                f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()
            )
    raise RewardServiceError(
        f"{reply.where} answered {reply.status} with {problem}",
        urls=[reply.url],
        status=reply.status,
        error_type="bad_response",
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


def __getattr__(name: str) -> Any:
    """`karma.client.trl_reward_func`, the TRL adapter's former name, kept: it lives in `karma.integrations.trl`,
    which imports this module, so the re-export is lazy (no circle at import time)."""
    if name == "trl_reward_func":
        from karma.integrations.trl import trl_reward_func

        return trl_reward_func
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
