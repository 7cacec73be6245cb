"""karma.client: RewardClient, and karma.integrations.trl's trl_reward_func, faked at the HTTP boundary
(httpx.MockTransport).

The client against a real server is tested in test_reward_api_server.py.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import re
import socket

import httpx
import pytest

from karma.client import RewardClient, RewardServiceError, ScoreResult
from karma.integrations.trl import trl_reward_func
from karma.protocol import ScoreItem
from karma.rm.model import RMInput


class FakeService:
    """A scripted reward service: `script` is a list of responses/exceptions per call (then 200s forever)."""

    def __init__(self, script=(), version: str = "v1"):
        self.script = list(script)
        self.calls: list[httpx.Request] = []
        self.version = version

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.calls.append(request)
        if self.script:
            step = self.script.pop(0)
            if isinstance(step, Exception):
                raise step
            if isinstance(step, httpx.Response):
                return step
        if request.url.path.endswith("/ready"):
            return httpx.Response(200, json={"ready": True, "models": {"a": "ready"}})
        body = json.loads(request.content)
        # score = length of the response text, so order mistakes are visible
        scores = [float(len(it["response"])) for it in body["items"]]
        return httpx.Response(
            200,
            json={
                "model": "a",
                "version": self.version,
                "scores": scores,
                "truncated": [False] * len(scores),
            },
        )

    @property
    def hosts(self) -> list[str]:
        return [c.url.host for c in self.calls]


def error(status: int, message: str, error_type: str, **headers) -> httpx.Response:
    return httpx.Response(status, json={"error": message, "error_type": error_type}, headers=headers)


class FakeClock:
    """Time that passes only when the client sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeDNS:
    """A resolver (`karma.discovery.Resolver`): host -> addresses, editable between calls; other names do not
    resolve. Records each lookup."""

    def __init__(self, **names: list[str]):
        self.names = {host.replace("_", "-"): list(addrs) for host, addrs in names.items()}
        self.lookups: list[tuple[str, int]] = []

    def __call__(self, host: str, port: int) -> list[str]:
        self.lookups.append((host, port))
        if host not in self.names:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return self.names[host]


def make_client(
    service,
    urls="http://rm1:8000",
    *,
    clock: FakeClock | None = None,
    resolver=None,
    seed: int = 0,
    **kwargs,
) -> tuple[RewardClient, list[float]]:
    """A client on `service` (a MockTransport handler); names resolve through `resolver` (default: none
    resolves, so the URLs are used as given, without a real DNS lookup); its back-off jitter draws from
    `random.Random(seed)`, so a test's run is the same every time (tests that assert what holds for every draw
    run several seeds)."""
    client = RewardClient(
        urls, transport=httpx.MockTransport(service), resolver=resolver or FakeDNS(), **kwargs
    )
    sleeps: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if clock is not None:
            clock.now += seconds

    client._sleep = fake_sleep
    client._random = random.Random(seed)
    if clock is not None:
        client._clock = clock
    return client, sleeps


def run(coro):
    return asyncio.run(coro)


def test_score_sends_items_in_any_form_and_returns_a_score_result():
    service = FakeService()
    client, _ = make_client(service, api_key="k")
    items = [
        {"context": "c", "response": "xx"},
        ScoreItem(
            context=[{"role": "user", "content": "hi"}], response="yyyy", metadata={"subreddit": "College"}
        ),
        RMInput("ctx", "z"),
    ]

    async def go():
        async with client:
            return await client.score(items, normalize=True)

    result = run(go())
    assert result == ScoreResult([2.0, 4.0, 1.0], "a", "v1", [False] * 3, ["v1"] * 3)
    (req,) = service.calls
    assert req.url == "http://rm1:8000/v1/score" and req.headers["authorization"] == "Bearer k"
    body = json.loads(req.content)
    assert body["normalize"] is True and body["truncate"] is True
    assert body["items"][0] == {"context": "c", "response": "xx"}  # no nulls sent
    assert body["items"][1]["context"] == [{"role": "user", "content": "hi"}]
    assert body["items"][1]["metadata"] == {"subreddit": "College"}
    with pytest.raises(ValueError, match="response"):
        run(client.score([{"context": "no response"}]))


def test_model_selects_the_url_prefix_and_long_lists_are_chunked_in_order():
    service = FakeService()
    client, _ = make_client(service, model="b", batch_size=3)
    texts = ["a" * n for n in range(1, 8)]
    result = run(client.score([{"response": t} for t in texts]))
    assert result.scores == [float(n) for n in range(1, 8)]
    assert [c.url.path for c in service.calls] == ["/models/b/v1/score"] * 3
    assert sorted(len(json.loads(c.content)["items"]) for c in service.calls) == [1, 3, 3]
    assert run(client.score([])).scores == []


def test_5xx_is_retried_with_jittered_exponential_backoff():
    service = FakeService(
        [error(503, "model 'a' is still loading", "not_ready"), error(500, "boom", "internal")]
    )
    client, sleeps = make_client(service, backoff_s=0.5, max_backoff_s=8)
    assert run(client.score([{"response": "abc"}])).scores == [3.0]
    assert len(service.calls) == 3
    assert len(sleeps) == 2 and 0 <= sleeps[0] <= 0.5 and 0 <= sleeps[1] <= 1.0


