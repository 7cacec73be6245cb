"""Where the trainer's numbers go: `metrics.jsonl` (one row per step), TensorBoard, one log line per step,
and `trainer_result.json` (every run, failed ones included). NaN / infinite floats are written as null. A row
holds numbers, and one string: `reward/version` (the reward model's version; not a TensorBoard scalar). In a
data-parallel run only rank 0 writes them (its rows are the whole step's: every rank holds the whole batch)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
RESULT_FILE = "trainer_result.json"


def json_safe(value: Any) -> Any:
    """`value` with NaN / infinite floats replaced by None (JSON has neither), in nested dicts too."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_result(out: Path, result: dict[str, Any]) -> None:
    (out / RESULT_FILE).write_text(json.dumps(json_safe(result), indent=2))


def failed_result(
    out: Path, step: int, exc: BaseException, checkpoint: Path | None, last_metrics: dict[str, Any]
) -> dict[str, Any]:
    """The trainer_result.json of a run that failed after set-up at `step` with `exc`."""
    return {
        "status": "failed",
        "step": step,
        "output_dir": str(out),
        "error_type": type(exc).__name__,
        "error": str(exc),
        "checkpoint": str(checkpoint) if checkpoint else None,
        "last_metrics": last_metrics,
    }


def note_reward_version(logger: logging.Logger, previous: str | None, version: str | None, step: int) -> None:
    """Log the reward model version of step `step`'s scores when it differs from `previous`: the first one
    known at INFO, a change (the reward model was hot-swapped since the previous step) as a warning."""
    if version == previous:
        return
    if previous is None:
        logger.info("reward model version %s (step %d)", version, step)
    else:
        logger.warning(
            "reward model version changed from %s to %s at step %d (hot swap)", previous, version, step
        )


class MetricSinks:
    """The step rows of a run in `out`, to the sinks named in `report_to` ("jsonl", "tensorboard") and the log.

    Opened at `step` (the resumed step, or 0): an existing metrics.jsonl keeps its rows up to `step` when
    `resume`, and nothing otherwise; TensorBoard purges the events after `step`."""

    def __init__(self, out: Path, report_to: list[str], *, resume: bool, step: int):
        metrics_file = out / METRICS_FILE
        if metrics_file.exists():  # keep the history up to the resumed step, drop anything after it
            lines = [
                ln
                for ln in metrics_file.read_text().splitlines()
                if ln.strip() and resume and json.loads(ln)["step"] <= step
            ]
            metrics_file.write_text("".join(ln + "\n" for ln in lines))
        self._jsonl = metrics_file.open("a") if "jsonl" in report_to else None
        self._tb = None
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(out / "tensorboard"), purge_step=step + 1 if step else None)

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        """The row of `step` (flushed), and its log line."""
        clean = json_safe(metrics)
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(clean) + "\n")
            self._jsonl.flush()
        if self._tb is not None:
            for k, v in clean.items():
                if k != "step" and isinstance(v, (int, float)):  # None (NaN) and strings are no scalars
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()
        log.info(
            "step %d: reward %.3f kl %.3f kl_coef %.4f loss %.4f (%.1fs, reward model %s)",
            step,
            metrics["reward/mean"],
            metrics["objective/kl"],
            metrics["objective/kl_coef"],
            metrics["loss/policy"],
            metrics["speed/step_s"],
            metrics.get("reward/version"),
        )

    def close(self) -> None:
        for sink in (self._jsonl, self._tb):
            if sink is not None:
                sink.close()
