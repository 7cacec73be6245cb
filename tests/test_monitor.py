"""Reward-hacking monitors (issue 15): the service's rolling statistics (`GET /v1/monitor`, Prometheus gauges)
and the trainer's per-step batch statistics and alarms, each checked against figures computed here with numpy
on the same items."""

from __future__ import annotations

import random
import time
import warnings

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from karma.rm.rule import RuleSpec, write_rule_folder
from services.policy_trainer.monitor import (
    DISTINCT2_COLLAPSE,
    LENGTH_CORRELATION,
    Alarm,
    HackingMonitor,
    RewardHackingError,
    RewardHackingWarning,
    batch_stats,
)
from services.reward_api.core.config import Settings
from services.reward_api.main import create_app
from services.reward_api.monitor import HEAD_CHARS, ScoreMonitor, summarize
from tests.support import serve_in_thread

RESPONSES = [
    "Thanks, that helps a lot!",
    "no",
    "Please read the syllabus first and then email your professor.",
    "thanks thanks thanks",
    "Thanks, that helps a lot!",  # a duplicate
    "I think you should talk to your advisor about it, please.",
    "",
    "word word word word word word",
]


def offline(scores, responses, truncated=None) -> dict:
    """The monitor's figures, written out with numpy."""
    s = np.asarray(scores, dtype=float)
    lengths = np.array([len(r.split()) for r in responses], dtype=float)

    def distinct(n: int) -> float:
        grams = [
            tuple(w[i : i + n]) for r in responses for w in [r.lower().split()] for i in range(len(w) - n + 1)
        ]
        return len(set(grams)) / len(grams)

    out = {
        "n": len(s),
        "score_mean": s.mean(),
        "score_std": s.std(),
        "length_mean": lengths.mean(),
        "score_length_corr": np.corrcoef(s, lengths)[0, 1],
        "distinct_1": distinct(1),
        "distinct_2": distinct(2),
        "duplicate_rate": 1 - len(set(responses)) / len(responses),
    }
    if truncated is not None:
        out["truncated_share"] = float(np.mean(truncated))
    return out


# --------------------------------------------------------------------------------------------- the service
def test_window_keeps_the_last_n_items_of_the_current_version():
    mon = ScoreMonitor(window=5)
    rng = np.random.default_rng(1)
    scores = rng.normal(size=len(RESPONSES)).tolist()
    truncated = [i % 3 == 0 for i in range(len(RESPONSES))]
    mon.observe("m", "v1", RESPONSES[:3], scores[:3], truncated[:3])
    mon.observe("m", "v1", RESPONSES[3:], scores[3:], truncated[3:])
    stats = mon.stats("m")
    want = offline(scores[-5:], RESPONSES[-5:], truncated[-5:])
    assert stats.n == 5 and stats.window == 5 and stats.version == "v1"
    for key, value in want.items():
        assert getattr(stats, key) == pytest.approx(value, abs=1e-12), key
    mon.observe("m", "v2", ["fresh start"], [2.0], [False])  # a new version starts a new window
    fresh = mon.stats("m")
    assert fresh.n == 1 and fresh.version == "v2" and fresh.score_std == 0.0
    assert fresh.score_length_corr is None and fresh.distinct_2 == 1.0 and fresh.duplicate_rate == 0.0
    assert mon.stats("other") is None
    off = ScoreMonitor(window=0)
    off.observe("m", "v", ["a"], [1.0], [False])
    assert off.all_stats() == {}


def test_get_monitor_and_the_gauges_equal_the_figures_computed_offline(tmp_path):
    spec = RuleSpec.parse(
        {"rules": [{"kind": "length_window", "min_words": 3, "max_words": 6, "scale": 4}, {"kind": "marker"}]}
    )
    write_rule_folder(spec, tmp_path / "rule")
    settings = Settings(models={"rule": str(tmp_path / "rule")}, api_key="k", monitor_window=100)
    auth = {"Authorization": "Bearer k"}
    with TestClient(create_app(settings)) as client:
        deadline = time.monotonic() + 60
        while client.get("/ready").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert client.get("/v1/monitor").status_code == 401
        assert client.get("/v1/monitor", headers=auth).json() == {"models": {}}
        items = [{"context": "c", "response": r} for r in RESPONSES]
        scored = client.post("/v1/score", json={"items": items}, headers=auth).json()["scores"]
        body = client.get("/v1/monitor", headers=auth).json()
        metrics = client.get("/metrics").text
    assert scored == pytest.approx([spec.score(r) for r in RESPONSES])
    stats = body["models"]["rule"]
    want = offline(scored, RESPONSES, [False] * len(RESPONSES))
    for key, value in want.items():
        assert stats[key] == pytest.approx(value, abs=1e-12), key
    assert stats["version"] == spec.version and stats["window"] == 100
    gauges = {
        f.name: f.samples[0].value
        for f in text_string_to_metric_families(metrics)
        if f.name.startswith("karma_monitor_") and f.samples
    }
    assert gauges["karma_monitor_items"] == len(RESPONSES)
    for key in (
        "score_mean",
        "score_std",
        "score_length_corr",
        "distinct_2",
        "duplicate_rate",
        "truncated_share",
    ):
        assert gauges[f"karma_monitor_{key}"] == pytest.approx(want[key], abs=1e-12), key