def test_429_honours_retry_after():
    service = FakeService([error(429, "overloaded", "overloaded", **{"Retry-After": "2"})])
    client, sleeps = make_client(service, backoff_s=0.25)
    assert run(client.score([{"response": "abc"}])).scores == [3.0]
    assert len(sleeps) == 1 and 2.0 <= sleeps[0] <= 2.25


def test_4xx_is_not_retried_and_raises_with_the_server_message():
    service = FakeService([error(422, "items.0.response: Field required", "validation")])
    client, sleeps = make_client(service)
    with pytest.raises(RewardServiceError, match=r"answered 422: items.0.response: Field required") as info:
        run(client.score([{"response": "x"}]))
    assert info.value.status == 422 and info.value.error_type == "validation"
    assert len(service.calls) == 1 and sleeps == []


def test_connect_errors_fail_over_to_the_next_url_at_once():
    service = FakeService([httpx.ConnectError("connection refused")])
    client, sleeps = make_client(service, urls="http://rm1:8000,http://rm2:8000")
    assert run(client.score([{"response": "ab"}])).scores == [2.0]
    assert service.hosts == ["rm1", "rm2"] and sleeps == [0.0]
    run(client.score([{"response": "ab"}]))  # rm1 is marked down for a while: rm2 again
    assert service.hosts[-1] == "rm2"


def test_healthy_urls_are_used_round_robin():
    service = FakeService()
    client, _ = make_client(service, urls=["http://rm1:8000", "http://rm2:8000/", "http://rm3:8000"])
    for _ in range(6):
        run(client.score([{"response": "x"}]))
    assert service.hosts == ["rm1", "rm2", "rm3", "rm1", "rm2", "rm3"]


def test_final_failure_names_the_urls_and_the_last_cause():
    service = FakeService([error(503, "not loaded", "not_ready")] * 10)
    client, sleeps = make_client(service, urls="http://rm1:8000,http://rm2:8000", max_retries=2)
    with pytest.raises(RewardServiceError, match=r"failed after 3 attempt\(s\)") as info:
        run(client.score([{"response": "x"}]))
    msg = str(info.value)
    assert "http://rm1:8000" in msg and "http://rm2:8000" in msg and "HTTP 503: not loaded" in msg
    assert info.value.urls == ["http://rm1:8000", "http://rm2:8000"]
    assert len(service.calls) == 3 and len(sleeps) == 2


def test_the_deadline_stops_retries_early():
    service = FakeService([error(429, "full", "overloaded", **{"Retry-After": "30"})] * 5)
    client, sleeps = make_client(service, deadline_s=5, max_retries=10)
    with pytest.raises(RewardServiceError, match="HTTP 429: full"):
        run(client.score([{"response": "x"}]))
    assert len(service.calls) == 1 and sleeps == []  # waiting 30 s would pass the 5 s deadline


def test_read_timeouts_are_not_retried():
    service = FakeService([httpx.ReadTimeout("slow")])
    client, _ = make_client(service)
    with pytest.raises(RewardServiceError, match="timed out after .* not retried"):
        run(client.score([{"response": "x"}]))
    assert len(service.calls) == 1


def test_wait_ready_polls_until_ready_and_reports_what_blocked_it():
    service = FakeService([error(503, "loading", "not_ready"), httpx.ConnectError("refused")])
    client, sleeps = make_client(service, model="a")
    run(client.wait_ready(60, interval_s=0.1))
    assert [c.url.path for c in service.calls] == ["/models/a/ready"] * 3 and sleeps == [0.1, 0.1]

    stuck = FakeService([error(503, "model 'a' is still loading", "not_ready")] * 3)
    client, _ = make_client(stuck)
    with pytest.raises(
        RewardServiceError,
        match=r"not ready before the deadline: http://rm1:8000: HTTP 503: "
        r"model 'a' is still loading",
    ):
        run(client.wait_ready(0.01, interval_s=0.1))
    unknown = FakeService([error(404, "unknown model 'q'; known models: a", "not_found")])
    client, _ = make_client(unknown, model="q")
    with pytest.raises(RewardServiceError, match="unknown model 'q'"):
        run(client.wait_ready(60))


# --------------------------------------------------------------------------------------------- bad answers
def ok_body(**fields) -> dict:
    return {"model": "a", "version": "v1", "scores": [0.5], "truncated": [False]} | fields


