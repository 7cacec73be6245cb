"""Helpers for tests and benchmarks of the reward service (also usable by the trainer's tests):
tiny random reward-model folders in the real format, and a real uvicorn server on loopback in a thread."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def make_tiny_rm(
    path: str | Path, variant: str = "context", *, seed: int = 0, max_length: int = 64, **config
) -> Path:
    """A 2-layer, hidden-32 random BERT reward model with MiniLM's tokenizer, saved as a KARMA RM folder.

    Different seeds give different weights, hence different `version`s (useful for hot-swap tests).
    """
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from karma.models import minilm_path
    from karma.rm.model import new_reward_model

    path = Path(path)
    backbone = path.with_name(path.name + ".backbone")
    tok = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
        initializer_range=0.5,  # large random weights: scores that differ visibly between inputs
    )
    BertModel(cfg).save_pretrained(backbone)
    tok.save_pretrained(backbone)
    torch.manual_seed(seed + 1)
    rm = new_reward_model(str(backbone), variant, max_length=max_length, **config)
    rm.save(path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve_in_thread(
    app,
    *,
    port: int | None = None,
    ready_path: str | None = "/ready",
    timeout: float = 120.0,
    **uvicorn_kwargs,
) -> Iterator[str]:
    """Run `app` on a real uvicorn at 127.0.0.1:<free port> in a daemon thread; yield its base URL.

    Waits until uvicorn accepts connections and, with `ready_path`, until that path answers 200.
    """
    import httpx
    import uvicorn

    port = port or free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", **uvicorn_kwargs)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    try:
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("uvicorn exited during startup")
            if time.monotonic() > deadline:
                raise TimeoutError(f"uvicorn did not start on {url} within {timeout}s")
            time.sleep(0.02)
        if ready_path:
            while True:
                try:
                    if httpx.get(url + ready_path, timeout=5).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{url}{ready_path} not ready within {timeout}s")
                time.sleep(0.05)
        yield url
    finally:
        server.should_exit = True
        thread.join(30)


def shared_data_dir() -> Path:
    """`KARMA_SHARED_DATA`, else `../shared/data` beside the repository."""
    import os

    return Path(
        os.environ.get("KARMA_SHARED_DATA", Path(__file__).resolve().parents[2].parent / "shared" / "data")
    )


def reddit_items(n: int, data_dir: str | Path | None = None, skip: int = 0, every: int = 1) -> list[dict]:
    """`n` real (context, response, metadata) items from the r/college dumps in shared data: context = post
    title + body + the parent comment when it is in the dump; deleted bodies skipped; every `every`-th
    eligible comment (spreads the sample over many threads). Deterministic."""
    import io
    import json

    import zstandard

    base = Path(data_dir or shared_data_dir()) / "reddit" / "college_2011_2022"

    def lines(name: str):
        with open(base / name, "rb") as fh:
            reader = zstandard.ZstdDecompressor(max_window_size=2**31).stream_reader(fh)
            for line in io.TextIOWrapper(reader, encoding="utf-8"):
                if line.strip():
                    yield json.loads(line)

    posts = {p["id"]: p for p in lines("RS_college.zst")}
    comments: dict[str, dict] = {}
    items: list[dict] = []
    seen = 0
    for c in lines("RC_college.zst"):
        comments[c["id"]] = c
        body = c.get("body") or ""
        if body in ("[deleted]", "[removed]") or not body.strip():
            continue
        seen += 1
        if (seen - 1) % every:
            continue
        post = posts.get(c["link_id"].removeprefix("t3_"), {})
        turns = [post.get("title") or "", post.get("selftext") or ""]
        parent = (
            comments.get(c["parent_id"].removeprefix("t1_")) if c["parent_id"].startswith("t1_") else None
        )
        if parent is not None:
            turns.append(parent.get("body") or "")
        created = post.get("created_utc")
        meta = {
            "subreddit": c.get("subreddit"),
            "depth": c.get("depth"),
            "seconds_since_post": (c["created_utc"] - created) if created else None,
            "created_utc": c.get("created_utc"),
        }
        items.append(
            {
                "context": [{"role": "user", "content": t} for t in turns if t.strip()],
                "response": body,
                "metadata": meta,
            }
        )
        if len(items) >= skip + n:
            break
    return items[skip:]
