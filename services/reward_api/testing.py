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
