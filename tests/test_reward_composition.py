"""Composed rewards (issue 15): the spec and its errors, a composition served over real HTTP (an in-thread
uvicorn) whose scores equal the weighted sum of its separately served components, hot swap of a component,
the score cache, and group normalisation."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from karma.protocol import Limits
from karma.rm.compose import COMPOSE_CONFIG_NAME, CompositionSpec, CompositionSpecError, write_compose_folder
from karma.rm.model import RewardModel, RMInput
from karma.rm.rule import RuleSpec, write_rule_folder
from services.reward_api.core.config import Settings
from services.reward_api.engine import CompositionError, ModelRegistry, ScoreCache, group_zscore
from services.reward_api.main import create_app
from tests.support import SCORE_TOL_F64, make_tiny_rm, serve_in_thread

ADMIN = {"Authorization": "Bearer t"}
ITEMS = [
    {
        "context": "Is a CS minor worth it?",
        "response": "Yes, if you like it.",
        "metadata": {"subreddit": "college"},
    },
    {"context": "Is a CS minor worth it?", "response": "no no no no no no no no", "metadata": {"depth": 2}},
    {
        "context": [{"role": "user", "content": "Dorm or apartment?"}],
        "response": "Dorm the first year, then see.",
    },
    {"context": "", "response": "I can't help with that."},
    {"context": "word " * 300, "response": "a reply long enough to sit inside the length window, surely"},
]
MIX = {
    "components": [
        {"model": "ctx", "weight": 1.0},
        {"model": "full", "weight": 0.5},
        {"rule": {"kind": "length_window", "min_words": 5, "max_words": 9, "scale": 4}, "weight": 0.2},
        {"rule": {"kind": "distinct_n", "n": 1}, "weight": 0.3, "name": "rep"},
    ]
}


def window(text: str, lo: int = 5, hi: int = 9, scale: float = 4) -> float:
    n = len(text.split())
    return 1 - max(lo - n, n - hi, 0) / scale


def distinct1(text: str) -> float:
    words = text.lower().split()
    return len(set(words)) / len(words) if words else 1.0


def limits(**overrides) -> Limits:
    return Settings().limits().model_copy(update=overrides)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("compose")
    make_tiny_rm(root / "ctx", "context", seed=1, score_normalization={"mean": 0.25, "std": 2.0})
    make_tiny_rm(root / "ctx2", "context", seed=5)
    make_tiny_rm(root / "full", "full", seed=2)
    write_compose_folder(CompositionSpec.parse(MIX), root / "mix")
    write_compose_folder(CompositionSpec.parse({"components": [{"model": "ghost"}]}), root / "ghost_mix")
    write_compose_folder(CompositionSpec.parse({"components": [{"model": "mix"}]}), root / "nested")
    write_rule_folder(RuleSpec.parse({"rules": [{"kind": "marker"}]}), root / "polite")
    return root


# --------------------------------------------------------------------------------------------- the spec
def test_the_spec_round_trips_through_its_folder_and_hashes_its_definition(root):
    spec = CompositionSpec.load(root / "mix")
    assert spec == CompositionSpec.parse(MIX)
    assert spec.models == ["ctx", "full"]
    assert [c.label for c in spec.components] == ["ctx", "full", "length_window", "rep"]
    assert spec.describe() == "1*ctx+0.5*full+0.2*length_window+0.3*rep"
    yaml_text = (root / "mix" / COMPOSE_CONFIG_NAME).read_text()
    assert CompositionSpec.parse(yaml_text).version == spec.version
    heavier = CompositionSpec.parse({**MIX, "components": [{**MIX["components"][0], "weight": 2.0}]})
    assert heavier.version != spec.version
    a, b = spec.served_version({"ctx": "v1", "full": "f"}), spec.served_version({"ctx": "v2", "full": "f"})
    assert a != b and len(a) == 12


def test_a_composition_folder_is_not_loadable_on_its_own(root):
    from karma.rm.model import RewardModel

    with pytest.raises(
        ValueError, match="is a composed reward \\(karma_compose.yaml\\): it has no weights of its own"
    ):
        RewardModel.load(root / "mix")


@pytest.mark.parametrize(
    "data,message",
    [
        ({"components": []}, r"components: List should have at least 1 item"),
        (
            {"components": [{"model": "a", "weigth": 2}]},
            r"components\.0\.weigth: Extra inputs are not permitted",
        ),
        (
            {"components": [{"weight": 2}]},
            r"components\.0: give exactly one of `model` .* \(keys given: weight\)",
        ),
        ({"components": [{"model": "a", "rule": {"kind": "marker"}}]}, r"give exactly one of `model`"),
        (
            {"components": [{"model": "a"}, {"model": "a"}]},
            r"components\.1: component name 'a' is used twice",
        ),
        (
            {"components": [{"rule": {"kind": "marker", "weight": 3}}]},
            r"components\.0: rule\.weight \(3\) must be left at 1: set the component's weight instead$",
        ),
        ({"components": [{"rule": {"kind": "sentiment"}}]}, r"components\.0\.rule: Input tag 'sentiment'"),
        ({"components": [{"model": "bad name!"}]}, r"components\.0\.model: String should match pattern"),
        ({"components": [{"model": "a"}], "extra": 1}, r"extra: Extra inputs are not permitted"),
        ({"components": ["a"]}, r"components\.0: a component is a mapping, not str"),
    ],
)
def test_bad_compositions_raise_an_error_naming_the_key(data, message):
    with pytest.raises(CompositionSpecError, match=r"^mix\.yaml: invalid composition: .*" + message):
        CompositionSpec.parse(data, where="mix.yaml")


def test_the_documented_example_parses():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "reward_service.md").read_text()
    block = doc.split("# rm/mix/karma_compose.yaml\n", 1)[1].split("```", 1)[0]
    spec = CompositionSpec.parse(block)
    assert spec.models == ["context", "full"]
    assert [c.label for c in spec.components] == ["context", "full", "length_window", "repetition", "refusal"]


def test_yaml_text_parses_and_bad_yaml_is_named():
    spec = CompositionSpec.parse("components:\n  - model: ctx\n  - rule: {kind: refusal}\n    weight: -1\n")
    assert spec.describe() == "1*ctx+-1*refusal"
    with pytest.raises(CompositionSpecError, match=r"^x\.yaml: not valid YAML or JSON"):
        CompositionSpec.parse("components: [", where="x.yaml")
    with pytest.raises(CompositionSpecError, match=r"expected a mapping with `components`, got list"):
        CompositionSpec.parse("- model: a", where="x.yaml")


# --------------------------------------------------------------------------------------------- over HTTP
def _score(url: str, name: str, items, **extra) -> dict:
    resp = httpx.post(f"{url}/models/{name}/v1/score", json={"items": items, **extra}, timeout=60)
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_a_composition_is_served_hot_swapped_and_refused_over_real_http(root):
    # `mix` listed first: compositions load after the models they read
    settings = Settings(
        models={"mix": str(root / "mix"), "ctx": str(root / "ctx"), "full": str(root / "full")},
        admin_token="t",
        model_roots=[str(root)],
        max_wait_ms=0,
    )
    with serve_in_thread(create_app(settings)) as url:
        ctx, full = _score(url, "ctx", ITEMS), _score(url, "full", ITEMS)
        mix = _score(url, "mix", ITEMS, components=True)
        responses = [it["response"] for it in ITEMS]
        want = [
            1.0 * c + 0.5 * f + 0.2 * window(r) + 0.3 * distinct1(r)
            for c, f, r in zip(ctx["scores"], full["scores"], responses, strict=True)
        ]
        assert mix["scores"] == pytest.approx(want, abs=1e-9)
        assert max(want) - min(want) > 0.05  # the items differ, so equality means something
        assert mix["components"] == {
            "ctx": pytest.approx(ctx["scores"], abs=1e-12),
            "full": pytest.approx(full["scores"], abs=1e-12),
            "length_window": pytest.approx([window(r) for r in responses]),
            "rep": pytest.approx([distinct1(r) for r in responses]),
        }
        assert mix["truncated"] == [a or b for a, b in zip(ctx["truncated"], full["truncated"], strict=True)]
        assert mix["truncated"][4] is True
        spec = CompositionSpec.load(root / "mix")
        assert mix["version"] == spec.served_version({"ctx": ctx["version"], "full": full["version"]})
        # normalize: each model component standardised with its own saved statistics, rules unchanged
        normalized = _score(url, "mix", ITEMS, normalize=True)
        assert normalized["scores"] == pytest.approx(
            [w - c + (c - 0.25) / 2.0 for w, c in zip(want, ctx["scores"], strict=True)], abs=1e-9
        )
        assert _score(url, "mix", ITEMS)["components"] is None  # only on request

        # the compatibility routes return the total
        classify = httpx.post(
            f"{url}/models/mix/classify", json={"input": ITEMS[3]["response"], "use_activation": False}
        ).json()
        alone = _score(url, "mix", [{"context": "", "response": ITEMS[3]["response"]}])
        assert classify["data"][0]["probs"][0] == pytest.approx(alone["scores"][0], abs=1e-9)
        query = {"query": ["Q: dorm? A: Dorm the first year."], "prompts": ["Q: dorm? A: "]}
        rewards = {
            m: httpx.post(f"{url}/models/{m}/get_reward", json=query).json()["rewards"][0]
            for m in ("ctx", "full", "mix")
        }
        r = "Dorm the first year."
        assert rewards["mix"] == pytest.approx(
            rewards["ctx"] + 0.5 * rewards["full"] + 0.2 * window(r) + 0.3 * distinct1(r), abs=1e-9
        )

        info = {m["name"]: m for m in httpx.get(f"{url}/info").json()["models"]}
        assert info["mix"]["objective"] == "compose" and info["mix"]["variant"] == "full"
        assert info["mix"]["backbone"] == "compose:1*ctx+0.5*full+0.2*length_window+0.3*rep"
        assert info["mix"]["version"] == mix["version"]

        # hot swap of a component: the composed version and scores follow at once
        swapped = httpx.put(f"{url}/v1/models/ctx", json={"path": "ctx2"}, headers=ADMIN)
        assert swapped.status_code == 200, swapped.text
        ctx2 = _score(url, "ctx", ITEMS)
        mix2 = _score(url, "mix", ITEMS, components=True)
        assert ctx2["version"] != ctx["version"] and mix2["version"] != mix["version"]
        assert mix2["version"] == spec.served_version({"ctx": ctx2["version"], "full": full["version"]})
        want2 = [w - c + c2 for w, c, c2 in zip(want, ctx["scores"], ctx2["scores"], strict=True)]
        assert mix2["scores"] == pytest.approx(want2, abs=1e-9) and mix2["scores"] != pytest.approx(want)

        # refusals: a component that is not served, a nested composition, removing a component
        ghost = httpx.post(f"{url}/v1/models", json={"name": "g", "path": "ghost_mix"}, headers=ADMIN)
        assert ghost.status_code == 422 and ghost.json()["error_type"] == "model_load"
        assert (
            "composed model 'g': component model 'ghost' is not served (unknown model 'ghost'"
            in ghost.json()["error"]
        )
        nested = httpx.post(f"{url}/v1/models", json={"name": "n", "path": "nested"}, headers=ADMIN)
        assert nested.status_code == 422
        assert "component model 'mix' is itself composed; compositions do not nest" in nested.json()["error"]
        gone = httpx.delete(f"{url}/v1/models/full", headers=ADMIN)
        assert gone.status_code == 409
        assert (
            gone.json()["error"]
            == "model 'full' is a component of composed model(s) mix; remove or swap them first"
        )
        into = httpx.put(f"{url}/v1/models/full", json={"path": "mix", "force": True}, headers=ADMIN)
        assert into.status_code == 422 and "compositions do not nest" in into.json()["error"]
        # the composition itself swaps like any model (here to a rule: another variant, so force)
        refused = httpx.put(f"{url}/v1/models/mix", json={"path": "polite"}, headers=ADMIN)
        assert refused.status_code == 409 and "from 'full' to 'response'" in refused.json()["error"]
        assert (
            httpx.put(
                f"{url}/v1/models/mix", json={"path": "polite", "force": True}, headers=ADMIN
            ).status_code
            == 200
        )
        assert _score(url, "mix", ITEMS[:1])["scores"] == [0.0]
        assert (
            httpx.delete(f"{url}/v1/models/full", headers=ADMIN).status_code == 200
        )  # no longer a component

        families = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{url}/metrics").text)}
        counted = {
            s.labels["component"]: s.value
            for s in families["karma_component_value"].samples
            if s.name.endswith("_count") and s.labels["model"] == "mix"
        }
        assert counted["ctx"] == counted["rep"] >= 3 * len(ITEMS)


def test_the_registry_takes_a_definition_without_a_folder(root):
    """For an embedding process (or a future admin route): `add` / `swap` take a `CompositionSpec` too."""
    registry = ModelRegistry(limits(max_wait_ms=0), device="cpu", dtype="auto")
    try:
        registry.load("ctx", root / "ctx")
        spec = CompositionSpec.parse(
            {"components": [{"model": "ctx", "weight": 2}, {"rule": {"kind": "refusal"}, "weight": -1}]}
        )
        handle = registry.add("api", spec)
        assert handle.path is None and handle.model.config.objective == "compose"
        items = [RMInput(it["context"], it["response"], it.get("metadata")) for it in ITEMS]
        alone = asyncio.run(registry.get("ctx").score(items)).scores
        out = asyncio.run(handle.score(items))
        assert out.scores == pytest.approx([2 * c - (i == 3) for i, c in enumerate(alone)], abs=1e-9)
        new, old = registry.swap("api", CompositionSpec.parse({"components": [{"model": "ctx"}]}))
        assert new.version != old.version
        assert asyncio.run(registry.get("api").score(items)).scores == pytest.approx(alone, abs=1e-9)
        with pytest.raises(CompositionError, match=r"composed model 'self' cannot be a component of itself"):
            registry.add("self", CompositionSpec.parse({"components": [{"model": "self"}]}))
    finally:
        registry.close()


def test_a_composition_whose_component_is_missing_fails_at_start(root):
    settings = Settings(models={"ctx": str(root / "ctx"), "g": str(root / "ghost_mix")})
    with TestClient(create_app(settings)) as client:
        for _ in range(600):
            ready = client.get("/ready").json()
            if "loading" not in ready["models"].values():
                break
            asyncio.run(asyncio.sleep(0.05))
        assert ready["models"] == {"ctx": "ready", "g": "failed"}
        assert (
            "CompositionError: composed model 'g': component model 'ghost' is not served"
            in ready["errors"]["g"]
        )


# --------------------------------------------------------------------------------------------- the cache
def test_score_cache_is_a_bounded_lru():
    cache = ScoreCache(2)
    from services.reward_api.engine import _Cached

    cache.put_many({b"a": _Cached(1.0, False, 3), b"b": _Cached(2.0, False, 3)})
    assert set(cache.get_many([b"a"])) == {b"a"}  # a is now the most recent
    cache.put_many({b"c": _Cached(3.0, True, 1)})
    assert len(cache) == 2 and set(cache.get_many([b"a", b"b", b"c"])) == {b"a", b"c"}  # b evicted
    off = ScoreCache(0)
    off.put_many({b"a": _Cached(1.0, False, 3)})
    assert len(off) == 0 and off.get_many([b"a"]) == {}


def test_cached_and_repeated_items_cost_no_forward_and_keep_their_scores(root):
    class Counting:
        def __init__(self, forward):
            self.forward, self.items = forward, 0

        def __call__(self, batch):
            self.items += len(batch)
            return self.forward(batch)

    # float64 on both sides: a and b are forwarded together here, alone in `rm.score([x])`, and agree within
    # SCORE_TOL_F64 (tests/support.py says why)
    registry = ModelRegistry(limits(max_wait_ms=0, score_cache_items=3), device="cpu", dtype="float64")
    handle = registry.load("ctx", root / "ctx")
    counting = Counting(handle.worker.model.forward)
    handle.worker.model.forward = counting
    rm = RewardModel.load(root / "ctx", dtype="float64")
    a, b, c, d = (RMInput(it["context"], it["response"], it.get("metadata")) for it in ITEMS[:4])
    try:
        first = asyncio.run(handle.score([a, a, b, a]))
        assert counting.items == 2  # a once, b once
        assert first.scores == pytest.approx([rm.score([x])[0] for x in (a, a, b, a)], abs=SCORE_TOL_F64)
        again = asyncio.run(handle.score([b, a]))
        assert counting.items == 2 and again.scores == [first.scores[2], first.scores[0]]
        other_flag = asyncio.run(handle.score([a], truncate=False))  # another key: the truncate flag differs
        assert counting.items == 3 and other_flag.scores == pytest.approx(
            [first.scores[0]], abs=SCORE_TOL_F64
        )
        asyncio.run(handle.score([c, d]))  # 3 entries at most: a (truncate=True) and b are evicted
        assert counting.items == 5 and len(handle.cache) == 3
        asyncio.run(handle.score([b]))
        assert counting.items == 6
        meta = RMInput(a.context, a.response, {"subreddit": "other"})
        asyncio.run(handle.score([meta]))  # metadata is part of the key
        assert counting.items == 7
    finally:
        registry.close()


def test_cache_hits_and_misses_are_counted_in_metrics(root):
    settings = Settings(models={"ctx": str(root / "ctx")})
    with TestClient(create_app(settings)) as client:
        for _ in range(600):
            if client.get("/ready").status_code == 200:
                break
            asyncio.run(asyncio.sleep(0.05))
        items = [ITEMS[0], ITEMS[0], ITEMS[1]]
        one = client.post("/v1/score", json={"items": items}).json()
        two = client.post("/v1/score", json={"items": items}).json()
        assert one == two
        text = client.get("/metrics").text
    fams = {f.name: f for f in text_string_to_metric_families(text)}

    def value(name: str) -> float:
        return next(
            s.value
            for s in fams[name].samples
            if s.labels.get("model") == "ctx" and s.name.endswith("_total")
        )

    assert value("karma_cache_hits") == 1 + 3 and value("karma_cache_misses") == 2
    assert next(s.value for s in fams["karma_cache_entries"].samples) == 2


# --------------------------------------------------------------------------------------------- group normalisation
def test_group_zscore_equals_numpy_per_group_and_zero_for_constant_groups():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=12).tolist()
    groups = ["a", "b", "a", "c", "a", "b", "d", "d", "b", "a", "e", "e"]
    scores[6] = scores[7] = 0.5  # group d: equal scores -> std 0
    z = group_zscore(scores, groups)
    for g in set(groups):
        idx = [i for i, x in enumerate(groups) if x == g]
        vals = np.array([scores[i] for i in idx])
        want = np.zeros_like(vals) if vals.std() == 0 or len(vals) == 1 else (vals - vals.mean()) / vals.std()
        assert [z[i] for i in idx] == pytest.approx(want.tolist(), abs=1e-12)
    assert z[3] == 0.0 and z[6] == z[7] == 0.0  # a group of one; a constant group
    assert math.fsum(z[i] for i, g in enumerate(groups) if g == "a") == pytest.approx(0, abs=1e-12)


def test_group_normalize_over_http_groups_items_by_context(root):
    settings = Settings(models={"polite": str(root / "polite")})
    items = [
        {"context": "q1", "response": "thanks!"},
        {"context": "q1", "response": "no"},
        {"context": "q1", "response": "please do"},
        {
            "context": [{"role": "user", "content": "q1"}],
            "response": "thanks",
        },  # a turn list: another context
        {"context": "q2", "response": "meh"},
        {"context": "q2", "response": "thank you"},
    ]
    with TestClient(create_app(settings)) as client:
        for _ in range(600):
            if client.get("/ready").status_code == 200:
                break
            asyncio.run(asyncio.sleep(0.05))
        raw = client.post("/v1/score", json={"items": items}).json()["scores"]
        grouped = client.post(
            "/v1/score", json={"items": items, "group_normalize": True, "components": True}
        ).json()
    assert raw == [1.0, 0.0, 1.0, 1.0, 0.0, 1.0]
    q1 = np.array(raw[:3])
    assert grouped["scores"][:3] == pytest.approx(((q1 - q1.mean()) / q1.std()).tolist())
    assert grouped["scores"][3] == 0.0 and grouped["scores"][4:] == [-1.0, 1.0]
    assert grouped["components"] == {"polite": raw}  # components are before group normalisation


def test_karma_rm_compose_and_rule_write_folders(tmp_path):
    from typer.testing import CliRunner

    from karma.cli import app
    from karma.rm.rule import RuleSpec

    spec = tmp_path / "shaped.yaml"
    spec.write_text("components:\n  - model: context\n  - rule: {kind: distinct_n, n: 2}\n    weight: 0.5\n")
    res = CliRunner().invoke(app, ["rm", "compose", "--spec", str(spec), "--out", str(tmp_path / "c")])
    assert res.exit_code == 0, res.output
    assert CompositionSpec.load(tmp_path / "c").describe() == "1*context+0.5*distinct_n"
    spec.write_text("components:\n  - weight: 1\n")
    res = CliRunner().invoke(app, ["rm", "compose", "--spec", str(spec), "--out", str(tmp_path / "d")])
    assert res.exit_code == 2 and "components.0: give exactly one of `model`" in res.output
    res = CliRunner().invoke(
        app,
        ["rm", "rule", "--kind", "refusal", "--kind", "distinct_n", "--n", "3", "--out", str(tmp_path / "r")],
    )
    assert res.exit_code == 0, res.output
    rules = RuleSpec.parse((tmp_path / "r" / "karma_rule.json").read_text()).rules
    assert [r.kind for r in rules] == ["refusal", "distinct_n"] and rules[1].n == 3
