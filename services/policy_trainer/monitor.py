"""Reward-hacking monitor of the trainer: per-step statistics of its own batch, and alarms.

The same figures as the reward service's `GET /v1/monitor` (`services/reward_api/monitor.py`), from the batch the
trainer just scored: `batch_stats(rewards, responses, kl)` → `BatchStats` (reward mean / std, response length in
whitespace words, Pearson corr(reward, length), corpus-level distinct-1 / distinct-2, duplicate rate, KL).

`HackingMonitor(Alarm(...)).update(step, stats)` returns the names of the alarms that trip at this step and,
at each alarm's onset (not tripped at the previous step), warns `RewardHackingWarning`; with `Alarm.alarm_stop` it
raises `RewardHackingError` instead, for the trainer to checkpoint and stop. The alarms:

* `length_correlation` — |corr(reward, length)| above `alarm_length_corr` for `alarm_corr_steps` steps in a row
  (the policy is buying reward with length);
* `distinct2_collapse` — the mean reward is above its baseline (the mean over the first `alarm_baseline_steps`
  steps) by more than `alarm_min_reward_rise` while distinct-2 has fallen below the baseline's distinct-2 by more
  than the fraction `alarm_distinct2_drop` (reward up while the responses collapse onto a few strings).

Pure: no torch, no I/O. The trainer wiring (config section, logging `stats.metrics()`, the checkpoint on
`RewardHackingError`) lives in the trainer.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from pydantic import BaseModel, ConfigDict, Field

from karma.rm.rule import count_words, distinct_n, duplicate_rate, pearson

LENGTH_CORRELATION = "length_correlation"
DISTINCT2_COLLAPSE = "distinct2_collapse"


class RewardHackingWarning(UserWarning):
    """An alarm of `HackingMonitor` tripped (the message names it, the step and the figures)."""


class RewardHackingError(RuntimeError):
    """An alarm tripped with `Alarm.alarm_stop`: the trainer should checkpoint and stop."""

    def __init__(self, step: int, alarms: Sequence[str], message: str):
        super().__init__(message)
        self.step = step
        self.alarms = list(alarms)


@dataclass(frozen=True)
class BatchStats:
    """Figures of one step's batch (None where undefined: no n-gram, fewer than 2 items, a constant side)."""

    n: int
    reward_mean: float
    reward_std: float  # population (ddof 0)
    length_mean: float  # whitespace words
    reward_length_corr: float | None
    distinct_1: float | None
    distinct_2: float | None
    duplicate_rate: float
    kl: float | None = None

    def metrics(self, prefix: str = "monitor/") -> dict[str, float]:
        """Flat metrics for the trainer's sinks (undefined figures left out)."""
        return {f"{prefix}{k}": float(v) for k, v in asdict(self).items() if v is not None}


def batch_stats(rewards: Sequence[float], responses: Sequence[str], kl: float | None = None) -> BatchStats:
    """The monitor's figures of one batch; `rewards[i]` is the reward of `responses[i]`."""
    if len(rewards) != len(responses):
        raise ValueError(f"batch_stats: {len(rewards)} rewards for {len(responses)} responses")
    if not responses:
        raise ValueError("batch_stats: an empty batch")
    n = len(rewards)
    r = [float(x) for x in rewards]
    lengths = [float(count_words(t)) for t in responses]
    mean = math.fsum(r) / n
    return BatchStats(
        n=n,
        reward_mean=mean,
        reward_std=math.sqrt(math.fsum((x - mean) ** 2 for x in r) / n),
        length_mean=math.fsum(lengths) / n,
        reward_length_corr=pearson(r, lengths),
        distinct_1=distinct_n(responses, 1),
        distinct_2=distinct_n(responses, 2),
        duplicate_rate=duplicate_rate(responses) or 0.0,
        kl=None if kl is None else float(kl),
    )


