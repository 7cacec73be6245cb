"""Slow: PPO demonstrably optimises a reward. The positive control — `karma serve` (a real process on
loopback) serving a `length_window` rule reward, `karma train` (a real process) with the shipped
`ppo_positive_control.yaml` on SmolLM2-135M-Instruct — must raise the held-out reward of the trained policy
over the base policy, significantly (paired permutation p < 0.05), on prompts it never trained on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from karma.net import free_port

ROOT = Path(__file__).parents[1]
CONFIG = ROOT / "services/policy_trainer/configs/ppo_positive_control.yaml"
SHARED_DATA = Path(os.environ.get("KARMA_SHARED_DATA", ROOT.parent / "shared" / "data"))
POLITENESS = SHARED_DATA / "eval" / "politeness" / "wikipedia.annotated.csv"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not POLITENESS.exists(), reason=f"shared data not found: {POLITENESS}"),
]


@pytest.fixture(scope="module")
def rule_service(tmp_path_factory):
    """`karma rm rule` writes the folder, `karma serve` serves it (both real processes)."""
    folder = tmp_path_factory.mktemp("rule") / "length_window"
    karma = [sys.executable, "-m", "karma.cli"]
    subprocess.run(
        [
            *karma,
            "rm",
            "rule",
            "--kind",
            "length_window",
            "--min-words",
            "5",
            "--max-words",
            "15",
            "--out",
            str(folder),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    port = free_port()
    proc = subprocess.Popen(
        [*karma, "serve", "--model", f"rule={folder}", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        yield url
    finally:
        proc.terminate()
        proc.communicate(timeout=60)


def test_ppo_raises_the_heldout_reward_of_a_rule_reward(rule_service, tmp_path):
    out = tmp_path / "run"
    start = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "karma.cli",
            "train",
            "--config",
            str(CONFIG),
            "--reward-url",
            rule_service,
            "--prompts",
            f"file:{POLITENESS}",
            "--output-dir",
            str(out),
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=900,
    )
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    h = json.loads((out / "heldout_reward.json").read_text())
    info = httpx.get(f"{rule_service}/info").json()["models"][0]
    assert info["backbone"] == "rule:length_window"
    summary = (
        f"{elapsed:.0f}s: base {h['base_mean']:.3f} -> trained {h['trained_mean']:.3f}, delta {h['delta']:+.3f} "
        f"[{h['ci_low']:.3f}, {h['ci_high']:.3f}], p = {h['p']:.4f}, words {h['base_mean_words']:.1f} -> "
        f"{h['trained_mean_words']:.1f}, EOS {h['base_eos_rate']:.2f} -> {h['trained_eos_rate']:.2f}, "
        f"KL {h['kl_mean']:.2f}"
    )
    print(summary)
    assert h["n"] >= 64 and "held-out slice" in h["source"]
    assert h["delta"] > 0 and h["ci_low"] > 0 and h["p"] < 0.05, summary
    assert h["trained_mean_words"] < h["base_mean_words"], summary  # toward the 5-15 word window: shorter
    assert h["kl_mean"] > 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["reward/missing_eos_penalty_frac"] == 0.0 for r in rows)  # the rule alone is the signal
