"""Issue 20, "no request can stall the loop" and "labels are advice": text that is not valid Unicode is a typed
422 on every scoring route (never a 500), chat markup is read in a thread and in linear time, and OpenRLHF label
metadata that does not validate is ignored for its item and flagged instead of failing the request."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from karma import chat
from services.reward_api.main import create_app
from tests.support import SCORE_TOL_F64, float64_settings, make_tiny_rm

JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    root: Path = tmp_path_factory.mktemp("models")
    make_tiny_rm(root / "b", "full", seed=1)
    with TestClient(create_app(float64_settings(models={"b": str(root / "b")}))) as c:
        deadline = time.monotonic() + 120
        while c.get("/ready").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        yield c


# Raw JSON bodies: `\ud800` is a JSON escape that reads into a lone surrogate (json.dumps would escape the
# backslash). Before issue 20, each of these was a 500 with the tokenizer's TypeError in the log.
@pytest.mark.parametrize(
    ("path", "body", "where", "code", "at"),
    [
        ("/v1/score", r'{"items": [{"response": "\ud800x"}]}', "items.0.response", "D800", 0),
        ("/v1/score", r'{"items": [{"response": "ok"}, {"response": "a", "context": "b\udfff"}]}', "items.1.context", "DFFF", 1),
        ("/v1/score", r'{"items": [{"response": "ok", "context": [{"content": "hi"}, {"content": "\udc00"}]}]}', "items.0.context.1.content", "DC00", 0),
        ("/v1/score", r'{"items": [{"response": "ok", "metadata": {"flair": "x\ud800"}}]}', "items.0.metadata.flair", "D800", 1),
        ("/get_reward", r'{"query": ["fine", "\ud800x"]}', "query.1", "D800", 0),
        ("/get_reward", r'{"query": ["abc"], "prompts": ["a\ud801"]}', "prompts.0", "D801", 1),
        ("/models/b/get_reward", r'{"query": ["\udbff"]}', "query.0", "DBFF", 0),
        ("/classify", r'{"input": "\ud800x"}', "input", "D800", 0),
        ("/classify", r'{"input": ["ok", "\ud800x"]}', "input.1", "D800", 0),
        ("/classify", r'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "\ud800"}]}', "messages.1.content", "D800", 0),
    ],
)  # fmt: skip
def test_a_lone_surrogate_is_a_typed_422_on_every_route(client, path, body, where, code, at):
    resp = client.post(path, content=body, headers=JSON)
    assert resp.status_code == 422, resp.text
    assert resp.json() == {
        "error": f"{where}: lone surrogate U+{code} at character {at} is not valid Unicode text",
        "error_type": "validation",
    }


def test_a_surrogate_pair_is_one_valid_character(client):
    """`\\ud83d\\ude00` is a pair (one emoji), not two lone surrogates: scored like the character itself."""
    pair = client.post("/v1/score", content=r'{"items": [{"response": "\ud83d\ude00 ok"}]}', headers=JSON)
    direct = client.post("/v1/score", json={"items": [{"response": "\U0001f600 ok"}]})
    assert pair.status_code == 200 and pair.json()["scores"] == direct.json()["scores"]


def test_chat_markup_is_read_off_the_event_loop(client, monkeypatch):
    """A 7.5 MB /get_reward query of repeated `[INST] ` took 5.1 s to read on the event loop, holding every
    other request. Now every route reads chat markup in a thread: `chat.conversation` never sees a running
    event loop in its own thread."""
    calls: list[bool] = []
    real = chat.conversation

    def spy(*args, **kwargs):
        try:
            asyncio.get_running_loop()
            calls.append(True)
        except RuntimeError:
            calls.append(False)
        return real(*args, **kwargs)

    monkeypatch.setattr(chat, "conversation", spy)
    query = "<|im_start|>user\nWhy?<|im_end|>\n<|im_start|>assistant\nBecause.<|im_end|>"
    assert client.post("/get_reward", json={"query": [query, query]}).status_code == 200
    assert client.post("/classify", json={"input": [query]}).status_code == 200
    assert calls == [False, False, False]  # three texts read, none on the loop


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("text", "turns", "response"),
    [
        ("<s>" * 1_000_000 + " hi </s>", 0, "hi"),  # each edge token cut was a copy of the rest: quadratic
        (" " * 1_000_000 + "x" + "</s> " * 300_000, 0, "x"),
        (
            "[INST] " + "<<SYS>> a " * 300_000 + "[/INST] r",
            300_000,
            "r",
        ),  # a lazy regex rescanned per <<SYS>>
    ],
)
def test_chat_markup_is_read_in_linear_time(text, turns, response):
    """Degenerate markup that took quadratic time (minutes) is read in one pass."""
    conv = chat.conversation(text)
    assert conv.response == response
    if turns:  # no `<</SYS>>`: no system turn, the user turn keeps its words (the special tokens go)
        assert [t["role"] for t in conv.context] == ["user"]
        assert conv.context[0]["content"].split() == ["a"] * turns
    else:
        assert conv.context == ""


def test_label_metadata_that_does_not_validate_is_ignored_and_flagged(client, caplog):
    """OpenRLHF turned the 422 this was into `reward=None` after 5 s, which failed the training step."""
    meta = {"subreddit": "college", "depth": 1}
    labels = [{"metadata": {"depth": "x"}}, {"metadata": meta}, 42, '{"metadata": {"subreddit": "\ud800"}}']
    queries = ["a reply", "a reply", "a reply", "a reply"]
    with caplog.at_level(logging.WARNING, logger="services.reward_api.api.routes.openrlhf"):
        body = json.dumps({"query": queries, "labels": labels})  # ASCII: the surrogate as a JSON escape
        resp = client.post("/get_reward", content=body, headers=JSON)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["extra_logs"]["karma_label_metadata_invalid"] == [1.0, 0.0, 0.0, 1.0]
    assert body["extra_logs"]["karma_labels_ignored"] == [0.0] * 4
    plain = client.post("/v1/score", json={"items": [{"response": "a reply"}]}).json()["scores"][0]
    with_meta = client.post("/v1/score", json={"items": [{"response": "a reply", "metadata": meta}]})
    want = [plain, with_meta.json()["scores"][0], plain, plain]
    assert body["rewards"] == pytest.approx(want, abs=SCORE_TOL_F64)
    assert abs(want[1] - plain) > 1e-6  # the valid metadata was used
    assert (
        "/get_reward: label metadata of 2 of 4 items does not validate; scored without it "
        "(first: labels.0.metadata.depth: Input should be a valid integer)"
    ) in caplog.messages


# --------------------------------------------------------------------------------------------- slow clients
def _raw(url: str, data: bytes, wait_s: float = 20.0) -> bytes:
    """Send `data` on a fresh connection, then read until the server closes it; what came, then `<still open>`
    if `wait_s` passed first, or `<reset>` if the server closed before reading everything sent."""
    import socket

    host, port = url.removeprefix("http://").split(":")
    out = b""
    with socket.create_connection((host, int(port)), timeout=wait_s) as sock:
        try:
            sock.sendall(data)
            while chunk := sock.recv(65536):
                out += chunk
        except TimeoutError:
            return out + b"<still open>"
        except (ConnectionResetError, BrokenPipeError):  # closed while we were still sending
            return out + b"<reset>"
    return out


def test_header_size_and_slow_clients_are_bounded_on_a_real_server(tmp_path):
    """`karma serve`'s uvicorn options (`server.uvicorn_options`): headers over max_header_bytes are refused, a
    head or a body that does not arrive in time ends the connection (408 for the body) instead of holding it."""
    from karma.rm.rule import RuleSpec, write_rule_folder
    from services.reward_api.core.config import Settings
    from services.reward_api.server import uvicorn_options
    from tests.support import serve_in_thread

    write_rule_folder(RuleSpec.parse({"rules": [{"kind": "marker"}]}), tmp_path / "rule")
    settings = Settings(
        models={"rule": str(tmp_path / "rule")},
        max_header_bytes=4096,
        header_timeout_s=0.5,
        body_timeout_s=0.5,
    )
    assert uvicorn_options(settings)["h11_max_incomplete_event_size"] == 4096
    assert uvicorn_options(settings)["timeout_keep_alive"] == 5
    with serve_in_thread(create_app(settings), **uvicorn_options(settings)) as url:
        ok = b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 30\r\n"
        body = b'{"items": [{"response": "hi"}]}'[:30]
        assert _raw(url, ok + b"Connection: close\r\n\r\n" + body).startswith(
            b"HTTP/1.1 "
        )  # a normal request
        big = _raw(url, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 8192 + b"\r\n\r\n")
        head, _, payload = big.partition(b"\r\n\r\n")  # was answered 200
        assert head.startswith(b"HTTP/1.1 431 ") and json.loads(payload) == {
            "error": "request headers of 8217 bytes exceed max_header_bytes=4096",
            "error_type": "payload_too_large",
        }
        huge = _raw(url, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 2**20 + b"\r\n\r\n")
        assert huge.startswith((b"HTTP/1.1 400 ", b"<reset>")), huge[:80]  # h11 stops reading at 4 KiB
        assert _raw(url, b"GET /health HTTP/1.1\r\nHost: x\r\n") == b""  # head never finished: closed
        assert _raw(url, b"") == b""  # nothing sent at all: closed too
        short = _raw(url, ok + b"\r\n" + body[:10])  # 10 of 30 bytes, then silence
        head, _, payload = short.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408 ") and b"connection: close" in head.lower(), short[:200]
        assert json.loads(payload) == {
            "error": "request body not received within body_timeout_s=0.5",
            "error_type": "timeout",  # was "validation": the protocol had no type for it
        }


def test_the_middleware_s_408_and_431_are_declared_on_every_operation_of_the_openapi_document(client):
    """The body/header middleware answers 408 (body late) and 431 (headers too large) before any route runs, so
    every operation declares them, with the one error body; 408 has an error type of its own."""
    from typing import get_args

    from karma.protocol import ErrorType

    assert "timeout" in get_args(ErrorType)
    doc = client.get("/openapi.json").json()
    operations = [(path, op) for path, item in doc["paths"].items() for op in item.values()]
    assert len(operations) > 10
    for path, op in operations:
        for code, what in (("408", "body_timeout_s"), ("431", "max_header_bytes")):
            declared = op["responses"].get(code)
            assert declared is not None, (path, op["operationId"], code)
            assert what in declared["description"]
            assert declared["content"]["application/json"]["schema"] == {
                "$ref": "#/components/schemas/ErrorBody"
            }
