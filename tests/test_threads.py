"""The thread rule (`karma/threads.py`): every core for the heavy work, a quarter for the reward service beside
the trainer, an explicit setting wins, and no shipped config fixes torch's thread count."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from karma import threads

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("cores", "worker", "service", "two_ranks"), [(1, 1, 1, 1), (2, 2, 1, 1), (8, 8, 2, 4)]
)
def test_the_auto_default_divides_the_usable_cores(monkeypatch, cores, worker, service, two_ranks):
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert threads.usable_cores() == cores
    assert threads.worker_threads() == worker and threads.service_threads() == service
    assert threads.worker_threads(processes=2) == two_ranks
    assert threads.worker_threads(3) == 3 and threads.service_threads(5) == 5  # an explicit setting wins


def _keys(node):
    if isinstance(node, dict):
        for k, v in node.items():
            yield k
            yield from _keys(v)
    elif isinstance(node, list):
        for v in node:
            yield from _keys(v)


def test_no_shipped_config_fixes_torch_threads():
    files = sorted([*ROOT.glob("karma/configs/*.yaml"), *ROOT.glob("services/policy_trainer/configs/*.yaml")])
    assert len(files) >= 6
    for f in files:
        assert not {"torch_threads", "threads"} & set(_keys(yaml.safe_load(f.read_text()))), f


def test_the_experiment_gives_the_reward_service_its_share(monkeypatch):
    from karma.experiment import ExperimentConfig

    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    flags = ExperimentConfig.load("demo").serve_flags()
    assert flags[flags.index("--torch-threads") + 1] == "2"
    explicit = ExperimentConfig.load("demo", {"serve": {"torch_threads": 3}}).serve_flags()
    assert explicit.count("--torch-threads") == 1 and explicit[explicit.index("--torch-threads") + 1] == "3"
