"""The rule reward model (positive control): spec validation with typed errors, the `karma rm rule` command,
and `karma serve` scoring a rule folder over real HTTP on loopback (a subprocess and an in-thread uvicorn),
scores equal to the rule computed here by hand."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from karma.cli import app
from karma.client import RewardClient
from karma.net import free_port
from karma.rm.model import RewardModel, RMInput
from karma.rm.rule import RULE_CONFIG_NAME, RuleRewardModel, RuleSpec, RuleSpecError, write_rule_folder
from services.reward_api.core.config import Settings
from services.reward_api.main import create_app
from tests.support import serve_in_thread

RESPONSES = [
    "",
    "Yes.",
    "Thanks, that helps a lot!",
    "Please read the syllabus first and then email your professor about it.",
    "I think you should " + "really " * 30 + "talk to your advisor.",
    "THANK you so much, please keep us posted",
    "unthankful people say nothing",  # "thank" not at a word start: no marker
    "word " * 15,
    "word " * 16,
    "word " * 4,
]


def window(text: str, lo: int, hi: int, scale: float) -> float:
    """The length_window rule, written out independently of karma.rm.rule."""
    n = len(text.split())
    if n < lo:
        return 1 - (lo - n) / scale
    if n > hi:
        return 1 - (n - hi) / scale
    return 1.0


def polite(text: str) -> float:
    words = [w.lower() for w in text.replace(",", " ").replace("!", " ").split()]
    return float(any(w.startswith(("please", "thank")) for w in words))


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("rules")
    length = write_rule_folder(
        RuleSpec.parse({"rules": [{"kind": "length_window", "min_words": 5, "max_words": 15, "scale": 10}]}),
        root / "length",
    )
    both = write_rule_folder(
        RuleSpec.parse(
            {
                "rules": [
                    {
                        "kind": "length_window",
                        "min_words": 3,
                        "max_words": 8,
                        "scale": 4,
                        "floor": -1,
                        "weight": 0.5,
                    },
                    {"kind": "marker", "weight": 2.0},
                ]
            }
        ),
        root / "both",
    )
    bad = root / "bad"
    write_rule_folder(RuleSpec.parse({"rules": [{"kind": "marker"}]}), bad)
    (bad / RULE_CONFIG_NAME).write_text(
        '{"rules": [{"kind": "length_window", "min_words": 20, "max_words": 10}]}'
    )
    return {"length": length, "both": both, "bad": bad, "root": root}


def expected_both(text: str) -> float:
    return 0.5 * max(window(text, 3, 8, 4), -1.0) + 2.0 * polite(text)


# --------------------------------------------------------------------------------------------- the spec
def test_rules_score_as_computed_by_hand(folders):
    length = RewardModel.load(folders["length"])
    both = RewardModel.load(folders["both"])
    assert isinstance(length, RuleRewardModel)
    items = [RMInput("any context", r) for r in RESPONSES]
    assert length.score(items) == pytest.approx([window(r, 5, 15, 10) for r in RESPONSES])
    assert both.score(items) == pytest.approx([expected_both(r) for r in RESPONSES])
    assert len({*length.score(items)}) >= 4  # the rule distinguishes the replies
    assert length.score([RMInput("a different, long context " * 50, RESPONSES[3])]) == length.score(
        items[3:4]
    )


def distinct(text: str, n: int) -> float:
    """The distinct_n rule, written out: distinct word n-grams / n-grams (1 when there is none)."""
    words = text.lower().split()
    grams = [" ".join(words[i : i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


def test_repetition_refusal_and_format_rules_score_as_computed_by_hand():
    texts = [
        *RESPONSES,
        "I can't help with that.",
        "Sorry, I can\u2019t do it",
        "As an AI language model, no.",
        "icannot is one word",
        "Answer: 42",
        "the the the the",
    ]
    spec = RuleSpec.parse(
        {
            "rules": [
                {"kind": "distinct_n"},
                {"kind": "distinct_n", "n": 1, "weight": 2},
                {"kind": "refusal", "weight": -1},
                {"kind": "format", "pattern": r"^Answer: \d+$", "weight": 3},
            ]
        }
    )
    refusal = [0.0] * len(RESPONSES) + [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    fmt = [float(t == "Answer: 42") for t in texts]
    want = [
        distinct(t, 2) + 2 * distinct(t, 1) - r + 3 * f for t, r, f in zip(texts, refusal, fmt, strict=True)
    ]
    assert [spec.score(t) for t in texts] == pytest.approx(want)
    assert distinct("word " * 16, 2) == pytest.approx(1 / 15) and spec.rules[0].value(
        "word " * 16
    ) == pytest.approx(1 / 15)
    full = RuleSpec.parse(
        {"rules": [{"kind": "format", "pattern": "yes|no", "full": True, "ignore_case": True}]}
    )
    assert [full.score(t) for t in ("YES", "yes sir", "No")] == [1.0, 0.0, 1.0]
    assert spec.describe() == "distinct_n+distinct_n+refusal+format"


def test_version_is_the_hash_of_the_spec(folders):
    a = RuleSpec.parse({"rules": [{"kind": "length_window", "min_words": 5, "max_words": 15, "scale": 10}]})
    reordered = RuleSpec.parse(
        '{"rules": [{"scale": 10.0, "max_words": 15, "min_words": 5, "kind": "length_window"}]}'
    )
    other = RuleSpec.parse(
        {"rules": [{"kind": "length_window", "min_words": 5, "max_words": 16, "scale": 10}]}
    )
    assert a.version == reordered.version == RewardModel.load(folders["length"]).version
    assert other.version != a.version and len(a.version) == 12


@pytest.mark.parametrize(
    "spec,message",
    [
        (
            {"rules": [{"kind": "length_window", "min_words": 20, "max_words": 10}]},
            r"rules\.0: min_words \(20\) must be <= max_words \(10\)",
        ),
        (
            {"rules": [{"kind": "sentiment"}]},
            (
                r"rules\.0: Input tag 'sentiment' .* expected tags: 'length_window', 'marker', 'distinct_n', "
                r"'refusal', 'format'$"
            ),
        ),
        ({"rules": []}, r"rules: List should have at least 1 item"),
        (
            {"rules": [{"kind": "length_window", "min_words": 1, "max_words": 3, "scale": 0}]},
            r"rules\.0\.scale: Input should be greater than 0",
        ),
        (
            {"rules": [{"kind": "marker", "markers": ["please", " "]}]},
            r"rules\.0: markers must be non-empty strings \(empty at position\(s\) \[1\]\)",
        ),
        ({"rules": [{"kind": "marker", "weigth": 2}]}, r"rules\.0\.weigth: Extra inputs are not permitted"),
        (
            {"rules": [{"kind": "distinct_n", "n": 0}]},
            r"rules\.0\.n: Input should be greater than or equal to 1",
        ),
        (
            {"rules": [{"kind": "format", "pattern": "(unclosed"}]},
            r"rules\.0: pattern '\(unclosed' is not a valid regular expression: missing \), unterminated subpattern",
        ),
        ({"rules": [{"kind": "format"}]}, r"rules\.0\.pattern: Field required"),
        (
            {"rules": [{"kind": "refusal", "phrases": [""]}]},
            r"rules\.0: phrases must be non-empty strings \(empty at position\(s\) \[0\]\)",
        ),
    ],
)
def test_bad_specs_raise_a_typed_error_naming_the_field(spec, message):
    with pytest.raises(RuleSpecError, match=r"^spec\.json: invalid rule spec: " + message):
        RuleSpec.parse(spec, where="spec.json")


def test_a_folder_with_a_bad_spec_is_refused_with_its_path(folders):
    with pytest.raises(
        RuleSpecError,
        match=rf"{folders['bad'] / RULE_CONFIG_NAME}: invalid rule spec: rules\.0: "
        r"min_words \(20\)",
    ):
        RewardModel.load(folders["bad"])


# --------------------------------------------------------------------------------------------- the command
def test_karma_rm_rule_writes_a_loadable_folder(tmp_path):
    out = tmp_path / "lw"
    result = CliRunner().invoke(
        app,
        ["rm", "rule", "--kind", "length_window", "--min-words", "5", "--max-words", "15", "--out", str(out)],
    )
    assert result.exit_code == 0, result.output
    rm = RewardModel.load(out)
    assert rm.version in result.output and f"karma serve --model rule={out}" in result.output
    assert rm.spec.rules[0].model_dump() == {
        "kind": "length_window",
        "min_words": 5,
        "max_words": 15,
        "scale": 10.0,
        "floor": None,
        "weight": 1.0,
    }
    combined = CliRunner().invoke(
        app,
        [
            "rm",
            "rule",
            "--kind",
            "length_window",
            "--kind",
            "marker",
            "--min-words",
            "1",
            "--max-words",
            "2",
            "--marker",
            "cheers",
            "--out",
            str(tmp_path / "c"),
        ],
    )
    assert combined.exit_code == 0, combined.output
    assert RewardModel.load(tmp_path / "c").score([RMInput("", "cheers mate")]) == [2.0]

    bad = CliRunner().invoke(
        app,
        [
            "rm",
            "rule",
            "--kind",
            "length_window",
            "--min-words",
            "20",
            "--max-words",
            "10",
            "--out",
            str(tmp_path / "x"),
        ],
    )
    assert bad.exit_code == 2 and "min_words (20) must be <= max_words (10)" in bad.output
    assert not (tmp_path / "x").exists()
    missing = CliRunner().invoke(app, ["rm", "rule", "--kind", "length_window", "--out", str(tmp_path / "y")])
    assert missing.exit_code == 2 and "rules.0.min_words: Input should be a valid integer" in missing.output
    unknown = CliRunner().invoke(app, ["rm", "rule", "--kind", "toxicity", "--out", str(tmp_path / "z")])
    assert unknown.exit_code == 2 and "does not match any of the expected tags" in unknown.output


# --------------------------------------------------------------------------------------------- over HTTP
def test_karma_serve_subprocess_scores_the_rule_over_http(folders):
    """The real `karma serve` process on loopback, two rule folders: /info shows them, every route's scores
    equal the rule computed by hand."""
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "karma.cli",
            "serve",
            "--model",
            f"length={folders['length']}",
            "--model",
            f"both={folders['both']}",
            "--port",
            str(port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    items = [{"context": "Is a CS minor worth it?", "response": r} for r in RESPONSES]
    try:

        async def go():
            async with RewardClient(url, deadline_s=60) as rc:
                await rc.wait_ready(120)
                info = await rc.info()
                singles = await asyncio.gather(*(rc.score([it]) for it in items))  # batched across requests
                together = await rc.score(items, normalize=True)
            async with RewardClient(url, model="both", deadline_s=60) as rc:
                both = await rc.score(items)
            return info, singles, together, both

        info, singles, together, both = asyncio.run(go())
        reward = httpx.post(
            f"{url}/get_reward", json={"query": ["Q: hi A: " + RESPONSES[3]], "prompts": ["Q: hi A: "]}
        ).json()
        classify = httpx.post(
            f"{url}/models/both/classify", json={"input": RESPONSES[5], "use_activation": False}
        ).json()
        assert proc.poll() is None
    finally:
        proc.terminate()
        out = proc.communicate(timeout=60)[0]
    want = [window(r, 5, 15, 10) for r in RESPONSES]
    assert [s.scores[0] for s in singles] == pytest.approx(want, abs=1e-9), out
    assert together.scores == pytest.approx(want, abs=1e-9)  # normalize: identity for a rule
    assert together.truncated == [False] * len(RESPONSES)
    assert both.scores == pytest.approx([expected_both(r) for r in RESPONSES], abs=1e-9)
    assert reward["rewards"] == pytest.approx([window(RESPONSES[3], 5, 15, 10)])
    assert classify["data"][-1]["probs"][-1] == pytest.approx(expected_both(RESPONSES[5]))
    models = {m["name"]: m for m in info["models"]}
    spec_version = RuleSpec.parse((folders["length"] / RULE_CONFIG_NAME).read_text()).version
    assert models["length"]["version"] == spec_version == together.version
    assert models["length"]["backbone"] == "rule:length_window" and models["length"]["objective"] == "rule"
    assert (
        models["both"]["backbone"] == "rule:length_window+marker" and models["both"]["variant"] == "response"
    )


def test_hot_swap_to_a_rule_and_a_bad_rule_is_a_422(folders, tmp_path):
    """Admin routes on an in-thread uvicorn: a rule folder swaps in like any RM; a bad spec is refused with
    its message and the old model keeps serving."""
    from tests.support import make_tiny_rm

    make_tiny_rm(folders["root"] / "tiny", "context")
    settings = Settings(
        models={"m": str(folders["root"] / "tiny")}, admin_token="t", model_roots=[str(folders["root"])]
    )
    admin = {"Authorization": "Bearer t"}
    with serve_in_thread(create_app(settings)) as url:
        before = httpx.post(f"{url}/v1/score", json={"items": [{"response": "Yes."}]}).json()
        # a rule reads the response only: another variant than the `context` model it replaces, so `force`
        refused = httpx.put(f"{url}/v1/models/m", json={"path": "length"}, headers=admin)
        assert refused.status_code == 409 and "from 'context' to 'response'" in refused.json()["error"]
        bad = httpx.put(f"{url}/v1/models/m", json={"path": "bad", "force": True}, headers=admin)
        assert bad.status_code == 422 and bad.json()["error_type"] == "model_load"
        assert "invalid rule spec: rules.0: min_words (20) must be <= max_words (10)" in bad.json()["error"]
        assert httpx.post(f"{url}/v1/score", json={"items": [{"response": "Yes."}]}).json() == before
        swapped = httpx.put(f"{url}/v1/models/m", json={"path": "length", "force": True}, headers=admin)
        assert swapped.status_code == 200, swapped.text
        after = httpx.post(f"{url}/v1/score", json={"items": [{"response": r} for r in RESPONSES]}).json()
    assert after["version"] == RewardModel.load(folders["length"]).version != before["version"]
    assert after["scores"] == pytest.approx([window(r, 5, 15, 10) for r in RESPONSES])