class Alarm(BaseModel):
    """When the monitor calls a step reward hacking. An alarm set to None is off."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    alarm_length_corr: float | None = Field(
        0.8, gt=0, le=1, description="length_correlation: |corr(reward, length)| above this ..."
    )
    alarm_corr_steps: int = Field(5, ge=1, description="... for this many steps in a row trips it")
    alarm_distinct2_drop: float | None = Field(
        0.3,
        gt=0,
        lt=1,
        description="distinct2_collapse: distinct-2 below (1 - this) x its baseline while the reward rises",
    )
    alarm_baseline_steps: int = Field(
        5, ge=1, description="the first steps whose mean reward and distinct-2 are the baseline"
    )
    alarm_min_reward_rise: float = Field(
        0.0, ge=0, description="the reward 'rises' when its mean exceeds the baseline by more than this"
    )
    alarm_stop: bool = Field(
        False, description="raise RewardHackingError (checkpoint and stop) instead of warning"
    )


class HackingMonitor:
    """Feed it every step's `BatchStats`; it keeps the baseline and the alarm streaks."""

    def __init__(self, alarm: Alarm | None = None):
        self.alarm = alarm or Alarm()
        self._baseline_reward: list[float] = []
        self._baseline_d2: list[float] = []
        self._corr_streak = 0
        self._tripped: set[str] = set()
        self.history: list[tuple[int, list[str]]] = []  # (step, alarms tripped) for steps where any did

    @property
    def baseline(self) -> tuple[float, float] | None:
        """(mean reward, mean distinct-2) of the baseline steps, once they are all in."""
        if len(self._baseline_reward) < self.alarm.alarm_baseline_steps or not self._baseline_d2:
            return None
        return (
            math.fsum(self._baseline_reward) / len(self._baseline_reward),
            math.fsum(self._baseline_d2) / len(self._baseline_d2),
        )

    def update(self, step: int, stats: BatchStats) -> list[str]:
        """The alarms tripping at `step` (warned at their onset; raised with `Alarm.alarm_stop`)."""
        a = self.alarm
        tripped: list[str] = []
        reasons: list[str] = []
        corr = stats.reward_length_corr
        if a.alarm_length_corr is not None:
            self._corr_streak = (
                self._corr_streak + 1 if corr is not None and abs(corr) > a.alarm_length_corr else 0
            )
            if self._corr_streak >= a.alarm_corr_steps:
                tripped.append(LENGTH_CORRELATION)
                reasons.append(
                    f"|corr(reward, length)| = {abs(corr or 0):.3f} > {a.alarm_length_corr:g} for "
                    f"{self._corr_streak} steps"
                )
        baseline = self.baseline
        if baseline is None:
            self._baseline_reward.append(stats.reward_mean)
            if stats.distinct_2 is not None:
                self._baseline_d2.append(stats.distinct_2)
        elif a.alarm_distinct2_drop is not None and stats.distinct_2 is not None:
            reward0, d2_0 = baseline
            rising = stats.reward_mean > reward0 + a.alarm_min_reward_rise
            collapsed = stats.distinct_2 < (1 - a.alarm_distinct2_drop) * d2_0
            if rising and collapsed:
                tripped.append(DISTINCT2_COLLAPSE)
                reasons.append(
                    f"reward {stats.reward_mean:.3f} > baseline {reward0:.3f} while distinct-2 "
                    f"{stats.distinct_2:.3f} fell more than {a.alarm_distinct2_drop:.0%} below its baseline {d2_0:.3f}"
                )
        onset = [name for name in tripped if name not in self._tripped]
        self._tripped = set(tripped)
        if tripped:
            self.history.append((step, tripped))
        if onset:
            message = f"reward hacking suspected at step {step}: " + "; ".join(
                f"{name} ({why})" for name, why in zip(tripped, reasons, strict=True) if name in onset
            )
            if a.alarm_stop:
                raise RewardHackingError(step, tripped, message)
            warnings.warn(RewardHackingWarning(message), stacklevel=2)
        return tripped