@pytest.mark.parametrize(
    "response,message",
    [
        (
            httpx.Response(200, text="<html>proxy error</html>"),
            r"POST http://rm1:8000/v1/score answered 200 with a body that is not JSON: '<html>proxy error</html>'",
        ),
        (
            httpx.Response(200, json={"model": "a", "scores": [0.5], "truncated": [False]}),
            r"POST http://rm1:8000/v1/score answered 200 with no 'version'",
        ),
        (httpx.Response(200, json=ok_body(version=None)), r"answered 200 with no 'version'"),
        (
            httpx.Response(200, json=ok_body(scores=None)),
            r"answered 200 with 'scores' that is null, not an array",
        ),
        (
            httpx.Response(200, json=ok_body(scores=[None])),
            r"answered 200 with scores\[0\] is null, not a number",
        ),
        (
            httpx.Response(200, json=ok_body(scores=["0.5"])),
            r'answered 200 with scores\[0\] is "0.5" \(a string\), not a number',
        ),
        (
            httpx.Response(200, json=ok_body(scores=[True])),
            r"scores\[0\] is true \(a boolean\), not a number",
        ),
        (httpx.Response(200, json=[0.5]), r"answered 200 with an array instead of a JSON object"),
        (
            httpx.Response(200, json=ok_body(truncated="no")),
            r"answered 200 with a body that is not a score response: truncated: Input should be a valid list",
        ),
        (
            httpx.Response(200, json=ok_body(scores=[0.5, 0.7], truncated=[False, False])),
            r"the service returned 2 scores for 1 items \(POST http://rm1:8000/v1/score\)",
        ),
    ],
    ids=[
        "not-json",
        "no-version",
        "null-version",
        "null-scores",
        "null-score",
        "string-score",
        "bool-score",
        "not-an-object",
        "bad-truncated",
        "wrong-count",
    ],
)
def test_an_invalid_answer_is_a_named_error_and_not_retried(response, message):
    service = FakeService([response])
    client, sleeps = make_client(service, urls="http://rm1:8000,http://rm2:8000")
    with pytest.raises(RewardServiceError, match=message) as info:
        run(client.score([{"response": "x"}]))
    assert info.value.urls == ["http://rm1:8000"] and info.value.error_type == "bad_response"
    assert info.value.status == 200 and len(service.calls) == 1 and sleeps == []


def test_integer_scores_are_numbers_and_nan_is_left_to_the_caller():
    service = FakeService(
        [
            httpx.Response(
                200,
                content=b'{"model": "a", "version": "v1", "scores": [1, NaN], "truncated": [false, false]}',
            )
        ]
    )
    client, _ = make_client(service)
    scores = run(client.score([{"response": "x"}, {"response": "y"}])).scores
    assert (
        scores[0] == 1.0 and isinstance(scores[0], float) and scores[1] != scores[1]
    )  # NaN: the trainer refuses it


def test_info_with_a_body_that_is_not_json_is_named():
    client, _ = make_client(FakeService([httpx.Response(200, text="")]))
    with pytest.raises(
        RewardServiceError, match=r"GET http://rm1:8000/info answered 200 with a body that is not JSON"
    ):
        run(client.info())


# --------------------------------------------------------------------------------------------- replicas
class Replicas:
    """One MockTransport handler for several hosts: each host has its own script (then healthy answers)."""

    def __init__(self, **scripts):
        self.services = {host: FakeService(script) for host, script in scripts.items()}
        self.calls: list[str] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.calls.append(request.url.host)
        return self.services.setdefault(request.url.host, FakeService())(request)


@pytest.mark.parametrize(
    "failure",
    [
        httpx.ConnectError("connection refused"),
        error(503, "model 'a' is still loading", "not_ready"),
        error(502, "bad gateway", "internal"),
        error(429, "overloaded", "overloaded", **{"Retry-After": "3"}),
    ],
    ids=["connect", "503", "502", "429"],
)
def test_a_failing_replica_fails_over_to_the_other_at_once_and_is_skipped(failure):
    replicas = Replicas(rm1=[failure])
    client, sleeps = make_client(replicas, urls="http://rm1:8000,http://rm2:8000")
    assert run(client.score([{"response": "ab"}])).scores == [2.0]
    assert replicas.calls == ["rm1", "rm2"] and sleeps == [0.0]  # no back-off while a replica is up
    for _ in range(2):
        run(client.score([{"response": "ab"}]))
    assert replicas.calls[2:] == ["rm2", "rm2"]  # rm1 is skipped for its back-off


def test_requests_ride_out_a_replica_restart():
    """rm1 restarts: refused connections, then 503 while its model loads, then healthy. Every request
    succeeds via rm2, none waits, and rm1 is used again once it is back."""
    restarting = [httpx.ConnectError("refused")] * 3 + [
        error(503, "model 'a' is still loading", "not_ready")
    ] * 2
    replicas = Replicas(rm1=restarting)
    clock = FakeClock()
    # one retry per request is enough: the fail-over itself
    client, sleeps = make_client(replicas, urls="http://rm1:8000,http://rm2:8000", clock=clock, max_retries=1)
    for i in range(40):
        clock.now += 0.5  # a request every half second
        assert run(client.score([{"response": "x" * i}])).scores == [float(i)]
    assert all(s == 0.0 for s in sleeps)
    assert replicas.services["rm1"].script == []  # rm1 went through its whole restart
    assert sorted(replicas.calls[-4:]) == ["rm1", "rm1", "rm2", "rm2"]  # and is back in the rotation


def test_when_every_replica_is_down_it_backs_off_with_jitter_until_one_returns():
    replicas = Replicas(rm1=[httpx.ConnectError("refused")] * 4, rm2=[httpx.ConnectError("refused")] * 4)
    clock = FakeClock()
    client, sleeps = make_client(
        replicas,
        urls="http://rm1:8000,http://rm2:8000",
        clock=clock,
        max_retries=20,
        backoff_s=0.5,
        max_backoff_s=4,
    )
    assert run(client.score([{"response": "abc"}])).scores == [3.0]
    assert len(replicas.calls) == 9
    waits = [s for s in sleeps if s > 0]
    assert sleeps[0] == 0.0 and waits  # the first failure fails over; then both are down: back-off
    assert all(w <= min(4, 0.5 * 2 ** (n - 1)) for n, w in enumerate(sleeps, 1) if w > 0)