def test_the_monitor_keeps_bounded_state_whatever_the_reply_size():
    """Issue 20: the monitor kept every reply whole and computed distinct-n over all of it at each scrape
    (7.4 s after three 8 MB replies). Now it keeps each reply's first HEAD_CHARS characters, its word count
    and a digest: what it holds, and so what a read costs, does not grow with the replies."""
    rng = random.Random(3)
    big = [" ".join(rng.choice(WORDS) for _ in range(400_000)) + f" end{i}" for i in range(4)]  # ~2.3 MB each
    small = RESPONSES[:3]
    mon = ScoreMonitor(window=6)
    mon.observe("m", "v", [summarize(r) for r in big], [1.0, 2.0, 3.0, 4.0], [False] * 4)
    mon.observe("m", "v", small, [0.5, 0.25, 0.0], [True, False, False])  # strings: summarised by the monitor
    kept = mon.kept_chars()
    window = big[1:] + small  # the oldest big reply left the window
    assert kept == sum(min(len(r), HEAD_CHARS) for r in small) + sum(len(summarize(r).head) for r in big[1:])
    assert kept <= 6 * HEAD_CHARS and HEAD_CHARS - 20 < len(summarize(big[0]).head) <= HEAD_CHARS
    assert set(summarize(big[0]).head.split()) <= set(WORDS)  # cut between words, not inside one
    stats = mon.stats("m")
    scores = [2.0, 3.0, 4.0, 0.5, 0.25, 0.0]
    want = offline(scores, window, [False, False, False, True, False, False])  # lengths: the whole replies
    for key in ("n", "score_mean", "score_std", "length_mean", "score_length_corr", "duplicate_rate"):
        assert getattr(stats, key) == pytest.approx(want[key], abs=1e-12), key
    assert stats.length_mean > 200_000 and stats.truncated_share == pytest.approx(1 / 6)
    heads = offline(scores, [summarize(r).head for r in window])  # distinct-n: of each reply's head
    assert stats.distinct_1 == pytest.approx(heads["distinct_1"], abs=1e-12)
    assert stats.distinct_2 == pytest.approx(heads["distinct_2"], abs=1e-12)
    mon.observe("m", "v", ["x"] * 6, [0.0] * 6, [False] * 6)  # every item replaced: the counts empty out
    assert mon.stats("m").distinct_1 == pytest.approx(1 / 6) and mon.stats(
        "m"
    ).duplicate_rate == pytest.approx(5 / 6)
    assert mon.kept_chars() == 6


def test_a_scrape_after_large_replies_reads_bounded_state_on_a_real_server(tmp_path):
    """Three ~2.3 MB replies scored through uvicorn: /v1/monitor and /metrics report their exact word counts
    while the monitor holds at most HEAD_CHARS characters of each."""
    spec = RuleSpec.parse({"rules": [{"kind": "length_window", "min_words": 3, "max_words": 6, "scale": 4}]})
    write_rule_folder(spec, tmp_path / "rule")
    app = create_app(Settings(models={"rule": str(tmp_path / "rule")}, monitor_window=16))
    rng = random.Random(4)
    big = [" ".join(rng.choice(WORDS) for _ in range(400_000)) for _ in range(3)]
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=120) as client:
        for reply in big:
            r = client.post("/v1/score", json={"items": [{"response": reply}]})
            assert r.status_code == 200, r.text
        stats = client.get("/v1/monitor").json()["models"]["rule"]
        gauges = {
            f.name: f.samples[0].value
            for f in text_string_to_metric_families(client.get("/metrics").text)
            if f.name.startswith("karma_monitor_") and f.samples
        }
    assert stats["n"] == 3 and stats["length_mean"] == pytest.approx(400_000)
    assert gauges["karma_monitor_items"] == 3 and gauges["karma_monitor_length_mean"] == pytest.approx(
        400_000
    )
    assert app.state.monitor.kept_chars() <= 3 * HEAD_CHARS


