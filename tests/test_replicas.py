"""Slow: reward-service replicas as real processes on loopback, one killed (SIGKILL) and started again on its
port under load.

- 8 concurrent scorers through one `RewardClient` over two `karma serve` replicas: no request fails, every
  score equals the score of the same items before the kill, the dead replica is left out and used again once
  it is back.
- `karma train` (a real process, tiny policy, hf engine) against the same two replicas, one killed mid-run and
  restarted: the run completes, and `metrics.jsonl` has every step exactly once.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from karma.client import RewardClient, RewardServiceError
from karma.net import free_port, stop_process, wait_http_ok

pytestmark = pytest.mark.slow

KARMA = [sys.executable, "-m", "karma.cli"]
SCORE_TOLERANCE = 1e-5
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


class ServeProcess:
    """`karma serve --model karma=FOLDER --port PORT` as a child process, which can be killed and started
    again on the same port; its output goes to a log file (named in failures)."""

    def __init__(self, folder: Path, port: int, log_dir: Path):
        self.folder, self.port = folder, port
        self.url = f"http://127.0.0.1:{port}"
        self.log = log_dir / f"serve-{port}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with self.log.open("a") as out:
            self.proc = subprocess.Popen(
                [*KARMA, "serve", "--model", f"karma={self.folder}", "--port", str(self.port)]
                + ["--torch-threads", "1"],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=CHILD_ENV,
            )

    def wait_ready(self, timeout_s: float = 180.0) -> None:
        def alive() -> None:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"karma serve exited ({self.proc.returncode}): {self.log.read_text()[-2000:]}"
                )

        wait_http_ok(self.url + "/ready", timeout_s, interval_s=0.1, check=alive)

    def kill(self) -> None:
        """SIGKILL: no graceful shutdown, requests in flight are cut."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)


class RecordingTransport(httpx.AsyncHTTPTransport):
    """The real transport, recording (time, port, outcome) of every request: status code or exception name."""

    def __init__(self) -> None:
        super().__init__()
        self.log: list[tuple[float, int, str]] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            response = await super().handle_async_request(request)
        except httpx.TransportError as exc:
            self.log.append((time.monotonic(), request.url.port, type(exc).__name__))
            raise
        self.log.append((time.monotonic(), request.url.port, str(response.status_code)))
        return response

    def outcomes(self, port: int, since: float = 0.0) -> list[str]:
        return [o for t, p, o in self.log if p == port and t >= since]


@pytest.fixture(scope="module")
def rm_folder(tmp_path_factory) -> Path:
    from tests.support import make_tiny_rm

    return make_tiny_rm(tmp_path_factory.mktemp("replicas") / "rm", "context", seed=3)


@pytest.fixture
def replicas(rm_folder, tmp_path):
    pair = [ServeProcess(rm_folder, free_port(), tmp_path) for _ in range(2)]
    for r in pair:
        r.start()
    try:
        for r in pair:
            r.wait_ready()
        yield pair
    finally:
        for r in pair:
            r.stop()


ITEMS = [
    {"context": f"How do I survive finals week number {i}?", "response": "Sleep, eat, study. " * (i % 5 + 1)}
    for i in range(16)
]


