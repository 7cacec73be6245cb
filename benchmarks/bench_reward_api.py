"""Reward-service throughput on the same inputs, in one run:

  (a) offline: the model's batched forward on pre-tokenised, length-sorted batches — the limit;
  (b) the service (`karma serve`, real uvicorn in its own process) under C concurrent single-item clients;
  (c) a naive server — one forward per request inside the async handler, as OpenRLHF's serve_rm does —
      under the same clients.

Prints items/s, p50/p99 latency, (b)/(a) (goal >= 0.85) and (b)/(c) (goal >= 3x). Each server pass is paired
with an offline pass run just before it (`--rounds` pairs, medians reported), so the drifting load of a
shared machine cancels out of the ratios; (b)/(c) compares both servers through their offline pairs.

The load generator is a minimal keep-alive HTTP/1.1 client on asyncio streams (one connection per
client, requests serialised once), so on a small machine it takes as little CPU from the server as
possible; `--client httpx` uses httpx instead. Inputs: real r/college threads from ../shared/data
(context = post + parent comment, response = the comment), truncated to the model's max_length.

    .venv/bin/python benchmarks/bench_reward_api.py                       # MiniLM RM (untrained head)
    .venv/bin/python benchmarks/bench_reward_api.py --model runs/rm/full  # a trained RM folder
"""

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


# --------------------------------------------------------------------------------------------- naive server
def naive_app(model_dir: str):
    """One forward per request on the event loop (no batching, no threads) — the baseline (c)."""
    from fastapi import FastAPI

    from karma.protocol import ScoreRequest, ScoreResponse
    from karma.rm.model import RewardModel, RMInput

    app = FastAPI()
    rm = RewardModel.load(model_dir)

    @app.get("/ready")
    async def ready() -> dict:
        return {"ready": True}

    @app.post("/v1/score")
    async def score(body: ScoreRequest) -> ScoreResponse:
        items = [
            RMInput(
                it.context if isinstance(it.context, str) else [t.model_dump() for t in it.context],
                it.response,
                it.rm_metadata(),
            )
            for it in body.items
        ]
        enc = [rm.encode(it, truncate=body.truncate) for it in items]
        scores = rm.forward(enc)
        return ScoreResponse(
            model="naive", version=rm.version, scores=scores, truncated=[e.truncated for e in enc]
        )

    return app


