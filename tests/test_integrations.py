"""The reward service as RL frameworks call it, on tiny random reward models.

* `karma.chat`: ChatML / Llama 3 / Gemma / Mistral text → turns; a templated OpenRLHF query scores as its
  clean context + response does on /v1/score.
* OpenRLHF's `/get_reward` request as its client (0.11.2, `SingleTurnAgentExecutor._fetch_rewards_via_http`)
  builds it: labels of any JSON, metadata through labels for the `full` variant, per-model defaults.
* The RM folder's chat template, rendered by its own tokenizer, read back by `/classify`.
* verl's custom reward function loaded and called exactly as verl 0.9.1 does (`get_custom_reward_fn`,
  `NaiveRewardManager.run_single`), against a real uvicorn on loopback.
* The README / docs snippets.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import inspect
import json
import math
import re
import shlex
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from karma import chat
from karma.rm.model import RewardModel, RMInput
from services.reward_api.core.config import Settings
from services.reward_api.main import create_app
from tests.support import SCORE_TOL_F64, float64_settings, make_tiny_rm, serve_in_thread

REPO = Path(__file__).resolve().parents[1]

SYSTEM = "You are a helpful assistant."
Q1, A1, Q2 = "Why is the sky blue?", "Rayleigh scattering.", "Is that why sunsets are red?"
REPLY = "Yes: the blue is scattered away first."
CLEAN_CONTEXT = [
    {"role": "user", "content": Q1},
    {"role": "assistant", "content": A1},
    {"role": "user", "content": Q2},
]

#: (prompt as the policy's tokenizer renders it with add_generation_prompt=True, the generated reply as
#: decoded with special tokens — its end token included)
TEMPLATED = {
    "chatml": (  # Qwen2.5 / SmolLM2
        (
            f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{Q1}<|im_end|>\n"
            f"<|im_start|>assistant\n{A1}<|im_end|>\n<|im_start|>user\n{Q2}<|im_end|>\n"
            "<|im_start|>assistant\n"
        ),
        f"{REPLY}<|im_end|>",
    ),
    "llama3": (
        (
            f"<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{SYSTEM}<|eot_id|>"
            f"<|start_header_id|>user<|end_header_id|>\n\n{Q1}<|eot_id|>"
            f"<|start_header_id|>assistant<|end_header_id|>\n\n{A1}<|eot_id|>"
            f"<|start_header_id|>user<|end_header_id|>\n\n{Q2}<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n"
        ),
        f"{REPLY}<|eot_id|>",
    ),
    "gemma": (  # no system role in Gemma's template
        (
            f"<bos><start_of_turn>user\n{Q1}<end_of_turn>\n<start_of_turn>model\n{A1}<end_of_turn>\n"
            f"<start_of_turn>user\n{Q2}<end_of_turn>\n<start_of_turn>model\n"
        ),
        f"{REPLY}<end_of_turn>\n<eos>",
    ),
    "mistral": (
        f"<s>[INST] {Q1} [/INST] {A1}</s>[INST] {Q2} [/INST]",
        f" {REPLY}</s>",
    ),
}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    make_tiny_rm(root / "a", "context", seed=0, score_normalization={"mean": 0.25, "std": 2.0})
    make_tiny_rm(root / "b", "full", seed=1)
    return root


@pytest.fixture(scope="module")
def rm_a(root) -> RewardModel:
    return RewardModel.load(root / "a", dtype="float64")


@pytest.fixture(scope="module")
def rm_b(root) -> RewardModel:
    return RewardModel.load(root / "b", dtype="float64")


# Served and offline scores are both float64 and agree within SCORE_TOL_F64 (tests/support.py says why): items
# reach the model in other batches on the two sides.
def open_client(root: Path, **overrides) -> TestClient:
    settings = {"models": {"a": str(root / "a"), "b": str(root / "b")}, **overrides}
    client = TestClient(create_app(float64_settings(**settings)))
    client.__enter__()
    deadline = time.monotonic() + 120
    while client.get("/ready").status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return client


@pytest.fixture(scope="module")
def client(root):
    c = open_client(root)
    yield c
    c.__exit__(None, None, None)


def openrlhf_post(client, path: str, query: str, prompt: str, label=""):
    """The body OpenRLHF 0.11.2 posts for one rollout: query = decode(prompt + action, skip_special_tokens=
    False), its prompt, its label (`--label_key` column as is; "" without one)."""
    resp = client.post(path, json={"query": [query], "prompts": [prompt], "labels": [label]})
    assert resp.status_code == 200, resp.text
    return resp.json()


def clean_score(client, context, response, path: str = "/v1/score", **extra) -> float:
    body = {"items": [{"context": context, "response": response, **extra}]}
    return client.post(path, json=body).json()["scores"][0]


# --------------------------------------------------------------------------------------------- karma.chat
@pytest.mark.parametrize("name", list(TEMPLATED))
def test_each_template_splits_into_turns(name):
    prompt, reply = TEMPLATED[name]
    assert chat.detect(prompt + reply).name == name
    turns = chat.split_turns(prompt + reply)
    roles = [t.role for t in turns]
    expected_roles = ["user", "assistant", "user", "assistant"]
    assert roles == (expected_roles if name in ("gemma", "mistral") else ["system", *expected_roles])
    assert [t.content for t in turns if t.role != "system"] == [Q1, A1, Q2, REPLY]
    assert all(t.closed for t in turns)
    conv = chat.conversation(prompt + reply)  # no prompt: split at the last assistant turn
    assert (conv.context, conv.response, conv.template) == (CLEAN_CONTEXT, REPLY, name)
    conv = chat.conversation(prompt + reply, prompt)  # with the prompt: the rest is the response
    assert (conv.context, conv.response, conv.prompt_matched) == (CLEAN_CONTEXT, REPLY, True)
    stripped = chat.strip_special_tokens(prompt + reply)
    assert not any(tok in stripped for tok in chat.FORMATS[name].special_tokens)
    assert chat.split_turns(prompt + reply, "none") == []


def test_chat_edge_cases():
    cut = chat.split_turns("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nunfinished")
    assert cut[-1] == chat.ChatTurn("assistant", "unfinished", closed=False)
    llama2 = "<s>[INST] <<SYS>>\nBe kind.\n<</SYS>>\n\nHi there [/INST] Hello! </s>"
    assert chat.split_turns(llama2) == [
        chat.ChatTurn("system", "Be kind."),
        chat.ChatTurn("user", "Hi there"),
        chat.ChatTurn("assistant", "Hello!"),
    ]
    v7 = "<s>[SYSTEM_PROMPT]Be kind.[/SYSTEM_PROMPT][INST]Hi[/INST]Hello!</s>"
    assert chat.conversation(v7).context == [{"role": "user", "content": "Hi"}]
    # plain text: split by the prompt only, well-known BOS/EOS off its ends, other markup kept
    plain = chat.conversation("<s>Q: why? A: because.</s>", "<s>Q: why? A:")
    assert (plain.context, plain.response, plain.template) == ("Q: why? A:", "because.", None)
    zephyr = chat.conversation("<|user|>\nQ<|assistant|>\nA", "<|user|>\nQ<|assistant|>\n")
    assert (zephyr.context, zephyr.response) == ("<|user|>\nQ<|assistant|>\n", "A")
    assert chat.conversation("a</s>", None, "none").response == "a</s>"
    # a named template is the only one read: ChatML markup is text to the llama3 reader
    prompt, reply = TEMPLATED["chatml"]
    as_llama3 = chat.conversation(prompt + reply, prompt, "llama3")
    assert as_llama3.template is None and "<|im_start|>user" in as_llama3.context[0]["content"]
    assert chat.conversation(prompt + reply, prompt, "chatml").context == CLEAN_CONTEXT


def test_template_from_a_tokenizer_folder_and_bad_settings(root, tmp_path):
    fmt = chat.chat_format_from_tokenizer(str(root / "a"))  # an RM folder: its saved ChatML template
    assert fmt.name == "chatml" and "[SEP]" in fmt.special_tokens
    assert chat.check_template(str(root / "a")) == str((root / "a").resolve())
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    with pytest.raises(ValueError, match="it has no chat template"):
        chat.check_template(str(tmp_path / "tok"))
    (tmp_path / "tok" / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ x }}"}))
    with pytest.raises(ValueError, match="its chat template is none of chatml, llama3, gemma, mistral"):
        chat.check_template(str(tmp_path / "tok"))
    with pytest.raises(ValueError, match="not a template name .* nor a tokenizer folder"):
        chat.check_template("chatlm")


# --------------------------------------------------------------------------------------------- OpenRLHF
@pytest.mark.parametrize("name", list(TEMPLATED))
def test_templated_queries_score_as_their_clean_text(client, rm_a, name):
    prompt, reply = TEMPLATED[name]
    clean = clean_score(client, CLEAN_CONTEXT, REPLY)
    assert clean == pytest.approx(rm_a.score([RMInput(CLEAN_CONTEXT, REPLY)])[0], abs=SCORE_TOL_F64)
    body = openrlhf_post(client, "/get_reward", prompt + reply, prompt)
    assert body["rewards"] == pytest.approx([clean], abs=SCORE_TOL_F64)
    assert body["extra_logs"]["karma_chat_markup"] == [1.0]
    assert body["extra_logs"]["karma_prompt_mismatch"] == [0.0]
    without_prompts = client.post("/get_reward", json={"query": [prompt + reply]}).json()
    assert without_prompts["rewards"] == pytest.approx([clean], abs=SCORE_TOL_F64)
    # a prompt the query does not start with: flagged, and the query is split at its last assistant turn
    odd = openrlhf_post(client, "/get_reward", prompt + reply, "a prompt decoded differently")
    assert odd["extra_logs"]["karma_prompt_mismatch"] == [1.0]
    assert odd["rewards"] == pytest.approx([clean], abs=SCORE_TOL_F64)
    raw = client.post("/classify", json={"input": prompt + reply, "use_activation": False}).json()
    assert raw["data"][-1]["probs"][-1] == pytest.approx(clean, abs=SCORE_TOL_F64)


def test_chat_template_setting_per_model(root, rm_a):
    prompt, reply = TEMPLATED["chatml"]
    c = open_client(root, chat_templates=["a=none", "b=llama3"])
    try:
        # "none": scored as the text it is, markup included — a different score
        body = openrlhf_post(c, "/get_reward", prompt + reply, prompt)
        assert body["rewards"] == pytest.approx(rm_a.score([RMInput(prompt, reply)]), abs=SCORE_TOL_F64)
        assert abs(body["rewards"][0] - clean_score(c, CLEAN_CONTEXT, REPLY)) > 1e-4
        assert body["extra_logs"]["karma_chat_markup"] == [0.0]
        # b reads Llama 3 only: the ChatML markup is not read off
        b = openrlhf_post(c, "/models/b/get_reward", prompt + reply, prompt)
        assert b["extra_logs"]["karma_chat_markup"] == [0.0]
    finally:
        c.__exit__(None, None, None)
    s = Settings(models={"a": str(root / "a")}, chat_templates=f"gemma,a={root / 'a'}")
    assert s.chat_templates == {"*": "gemma", "a": str((root / "a").resolve())}
    assert s.chat_template("a") == str((root / "a").resolve()) and s.chat_template("zz") == "gemma"
    assert Settings().chat_template("x") == "auto"
    with pytest.raises(ValueError, match="not a template name"):
        Settings(chat_templates=["a=chatlm"])
    with pytest.raises(ValueError, match="chat_templates: 'c' is not among the served models \\(a\\)"):
        Settings(models={"a": str(root / "a")}, chat_templates=["c=chatml"])


@pytest.mark.parametrize(
    "label", [42, 3.5, True, None, "", "72", {"answer": "72"}, ["a", 1], {"metadata": None}, "{not json"]
)
def test_labels_may_be_any_json(client, label):
    query, prompt = "Why is the sky blue? Rayleigh.", "Why is the sky blue?"
    expected = client.post("/get_reward", json={"query": [query], "prompts": [prompt]}).json()["rewards"]
    assert openrlhf_post(client, "/get_reward", query, prompt, label)["rewards"] == expected
    resp = client.post("/get_reward", json={"query": [query], "labels": [label, label]})  # unpaired: not used
    assert resp.status_code == 200 and resp.json()["extra_logs"]["karma_labels_ignored"] == [1.0]


def test_metadata_in_labels_reaches_the_full_variant(client, rm_b):
    from karma.rm.template import metadata_header

    prompt, reply = TEMPLATED["chatml"]
    meta = {"subreddit": "college", "depth": 1, "seconds_since_post": 7200, "created_utc": 1_600_000_000}
    assert metadata_header(meta).startswith("[r/college | depth 1 | 2.0h after post")  # not "[r/? | depth ?"
    with_meta = openrlhf_post(client, "/models/b/get_reward", prompt + reply, prompt, {"metadata": meta})
    expected = rm_b.score([RMInput(CLEAN_CONTEXT, REPLY, meta)])
    assert with_meta["rewards"] == pytest.approx(expected, abs=SCORE_TOL_F64)
    assert with_meta["rewards"][0] == pytest.approx(
        clean_score(client, CLEAN_CONTEXT, REPLY, "/models/b/v1/score", metadata=meta), abs=SCORE_TOL_F64
    )
    as_string = openrlhf_post(
        client, "/models/b/get_reward", prompt + reply, prompt, json.dumps({"metadata": meta})
    )
    assert as_string["rewards"] == with_meta["rewards"]
    bare = openrlhf_post(client, "/models/b/get_reward", prompt + reply, prompt, {"answer": "x"})
    assert bare["rewards"] == pytest.approx(rm_b.score([RMInput(CLEAN_CONTEXT, REPLY)]), abs=SCORE_TOL_F64)
    assert abs(bare["rewards"][0] - with_meta["rewards"][0]) > 1e-4  # the header changed the score
    # labels are advice: metadata that does not validate is dropped for its item and flagged, not a 422
    resp = client.post(
        "/models/b/get_reward", json={"query": ["x"], "labels": [{"metadata": {"depth": "1"}}]}
    )
    assert resp.status_code == 200
    assert resp.json()["extra_logs"]["karma_label_metadata_invalid"] == [1.0]


def test_normalized_by_default_for_chosen_models(root, client):
    query, prompt = "Why is the sky blue? Rayleigh.", "Why is the sky blue?"
    raw_a = openrlhf_post(client, "/get_reward", query, prompt)["rewards"][0]
    raw_b = openrlhf_post(client, "/models/b/get_reward", query, prompt)["rewards"][0]
    classify_raw = client.post("/classify", json={"input": "Rayleigh.", "use_activation": False}).json()
    c = open_client(root, normalize_models=["a"])
    try:
        body = openrlhf_post(c, "/get_reward", query, prompt)
        assert body["rewards"] == pytest.approx([(raw_a - 0.25) / 2.0], abs=SCORE_TOL_F64)
        assert body["scores"] == pytest.approx([1 / (1 + math.exp(-body["rewards"][0]))])
        explicit = c.post("/get_reward", json={"query": [query], "prompts": [prompt], "normalize": False})
        assert explicit.json()["rewards"] == pytest.approx([raw_a], abs=SCORE_TOL_F64)
        assert openrlhf_post(c, "/models/b/get_reward", query, prompt)["rewards"] == pytest.approx(
            [raw_b], abs=SCORE_TOL_F64
        )
        out = c.post("/classify", json={"input": "Rayleigh.", "use_activation": False}).json()
        assert out["data"][0]["probs"][0] == pytest.approx(
            (classify_raw["data"][0]["probs"][0] - 0.25) / 2.0, abs=SCORE_TOL_F64
        )
        item = {"context": prompt, "response": " Rayleigh."}
        raw_score = client.post("/v1/score", json={"items": [item]}).json()["scores"][0]
        assert c.post("/v1/score", json={"items": [item]}).json()["scores"] == pytest.approx(
            [(raw_score - 0.25) / 2.0], abs=SCORE_TOL_F64
        )
        assert c.post("/v1/score", json={"items": [item], "normalize": False}).json()[
            "scores"
        ] == pytest.approx([raw_score], abs=SCORE_TOL_F64)
    finally:
        c.__exit__(None, None, None)
    s = Settings(models={"a": str(root / "a"), "b": str(root / "b")}, normalize_models="b, a")
    assert (
        s.normalize_models == ["b", "a"]
        and s.normalize_default("a")
        and not Settings().normalize_default("a")
    )
    assert Settings(normalize_models=["*"]).normalize_default("anything")
    with pytest.raises(ValueError, match="normalize_models: 'c' is not among the served models"):
        Settings(models={"a": str(root / "a")}, normalize_models=["c"])
    assert Settings(
        models={"a": str(root / "a")}, normalize_models=["c"], admin_token="t"
    ).normalize_models == ["c"]  # may be loaded later through the admin routes


def test_cli_and_environment_set_the_new_options(root, monkeypatch):
    from services.reward_api.cli import build_settings

    monkeypatch.setenv("KARMA_NORMALIZE_MODELS", "a")
    monkeypatch.setenv("KARMA_CHAT_TEMPLATES", json.dumps({"a": "mistral"}))
    s = build_settings(models=[f"a={root / 'a'}"])
    assert s.normalize_models == ["a"] and s.chat_templates == {"a": "mistral"}
    s = build_settings(models=[f"a={root / 'a'}"], normalize_models=["*"], chat_templates=["llama3"])
    assert s.normalize_models == ["*"] and s.chat_templates == {"*": "llama3"}


# --------------------------------------------------------------------------------------------- RM folder
def test_rm_folders_carry_a_chat_template_that_classify_reads_back(root, client):
    from transformers import AutoTokenizer

    cfg = json.loads((root / "a" / "tokenizer_config.json").read_text())
    assert cfg["chat_template"] == chat.CHATML_TEMPLATE
    assert not (root / "a" / "chat_template.jinja").exists()
    tok = AutoTokenizer.from_pretrained(root / "a")
    messages = [
        {"role": "system", "content": SYSTEM},
        *CLEAN_CONTEXT,
        {"role": "assistant", "content": REPLY},
    ]
    text = tok.apply_chat_template(messages, tokenize=False)  # what verl's reward-model path renders
    out = client.post("/classify", json={"model": "a", "input": text, "use_activation": False}).json()
    by_messages = client.post("/classify", json={"messages": messages, "use_activation": False}).json()
    assert out["data"][-1]["probs"][-1] == pytest.approx(
        by_messages["data"][-1]["probs"][-1], abs=SCORE_TOL_F64
    )
    assert out["data"][-1]["probs"][-1] == pytest.approx(
        clean_score(client, CLEAN_CONTEXT, REPLY), abs=SCORE_TOL_F64
    )


# --------------------------------------------------------------------------------------------- verl
def _call_with_kwargs(raw_fn, extra_kwargs, *args, **kwargs):  # verl/trainer/ppo/reward.py, 0.9.1
    return raw_fn(*args, **{**kwargs, **extra_kwargs})


async def _call_with_kwargs_async(raw_fn, extra_kwargs, *args, **kwargs):
    return await raw_fn(*args, **{**kwargs, **extra_kwargs})


def verl_custom_reward_fn(path: str, name: str, reward_kwargs: dict | None = None):
    """verl 0.9.1 `get_custom_reward_fn`: `load_extern_object(path, name)` (pkg:// → import_module), wrapped
    with the config's reward_kwargs."""
    assert path.startswith("pkg://")
    raw_fn = getattr(importlib.import_module(path.removeprefix("pkg://").replace("/", ".")), name)
    wrap = _call_with_kwargs_async if inspect.iscoroutinefunction(raw_fn) else _call_with_kwargs
    return functools.partial(wrap, raw_fn, dict(reward_kwargs or {}))


async def verl_run_single(compute_score, data_source, response_str, ground_truth, extra_info, router=None):
    """verl 0.9.1 `NaiveRewardManager.run_single`, from the decoded response on."""
    extra_info = dict(extra_info)
    extra_info["num_turns"] = None
    extra_info["rollout_reward_scores"] = {}
    extra = {"reward_router_address": router, "reward_model_tokenizer": None} if router is not None else {}
    loop = asyncio.get_running_loop()
    kwargs = {
        "data_source": data_source,
        "solution_str": response_str,
        "ground_truth": ground_truth,
        "extra_info": extra_info,
    }
    if inspect.iscoroutinefunction(compute_score):
        result = await compute_score(**kwargs, **extra)
    else:
        result = await loop.run_in_executor(None, lambda: compute_score(**kwargs, **extra))
    return result["score"] if isinstance(result, dict) else result, result


VERL_ROWS = [  # (extra_info, solution_str, expected (context, response, metadata))
    (
        {"prompt": [{"role": "system", "content": SYSTEM}, *CLEAN_CONTEXT]},
        REPLY,
        (CLEAN_CONTEXT, REPLY, None),
    ),
    ({"prompt": TEMPLATED["llama3"][0], "index": 3}, REPLY, (CLEAN_CONTEXT, REPLY, None)),
    ({"question": Q1, "answer": "72"}, A1, (Q1, A1, None)),
    ({}, TEMPLATED["gemma"][0] + TEMPLATED["gemma"][1], (CLEAN_CONTEXT, REPLY, None)),
    ({"index": 0}, REPLY, ("", REPLY, None)),
]


@pytest.fixture(scope="module")
def loopback(root):
    app = create_app(float64_settings(models={"a": str(root / "a"), "b": str(root / "b")}))
    with serve_in_thread(app) as url:
        yield url


@pytest.mark.parametrize("name", ["compute_score", "compute_score_async"])
def test_verl_reward_function_as_verl_calls_it(loopback, rm_a, rm_b, monkeypatch, name):
    from karma.integrations import verl

    monkeypatch.setenv("KARMA_REWARD_URL", loopback)
    fn = verl_custom_reward_fn("pkg://karma.integrations.verl", name)
    want = rm_a.score([RMInput(*row[2]) for row in VERL_ROWS])

    async def rollouts():
        return await asyncio.gather(
            *(
                verl_run_single(fn, "reddit", sol, "", info, router="127.0.0.1:1")
                for info, sol, _ in VERL_ROWS
            )
        )

    got = asyncio.run(rollouts())
    assert [s for s, _ in got] == pytest.approx(want, abs=SCORE_TOL_F64)  # batched together, in float64
    assert got[0][1] == {"score": got[0][0], "karma_truncated": 0.0, "karma_missing_prompt": 0.0}
    assert [r["karma_missing_prompt"] for _, r in got] == [0.0, 0.0, 0.0, 0.0, 1.0]  # the last has no prompt
    # reward_kwargs (the config) win over the environment: the full model, with metadata from extra_info
    meta = {"subreddit": "college", "depth": 2}
    fn_b = verl_custom_reward_fn("pkg://karma.integrations.verl", name, {"url": loopback, "model": "b"})
    monkeypatch.setenv("KARMA_REWARD_URL", "http://127.0.0.1:9")  # nothing listens there
    score, _ = asyncio.run(
        verl_run_single(fn_b, "reddit", REPLY, None, {"prompt": CLEAN_CONTEXT, "metadata": meta})
    )
    assert score == pytest.approx(rm_b.score([RMInput(CLEAN_CONTEXT, REPLY, meta)])[0], abs=SCORE_TOL_F64)
    normalized = verl.compute_score(solution_str=REPLY, extra_info={}, url=loopback, normalize="true")
    # the item was scored (batched) above, so the service's score cache answers: scored in another batch
    assert normalized["score"] == pytest.approx(
        (rm_a.score([RMInput("", REPLY)])[0] - 0.25) / 2.0, abs=SCORE_TOL_F64
    )
    verl.close()


def test_verl_reward_function_fails_loudly(monkeypatch):
    from karma.client import RewardServiceError
    from karma.integrations import verl

    monkeypatch.setenv("KARMA_REWARD_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("KARMA_REWARD_READY_TIMEOUT_S", "0.2")
    with pytest.raises(RewardServiceError, match="not ready before the deadline: http://127.0.0.1:9"):
        verl.compute_score("reddit", "a reply", None, {})
    verl.close()
    with pytest.raises(RewardServiceError, match="not ready"):
        asyncio.run(verl.compute_score_async("reddit", "a reply", None, {}))


def verl_on_fake_service(monkeypatch, handler) -> list:
    """verl's adapter makes its RewardClients on `handler` (an httpx.MockTransport handler); returns them."""
    from karma.client import RewardClient
    from karma.integrations import verl

    made = []

    def make(*args, **kwargs):
        made.append(RewardClient(*args, transport=httpx.MockTransport(handler), **kwargs))
        return made[-1]

    monkeypatch.setattr(verl, "RewardClient", make)
    return made


def test_verl_retries_until_a_configurable_deadline_and_rides_out_a_restart(monkeypatch):
    """One rollout's score is retried until `deadline_s` (default 120 s, like karma's trainer), however many
    tries that takes: a 13 s restart of a lone replica is ridden out (the former 5 retries gave up after
    4-8 s); reward_kwargs or KARMA_REWARD_DEADLINE_S set it."""
    from karma.client import RewardServiceError
    from tests.test_client import FakeClock, Outage, fake_time

    clock = FakeClock()
    fake_time(monkeypatch, clock)
    outage = Outage(clock, 13.0)
    made = verl_on_fake_service(monkeypatch, outage)
    url = "http://127.0.0.1:8000"
    fn = verl_custom_reward_fn("pkg://karma.integrations.verl", "compute_score_async", {"url": url})
    score, _ = asyncio.run(verl_run_single(fn, "reddit", "abc", "", {"prompt": "p"}))
    assert score == 3.0 and outage.failed > 6 and clock.now - outage.start >= 13.0
    assert made[-1].deadline_s == 120.0 and made[-1].max_retries is None
    for kwargs in ({"url": url, "deadline_s": 5}, {"url": url}):
        if "deadline_s" not in kwargs:
            monkeypatch.setenv("KARMA_REWARD_DEADLINE_S", "5")
        fn = verl_custom_reward_fn("pkg://karma.integrations.verl", "compute_score_async", kwargs)
        outage.start = clock.now  # another restart
        with pytest.raises(RewardServiceError, match=r"failed after \d+ attempt\(s\) in [0-4]\.\ds"):
            asyncio.run(verl_run_single(fn, "reddit", "abc", "", {"prompt": "p"}))
        assert made[-1].deadline_s == 5.0


@pytest.mark.parametrize("name", ["compute_score", "compute_score_async"])
def test_verl_unknown_or_bad_reward_kwargs_are_errors_that_name_them(monkeypatch, name):
    from karma.integrations import verl

    monkeypatch.setenv("KARMA_REWARD_URL", "http://127.0.0.1:9")  # nothing listens: nothing may be sent
    monkeypatch.setenv("KARMA_REWARD_READY_TIMEOUT_S", "0.2")
    accepted = "accepted: url, model, api_key, normalize, chat_template, ready_timeout_s, deadline_s, on_missing_prompt"
    cases = [
        (
            {"modle": "full"},
            TypeError,
            rf"unknown reward_kwargs key 'modle' \(did you mean 'model'\?\); {accepted}$",
        ),
        (
            {"model": "full", "retries": 3, "zzz": 1},
            TypeError,
            rf"unknown reward_kwargs keys 'retries', 'zzz'; {accepted}$",
        ),
        (
            {"deadline_s": "soon"},
            ValueError,
            r"deadline_s \(KARMA_REWARD_DEADLINE_S\) must be a number of seconds, got 'soon'",
        ),
        ({"deadline_s": 0}, ValueError, r"deadline_s must be > 0 seconds, got 0"),
        (
            {"on_missing_prompt": "raise"},
            ValueError,
            r"on_missing_prompt must be one of warn, error, ignore, got 'raise'",
        ),
    ]
    for kwargs, exc, message in cases:
        fn = verl_custom_reward_fn("pkg://karma.integrations.verl", name, kwargs)
        with pytest.raises(exc, match=message):
            asyncio.run(verl_run_single(fn, "reddit", REPLY, "", {"prompt": Q1}, router="127.0.0.1:1"))
    verl.close()


def test_verl_row_without_a_prompt_warns_once_is_counted_and_can_be_an_error(monkeypatch, caplog):
    from karma.integrations import verl
    from tests.test_client import FakeService

    service = FakeService()
    verl_on_fake_service(monkeypatch, service)
    monkeypatch.setattr(verl, "_missing", {"rows": 0, "warned": False})
    fn = verl_custom_reward_fn(
        "pkg://karma.integrations.verl", "compute_score_async", {"url": "http://127.0.0.1:8000"}
    )

    def score(extra_info, solution=REPLY):
        return asyncio.run(verl_run_single(fn, "reddit", solution, "", extra_info))[1]

    with caplog.at_level("WARNING", logger="karma.integrations.verl"):
        first, second = score({"index": 0}), score({})
        templated = score({}, TEMPLATED["gemma"][0] + TEMPLATED["gemma"][1])  # its context is in the text
        given = score({"prompt": Q1})
    assert first["karma_missing_prompt"] == second["karma_missing_prompt"] == 1.0
    assert templated["karma_missing_prompt"] == given["karma_missing_prompt"] == 0.0
    assert verl.missing_prompt_rows() == 2
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "karma.integrations.verl"]
    assert warning.startswith(
        "karma.integrations.verl: a row has no prompt: extra_info has none of 'prompt', 'raw_prompt', "
        "'question', 'context' (its keys: 'index', 'num_turns', 'rollout_reward_scores') and solution_str "
        "holds no earlier turns, so it is scored without context."
    )
    sent = len(service.calls)
    strict = verl_custom_reward_fn(
        "pkg://karma.integrations.verl",
        "compute_score_async",
        {"url": "http://127.0.0.1:8000", "on_missing_prompt": "error"},
    )
    with pytest.raises(
        ValueError,
        match=r"a row has no prompt: .*; put the prompt in extra_info\['prompt'\] when making the dataset \(on_missing_prompt=error\)",
    ):
        asyncio.run(verl_run_single(strict, "reddit", REPLY, "", {"index": 0}))
    assert len(service.calls) == sent  # refused before anything was sent
    monkeypatch.setenv("KARMA_REWARD_ON_MISSING_PROMPT", "ignore")
    caplog.clear()
    monkeypatch.setattr(verl, "_missing", {"rows": 0, "warned": False})
    assert score({})["karma_missing_prompt"] == 1.0 and verl.missing_prompt_rows() == 1
    assert not [r for r in caplog.records if r.name == "karma.integrations.verl"]


def test_verl_remote_reward_manager_takes_the_sync_variant_and_the_docs_say_so():
    """verl's `remote` manager asserts `not inspect.iscoroutinefunction(compute_score)` at start; the sync
    variant, wrapped as verl wraps it, passes; the docs name the variant to use with it."""
    sync = verl_custom_reward_fn("pkg://karma.integrations.verl", "compute_score", {"url": "http://x:1"})
    async_ = verl_custom_reward_fn(
        "pkg://karma.integrations.verl", "compute_score_async", {"url": "http://x:1"}
    )
    assert not inspect.iscoroutinefunction(sync) and inspect.iscoroutinefunction(async_)
    for path in (REPO / "docs" / "reward_service.md", REPO / "karma" / "integrations" / "verl.py"):
        text = " ".join(path.read_text().split())
        assert "Async reward score is not supported in remote reward manager" in text, path
        assert re.search(r"reward_manager\.name=remote.*use `compute_score`", text), path


# --------------------------------------------------------------------------------------------- snippets
def _blocks(path: Path, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", path.read_text(), re.DOTALL)


def _overrides(text: str) -> dict[str, str]:
    return dict(re.findall(r"\+?(reward\.custom_reward_function\.[\w.]+)=(\S+)", text))


def test_readme_and_docs_verl_snippets(loopback, rm_a):
    from karma.integrations import verl

    readme, docs = REPO / "README.md", REPO / "docs" / "reward_service.md"
    assert "point its reward loop at" not in readme.read_text()
    configs = [
        _overrides(b) for p in (readme, docs) for b in _blocks(p, "bash") if "custom_reward_function" in b
    ]
    assert len(configs) == 2
    (yaml_block,) = [b for b in _blocks(docs, "yaml") if "custom_reward_function" in b]
    import yaml

    section = yaml.safe_load(yaml_block)["reward"]["custom_reward_function"]
    prefix = "reward.custom_reward_function."
    flat = {prefix + k: v for k, v in section.items() if k != "reward_kwargs"}
    configs.append(flat | {f"{prefix}reward_kwargs.{k}": v for k, v in section["reward_kwargs"].items()})
    for cfg in configs:
        kwargs = {
            k.removeprefix(prefix + "reward_kwargs."): v for k, v in cfg.items() if "reward_kwargs" in k
        }
        assert kwargs and set(kwargs) <= set(verl.Options.__dataclass_fields__)
        assert kwargs["model"] == "full"  # a model the README's `karma serve` line serves
        kwargs = {**kwargs, "url": loopback, "model": "a"}  # the served test models
        fn = verl_custom_reward_fn(cfg[prefix + "path"], cfg[prefix + "name"], kwargs)
        score, _ = asyncio.run(verl_run_single(fn, "reddit", REPLY, "", {"prompt": CLEAN_CONTEXT}))
        assert score == pytest.approx(rm_a.score([RMInput(CLEAN_CONTEXT, REPLY)])[0], abs=SCORE_TOL_F64)
    verl.close()
    # the dataset row of the docs: extra_info as written there is what score_item reads
    (row_block,) = [b for b in _blocks(docs, "python") if "extra_info" in b]
    scope = {"messages": CLEAN_CONTEXT}
    exec(row_block, scope)  # noqa: S102 - our own documentation
    item = verl.score_item(REPLY, scope["row"]["extra_info"])
    assert item.rm_metadata() == {"subreddit": "college", "depth": 1}
    assert [t.content for t in item.context] == [Q1, A1, Q2]


def test_readme_serve_and_openrlhf_snippets(root, loopback, rm_a, monkeypatch, tmp_path):
    import uvicorn
    from typer.testing import CliRunner

    from karma.cli import app

    block = next(b for b in _blocks(REPO / "README.md", "bash") if b.startswith("karma serve"))
    command = re.sub(r"\\\n", " ", block).splitlines()[0].split("#")[0]
    (tmp_path / "rm").mkdir()
    (tmp_path / "rm" / "full").symlink_to(root / "b")
    (tmp_path / "rm" / "context").symlink_to(root / "a")
    monkeypatch.chdir(tmp_path)
    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.update(app=app, **kw))
    result = CliRunner().invoke(app, shlex.split(command)[1:])
    assert result.exit_code == 0, result.output
    settings = served["app"].state.settings
    assert list(settings.models) == ["full", "context"] and settings.default_model == "context"
    assert settings.normalize_default("full") and settings.normalize_default("context")
    # the OpenRLHF flag of the README, against a loopback server
    flag = re.search(r"--reward\.remote_url (http://\S+/get_reward)", (REPO / "README.md").read_text())
    url = flag.group(1).replace("http://127.0.0.1:8000", loopback)
    prompt, reply = TEMPLATED["chatml"]
    body = httpx.post(url, json={"query": [prompt + reply], "prompts": [prompt], "labels": [""]}, timeout=180)
    body.raise_for_status()
    assert body.json()["rewards"] == pytest.approx(
        rm_a.score([RMInput(CLEAN_CONTEXT, REPLY)]), abs=SCORE_TOL_F64
    )