@pytest.mark.parametrize("seed", range(20))
def test_a_dead_service_is_retried_until_the_deadline_and_logged_at_info_at_a_sane_rate(caplog, seed):
    """What holds for every jitter draw: the call stops before the 60 s deadline (at ≥ 58 s: it stops when the
    next wait, ≤ max_backoff_s = 2 s, would cross it; "60.0s" when it stops within 0.05 s of it); one INFO line
    per ≥ 5 s of fake time, and the next attempt after a 5 s mark comes at most one wait (2 s) later, so 58-60 s
    make between 1 + 58 // 7 = 9 and 1 + 60 // 5 = 13 lines."""
    replicas = Replicas(
        rm1=[httpx.ConnectError("refused")] * 10_000, rm2=[httpx.ConnectError("refused")] * 10_000
    )
    clock = FakeClock()
    client, _ = make_client(
        replicas,
        urls="http://rm1:8000,http://rm2:8000",
        clock=clock,
        max_retries=10_000,
        deadline_s=60,
        backoff_s=0.5,
        max_backoff_s=2,
        seed=seed,
    )
    start = clock.now
    final = r"failed after \d+ attempt\(s\) in (5[89]\.\d|60\.0)s \(http://rm1:8000, http://rm2:8000\)"
    with caplog.at_level("INFO", logger="karma.client"), pytest.raises(RewardServiceError, match=final):
        run(client.score([{"response": "x"}]))
    assert 58 <= clock.now - start < 60 and len(replicas.calls) > 40
    info = [r.getMessage() for r in caplog.records if r.levelname == "INFO" and r.name == "karma.client"]
    assert 9 <= len(info) <= 13  # one line per log_interval_s (5 s) of fake time, not one per attempt
    assert "POST /v1/score attempt 1 failed (http://rm1:8000: ConnectError: refused)" in info[0]
    assert re.search(
        r"attempt \d+ failed \(http://rm\d:8000: ConnectError: refused\); retrying in "
        r"\d\.\d\ds \(\d+\.\ds elapsed, deadline 60s\)",
        info[-1],
    )


def test_wait_ready_logs_while_it_waits(caplog):
    service = FakeService([httpx.ConnectError("refused")] * 30)
    clock = FakeClock()
    client, _ = make_client(service, clock=clock)
    with caplog.at_level("INFO", logger="karma.client"):
        run(client.wait_ready(60, interval_s=1.0))
    info = [r.getMessage() for r in caplog.records if r.levelname == "INFO" and r.name == "karma.client"]
    assert len(info) == 6  # 30 s of waiting, a line every 5 s (httpx logs its own requests at INFO too)
    assert info[0] == (
        "waiting for the reward service to be ready (0.0s elapsed, deadline 60s): "
        "http://rm1:8000: ConnectError: refused"
    )


def test_trl_reward_func_fails_over_between_replicas():
    replicas = Replicas(rm1=[httpx.ConnectError("refused")] * 5)
    f = trl_reward_func(["http://rm1:8000", "http://rm2:8000"], transport=httpx.MockTransport(replicas))

    async def go():
        try:
            return [await f(prompts=["p"], completions=["abcd"]) for _ in range(3)]
        finally:
            await f.aclose()

    assert run(go()) == [[4.0]] * 3
    assert "rm2" in replicas.calls


# ------------------------------------------------------------------------------- discovery (karma.discovery)
def score_n(client: RewardClient, n: int, clock: FakeClock | None = None, step_s: float = 0.0) -> None:
    for _ in range(n):
        if clock is not None:
            clock.now += step_s
        assert run(client.score([{"response": "abc"}])).scores == [3.0]


def test_a_name_expands_into_one_endpoint_per_address_and_keeps_its_host_header():
    replicas = Replicas()
    dns = FakeDNS(reward_api=["172.18.0.3", "172.18.0.4"])
    client, _ = make_client(replicas, urls="http://reward-api:8000", resolver=dns, model="karma")
    score_n(client, 4)
    assert replicas.calls == ["172.18.0.3", "172.18.0.4"] * 2
    assert dns.lookups == [("reward-api", 8000)]  # once: the next one is due in 30 s
    for service in replicas.services.values():
        for request in service.calls:
            assert request.headers["host"] == "reward-api:8000"
            assert request.url.path == "/models/karma/v1/score"
    assert [ep.label for ep in client.endpoints] == [
        "http://reward-api:8000 at 172.18.0.3",
        "http://reward-api:8000 at 172.18.0.4",
    ]
    assert client.urls == ["http://reward-api:8000"]


