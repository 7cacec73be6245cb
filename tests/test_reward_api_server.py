"""The reward service on a real uvicorn (127.0.0.1, free port): concurrency, hot swap under load, overload,
the OpenRLHF / verl client formats, and (slow) `karma serve` with the MiniLM reward model on real Reddit data."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from karma.client import RewardClient, RewardServiceError
from karma.rm.model import RewardModel, RMInput
from services.reward_api.core.config import Settings
from services.reward_api.main import create_app
from services.reward_api.testing import free_port, make_tiny_rm, reddit_items, serve_in_thread

ADMIN = {"Authorization": "Bearer admin-secret"}
ITEMS = [
    {"context": "post " * (3 * i), "response": f"reply number {i} " + "ok " * (i % 4)} for i in range(16)
]


def as_inputs(items) -> list[RMInput]:
    return [RMInput(it.get("context", ""), it["response"], it.get("metadata")) for it in items]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    make_tiny_rm(root / "a", "context", seed=0)
    make_tiny_rm(root / "a2", "context", seed=2)
    return root


@pytest.fixture(scope="module")
def models(root) -> dict[str, RewardModel]:
    return {name: RewardModel.load(root / name) for name in ("a", "a2")}


def app_for(root: Path, **overrides):
    settings = {"models": {"a": str(root / "a")}, "admin_token": "admin-secret", "model_roots": [str(root)]}
    settings.update(overrides)
    return create_app(Settings(**settings))


def metric(url: str, name: str, **labels) -> float:
    text = httpx.get(f"{url}/metrics").text
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    raise KeyError(name)


def test_concurrent_single_item_clients_are_batched_across_requests(root, models):
    with serve_in_thread(app_for(root, max_wait_ms=20)) as url:

        async def go():
            async with RewardClient(url) as rc:
                await rc.wait_ready(30)
                return await asyncio.gather(*(rc.score([it]) for it in ITEMS))

        results = asyncio.run(go())
        scores = [r.scores[0] for r in results]
        assert scores == pytest.approx(models["a"].score(as_inputs(ITEMS)), abs=1e-5)
        assert {r.version for r in results} == {models["a"].version}
        batches = metric(url, "karma_batch_size_count", model="a")
        assert metric(url, "karma_items_scored_total", model="a") == len(ITEMS)
        assert batches < len(ITEMS)  # 16 requests shared forwards


def test_hot_swap_while_8_clients_score_continuously(root, models):
    app = app_for(root, max_wait_ms=2)
    old_v, new_v = models["a"].version, models["a2"].version
    expected = {v: m.score(as_inputs(ITEMS[:8])) for v, m in ((old_v, models["a"]), (new_v, models["a2"]))}
    with serve_in_thread(app) as url:

        async def go():
            results: dict[int, list[tuple[str, float]]] = {i: [] for i in range(8)}
            failures: list[BaseException] = []
            stop = asyncio.Event()
            async with RewardClient(url, max_retries=0) as rc:  # no retries: every failure is counted

                async def client(i: int) -> None:
                    while not stop.is_set():
                        try:
                            r = await rc.score([ITEMS[i]])
                        except Exception as exc:  # noqa: BLE001 - counted and asserted empty below
                            failures.append(exc)
                            continue
                        results[i].append((r.version, r.scores[0]))

                async def until(condition, timeout: float = 60) -> None:
                    deadline = time.monotonic() + timeout
                    while not condition() and time.monotonic() < deadline:
                        await asyncio.sleep(0.05)

                tasks = [asyncio.create_task(client(i)) for i in range(8)]
                await until(lambda: all(len(r) >= 3 for r in results.values()))  # every client is scoring
                async with httpx.AsyncClient(timeout=120) as admin:
                    swap = await admin.put(f"{url}/v1/models/a", json={"path": "a2"}, headers=ADMIN)
                swapped_at = {i: len(r) for i, r in results.items()}
                await until(lambda: all(len(r) >= swapped_at[i] + 3 for i, r in results.items()))
                stop.set()
                await asyncio.gather(*tasks)
            return swap, results, failures, swapped_at

        swap, results, failures, swapped_at = asyncio.run(go())
        assert swap.status_code == 200 and swap.json()["previous_version"] == old_v
        assert failures == []
        for i, seen in results.items():
            versions = [v for v, _ in seen]
            k = versions.count(old_v)
            assert versions == [old_v] * k + [new_v] * (len(versions) - k), (
                f"client {i} went back to the old model"
            )
            assert (
                k <= swapped_at[i] + 1
            )  # at most the request in flight at the switch finished on the old one
            for version, score in seen:  # each reply names the model that produced its score
                assert score == pytest.approx(expected[version][i], abs=1e-5)
        assert all(v == old_v for s in results.values() for v, _ in s[:1])
        assert all(s[-1][0] == new_v for s in results.values())
        registry = app.state.registry
        for t in registry._retiring:
            t.join(10)
        assert not any(t.is_alive() for t in registry._retiring)  # the old model was freed


def test_overload_answers_429_and_the_server_stays_alive(root, models):
    app = app_for(root, max_queue_items=16, max_client_batch_size=16, max_wait_ms=300)
    batch = [{"response": f"item {i}"} for i in range(16)]
    with serve_in_thread(app) as url:

        async def flood():
            async with httpx.AsyncClient(timeout=60) as http:
                return await asyncio.gather(
                    *(http.post(f"{url}/v1/score", json={"items": batch}) for _ in range(12))
                )

        responses = asyncio.run(flood())
        codes = [r.status_code for r in responses]
        assert 200 in codes and 429 in codes and set(codes) <= {200, 429}
        rejected = next(r for r in responses if r.status_code == 429)
        assert rejected.headers["retry-after"] == "1"
        assert rejected.json()["error_type"] == "overloaded"
        assert "exceed max_queue_items=16" in rejected.json()["error"]
        assert httpx.get(f"{url}/health").status_code == 200

        async def patient():  # the client's retries honour Retry-After and get every request through
            async with RewardClient(url, deadline_s=60, max_retries=30) as rc:
                return await asyncio.gather(*(rc.score(batch) for _ in range(6)))

        results = asyncio.run(patient())
        expected = models["a"].score(as_inputs(batch))
        assert all(r.scores == pytest.approx(expected, abs=1e-5) for r in results)


def test_openrlhf_and_verl_clients_read_their_formats(root, models):
    import requests

    with serve_in_thread(app_for(root)) as url:
        # OpenRLHF's remote RM client: POST {query, prompts, labels}, read "rewards" (and "scores" in [0, 1])
        prompts = ["Why is the sky blue?", "Best study tips?"]
        queries = [p + " Because of scattering." for p in prompts]
        r = requests.post(
            f"{url}/models/a/get_reward",
            json={"query": queries, "prompts": prompts, "labels": ["", ""]},
            headers={"Content-Type": "application/json"},
            timeout=180,
        )
        rewards = r.json()["rewards"]
        expected = models["a"].score([RMInput(p, " Because of scattering.") for p in prompts])
        assert rewards == pytest.approx(expected, abs=1e-5)
        assert all(0.0 <= s <= 1.0 for s in r.json()["scores"])
        # verl's reward loop against a vLLM pooling server: POST /classify, read data[-1]["probs"][-1]
        text = queries[0]
        out = httpx.post(
            f"{url}/classify", json={"model": "rm", "input": text, "use_activation": False}
        ).json()
        assert out["data"][-1]["probs"][-1] == pytest.approx(
            models["a"].score([RMInput("", text)])[0], abs=1e-5
        )


def test_client_reports_a_dead_server_by_url(root):
    port = free_port()  # nothing listens there

    async def go():
        async with RewardClient([f"http://127.0.0.1:{port}"], max_retries=2, backoff_s=0.01) as rc:
            await rc.score([{"response": "x"}])

    with pytest.raises(RewardServiceError, match=rf"127.0.0.1:{port}.*ConnectError"):
        asyncio.run(go())


# --------------------------------------------------------------------------------------------- slow
@pytest.mark.slow
def test_karma_serve_serves_real_minilm_scores_on_reddit_data(tmp_path):
    from karma.models import minilm_path
    from karma.rm.model import new_reward_model

    folder = new_reward_model(str(minilm_path()), "full", max_length=256).save(tmp_path / "minilm_rm")
    items = reddit_items(48)
    expected = RewardModel.load(folder).score(as_inputs(items))
    port = free_port()
    env = {**os.environ, "KARMA_MAX_WAIT_MS": "5"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "karma.cli", "serve", "--model", f"karma={folder}", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:

        async def go():
            async with RewardClient(f"http://127.0.0.1:{port}", deadline_s=120) as rc:
                await rc.wait_ready(180)
                info = await rc.info()
                single = await asyncio.gather(*(rc.score([it]) for it in items[:16]))
                many = await rc.score(items)
                return info, single, many

        info, single, many = asyncio.run(go())
        assert proc.poll() is None
    finally:
        proc.terminate()
        out = proc.communicate(timeout=60)[0]
    assert info["models"][0]["max_length"] == 256 and info["models"][0]["variant"] == "full", out
    assert many.scores == pytest.approx(expected, abs=1e-4)
    assert [s.scores[0] for s in single] == pytest.approx(expected[:16], abs=1e-4)
    assert any(many.truncated)  # real threads are longer than 256 tokens
    assert max(expected) - min(expected) > 1e-3
