"""`run_isolated`: a stage in a fresh process returns its result, re-raises its error, names a death, and runs
with the stage environment (a user's setting wins)."""

from __future__ import annotations

import os
import signal

import pytest

from karma.experiment.isolate import STAGE_ENV, StageProcessError, run_isolated


def _add(a: int, b: int) -> int:
    return a + b


def _fail(message: str) -> None:
    raise ValueError(message)


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _env(name: str) -> str | None:
    return os.environ.get(name)


def test_result_and_error_come_back():
    assert run_isolated(_add, 2, 3) == 5
    with pytest.raises(ValueError, match="^bad input\n"):
        run_isolated(_fail, "bad input")


def test_a_killed_stage_is_named():
    with pytest.raises(
        StageProcessError, match=r"the stage process _die exited with code -9 without a result"
    ):
        run_isolated(_die)


def test_stage_environment_defaults_and_the_users_setting_wins(monkeypatch):
    assert STAGE_ENV == {"MALLOC_ARENA_MAX": "2", "MALLOC_MMAP_THRESHOLD_": "262144"}
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    assert run_isolated(_env, "MALLOC_ARENA_MAX") == "2"
    assert "MALLOC_ARENA_MAX" not in os.environ  # this process's environment is left as it was
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert run_isolated(_env, "MALLOC_ARENA_MAX") == "4"