def test_ip_addresses_are_not_resolved_and_https_keeps_the_tls_server_name():
    replicas = Replicas()
    dns = FakeDNS(rm_tls=["10.0.0.7"])
    client, _ = make_client(
        replicas, urls=["http://127.0.0.1:8001", "https://rm-tls:8443", "http://[::1]:8002"], resolver=dns
    )
    score_n(client, 3)
    assert replicas.calls == ["127.0.0.1", "10.0.0.7", "::1"]
    assert dns.lookups == [("rm-tls", 8443)]
    (tls,) = replicas.services["10.0.0.7"].calls
    assert str(tls.url) == "https://10.0.0.7:8443/v1/score"
    assert tls.headers["host"] == "rm-tls:8443" and tls.extensions["sni_hostname"] == "rm-tls"
    (plain,) = replicas.services["127.0.0.1"].calls
    assert "sni_hostname" not in plain.extensions and plain.headers["host"] == "127.0.0.1:8001"


def test_names_are_resolved_again_so_replicas_join_and_leave(caplog):
    """`--scale reward-api=3`, then `=1`: each change is seen at the next resolution (every 30 s)."""
    replicas = Replicas()
    dns = FakeDNS(reward_api=["10.0.0.1", "10.0.0.2"])
    clock = FakeClock()
    client, _ = make_client(replicas, urls="http://reward-api:8000", resolver=dns, clock=clock)
    with caplog.at_level("INFO", logger="karma.client"):
        score_n(client, 4, clock, 1.0)
        dns.names["reward-api"] = ["10.0.0.1", "10.0.0.2", "10.0.0.3"]  # scaled up
        score_n(client, 20, clock, 1.0)  # 24 s: not yet resolved again
        assert set(replicas.calls) == {"10.0.0.1", "10.0.0.2"}
        score_n(client, 9, clock, 1.0)  # past 30 s
        assert set(replicas.calls[-6:]) == {"10.0.0.1", "10.0.0.2", "10.0.0.3"}
        dns.names["reward-api"] = ["10.0.0.2"]  # scaled down
        score_n(client, 40, clock, 1.0)
    assert set(replicas.calls[-5:]) == {"10.0.0.2"}
    assert [ep.address for ep in client.endpoints] == ["10.0.0.2"]
    assert len(dns.lookups) == 3  # at 1 s, 31 s, 61 s of fake time (73 s in all)
    changes = [r.getMessage() for r in caplog.records if "endpoint(s)" in r.getMessage()]
    assert changes == [
        (
            "reward service http://reward-api:8000: 2 endpoint(s); "
            "joined: http://reward-api:8000 at 10.0.0.1, http://reward-api:8000 at 10.0.0.2"
        ),
        "reward service http://reward-api:8000: 3 endpoint(s); joined: http://reward-api:8000 at 10.0.0.3",
        (
            "reward service http://reward-api:8000: 1 endpoint(s); "
            "left: http://reward-api:8000 at 10.0.0.1, http://reward-api:8000 at 10.0.0.3"
        ),
    ]


def test_a_failing_replica_is_out_for_a_growing_backoff_then_retried_and_back_after_one_success():
    """rm1 refuses 5 connections in a row: it is tried again after 0.25, 0.5, 1, 2, 2 s (backoff_s x 2^(n-1),
    capped at 2 s), every request meanwhile answered by rm2 without waiting; then it answers and is back in
    the rotation."""
    replicas = Replicas(rm1=[httpx.ConnectError("refused")] * 5)
    clock = FakeClock()
    client, sleeps = make_client(
        replicas, urls="http://rm1:8000,http://rm2:8000", clock=clock, backoff_s=0.25, max_backoff_s=2
    )
    tried_rm1: list[float] = []
    for _ in range(120):
        clock.now += 1 / 16  # exact in binary: no rounding at the edges of the back-off
        before = len(replicas.calls)
        assert run(client.score([{"response": "ab"}])).scores == [2.0]
        if "rm1" in replicas.calls[before:]:
            tried_rm1.append(clock.now)
    gaps = [b - a for a, b in itertools.pairwise(tried_rm1)]
    assert gaps[:5] == [0.25, 0.5, 1.0, 2.0, 2.0]
    assert set(gaps[5:]) == {0.125}  # back: every other request
    assert set(sleeps) == {0.0}


@pytest.mark.parametrize(
    "failure",
    [
        httpx.RemoteProtocolError("Server disconnected without sending a response."),
        httpx.ReadError("[Errno 104] Connection reset by peer"),
        httpx.WriteError("[Errno 32] Broken pipe"),
    ],
    ids=["disconnected", "reset", "broken-pipe"],
)
def test_a_request_in_flight_on_a_replica_that_dies_is_answered_by_another(failure):
    replicas = Replicas(**{"10.0.0.1": [failure]})
    client, sleeps = make_client(
        replicas, urls="http://reward-api:8000", resolver=FakeDNS(reward_api=["10.0.0.1", "10.0.0.2"])
    )
    assert run(client.score([{"response": "abcd"}])).scores == [4.0]
    assert replicas.calls == ["10.0.0.1", "10.0.0.2"] and sleeps == [0.0]


