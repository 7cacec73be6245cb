"""The reward service in process (FastAPI TestClient, lifespan included) on tiny random reward models.

Checks numbers against the in-process `RewardModel`, the error taxonomy (one body shape, pinned messages),
limits, auth, model management and the compatibility routes. Real-uvicorn tests are in
test_reward_api_server.py; the OpenAPI contract is fuzzed in test_schemathesis.py.
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from karma.rm.model import RewardModel, RMInput
from services.reward_api.core.config import Settings
from services.reward_api.main import create_app
from tests.support import SCORE_TOL_F64, float64_settings, make_tiny_rm

ADMIN = {"Authorization": "Bearer admin-secret"}
ITEMS = [
    {"context": "Why is the sky blue?", "response": "Rayleigh scattering of sunlight."},
    {"context": [{"role": "user", "content": "Any tips for finals?"}], "response": "Sleep. Then study."},
    {"context": "", "response": "first!"},
    {"context": "word " * 200, "response": "a short reply that must survive truncation"},
]


def rm_inputs(items) -> list[RMInput]:
    return [RMInput(it.get("context", ""), it["response"], it.get("metadata")) for it in items]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    make_tiny_rm(root / "a", "context", seed=0, score_normalization={"mean": 0.25, "std": 2.0})
    make_tiny_rm(root / "b", "full", seed=1)
    make_tiny_rm(root / "a2", "context", seed=2)
    (root / "not_a_model").mkdir()
    outside = tmp_path_factory.mktemp("outside")
    make_tiny_rm(outside / "evil", "context", seed=4)
    (root / "link").symlink_to(outside / "evil")
    return root


@pytest.fixture(scope="module")
def rm_a(root) -> RewardModel:
    return RewardModel.load(root / "a", dtype="float64")


def wait_ready(client: TestClient, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while client.get("/ready").status_code != 200:
        assert time.monotonic() < deadline, client.get("/ready").json()
        time.sleep(0.05)


# Served and offline scores are both float64 and agree within SCORE_TOL_F64 (tests/support.py says why): the
# service batches by length and padding (and across requests), `RewardModel.score` in sorted runs of 32.
def open_client(root: Path, **overrides) -> TestClient:
    settings = {
        "models": {"a": str(root / "a"), "b": str(root / "b")},
        "admin_token": "admin-secret",
        "model_roots": [str(root)],
        "max_client_batch_size": 8,
        "max_queue_items": 64,
        "max_body_bytes": 20_000,
        **overrides,
    }
    return TestClient(create_app(float64_settings(**settings)))


@pytest.fixture(scope="module")
def client(root):
    with open_client(root) as c:
        wait_ready(c)
        yield c


def assert_error(resp, status: int, error_type: str, match: str) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error", "error_type"}
    assert body["error_type"] == error_type
    assert match in body["error"], body["error"]
    return body


# --------------------------------------------------------------------------------------------- scoring
def test_scores_equal_the_in_process_model(client, rm_a):
    resp = client.post("/v1/score", json={"items": ITEMS})
    assert resp.status_code == 200
    body = resp.json()
    expected = rm_a.score(rm_inputs(ITEMS))
    assert body["model"] == "a" and body["version"] == rm_a.version and len(rm_a.version) == 12
    assert body["scores"] == pytest.approx(expected, abs=SCORE_TOL_F64)
    assert body["truncated"] == [False, False, False, True]
    assert max(expected) - min(expected) > 1e-2


def test_normalize_uses_the_saved_mean_and_std(client, rm_a):
    raw = client.post("/v1/score", json={"items": ITEMS}).json()["scores"]
    norm = client.post("/v1/score", json={"items": ITEMS, "normalize": True}).json()["scores"]
    assert norm == pytest.approx([(s - 0.25) / 2.0 for s in raw], abs=SCORE_TOL_F64)


def test_same_score_whatever_the_batch(client):
    alone = [client.post("/v1/score", json={"items": [it]}).json()["scores"][0] for it in ITEMS]
    together = client.post("/v1/score", json={"items": ITEMS[::-1]}).json()["scores"][::-1]
    assert together == pytest.approx(alone, abs=SCORE_TOL_F64)


def test_model_chosen_by_url(client, root):
    rm_b = RewardModel.load(root / "b", dtype="float64")
    items = [{"context": "c", "response": "r", "metadata": {"subreddit": "College", "depth": 1}}]
    body = client.post("/models/b/v1/score", json={"items": items}).json()
    assert body["model"] == "b" and body["version"] == rm_b.version
    assert body["scores"] == pytest.approx(rm_b.score(rm_inputs(items)), abs=SCORE_TOL_F64)
    assert client.post("/models/a/v1/score", json={"items": items}).json()["model"] == "a"
    resp = client.post("/models/nope/v1/score", json={"items": items})
    assert_error(resp, 404, "not_found", "unknown model 'nope'; known models: a, b")


def test_truncation_cuts_context_from_the_left_never_the_response(client, rm_a):
    long = {"context": "old " * 150 + "the recent part", "response": "the answer"}
    body = client.post("/v1/score", json={"items": [long]}).json()
    assert body["truncated"] == [True]
    enc = rm_a.encode(RMInput(long["context"], long["response"]))
    text = rm_a.tokenizer.decode(enc.input_ids)
    assert text.rstrip().endswith("the recent part [SEP] the answer [SEP]")
    resp = client.post("/v1/score", json={"items": [ITEMS[0], long], "truncate": False})
    assert_error(resp, 422, "validation", "item 1: input is")
    assert "longer than the model's max_length 64" in resp.json()["error"]


# --------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("payload", "match"),
    [
        ({"items": []}, "items: List should have at least 1 item"),
        ({"items": [{"response": "x", "score": 3}]}, "items.0.score: Extra inputs are not permitted"),
        ({"items": [{"context": "x"}]}, "items.0.response: Field required"),
        ({"items": [{"response": 5}]}, "items.0.response: Input should be a valid string"),
        ({"items": [{"response": "x"}], "normalise": True}, "normalise: Extra inputs are not permitted"),
        ({"items": "x"}, "items: Input should be a valid list"),
    ],
)
def test_malformed_requests_get_422(client, payload, match):
    assert_error(client.post("/v1/score", json=payload), 422, "validation", match)


@pytest.mark.parametrize(
    ("metadata", "match"),
    [
        ({"depth": "3"}, "items.0.metadata.depth: Input should be a valid integer"),
        ({"created_utc": 1e20}, "items.0.metadata.created_utc: Input should be less than or equal to"),
        ({"seconds_since_post": "1h"}, "items.0.metadata.seconds_since_post: Input should be a valid number"),
        ({"tags": ["a"]}, "items.0.metadata.tags"),
    ],
)
def test_metadata_the_template_reads_is_typed(client, metadata, match):
    resp = client.post("/models/b/v1/score", json={"items": [{"response": "x", "metadata": metadata}]})
    assert_error(resp, 422, "validation", match)


def test_metadata_from_pandas_rows_is_accepted(root):
    import numpy as np

    from karma.protocol import ScoreItem

    row = {
        "depth": 2.0,
        "sibling_count": np.int32(3),
        "seconds_since_post": float("nan"),
        "subreddit": "College",
    }
    item = ScoreItem.model_validate({"response": "x", "metadata": row})
    assert item.rm_metadata() == {"depth": 2, "sibling_count": 3, "subreddit": "College"}


def test_non_json_body_gets_422(client):
    resp = client.post("/v1/score", content=b"{not json", headers={"content-type": "application/json"})
    assert_error(resp, 422, "validation", "JSON decode error")


def test_too_many_items_get_422_and_too_large_a_body_413(client):
    # the item limit is in the OpenAPI document (maxItems): exceeding it is a validation error
    assert (
        client.get("/openapi.json").json()["components"]["schemas"]["ScoreRequest"]["properties"]["items"][
            "maxItems"
        ]
        == 8
    )
    resp = client.post("/v1/score", json={"items": [{"response": "x"}] * 9})
    assert_error(resp, 422, "validation", "9 items in one request; the limit is max_client_batch_size=8")
    big = json.dumps({"items": [{"response": "x" * 30_000}]}).encode()
    resp = client.post("/v1/score", content=big, headers={"content-type": "application/json"})
    assert_error(resp, 413, "payload_too_large", "request body exceeds max_body_bytes=20000")

    def chunks():  # no Content-Length: counted while streaming
        for _ in range(30):
            yield b" " * 1000

    resp = client.post("/v1/score", content=chunks(), headers={"content-type": "application/json"})
    assert_error(resp, 413, "payload_too_large", "max_body_bytes=20000")
    small = client.post(
        "/v1/score",
        content=iter([json.dumps({"items": ITEMS[:1]}).encode()]),
        headers={"content-type": "application/json"},
    )
    assert small.status_code == 200  # a chunked body under the limit is replayed intact


def test_unknown_route_and_method_use_the_error_body(client):
    assert_error(client.get("/nope"), 404, "not_found", "Not Found")
    assert_error(client.get("/v1/score"), 405, "method_not_allowed", "Method Not Allowed")


# --------------------------------------------------------------------------------------------- readiness
def test_not_ready_until_every_model_is_loaded(root):
    from services.reward_api.engine import ModelRegistry

    registry = ModelRegistry(Settings().limits(), device="cpu", dtype="auto")
    registry.default = "a"
    registry.declare("a")
    app = create_app(Settings(), registry=registry)
    with TestClient(app) as c:
        assert c.get("/health").json() == {"status": "ok"}
        ready = c.get("/ready")
        assert ready.status_code == 503 and ready.json()["models"] == {"a": "loading"}
        resp = c.post("/v1/score", json={"items": ITEMS[:1]})
        assert_error(resp, 503, "not_ready", "model 'a' is still loading")
        assert resp.headers["retry-after"] == "1"
        registry.load("a", root / "a")
        assert c.get("/ready").status_code == 200
        assert c.get("/info").json()["models"][0]["dtype"] == "float32"  # dtype auto, on CPU
        assert c.post("/v1/score", json={"items": ITEMS[:1]}).status_code == 200
        with pytest.raises(Exception, match="not a KARMA reward model"):
            registry.load("bad", root / "not_a_model")
        ready = c.get("/ready")
        assert ready.status_code == 503
        assert ready.json()["models"]["bad"] == "failed" and "karma_rm.json" in ready.json()["errors"]["bad"]
        registry.close()


def test_info_and_health(client, rm_a):
    info = client.get("/info").json()
    assert info["default_model"] == "a"
    assert info["limits"] == {
        "max_client_batch_size": 8,
        "max_body_bytes": 20_000,
        "max_queue_items": 64,
        "max_queue_wait_s": 5.0,
        "max_batch_tokens": 16384,
        "max_wait_ms": 2.0,
        "padding_tolerance": 0.25,
        "score_cache_items": 100_000,
        "monitor_window": 1024,
    }
    a = next(m for m in info["models"] if m["name"] == "a")
    assert a["version"] == rm_a.version and a["dtype"] == "float64" and a["device"] == "cpu"
    assert a["max_length"] == 64 and a["variant"] == "context" and a["default"] is True
    assert a["path"] is None  # folders are shown to admins only
    assert info["auth"] == {"api_key": False, "admin": True}
    assert client.get("/models/b/ready").json()["models"] == {"b": "ready"}
    assert_error(client.get("/models/zz/health"), 404, "not_found", "known models: a, b")


def test_metrics_count_requests_by_route_template_and_items_by_model(client):
    client.post("/models/b/v1/score", json={"items": ITEMS[:3]})
    text = client.get("/metrics").text
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }
    key = (
        "karma_requests_total",
        (("method", "POST"), ("route", "/models/{name}/v1/score"), ("status", "200")),
    )
    assert samples[key] >= 1
    assert samples[("karma_items_scored_total", (("model", "b"),))] >= 3
    assert samples[("karma_batch_size_count", (("model", "b"),))] >= 1
    assert samples[("karma_tokens_total", (("model", "b"),))] > 0
    assert ("karma_queue_depth", (("model", "b"),)) in samples
    assert not any("nope" in str(k) for k in samples)  # raw paths never become labels


# --------------------------------------------------------------------------------------------- compat
def test_get_reward_speaks_openrlhf(client, rm_a):
    prompts = ["<|user|>Why is the sky blue?\n<|assistant|>", "Tips for finals?"]
    queries = [prompts[0] + "Rayleigh scattering.", prompts[1] + " Sleep first."]
    resp = client.post("/get_reward", json={"query": queries, "prompts": prompts, "labels": [None, "x"]})
    body = resp.json()
    expected = rm_a.score([RMInput(prompts[0], "Rayleigh scattering."), RMInput(prompts[1], " Sleep first.")])
    assert body["rewards"] == pytest.approx(expected, abs=SCORE_TOL_F64)
    assert body["scores"] == pytest.approx([1 / (1 + math.exp(-r)) for r in expected], abs=SCORE_TOL_F64)
    assert all(0 <= s <= 1 for s in body["scores"])
    assert body["extra_logs"] == {
        "karma_truncated": [0.0, 0.0],
        "karma_prompt_mismatch": [0.0, 0.0],
        "karma_chat_markup": [0.0, 0.0],  # `<|user|>` is in none of the templates karma.chat reads
        "karma_labels_ignored": [0.0, 0.0],
        "karma_label_metadata_invalid": [0.0, 0.0],
    }
    odd = client.post("/get_reward", json={"query": ["unrelated text"], "prompts": ["a prompt"]}).json()
    assert odd["extra_logs"]["karma_prompt_mismatch"] == [1.0]
    assert odd["rewards"] == pytest.approx(
        rm_a.score([RMInput("a prompt", "unrelated text")]), abs=SCORE_TOL_F64
    )
    # lists that do not pair up with `query` are valid by the schema (it cannot say "as long as"), so they are
    # not refused: they are not used, and extra_logs says so for every query
    resp = client.post("/get_reward", json={"query": ["a", "b"], "prompts": ["a"], "labels": [1, 2, 3]})
    assert resp.status_code == 200
    assert resp.json()["rewards"] == pytest.approx(
        rm_a.score([RMInput("", "a"), RMInput("", "b")]), abs=SCORE_TOL_F64
    )
    assert resp.json()["extra_logs"]["karma_prompt_mismatch"] == [1.0, 1.0]
    assert resp.json()["extra_logs"]["karma_labels_ignored"] == [1.0, 1.0]


def test_classify_speaks_vllm(client, rm_a):
    resp = client.post("/classify", json={"model": "whatever", "input": ["good answer", "bad"]})
    body = resp.json()
    raw = rm_a.score([RMInput("", "good answer"), RMInput("", "bad")])
    assert [p for d in body["data"] for p in d["probs"]] == pytest.approx(
        [1 / (1 + math.exp(-r)) for r in raw], abs=SCORE_TOL_F64
    )
    assert [d["index"] for d in body["data"]] == [0, 1] and body["data"][0]["num_classes"] == 1
    assert body["object"] == "list" and body["model"] == "a" and body["usage"]["prompt_tokens"] > 0
    raw_one = client.post("/classify", json={"input": "good answer", "use_activation": False}).json()
    assert raw_one["data"][-1]["probs"][-1] == pytest.approx(raw[0], abs=SCORE_TOL_F64)  # what verl reads
    msgs = [
        {"role": "system", "content": "be nice"},
        {"role": "user", "content": "Why is the sky blue?"},
        {"role": "assistant", "content": "Rayleigh scattering."},
    ]
    chat = client.post("/classify", json={"messages": msgs, "activation": False}).json()
    expected = rm_a.score(
        [RMInput([{"role": "user", "content": "Why is the sky blue?"}], "Rayleigh scattering.")]
    )
    assert chat["data"][0]["probs"][0] == pytest.approx(expected[0], abs=SCORE_TOL_F64)
    both = client.post("/classify", json={"input": "x", "messages": msgs})
    assert_error(both, 422, "validation", "send exactly one of `input`")


# --------------------------------------------------------------------------------------------- auth
def test_api_key_protects_scoring_and_info_but_not_health(root):
    with open_client(root, api_key="score-key") as c:
        wait_ready(c)
        resp = c.post("/v1/score", json={"items": ITEMS[:1]})
        assert_error(resp, 401, "unauthorized", "missing credentials")
        assert resp.headers["www-authenticate"] == "Bearer"
        bad = c.post("/get_reward", json={"query": ["x"]}, headers={"Authorization": "Bearer nope"})
        assert_error(bad, 401, "unauthorized", "invalid API key")
        ok = {"Authorization": "Bearer score-key"}
        assert c.post("/v1/score", json={"items": ITEMS[:1]}, headers=ok).status_code == 200
        assert c.post("/classify", json={"input": "x"}, headers=ADMIN).status_code == 200  # admin may score
        assert c.get("/info").status_code == 401 and c.get("/info", headers=ok).status_code == 200
        assert c.get("/health").status_code == 200 and c.get("/metrics").status_code == 200
        assert_error(c.get("/v1/models", headers=ok), 403, "forbidden", "may score but not manage models")
        assert_error(
            c.get("/v1/models", headers={"Authorization": "Bearer x"}), 401, "unauthorized", "invalid admin"
        )


def test_admin_routes_are_off_without_a_token(root):
    with open_client(root, admin_token=None) as c:
        wait_ready(c)
        assert_error(c.get("/v1/models", headers=ADMIN), 404, "not_found", "Not Found")
        assert "/v1/models" not in c.get("/openapi.json").json()["paths"]


# --------------------------------------------------------------------------------------------- admin
def test_model_management_load_swap_delete(root, rm_a):
    rm_a2 = RewardModel.load(root / "a2", dtype="float64")
    with open_client(root) as c:
        wait_ready(c)
        listed = c.get("/v1/models", headers=ADMIN).json()
        assert [m["name"] for m in listed["models"]] == ["a", "b"] and listed["models"][0]["path"] == str(
            root / "a"
        )

        created = c.post("/v1/models", json={"name": "c", "path": str(root / "a2")}, headers=ADMIN)
        assert created.status_code == 201 and created.json()["version"] == rm_a2.version
        assert c.post("/models/c/v1/score", json={"items": ITEMS[:1]}).json()["version"] == rm_a2.version
        dup = c.post("/v1/models", json={"name": "c", "path": "a2"}, headers=ADMIN)
        assert_error(dup, 409, "conflict", "model 'c' already exists")

        before = c.post("/v1/score", json={"items": ITEMS}).json()
        swapped = c.put("/v1/models/a", json={"path": "a2"}, headers=ADMIN)  # relative to the first root
        assert swapped.status_code == 200
        assert swapped.json()["previous_version"] == rm_a.version
        assert swapped.json()["model"]["version"] == rm_a2.version
        after = c.post("/v1/score", json={"items": ITEMS}).json()
        assert before["version"] == rm_a.version and after["version"] == rm_a2.version
        assert after["scores"] == pytest.approx(rm_a2.score(rm_inputs(ITEMS)), abs=SCORE_TOL_F64)

        assert c.delete("/v1/models/c", headers=ADMIN).json()["name"] == "c"
        assert_error(
            c.post("/models/c/v1/score", json={"items": ITEMS[:1]}), 404, "not_found", "known models: a, b"
        )
        assert_error(c.delete("/v1/models/a", headers=ADMIN), 409, "conflict", "is the default model")
        assert_error(
            c.put("/v1/models/zz", json={"path": "a2"}, headers=ADMIN), 404, "not_found", "unknown model"
        )


@pytest.mark.parametrize(
    ("path", "status", "match"),
    [
        ("../outside/evil", 403, "outside the configured model roots"),
        ("/etc", 403, "outside the configured model roots"),
        ("link", 403, "outside the configured model roots"),  # a symlink inside the root pointing out
        ("not_a_model", 403, "no KARMA reward-model folder at 'not_a_model' (no karma_rm.json in it)"),
        ("nowhere/at/all", 403, "no folder at 'nowhere/at/all' under the model roots"),
        ("x" * 300, 403, "File name too long"),  # no such folder can exist
        ("a/../../a", 403, "outside the configured model roots"),
    ],
)
def test_admin_paths_are_confined_to_model_roots(client, path, status, match):
    resp = client.post("/v1/models", json={"name": "x", "path": path}, headers=ADMIN)
    assert_error(resp, status, "forbidden", match)


def test_admin_default_model_route_and_variant_guarded_swap(root, rm_a):
    make_tiny_rm(root / "full_v", "full", seed=5)
    app = create_app(
        Settings(
            models={"a": str(root / "a"), "b": str(root / "b")},
            admin_token="admin-secret",
            model_roots=[str(root)],
        )
    )
    with TestClient(app) as c:
        wait_ready(c)
        assert c.post("/v1/score", json={"items": ITEMS[:1]}).json()["model"] == "a"
        r = c.put("/v1/default-model", json={"name": "b"}, headers=ADMIN)
        assert r.status_code == 200 and r.json()["default_model"] == "b"
        assert c.post("/v1/score", json={"items": ITEMS[:1]}).json()["model"] == "b"
        assert c.get("/info").json()["default_model"] == "b"
        assert_error(
            c.put("/v1/default-model", json={"name": "zz"}, headers=ADMIN),
            404,
            "not_found",
            "unknown model 'zz'",
        )
        assert c.put("/v1/default-model", json={"name": "b"}).status_code == 401
        refused = c.put("/v1/models/a", json={"path": "full_v"}, headers=ADMIN)
        assert_error(
            refused, 409, "conflict", "would change its variant from 'context' to 'full'; send force=true"
        )
        assert c.get("/v1/models", headers=ADMIN).json()["models"][0]["variant"] == "context"
        forced = c.put("/v1/models/a", json={"path": "full_v", "force": True}, headers=ADMIN)
        assert forced.status_code == 200 and forced.json()["model"]["variant"] == "full"


# --------------------------------------------------------------------------------------------- settings
def test_settings_from_environment_and_their_validation(root, monkeypatch):
    monkeypatch.setenv("KARMA_MODELS", f"a={root / 'a'},b={root / 'b'}")
    monkeypatch.setenv("KARMA_MAX_WAIT_MS", "7.5")
    monkeypatch.setenv("KARMA_API_KEY", "k")
    monkeypatch.setenv("KARMA_MODEL_ROOTS", str(root))
    s = Settings()
    assert list(s.models) == ["a", "b"] and s.default_model == "a" and s.max_wait_ms == 7.5
    assert s.api_key.get_secret_value() == "k" and s.model_roots == [root.resolve()]
    monkeypatch.setenv("KARMA_MODELS", json.dumps({"m": str(root / "b")}))
    assert Settings(default_model="m").models == {"m": (root / "b").resolve()}
    monkeypatch.delenv("KARMA_MODELS")
    with pytest.raises(ValueError, match="Input should be greater than or equal to 0"):
        Settings(max_wait_ms=-1)
    with pytest.raises(ValueError, match="default model 'zz' is not among the served models"):
        Settings(models={"a": str(root / "a")}, default_model="zz")
    with pytest.raises(ValueError, match="is not a KARMA reward-model folder"):
        Settings(models={"a": str(root / "not_a_model")})
    with pytest.raises(ValueError, match="model spec 'nopath' is not NAME=PATH"):
        Settings(models=["nopath"])
    with pytest.raises(
        ValueError, match=r"max_queue_items \(4\) must be at least max_client_batch_size \(8\)"
    ):
        Settings(max_queue_items=4, max_client_batch_size=8)
    with pytest.raises(
        ValueError, match="Input should be 'auto', 'float32', 'bfloat16', 'float16' or 'float64'"
    ):
        Settings(dtype="int8")
    with pytest.raises(ValueError, match="Extra inputs are not permitted"):
        Settings(max_wait=3)


def test_cli_flags_override_the_environment(root, monkeypatch):
    import typer
    from typer.testing import CliRunner

    from karma.cli import app
    from services.reward_api.cli import build_settings

    monkeypatch.setenv("KARMA_MAX_BATCH_TOKENS", "999")
    monkeypatch.setenv("KARMA_PORT", "9001")
    s = build_settings(models=[f"a={root / 'a'}"], port=8123, max_batch_tokens=None, model_roots=[])
    assert s.port == 8123 and s.max_batch_tokens == 999 and list(s.models) == ["a"]
    with pytest.raises(typer.BadParameter, match="max_wait_ms: Input should be greater than or equal to 0"):
        build_settings(max_wait_ms=-3)

    def run(*args) -> tuple[int, str]:
        result = CliRunner().invoke(app, ["serve", *args])
        return result.exit_code, " ".join(
            re.sub(r"[│╭╮╰╯─]", " ", result.output).split()
        )  # unwrap rich's box

    code, out = run("--model", "a=/does/not/exist")
    assert code == 2 and "/does/not/exist is not a KARMA reward-model folder" in out
    monkeypatch.delenv("KARMA_MODELS", raising=False)
    code, out = run()
    assert code == 2 and "no model to serve" in out