@pytest.mark.timeout(300)
def test_eight_scorers_lose_no_request_and_no_score_when_a_replica_is_killed(replicas):
    a, b = replicas
    transport = RecordingTransport()
    answered: list[tuple[int, list[float]]] = []  # (first item index, scores)
    failures: list[BaseException] = []
    stop = threading.Event()
    reference: dict[int, float] = {}

    async def scorer(rc: RewardClient, k: int) -> None:
        i = k
        while not stop.is_set():
            start = i % len(ITEMS)
            chunk = [ITEMS[(start + j) % len(ITEMS)] for j in range(4)]
            try:
                answered.append((start, (await rc.score(chunk)).scores))
            except RewardServiceError as exc:
                failures.append(exc)
            i += 8

    async def load() -> None:
        async with RewardClient(
            [a.url, b.url], transport=transport, deadline_s=60, max_retries=1000, max_backoff_s=1.0
        ) as rc:
            reference.update(enumerate((await rc.score(ITEMS)).scores))  # before the kill
            await asyncio.gather(*(scorer(rc, k) for k in range(8)))

    def wait_for_more(n: int, timeout_s: float = 120.0) -> None:
        target = len(answered) + n
        deadline = time.monotonic() + timeout_s
        while len(answered) < target:
            assert not failures, failures[:3]
            assert time.monotonic() < deadline, f"no progress: {len(answered)} answers"
            time.sleep(0.02)

    worker = threading.Thread(target=lambda: asyncio.run(load()))
    worker.start()
    try:
        wait_for_more(50)
        assert {"200"} == set(transport.outcomes(a.port)) == set(transport.outcomes(b.port))
        killed_at = time.monotonic()
        a.kill()
        wait_for_more(100)  # b alone
        a.start()  # on the same port
        a.wait_ready()
        restarted_at = time.monotonic()
        wait_for_more(100)
        deadline = time.monotonic() + 60
        while "200" not in transport.outcomes(a.port, since=restarted_at):
            assert time.monotonic() < deadline, "the restarted replica never got a request"
            wait_for_more(10)
        wait_for_more(50)
    finally:
        stop.set()
        worker.join(60)

    assert failures == []
    assert len(answered) >= 360
    # The same items, the same scores: up to float32 noise (the server pads each shared batch to its longest
    # item, so a score moves by ~1e-6 with its batch-mates), far below the gaps between the items' scores,
    # so a score from the wrong item, model or replica state could not pass.
    values = sorted(reference.values())
    assert min(y - x for x, y in itertools.pairwise(values)) > 100 * SCORE_TOLERANCE
    worst = 0.0
    for start, scores in answered:
        expected = [reference[(start + j) % len(ITEMS)] for j in range(4)]
        assert scores == pytest.approx(expected, rel=0, abs=SCORE_TOLERANCE)
        worst = max(worst, *(abs(s - e) for s, e in zip(scores, expected, strict=True)))
    down = transport.outcomes(a.port, since=killed_at)
    failed = [o for o in down if o != "200"]
    # cut in flight (8 scorers keep requests on A all the time), refused while down, 503 while it loads
    assert set(failed) <= {"ReadError", "RemoteProtocolError", "WriteError", "ConnectError", "503"}
    assert {"ReadError", "RemoteProtocolError"} & set(failed), failed
    assert "ConnectError" in failed
    assert "200" in transport.outcomes(b.port, since=killed_at)
    print(
        f"{len(answered)} requests answered, 0 failed; replica A after the kill: "
        + ", ".join(f"{o} x{failed.count(o)}" for o in sorted(set(failed)))
        + f"; A served {transport.outcomes(a.port, since=restarted_at).count('200')} after its restart; "
        f"largest score difference {worst:.2e}"
    )


def read_steps(path: Path) -> list[int]:
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def requests_served(url: str) -> float:
    """`/v1/score` requests the replica answered since it started (its Prometheus counter)."""
    total = 0.0
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("karma_requests_total{") and '"/v1/score"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.mark.timeout(600)
def test_karma_train_keeps_training_across_a_replica_kill(replicas, tmp_path):
    import yaml

    from tests.support import make_tiny_causal_lm

    a, b = replicas
    policy = make_tiny_causal_lm(tmp_path / "policy")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"prompt": f"question {i}: how do I pass exam {i}?"}) + "\n" for i in range(40))
    )
    steps = 100  # ~0.2 s each here: the run outlasts A's restart (~8 s), so A rejoins it
    out = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {"policy": str(policy)},
                "data": {"prompts": f"file:{prompts}", "max_prompt_length": 64},
                "rollout": {"engine": "hf", "max_new_tokens": 12},
                "reward": {"reward_url": [a.url, b.url], "reward_ready_timeout_s": 60},
                "ppo": {"prompts_per_step": 4, "mini_batch_size": 4, "micro_batch_size": 4, "epochs": 1},
                "run": {
                    "steps": steps,
                    "output_dir": str(out),
                    "save_every": 0,
                    "report_to": ["jsonl"],
                    "torch_threads": 1,
                },
                "eval": {"heldout_prompts": 0},
            }
        )
    )
    log = tmp_path / "train.log"
    with log.open("w") as sink:
        train = subprocess.Popen(
            [*KARMA, "train", "--config", str(config)], stdout=sink, stderr=subprocess.STDOUT, env=CHILD_ENV
        )
    metrics = out / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 300
        while not read_steps(metrics):  # step 1 done: the run is in its loop
            assert train.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no step within 300 s"
            time.sleep(0.05)
        a.kill()
        killed_after = read_steps(metrics)[-1]
        a.start()
        a.wait_ready()
        restarted_after = read_steps(metrics)[-1] if read_steps(metrics) else 0
        rc = train.wait(300)
    finally:
        if train.poll() is None:
            train.kill()
            train.wait(30)
    text = log.read_text()
    assert rc == 0, text[-3000:]
    assert read_steps(metrics) == list(range(1, steps + 1))  # no step lost, none repeated
    result = json.loads((out / "trainer_result.json").read_text())
    assert result["status"] == "completed" and result["step"] == steps
    served_after_restart = requests_served(a.url)
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    print({k: round(v, 3) for k, v in rows[-1].items() if k.startswith(("timing/", "speed/"))})
    print(
        f"killed A after step {killed_after}, A ready again after step {restarted_after}; "
        f"A answered {served_after_restart:.0f} scoring requests after its restart"
    )
    assert killed_after < steps and restarted_after < steps  # the kill and the restart landed inside the run
    assert served_after_restart > 0  # A rejoined the rotation
    noticed = [line for line in text.splitlines() if f"failed ({a.url}: " in line]
    assert noticed, "the trainer never tried the killed replica"
    print(noticed[0])
