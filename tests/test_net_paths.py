"""karma.net (free port, readiness poll) and karma.paths (the shared data folder): fast, loopback only."""

from __future__ import annotations

import http.server
import threading
from pathlib import Path

import pytest

from karma.net import free_port, wait_http_ok
from karma.paths import SOURCE_ROOT, shared_data_dir


@pytest.fixture
def flaky_server():
    """A loopback HTTP server whose GET answers 503 for the first two requests, then 200."""
    calls = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            calls.append(self.path)
            self.send_response(200 if len(calls) > 2 else 503)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", calls
    finally:
        server.shutdown()
        server.server_close()


def test_free_port_is_bindable():
    import socket

    port = free_port()
    assert 0 < port < 65536
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_wait_http_ok_retries_until_200(flaky_server):
    url, calls = flaky_server
    waited = wait_http_ok(f"{url}/ready", 10, interval_s=0.01)
    assert calls == ["/ready"] * 3 and waited >= 0


def test_wait_http_ok_times_out_on_a_closed_port():
    with pytest.raises(TimeoutError, match="did not answer 200 within 0.3s"):
        wait_http_ok(f"http://127.0.0.1:{free_port()}/ready", 0.3, interval_s=0.05)


def test_wait_http_ok_check_stops_the_wait_early():
    def dead():
        raise RuntimeError("server exited")

    with pytest.raises(RuntimeError, match="server exited"):
        wait_http_ok(f"http://127.0.0.1:{free_port()}/ready", 60, check=dead)


def test_shared_data_dir_argument_then_env_then_beside_the_checkout(monkeypatch, tmp_path):
    monkeypatch.setenv("KARMA_SHARED_DATA", str(tmp_path / "env"))
    assert shared_data_dir(tmp_path / "arg") == tmp_path / "arg"
    assert shared_data_dir() == tmp_path / "env"
    monkeypatch.delenv("KARMA_SHARED_DATA")
    assert shared_data_dir() == SOURCE_ROOT.parent / "shared" / "data"
    assert (SOURCE_ROOT / "karma" / "paths.py").is_file()
    assert shared_data_dir("~/x") == Path("~/x").expanduser()
