"""A burst at 10x the reward service's capacity: admission by time must answer 200 / 429 / 503 only (no client
timeouts), the 200s must wait about `max_queue_wait_s` at most, and the server's memory must come back down.

One run, in order:
  1. start `karma serve` (its own process) on a MiniLM reward model; record start -> /health and -> /ready;
  2. capacity: 8 closed-loop clients x 32 real r/college items for `--capacity-s` seconds -> items/s;
  3. burst: open-loop Poisson arrivals of requests of 1-64 items (uniform) at `--factor` x capacity for
     `--burst-s` seconds, each with a `--client-timeout` (30 s) client timeout; the server's RSS is sampled;
  4. after the burst: every answer in, then `--settle-s` seconds idle -> RSS again.

Prints one JSON object: start-to-ready, capacity, status counts, client timeouts, latency of the 200s and of
the 429s (p50/p99), RSS before / peak / after. `run()` is what tests/test_reward_api_server.py's slow test calls.

    .venv/bin/python benchmarks/bench_burst.py                    # 60 s at 10x, MiniLM (untrained head)
    .venv/bin/python benchmarks/bench_burst.py --model runs/rm/context --burst-s 30
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def quantile(xs: list[float], q: float) -> float | None:
    """Nearest-rank quantile (None for no data)."""
    if not xs:
        return None
    xs = sorted(xs)
    return xs[max(math.ceil(q * len(xs)) - 1, 0)]


def start_server(model: str, port: int, env: dict[str, str]) -> tuple[subprocess.Popen, float, float]:
    """`karma serve` in its own process: (process, seconds to /health 200, seconds to /ready 200)."""
    from karma.net import wait_http_ok

    t0 = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "karma.cli", "serve", "--model", f"rm={model}", "--port", str(port)],
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )

    def running() -> None:
        if proc.poll() is not None:
            raise RuntimeError(f"karma serve exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")

    base = f"http://127.0.0.1:{port}"
    try:  # /health answers before /ready: two waits in a row time both from t0
        wait_http_ok(f"{base}/health", 300, interval_s=0.05, request_timeout_s=1, check=running)
        health = time.monotonic() - t0
        wait_http_ok(
            f"{base}/ready", max(300 - health, 0.0), interval_s=0.05, request_timeout_s=1, check=running
        )
    except TimeoutError:
        proc.kill()
        raise TimeoutError("karma serve not ready within 300 s") from None
    return proc, health, time.monotonic() - t0


async def capacity(url: str, items: list[dict], seconds: float, clients: int = 8, batch: int = 32) -> float:
    """Items/s the server sustains for closed-loop clients (each waits for its answer, then sends again)."""
    import httpx

    done = 0
    stop = time.monotonic() + seconds

    async def client(i: int) -> None:
        nonlocal done
        rng = random.Random(i)
        async with httpx.AsyncClient(timeout=120) as http:
            while time.monotonic() < stop:
                body = {"items": rng.sample(items, batch)}
                r = await http.post(f"{url}/v1/score", json=body)
                if r.status_code == 200:
                    done += batch

    t0 = time.monotonic()
    await asyncio.gather(*(client(i) for i in range(clients)))
    return done / (time.monotonic() - t0)


async def burst(
    url: str,
    items: list[dict],
    rate_items: float,
    seconds: float,
    client_timeout: float,
    pid: int,
    seed: int = 0,
) -> dict:
    """Poisson arrivals of 1-64-item requests totalling `rate_items` items/s for `seconds`."""
    import httpx
    import psutil

    rng = random.Random(seed)
    req_rate = rate_items / 32.5  # mean request size of uniform 1..64
    codes: dict[str, int] = {}
    lat: dict[str, list[float]] = {}
    rss = [psutil.Process(pid).memory_info().rss]
    sent_items = 0
    limits = httpx.Limits(max_connections=2000, max_keepalive_connections=2000)
    async with httpx.AsyncClient(timeout=httpx.Timeout(client_timeout), limits=limits) as http:

        async def one(n: int) -> None:
            t = time.monotonic()
            try:
                r = await http.post(f"{url}/v1/score", json={"items": rng.sample(items, n)})
                key = str(r.status_code)
            except httpx.TimeoutException:
                key = "client_timeout"
            except httpx.TransportError as exc:
                key = type(exc).__name__
            codes[key] = codes.get(key, 0) + 1
            lat.setdefault(key, []).append(time.monotonic() - t)

        async def sample_rss() -> None:
            while True:
                rss.append(psutil.Process(pid).memory_info().rss)
                await asyncio.sleep(0.5)

        sampler = asyncio.ensure_future(sample_rss())
        tasks = []
        t0 = time.monotonic()
        next_at = t0
        while next_at - t0 < seconds:
            now = time.monotonic()
            if now < next_at:
                await asyncio.sleep(next_at - now)
            n = rng.randint(1, 64)
            sent_items += n
            tasks.append(asyncio.ensure_future(one(n)))
            next_at += rng.expovariate(req_rate)
        offered_s = time.monotonic() - t0
        await asyncio.gather(*tasks)
        sampler.cancel()
    return {
        "requests": len(tasks),
        "offered_items_per_s": round(sent_items / offered_s, 1),
        "codes": dict(sorted(codes.items())),
        "client_timeouts": codes.get("client_timeout", 0),
        "latency_s": {
            k: {
                "p50": round(quantile(v, 0.5), 3),
                "p99": round(quantile(v, 0.99), 3),
                "max": round(max(v), 3),
            }
            for k, v in sorted(lat.items())
        },
        "rss_mib": {"before": round(rss[0] / 2**20), "peak": round(max(rss) / 2**20)},
    }


def run(
    model: str | None = None,
    *,
    burst_s: float = 60.0,
    factor: float = 10.0,
    capacity_s: float = 15.0,
    client_timeout: float = 30.0,
    settle_s: float = 10.0,
    max_queue_wait_s: float = 5.0,
    n_items: int = 512,
) -> dict:
    import psutil

    from karma.net import free_port
    from tests.support import reddit_items

    tmp = None
    if model is None:
        from karma.models import minilm_path
        from karma.rm.model import new_reward_model

        tmp = tempfile.TemporaryDirectory(prefix="karma-burst-")
        model = str(
            new_reward_model(str(minilm_path()), "context", max_length=256).save(Path(tmp.name) / "rm")
        )
    items = [{"context": it.get("context", ""), "response": it["response"]} for it in reddit_items(n_items)]
    port = free_port()
    # the cache off: the bench re-sends its 512 items, and each must cost a forward as a new item would
    env = {
        "KARMA_MAX_QUEUE_WAIT_S": str(max_queue_wait_s),
        "KARMA_LOG_LEVEL": "warning",
        "KARMA_SCORE_CACHE_ITEMS": "0",
    }
    proc, to_health, to_ready = start_server(model, port, env)
    url = f"http://127.0.0.1:{port}"
    try:
        cap = asyncio.run(capacity(url, items, capacity_s))
        out = asyncio.run(burst(url, items, factor * cap, burst_s, client_timeout, proc.pid))
        time.sleep(settle_s)
        out["rss_mib"]["after"] = round(psutil.Process(proc.pid).memory_info().rss / 2**20)
        alive = proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(60)
        if tmp is not None:
            tmp.cleanup()
    return {
        "start_to_health_s": round(to_health, 2),
        "start_to_ready_s": round(to_ready, 2),
        "capacity_items_per_s": round(cap, 1),
        "factor": factor,
        "burst_s": burst_s,
        "client_timeout_s": client_timeout,
        "max_queue_wait_s": max_queue_wait_s,
        "server_alive": alive,
        **out,
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="reward-model folder (default: MiniLM with an untrained head)")
    ap.add_argument("--burst-s", type=float, default=60.0)
    ap.add_argument("--factor", type=float, default=10.0, help="offered load / measured capacity")
    ap.add_argument("--capacity-s", type=float, default=15.0)
    ap.add_argument("--client-timeout", type=float, default=30.0)
    ap.add_argument("--settle-s", type=float, default=10.0)
    ap.add_argument("--max-queue-wait-s", type=float, default=5.0)
    a = ap.parse_args()
    print(
        json.dumps(
            run(
                a.model,
                burst_s=a.burst_s,
                factor=a.factor,
                capacity_s=a.capacity_s,
                client_timeout=a.client_timeout,
                settle_s=a.settle_s,
                max_queue_wait_s=a.max_queue_wait_s,
            ),
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