# --------------------------------------------------------------------------------------------- load generator
def _request_bytes(port: int, item: dict) -> bytes:
    body = json.dumps({"items": [item]}).encode()
    head = (
        f"POST /v1/score HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    return head + body


async def _drain(queue: asyncio.Queue, lat: list, scores: dict, send) -> None:
    """One client: take request indices off the shared queue until it is empty; `send(i)` returns the score."""
    while True:
        try:
            i = queue.get_nowait()
        except asyncio.QueueEmpty:
            return
        t0 = time.perf_counter()
        score = await send(i)
        lat.append(time.perf_counter() - t0)
        scores[i] = score


async def _raw_client(
    port: int, requests: list[bytes], queue: asyncio.Queue, lat: list, scores: dict
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def send(i: int) -> float:
        writer.write(requests[i])
        await writer.drain()
        status_line = await reader.readline()
        length = 0
        while (line := await reader.readline()) not in (b"\r\n", b""):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        body = await reader.readexactly(length)
        if b" 200 " not in status_line:
            raise RuntimeError(f"request {i}: {status_line!r} {body[:200]!r}")
        return json.loads(body)["scores"][0]

    try:
        await _drain(queue, lat, scores, send)
    finally:
        writer.close()


async def _httpx_client(
    url: str, items: list[dict], queue: asyncio.Queue, lat: list, scores: dict, http
) -> None:
    async def send(i: int) -> float:
        resp = await http.post(f"{url}/v1/score", json={"items": [items[i]]})
        resp.raise_for_status()
        return resp.json()["scores"][0]

    await _drain(queue, lat, scores, send)


async def load(port: int, items: list[dict], concurrency: int, client: str) -> dict:
    queue: asyncio.Queue = asyncio.Queue()
    for i in range(len(items)):
        queue.put_nowait(i)
    lat: list[float] = []
    scores: dict[int, float] = {}
    t0 = time.perf_counter()
    if client == "raw":
        reqs = [_request_bytes(port, it) for it in items]
        await asyncio.gather(*(_raw_client(port, reqs, queue, lat, scores) for _ in range(concurrency)))
    else:
        import httpx

        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(timeout=600, limits=limits) as http:
            url = f"http://127.0.0.1:{port}"
            await asyncio.gather(
                *(_httpx_client(url, items, queue, lat, scores, http) for _ in range(concurrency))
            )
    elapsed = time.perf_counter() - t0
    lat.sort()
    return {
        "items_per_s": len(items) / elapsed,
        "p50_ms": 1000 * statistics.median(lat),
        "p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))],
        "scores": [scores[i] for i in range(len(items))],
    }


def start_server(cmd: list[str], port: int, env: dict) -> subprocess.Popen:
    from karma.net import wait_http_ok

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def running() -> None:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read()[-2000:]}")

    try:
        wait_http_ok(f"http://127.0.0.1:{port}/ready", 300, request_timeout_s=2, check=running)
    except TimeoutError:
        proc.kill()
        raise TimeoutError("server not ready in 300 s") from None
    return proc


def stop_server(proc: subprocess.Popen) -> None:
    from karma.net import stop_process

    stop_process(proc)


# --------------------------------------------------------------------------------------------- main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="RM folder (default: MiniLM backbone + untrained head, variant full)")
    p.add_argument("--items", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3, help="offline/server pass pairs; medians are reported")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--max-batch-tokens", type=int, default=8192)
    p.add_argument("--max-wait-ms", type=float, default=2.0)
    p.add_argument("--padding-tolerance", type=float, default=0.25)
    p.add_argument("--client", choices=["raw", "httpx"], default="raw")
    p.add_argument(
        "--torch-threads", type=int, help="intra-op threads for (a), (b) and (c) alike (default: torch's)"
    )
    p.add_argument("--skip-naive", action="store_true")
    p.add_argument("--json-out", type=Path)
    p.add_argument("--naive-server", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.naive_server:
        import torch
        import uvicorn

        if args.torch_threads:
            torch.set_num_threads(args.torch_threads)
        uvicorn.run(
            naive_app(args.model), host="127.0.0.1", port=args.port, log_level="warning", access_log=False
        )
        return

    import torch

    from karma.net import free_port
    from karma.rm.model import RewardModel, RMInput
    from services.reward_api.engine import plan_batches
    from tests.support import reddit_items

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    threads = ["--torch-threads", str(torch.get_num_threads())]

    tmp = tempfile.TemporaryDirectory(prefix="bench-rm-")
    model_dir = args.model
    if model_dir is None:
        from karma.models import minilm_path
        from karma.rm.model import new_reward_model

        torch.manual_seed(0)
        model_dir = str(
            new_reward_model(str(minilm_path()), "full", max_length=args.max_length).save(
                Path(tmp.name) / "rm"
            )
        )
    items = reddit_items(args.items, every=25)  # spread over many threads: a realistic mix of lengths
    rm = RewardModel.load(model_dir)
    inputs = [RMInput(it["context"], it["response"], it["metadata"]) for it in items]

    # (a) offline: length-sorted batches under the same padded-token budget as the server, pre-tokenised
    t0 = time.perf_counter()
    enc = [rm.encode(x) for x in inputs]
    tokenize_s = time.perf_counter() - t0
    plan = plan_batches([len(e) for e in enc], args.max_batch_tokens, args.padding_tolerance)
    rm.forward([enc[i] for i in plan[0]])  # warm-up
    offline = [0.0] * len(enc)

    def offline_pass() -> float:
        t0 = time.perf_counter()
        for idx in plan:
            for i, s in zip(idx, rm.forward([enc[i] for i in idx]), strict=True):
                offline[i] = s
        return len(enc) / (time.perf_counter() - t0)

    mean_tokens = sum(len(e) for e in enc) / len(enc)
    results = {
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_avg": os.getloadavg(),
        },
        "inputs": {
            "items": len(items),
            "mean_tokens": mean_tokens,
            "truncated": sum(e.truncated for e in enc),
            "max_length": rm.max_length,
            "model_version": rm.version,
            "tokenize_items_per_s": len(enc) / tokenize_s,
            "offline_batches": len(plan),
        },
        "rounds": args.rounds,
    }
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    warm = items[: args.concurrency]

    def bench(name: str, cmd: list[str], port: int) -> dict:
        """`rounds` × (offline pass, then a pass through the server): each server pass is compared with the
        offline pass just before it, so a shared machine's drifting load cancels out of the ratio."""
        proc = start_server(cmd, port, env)
        rows = []
        try:
            asyncio.run(load(port, warm, args.concurrency, args.client))  # warm-up
            for r in range(args.rounds):
                a = offline_pass()
                out = asyncio.run(load(port, items, args.concurrency, args.client))
                err = max(abs(x - y) for x, y in zip(out.pop("scores"), offline, strict=True))
                rows.append(
                    {
                        "offline_items_per_s": a,
                        **out,
                        "max_abs_diff_vs_offline": err,
                        "ratio_to_offline": out["items_per_s"] / a,
                    }
                )
                print(
                    f"  {name} round {r + 1}: offline {a:.2f} items/s, server {out['items_per_s']:.2f} items/s "
                    f"(ratio {rows[-1]['ratio_to_offline']:.2f}; p50 {out['p50_ms']:.0f} ms, "
                    f"p99 {out['p99_ms']:.0f} ms; load avg {os.getloadavg()[0]:.1f})",
                    flush=True,
                )
        finally:
            stop_server(proc)
        med = lambda key: statistics.median(row[key] for row in rows)
        return {
            "rounds": rows,
            **{
                k: med(k)
                for k in ("offline_items_per_s", "items_per_s", "p50_ms", "p99_ms", "ratio_to_offline")
            },
            "max_abs_diff_vs_offline": max(row["max_abs_diff_vs_offline"] for row in rows),
        }

    # (b) the service
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "karma.cli",
        "serve",
        "--model",
        f"rm={model_dir}",
        "--port",
        str(port),
        "--max-batch-tokens",
        str(args.max_batch_tokens),
        "--max-wait-ms",
        str(args.max_wait_ms),
        "--padding-tolerance",
        str(args.padding_tolerance),
        "--max-queue-items",
        "100000",
        "--max-queue-wait-s",  # capacity, not admission: 64 clients queue ~5 s of work at ~13 items/s
        "3600",
        "--score-cache-items",  # every round re-sends the same items: measure forwards, not cache hits
        "0",
        "--log-level",
        "warning",
        *threads,
    ]
    results["b_service"] = rb = bench("(b) karma serve", cmd, port)
    # (c) naive
    if not args.skip_naive:
        port = free_port()
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--naive-server",
            "--model",
            model_dir,
            "--port",
            str(port),
            *threads,
        ]
        results["c_naive"] = bench("(c) naive", cmd, port)

    results["ratio_b_over_a"] = rb["ratio_to_offline"]
    print(
        f"inputs: {len(items)} real r/college items, mean {mean_tokens:.0f} tokens "
        f"({results['inputs']['truncated']} truncated to {results['inputs']['max_length']}); "
        f"{args.concurrency} concurrent single-item clients ({args.client}); medians of {args.rounds} rounds"
    )
    print(
        f"(a) offline batched forward : {rb['offline_items_per_s']:8.2f} items/s  ({len(plan)} batches; "
        f"tokenising alone {results['inputs']['tokenize_items_per_s']:.0f} items/s)"
    )
    print(
        f"(b) karma serve             : {rb['items_per_s']:8.2f} items/s  p50 {rb['p50_ms']:.0f} ms  "
        f"p99 {rb['p99_ms']:.0f} ms  (max |score - offline| {rb['max_abs_diff_vs_offline']:.1e})"
    )
    if "c_naive" in results:
        rc = results["c_naive"]
        # both servers relative to their adjacent offline passes, then to each other
        results["ratio_b_over_c"] = rb["ratio_to_offline"] / rc["ratio_to_offline"]
        print(
            f"(c) naive server            : {rc['items_per_s']:8.2f} items/s  p50 {rc['p50_ms']:.0f} ms  "
            f"p99 {rc['p99_ms']:.0f} ms  (offline alongside: {rc['offline_items_per_s']:.2f} items/s)"
        )
        print(f"(b)/(c) = {results['ratio_b_over_c']:.2f}x (goal >= 3)")
    print(f"(b)/(a) = {results['ratio_b_over_a']:.2f} (goal >= 0.85)")
    if args.json_out:
        args.json_out.write_text(json.dumps(results, indent=2))
    tmp.cleanup()


if __name__ == "__main__":
    main()
