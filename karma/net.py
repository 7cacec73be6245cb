"""Small loopback-networking helpers the product needs to start a service and wait for it."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_http_ok(
    url: str,
    timeout_s: float,
    *,
    interval_s: float = 0.2,
    request_timeout_s: float = 5.0,
    check: Callable[[], None] | None = None,
) -> float:
    """Poll `GET url` until it answers 200; return the seconds waited.

    Connection errors count as "not yet". `check` runs before every attempt and may raise to stop waiting
    early (e.g. when the server process has exited). TimeoutError after `timeout_s` seconds.
    (The async client has its own `RewardClient.wait_ready`, which also follows replicas and prefixes.)
    """
    import httpx

    start = time.monotonic()
    deadline = start + timeout_s
    while True:
        if check is not None:
            check()
        try:
            if httpx.get(url, timeout=request_timeout_s).status_code == 200:
                return time.monotonic() - start
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer 200 within {timeout_s:g}s")
        time.sleep(interval_s)


def stop_process(proc, grace_s: float = 30.0) -> int | None:
    """SIGTERM a `subprocess.Popen` that is still running, SIGKILL it after `grace_s`; its exit code."""
    import subprocess

    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(grace_s)
    return proc.returncode
