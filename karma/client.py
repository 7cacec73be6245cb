"""Typed async client of the reward service (TRL's reward-function adapter is `karma.integrations.trl`).

    async with RewardClient(["http://rm1:8000", "http://rm2:8000"]) as rm:
        await rm.wait_ready(60)
        result = await rm.score([{"context": "Why is the sky blue?", "response": "Rayleigh scattering."}])
        result.scores, result.version

One long-lived `httpx.AsyncClient` (one connection pool) serves every call. Several URLs are replicas, and
so is every address a URL's host name resolves to (`karma.discovery`: `http://reward-api:8000` of a compose
service scaled to N replicas is N endpoints, resolved again every `resolve_interval_s`, so replicas that join
are used and those that leave are dropped; `resolve_interval_s=None` uses the URLs as given). The endpoints
are used round-robin. One that fails — the connection could not be made or broke before a response (a
request in flight on a replica that died), or it answered 5xx / 429 — is out of rotation for a back-off (its
`Retry-After`, else `backoff_s` x 2^(n-1) for its n-th failure in a row, capped by `max_backoff_s`), then
tried again; the request goes to another endpoint at once (scoring is idempotent). Only when every endpoint
is out does the client wait (exponential backoff with full jitter, or `Retry-After` plus jitter). This goes
on until `max_retries` or the call's `deadline_s` runs out (`max_retries=None`: the deadline alone bounds
it, as the trainer and the framework adapters use it); then `RewardServiceError` names the URL(s) and
the last cause. So a request sent while one of two replicas restarts is answered by the other. A 4xx other
than 429 is the caller's mistake and raises at once; so does a 2xx whose body is not a valid response (not
JSON, no `version`, null or string scores). Read timeouts are not retried (a slow server would get the same
work twice). While retrying, the client logs at INFO at most every `log_interval_s` (the rest at DEBUG).
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

from karma.discovery import Endpoint, Replicas, Resolver, resolve_addresses
from karma.protocol import ScoreItem, ScoreResponse, as_score_item

log = logging.getLogger(__name__)

#: how long the framework adapters (`karma.integrations`) retry one scoring call, bounded by this deadline
#: alone (`max_retries=None`), as karma's trainer does (its `reward_deadline_s`): a replica restart (12-13 s
#: under load) passes unnoticed; a service that is gone stops the run within two minutes
ADAPTER_DEADLINE_S = 120.0

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

    endpoint: Endpoint  # the replica that answered
    where: str  # "POST http://rm1:8000/v1/score", for messages
    status: int
    data: Any


@dataclass
class _Failure:
    """A retryable failure of one attempt."""

    cause: str  # "http://rm1:8000: HTTP 503: model 'a' is still loading"
    exc: BaseException | None
    retry_after: float | None  # the server's Retry-After (s), if it sent one
    connect: bool = False  # no connection could be made (the replica may be gone)


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
    _random = random.Random()  # the back-off jitter's draws; tests give an instance a seeded one
    #: while a call is retrying, an INFO line at most this often (per client); the other retries log at DEBUG
    log_interval_s: float = 5.0

    def __init__(
        self,
        urls: str | Sequence[str],
        api_key: str | None = None,
        model: str | None = None,
        timeout: float = 60.0,
        max_retries: int | None = 5,
        deadline_s: float = 300.0,
        *,
        batch_size: int = 256,
        max_connections: int = 64,
        backoff_s: float = 0.25,
        max_backoff_s: float = 8.0,
        transport: httpx.AsyncBaseTransport | None = None,
        resolve_interval_s: float | None = 30.0,
        resolver: Resolver = resolve_addresses,
    ):
        if (max_retries is not None and max_retries < 0) or deadline_s <= 0 or timeout <= 0 or batch_size < 1:
            raise ValueError(
                "max_retries >= 0 (or None), deadline_s > 0, timeout > 0 and batch_size >= 1 are required"
            )
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
        self._replicas = Replicas(
            self.urls,
            interval_s=resolve_interval_s,
            resolver=resolver,
            backoff_s=backoff_s,
            max_backoff_s=max_backoff_s,
            clock=lambda: self._clock(),  # late-bound: tests replace `_clock` on the instance
        )
        self._last_info = -math.inf

    @property
    def endpoints(self) -> list[Endpoint]:
        """Where requests go now: one per URL, or per address of a URL's host name once resolved."""
        return self._replicas.endpoints

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
                urls=[reply.endpoint.url],
                status=reply.status,
                error_type="bad_response",
            )
        return body

    async def info(self) -> dict[str, Any]:
        """`GET /info` of the next replica (models, versions, limits)."""
        return (await self._request("GET", "/info", None)).data

    async def wait_ready(self, deadline_s: float | None = None, interval_s: float = 0.5) -> None:
        """Block until every endpoint answers 200 on its readiness route (`/ready`, or `/models/{model}/ready`):
        every URL, and every address of a URL's host name (resolved again while waiting)."""
        start = self._clock()
        budget = self.deadline_s if deadline_s is None else deadline_s
        ready: set[str] = set()
        causes: dict[str, str] = {}
        while True:
            await self._replicas.refresh()
            pending = [ep for ep in self.endpoints if ep.url not in ready]
            for ep in pending:
                cause = await self._ready_cause(ep)
                if cause is None:
                    ready.add(ep.url)
                else:
                    causes[ep.url] = cause
            pending = [ep for ep in pending if ep.url not in ready]
            if not pending:
                return
            detail = "; ".join(f"{ep.label}: {causes.get(ep.url, 'no answer')}" for ep in pending)
            elapsed = self._clock() - start
            if elapsed + interval_s > budget:
                raise RewardServiceError(
                    f"reward service not ready before the deadline: {detail}", urls=[ep.url for ep in pending]
                )
            self._log_rate_limited(
                "waiting for the reward service to be ready (%.1fs elapsed, deadline %.0fs): %s",
                elapsed,
                budget,
                detail,
            )
            await self._sleep(interval_s)

    async def _ready_cause(self, ep: Endpoint) -> str | None:
        """None when `ep` is ready, else why not; a 404 (unknown model) raises."""
        try:
            resp = await self._http.get(
                f"{ep.url}{self._prefix}/ready",
                headers=ep.headers,
                extensions=ep.extensions,
                timeout=min(self.timeout, 10.0),
            )
        except httpx.TransportError as exc:
            return f"{type(exc).__name__}: {exc}"
        if resp.status_code == 200:
            return None
        if resp.status_code == 404:
            raise RewardServiceError(
                f"{ep.label}: {_error_text(resp)}", urls=[ep.url], status=404, error_type="not_found"
            )
        return f"HTTP {resp.status_code}: {_error_text(resp)}"

    # -------------------------------------------------------------------------------- transport
    def _wait_before_retry(self, attempt: int, retry_after: float | None) -> float:
        """0 while another endpoint is in rotation (fail over at once); else full-jitter backoff or
        Retry-After + jitter."""
        if self._replicas.any_up():
            return 0.0
        if retry_after is not None:
            return retry_after + self._random.uniform(0, self.backoff_s)
        return self._random.uniform(0, min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1)))

    async def _request(self, method: str, path: str, payload: Any) -> _Reply:
        """Send to endpoints until one answers 2xx with JSON, or retries / the deadline run out."""
        start = self._clock()
        deadline = start + self.deadline_s
        attempt, tried = 0, []
        failure = _Failure("no attempt made", None, None)
        while True:
            await self._replicas.refresh()  # cheap unless a resolution is due
            ep = self._replicas.pick()
            tried.append(ep)
            outcome = await self._attempt(method, ep, path, payload, deadline)
            if isinstance(outcome, _Reply):
                self._replicas.succeeded(ep)
                return outcome
            failure = outcome
            attempt += 1
            self._replicas.failed(ep, failure.retry_after, connect=failure.connect)
            wait = self._wait_before_retry(attempt, failure.retry_after)
            elapsed = self._clock() - start
            out_of_tries = self.max_retries is not None and attempt > self.max_retries
            if out_of_tries or elapsed + wait >= self.deadline_s:
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
        tried = list(dict.fromkeys(tried))
        raise RewardServiceError(
            f"reward service failed after {attempt} attempt(s) in {self._clock() - start:.1f}s "
            f"({', '.join(ep.label for ep in tried)}); last error: {failure.cause}",
            urls=[ep.url for ep in tried],
            cause=failure.exc or failure.cause,
        )

    async def _attempt(
        self, method: str, ep: Endpoint, path: str, payload: Any, deadline: float
    ) -> _Reply | _Failure:
        """One request to one endpoint: the reply, a retryable failure, or a `RewardServiceError` for the rest."""
        where = ep.where(method, path)
        timeout = max(min(self.timeout, deadline - self._clock()), 0.001)
        try:
            resp = await self._http.request(
                method,
                ep.url + path,
                json=payload,
                headers=ep.headers,
                extensions=ep.extensions,
                timeout=httpx.Timeout(timeout),
            )
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            return _Failure(f"{ep.label}: {type(exc).__name__}: {exc}", exc, None, connect=True)
        except _RETRYABLE_TRANSPORT as exc:
            return _Failure(f"{ep.label}: {type(exc).__name__}: {exc}", exc, None)
        except httpx.TimeoutException as exc:
            raise RewardServiceError(
                f"{where} timed out after {timeout:.1f}s ({type(exc).__name__}); not retried",
                urls=[ep.url],
                cause=exc,
            ) from exc
        if resp.status_code == 429 or resp.status_code >= 500:
            return _Failure(
                f"{ep.label}: HTTP {resp.status_code}: {_error_text(resp)}", None, _retry_after(resp)
            )
        if resp.status_code >= 400:
            raise RewardServiceError(
                f"{where} answered {resp.status_code}: {_error_text(resp)}",
                urls=[ep.url],
                status=resp.status_code,
                error_type=_error_type(resp),
            )
        try:
            data = resp.json()
        except ValueError as exc:  # JSONDecodeError, or bytes that are not text
            raise RewardServiceError(
                f"{where} answered {resp.status_code} with a body that is not JSON: {resp.text[:200]!r}",
                urls=[ep.url],
                status=resp.status_code,
                error_type="bad_response",
                cause=exc,
            ) from exc
        return _Reply(ep, where, resp.status_code, data)

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
        urls=[reply.endpoint.url],
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