def test_a_refused_connection_to_an_address_brings_the_next_resolution_forward():
    """A replica that left (its container is gone): the first refused connection makes the name due for
    resolution within a second instead of 30 s, and the address leaves the rotation."""
    replicas = Replicas(**{"10.0.0.2": [httpx.ConnectError("no route to host")] * 100})
    dns = FakeDNS(reward_api=["10.0.0.1", "10.0.0.2"])
    clock = FakeClock()
    client, _ = make_client(replicas, urls="http://reward-api:8000", resolver=dns, clock=clock)
    score_n(client, 2, clock, 0.1)
    assert replicas.calls == ["10.0.0.1", "10.0.0.2", "10.0.0.1"]
    dns.names["reward-api"] = ["10.0.0.1"]
    score_n(client, 12, clock, 0.1)
    assert len(dns.lookups) == 2  # the first, and one 1 s after the refusal
    assert [ep.address for ep in client.endpoints] == ["10.0.0.1"]
    assert replicas.calls.count("10.0.0.2") <= 4


def test_a_name_that_does_not_resolve_is_used_as_given_and_later_keeps_its_last_addresses(caplog):
    replicas = Replicas()
    dns = FakeDNS()  # reward-api unknown at first (its containers are still starting)
    clock = FakeClock()
    client, _ = make_client(replicas, urls="http://reward-api:8000", resolver=dns, clock=clock)
    score_n(client, 1, clock)
    assert replicas.calls == ["reward-api"]  # as given: httpx resolves it when it connects
    dns.names["reward-api"] = ["10.0.0.1", "10.0.0.2"]
    score_n(client, 2, clock, 31.0)
    assert replicas.calls[1:] == ["10.0.0.1", "10.0.0.2"]
    del dns.names["reward-api"]  # the DNS server fails for a while
    with caplog.at_level("INFO", logger="karma.client"):
        score_n(client, 2, clock, 31.0)
    assert replicas.calls[3:] == ["10.0.0.1", "10.0.0.2"]
    assert any(
        "reward service http://reward-api:8000 does not resolve ([Errno -2] Name or service not known); "
        "keeping its last addresses" in r.getMessage()
        for r in caplog.records
    )


def test_wait_ready_waits_for_every_address_of_a_name():
    replicas = Replicas(**{"10.0.0.2": [error(503, "model 'a' is still loading", "not_ready")] * 2})
    dns = FakeDNS(reward_api=["10.0.0.1", "10.0.0.2"])
    client, sleeps = make_client(replicas, urls="http://reward-api:8000", resolver=dns)
    run(client.wait_ready(60, interval_s=0.1))
    assert replicas.calls == ["10.0.0.1", "10.0.0.2", "10.0.0.2", "10.0.0.2"] and sleeps == [0.1, 0.1]

    stuck = Replicas(**{"10.0.0.2": [error(503, "model 'a' is still loading", "not_ready")] * 5})
    client, _ = make_client(stuck, urls="http://reward-api:8000", resolver=dns)
    with pytest.raises(
        RewardServiceError,
        match=r"not ready before the deadline: http://reward-api:8000 at 10\.0\.0\.2: HTTP 503: "
        r"model 'a' is still loading$",
    ) as info:
        run(client.wait_ready(0.01, interval_s=0.1))
    assert info.value.urls == ["http://10.0.0.2:8000"]


def test_errors_name_the_replica_by_its_url_and_address():
    replicas = Replicas(
        **{"10.0.0.1": [error(503, "busy", "overloaded")], "10.0.0.2": [error(422, "bad item", "validation")]}
    )
    client, _ = make_client(
        replicas, urls="http://reward-api:8000", resolver=FakeDNS(reward_api=["10.0.0.1", "10.0.0.2"])
    )
    with pytest.raises(
        RewardServiceError,
        match=r"^POST http://reward-api:8000/v1/score at 10\.0\.0\.2 answered 422: bad item$",
    ) as info:
        run(client.score([{"response": "x"}]))
    assert info.value.urls == ["http://10.0.0.2:8000"]
    dead = Replicas(**{"10.0.0.1": [httpx.ConnectError("refused")] * 9})
    client, _ = make_client(
        dead, urls="http://reward-api:8000", resolver=FakeDNS(reward_api=["10.0.0.1"]), max_retries=1
    )
    with pytest.raises(
        RewardServiceError,
        match=r"failed after 2 attempt\(s\) in .*s \(http://reward-api:8000 at 10\.0\.0\.1\); "
        r"last error: http://reward-api:8000 at 10\.0\.0\.1: ConnectError: refused",
    ):
        run(client.score([{"response": "x"}]))


def test_resolve_addresses_prefers_ipv4_dedupes_and_sorts(monkeypatch):
    from karma import discovery

    def fake_getaddrinfo(host, port, type=0):
        v4 = [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in ("10.0.0.10", "10.0.0.9")]
        v6 = [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("fe80::1%eth0", port, 0, 2))]
        return {"both": v4 + v6 + v4[:1], "v6": v6}[host]

    monkeypatch.setattr(discovery.socket, "getaddrinfo", fake_getaddrinfo)
    assert discovery.resolve_addresses("both", 8000) == ["10.0.0.9", "10.0.0.10"]
    assert discovery.resolve_addresses("v6", 8000) == ["fe80::1"]


