"""scripts/device_check.py, the one-command GPU check, kept from rotting: its `--cpu --tiny` mode runs the same
code paths (KARMA RM folder on a random MiniLM-shaped backbone, `karma serve` in a child process, the PPO
`Trainer` with the hf engine over HTTP, raw forward+backward and generate) on tiny configs in seconds."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "device_check.py"


def load_script():
    spec = importlib.util.spec_from_file_location("device_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def positive(value) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


@pytest.mark.timeout(300)
def test_cpu_tiny_run_prints_finite_positive_ratios(tmp_path):
    out = tmp_path / "device_check.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--cpu", "--tiny", "--out", str(out), "--budget-s", "240"],
        check=False,
        capture_output=True,
        text=True,
        timeout=280,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert json.loads(proc.stdout) == result  # the one JSON on stdout is the file's
    assert result["device"] == "cpu" and result["mode"] == "tiny" and result["dtype"] == "float32"
    assert result["archs"] == {"rm": "minilm_tiny", "policy": "smollm2_tiny"}
    assert set(result["ratios"]) == {"rm_serving", "ppo_update", "generation"}
    assert all(positive(r) for r in result["ratios"].values()), result["ratios"]
    rm, ppo, gen = result["rm_serving"], result["ppo_step"], result["generation"]
    for value in (rm["raw_forward_seq_per_s"], rm["server_seq_per_s"], ppo["update_tokens_per_s"]):
        assert positive(value)
    for value in (
        ppo["raw_fwd_bwd_tokens_per_s"],
        gen["trainer_tokens_per_s"],
        gen["raw_generate_tokens_per_s"],
    ):
        assert positive(value)
    assert rm["ratio"] == pytest.approx(rm["server_seq_per_s"] / rm["raw_forward_seq_per_s"])
    assert rm["request_items"] == 64 and rm["requests"] > 0
    assert rm["unk_share"] < 0.1 and rm["score_std"] > 0  # the synthetic tokenizer tokenises; items differ
    assert ppo["trainer_device"] == "cpu" and ppo["steps"] == 2 and ppo["timed_steps"] == 1
    assert ppo["mean_response_tokens"] > 0
    assert "error" not in result


def test_carried_wheels_are_used_only_for_missing_or_older_distributions():
    dc = load_script()
    assert dc._needed(Path("typing_extensions-0.0.1-py3-none-any.whl")) is False  # installed, newer
    assert dc._needed(Path("typing_extensions-999.0-py3-none-any.whl")) is True  # installed, older
    assert dc._needed(Path("no_such_distribution_here-1.0-py3-none-any.whl")) is True
    # every architecture the check builds has its config in the repository
    for name in ("minilm", "minilm_tiny", "smollm2_135m", "smollm2_tiny"):
        assert (ROOT / "karma" / "configs" / "arch" / f"{name}.json").is_file()
    assert dc.arch_config("minilm").num_hidden_layers == 6
    assert dc.arch_config("smollm2_135m").num_hidden_layers == 30


def test_the_wheel_script_and_wrapper_are_bash_and_wheels_are_ignored():
    for script in ("device-wheels.sh", "device-check.sh"):
        path = ROOT / "scripts" / script
        assert os.access(path, os.X_OK)
        assert path.read_text().startswith("#!/usr/bin/env bash\n")
        out = subprocess.run(["bash", "-n", str(path)], check=False, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", "wheels/pydantic_core-2.0-cp312-cp312-manylinux2014_x86_64.whl"],
        cwd=ROOT,
        check=False,
    )
    assert ignored.returncode == 0, "wheels/ must be git-ignored"
