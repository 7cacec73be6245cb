"""karma.client: RewardClient and trl_reward_func, faked at the HTTP boundary (httpx.MockTransport).

The client against a real server is tested in test_reward_api_server.py.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from karma.client import RewardClient, RewardServiceError, ScoreResult, trl_reward_func
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


def make_client(service: FakeService, urls="http://rm1:8000", **kwargs) -> tuple[RewardClient, list[float]]:
    client = RewardClient(urls, transport=httpx.MockTransport(service), **kwargs)
    sleeps: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        sleeps.append(seconds)

    client._sleep = fake_sleep
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


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="at least one URL"):
        RewardClient([])
    with pytest.raises(ValueError, match="must start with http"):
        RewardClient("rm1:8000")


# --------------------------------------------------------------------------------------------- TRL
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