def test_localhost_resolves_for_real_to_loopback_and_discovery_can_be_off():
    from karma.discovery import resolve_addresses

    assert resolve_addresses("localhost", 8000) == ["127.0.0.1"]
    replicas = Replicas()
    dns = FakeDNS(reward_api=["10.0.0.1", "10.0.0.2"])
    client, _ = make_client(replicas, urls="http://reward-api:8000", resolver=dns, resolve_interval_s=None)
    score_n(client, 2)
    assert replicas.calls == ["reward-api", "reward-api"] and dns.lookups == []
    with pytest.raises(ValueError, match=r"resolve_interval_s must be > 0 \(or None: no discovery\), got 0"):
        RewardClient("http://rm1:8000", resolve_interval_s=0)


class LoopbackReplica:
    """A minimal reward service (score = response length) on a real uvicorn at a fixed loopback port, which
    can be stopped and started again on that port."""

    def __init__(self, port: int):
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.served = 0
        self._server = None

    def app(self):
        from fastapi import FastAPI

        app = FastAPI()

        @app.get("/ready")
        def ready() -> dict:
            return {"ready": True, "models": {"a": "ready"}}

        @app.post("/v1/score")
        def score(body: dict) -> dict:
            self.served += 1
            scores = [float(len(it["response"])) for it in body["items"]]
            return {"model": "a", "version": "v1", "scores": scores, "truncated": [False] * len(scores)}

        return app

    def start(self) -> None:  # returns once /ready answers 200
        from tests.support import serve_in_thread

        self._server = serve_in_thread(self.app(), port=self.port)
        self._server.__enter__()

    def stop(self) -> None:
        if self._server is not None:
            self._server.__exit__(None, None, None)
            self._server = None


def test_rolling_restart_of_two_real_replicas_loses_no_request(caplog):
    """Two uvicorn replicas on loopback behind one client that keeps scoring; one is stopped, started again
    and waited for on /ready, then the other: every request is answered, and both restarts were noticed."""
    import threading

    from karma.net import free_port

    replicas = [LoopbackReplica(free_port()), LoopbackReplica(free_port())]
    errors: list[float] = []  # score - expected, per answered request
    failures: list[BaseException] = []
    stop = threading.Event()

    def client_loop() -> None:
        async def go():
            async with RewardClient(
                [r.url for r in replicas], deadline_s=30, max_retries=100, backoff_s=0.05
            ) as rc:
                i = 0
                while not stop.is_set():
                    i += 1
                    try:
                        errors.append((await rc.score([{"response": "x" * (i % 7)}])).scores[0] - i % 7)
                    except RewardServiceError as exc:
                        failures.append(exc)
                    await asyncio.sleep(0.005)

        asyncio.run(go())

    def wait_for_more(n: int) -> None:
        target = len(errors) + n
        for _ in range(2000):
            if len(errors) >= target:
                return
            stop.wait(0.01)
        raise AssertionError(f"the client made no progress; failures: {failures[-3:]}")

    for r in replicas:
        r.start()
    worker = threading.Thread(target=client_loop)
    try:
        with caplog.at_level("DEBUG", logger="karma.client"):
            worker.start()
            wait_for_more(20)
            for r in replicas:  # the rolling restart
                r.stop()
                served_before = r.served
                wait_for_more(20)  # the other replica alone
                assert r.served == served_before
                r.start()
                wait_for_more(40)
                assert r.served > served_before  # back in the rotation
    finally:
        stop.set()
        worker.join(30)
        for r in replicas:
            r.stop()
    assert failures == [] and set(errors) == {0.0}
    failed_on = {
        m.group(1) for r in caplog.records if (m := re.search(r"failed \((http://[\d.:]+): ", r.getMessage()))
    }
    assert failed_on == {r.url for r in replicas}  # each restart really was hit, and ridden out


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="at least one URL"):
        RewardClient([])
    with pytest.raises(ValueError, match="must start with http"):
        RewardClient("rm1:8000")


# --------------------------------------------------------------------------------------------- TRL
def test_trl_reward_func_is_still_importable_from_karma_client():
    import karma.client
    from karma.client import trl_reward_func as old_home

    assert old_home is trl_reward_func is karma.client.trl_reward_func
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        karma.client.nothing_here  # noqa: B018


def test_trl_reward_func_makes_numpy_and_missing_metadata_plain():
    import numpy as np

    service = FakeService()
    f = trl_reward_func(
        "http://rm1:8000", transport=httpx.MockTransport(service), metadata_columns=("depth",)
    )

    async def go():
        try:
            return await f(
                prompts=["p"],
                completions=["abc"],
                depth=[np.float64(2.0)],
                metadata=[{"seconds_since_post": np.nan}],
            )
        finally:
            await f.aclose()

    assert run(go()) == [3.0]
    assert json.loads(service.calls[0].content)["items"][0]["metadata"] == {"depth": 2}