# --------------------------------------------------------------------------------------------- the trainer
def test_batch_stats_equal_numpy():
    rewards = np.random.default_rng(2).normal(size=len(RESPONSES)).tolist()
    stats = batch_stats(rewards, RESPONSES, kl=0.05)
    want = offline(rewards, RESPONSES)
    assert stats.n == want["n"] and stats.kl == 0.05
    assert stats.reward_mean == pytest.approx(want["score_mean"], abs=1e-12)
    assert stats.reward_std == pytest.approx(want["score_std"], abs=1e-12)
    assert stats.length_mean == pytest.approx(want["length_mean"], abs=1e-12)
    assert stats.reward_length_corr == pytest.approx(want["score_length_corr"], abs=1e-12)
    assert stats.distinct_1 == pytest.approx(want["distinct_1"], abs=1e-12)
    assert stats.distinct_2 == pytest.approx(want["distinct_2"], abs=1e-12)
    assert stats.duplicate_rate == pytest.approx(want["duplicate_rate"], abs=1e-12)
    assert stats.metrics()["monitor/distinct_2"] == stats.distinct_2
    assert "monitor/kl" not in batch_stats([1.0], ["a"]).metrics()
    with pytest.raises(ValueError, match="batch_stats: 2 rewards for 1 responses"):
        batch_stats([1.0, 2.0], ["a"])


WORDS = ("the", "a", "my", "your", "class", "dorm", "exam", "study", "sleep", "coffee", "library", "friend")


def diverse_batch(rng: random.Random, n: int = 16) -> list[str]:
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 9))) for _ in range(n)]


def test_a_hacked_rule_reward_trips_the_distinct2_alarm():
    """A politeness rule reward is 'hacked': over the steps, more of the batch collapses onto one repeated
    polite string — the reward rises while distinct-2 falls; the alarm fires at the collapse, not before."""
    reward = RuleSpec.parse({"rules": [{"kind": "marker"}]})
    hacked = "thank you please thank you please"
    rng = random.Random(0)
    monitor = HackingMonitor(Alarm(alarm_distinct2_drop=0.5, alarm_baseline_steps=3, alarm_length_corr=None))
    fired: dict[int, list[str]] = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(12):
            batch = diverse_batch(rng)
            k = max(0, step - 3) * 2  # from step 4 on, 2 more replies a step are the hacked string
            batch[:k] = [hacked] * k
            stats = batch_stats([reward.score(r) for r in batch], batch)
            if tripped := monitor.update(step, stats):
                fired[step] = tripped
    first = min(fired)
    assert all(names == [DISTINCT2_COLLAPSE] for names in fired.values())
    assert 5 <= first <= 10 and sorted(fired) == list(range(first, 12))  # trips once collapsed, stays tripped
    hacking = [w for w in caught if issubclass(w.category, RewardHackingWarning)]
    assert len(hacking) == 1  # warned at the onset only
    assert str(hacking[0].message).startswith(
        f"reward hacking suspected at step {first}: distinct2_collapse ("
    )


def test_the_length_correlation_alarm_needs_k_steps_and_can_stop_the_run():
    alarm = Alarm(alarm_length_corr=0.9, alarm_corr_steps=3, alarm_distinct2_drop=None, alarm_stop=True)
    monitor = HackingMonitor(alarm)
    rng = random.Random(1)
    long_is_good = [" ".join(["word"] * n) + f" {i}" for i, n in enumerate(range(1, 17))]
    rewards = [float(len(r.split())) for r in long_is_good]  # corr = 1
    noise = [rng.random() for _ in long_is_good]  # corr ~ 0
    assert monitor.update(0, batch_stats(rewards, long_is_good)) == []
    assert monitor.update(1, batch_stats(rewards, long_is_good)) == []
    assert monitor.update(2, batch_stats(noise, long_is_good)) == []  # the streak breaks
    assert monitor.update(3, batch_stats(rewards, long_is_good)) == []
    assert monitor.update(4, batch_stats(rewards, long_is_good)) == []
    with pytest.raises(
        RewardHackingError,
        match=r"at step 5: length_correlation \(\|corr\(reward, length\)\| = 1\.000 > 0\.9 for 3 steps\)",
    ) as err:
        monitor.update(5, batch_stats(rewards, long_is_good))
    assert err.value.step == 5 and err.value.alarms == [LENGTH_CORRELATION]
    warn_only = HackingMonitor(alarm.model_copy(update={"alarm_stop": False, "alarm_corr_steps": 1}))
    with pytest.warns(RewardHackingWarning, match="length_correlation"):
        tripped = warn_only.update(0, batch_stats(rewards, long_is_good))
    assert tripped == [LENGTH_CORRELATION]


def test_alarm_config_is_validated():
    with pytest.raises(ValueError, match="alarm_distinct2_drop"):
        Alarm(alarm_distinct2_drop=1.5)
    with pytest.raises(ValueError, match="alarm_corr_steps"):
        Alarm(alarm_corr_steps=0)