def test_trl_reward_func_handles_standard_and_conversational_data():
    service = FakeService()
    logged: dict[str, float] = {}
    f = trl_reward_func(
        "http://rm1:8000",
        transport=httpx.MockTransport(service),
        name="karma_rm",
        metadata_columns=("subreddit",),
    )
    assert f.__name__ == "karma_rm"

    async def go():
        standard = await f(
            prompts=["Why is the sky blue?", "Tips?"],
            completions=["Scattering.", "Sleep"],
            completion_ids=[[1], [2]],
            trainer_state=None,
            log_extra=lambda *a: None,
            log_metric=lambda k, v: logged.__setitem__(k, v),
            subreddit=["askscience", "College"],
        )
        conversational = await f(
            prompts=[[{"role": "system", "content": "be kind"}, {"role": "user", "content": "Hi?"}]],
            completions=[[{"role": "assistant", "content": "Hello there"}]],
            metadata=[{"depth": 2}],
            subreddit=["College"],
        )
        await f.aclose()
        return standard, conversational

    standard, conversational = run(go())
    assert standard == [11.0, 5.0] and conversational == [11.0]
    first, second = (json.loads(c.content)["items"] for c in service.calls)
    assert first[0] == {
        "context": "Why is the sky blue?",
        "response": "Scattering.",
        "metadata": {"subreddit": "askscience"},
    }
    assert second[0] == {
        "context": [{"role": "user", "content": "Hi?"}],  # system prompts are not thread context
        "response": "Hello there",
        "metadata": {"depth": 2, "subreddit": "College"},
    }
    assert logged == {"karma_rm/truncated_frac": 0.0}


def test_trl_recognises_it_as_an_async_reward_function_and_runs_it_on_its_loop_thread():
    from trl.trainer.utils import (
        get_callable_name,
        is_async_callable,
        shutdown_event_loop_in_daemon,
        start_event_loop_in_daemon,
    )

    service = FakeService()
    f = trl_reward_func("http://rm1:8000", transport=httpx.MockTransport(service))
    assert is_async_callable(f) and get_callable_name(f) == "karma_reward"
    thread, loop, ready = start_event_loop_in_daemon(name="trl-rewards")
    ready.wait()
    try:  # what GRPOTrainer._calculate_rewards does with async reward functions
        for _ in range(2):  # the client made on the first call is reused on TRL's loop
            out = asyncio.run_coroutine_threadsafe(f(prompts=["p"], completions=["abc"]), loop).result(10)
            assert out == [3.0]
        asyncio.run_coroutine_threadsafe(f.aclose(), loop).result(10)
    finally:
        shutdown_event_loop_in_daemon(thread, loop)


class Outage:
    """A lone replica restarting: /ready answers, /v1/score is a 503 (or a refused connection) until `clock`
    has moved `seconds` past the first call, then the FakeService answers."""

    def __init__(self, clock: FakeClock, seconds: float, refuse: bool = False):
        self.clock, self.seconds, self.refuse = clock, seconds, refuse
        self.service = FakeService()
        self.start: float | None = None
        self.failed = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/v1/score"):
            self.start = self.clock.now if self.start is None else self.start
            if self.clock.now - self.start < self.seconds:
                self.failed += 1
                if self.refuse:
                    raise httpx.ConnectError("connection refused")
                return error(503, "shutting down", "unavailable")
        return self.service(request)


def fake_time(monkeypatch, clock: FakeClock, seed: int = 0) -> list[float]:
    """Every RewardClient (also those an adapter makes) sleeps in `clock`'s fake time; its jitter is seeded."""
    sleeps: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        sleeps.append(seconds)
        clock.now += seconds

    monkeypatch.setattr(RewardClient, "_sleep", staticmethod(fake_sleep))
    monkeypatch.setattr(RewardClient, "_clock", staticmethod(clock))
    monkeypatch.setattr(RewardClient, "_random", random.Random(seed))
    return sleeps


@pytest.mark.parametrize("refuse", [False, True], ids=["503", "refused"])
def test_trl_reward_func_rides_out_a_13s_restart_of_a_lone_replica_and_stops_at_its_deadline(
    monkeypatch, refuse
):
    """The same retries as karma's trainer: bounded by a deadline (default 120 s), not a count of tries (the
    former 5 retries gave up 4-8 s into a restart that takes 12-13 s)."""
    clock = FakeClock()
    fake_time(monkeypatch, clock)
    outage = Outage(clock, 13.0, refuse=refuse)
    f = trl_reward_func("http://127.0.0.1:8000", transport=httpx.MockTransport(outage))

    async def go(fn):
        try:
            return await fn(prompts=["p"], completions=["abc"])
        finally:
            await fn.aclose()

    assert run(go(f)) == [3.0]
    assert outage.failed > 6 and clock.now - outage.start >= 13.0
    short = trl_reward_func("http://127.0.0.1:8000", transport=httpx.MockTransport(outage), deadline_s=5)
    outage.start = clock.now  # a second restart
    with pytest.raises(RewardServiceError, match=r"failed after \d+ attempt\(s\) in [0-4]\.\ds \(http://127"):
        run(go(short))
    assert clock.now - outage.start < 5.0


def test_max_retries_none_leaves_the_deadline_alone_to_bound_retries():
    clock = FakeClock()
    dead = FakeService([error(503, "down", "unavailable")] * 10_000)
    client, _ = make_client(dead, clock=clock, max_retries=None, deadline_s=30, max_backoff_s=1)
    with pytest.raises(RewardServiceError, match=r"failed after \d+ attempt\(s\) in (29\.\d|30\.0)s"):
        run(client.score([{"response": "x"}]))
    assert len(dead.calls) > 30  # well past the default count of 5 retries
    with pytest.raises(ValueError, match=r"max_retries >= 0 \(or None\)"):
        RewardClient("http://rm1:8000", max_retries=-1)
