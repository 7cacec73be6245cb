"""`karma experiment`: its flags are the top-level fields of `ExperimentConfig` (generated; also
`KARMA_EXPERIMENT_<FIELD>`), plus the preset or file, `--quick`, `--data` and `--force`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer

from karma.config import ConfigError, command, parameter
from karma.experiment.config import ENV_PREFIX, PRESETS, ExperimentConfig, PreparedData, data_spec_from_path


def _build(cls: type[ExperimentConfig], flags: dict[str, Any], extra: dict[str, Any]) -> ExperimentConfig:
    preset = "quick" if extra["quick"] else str(extra["config"] or "default")
    try:
        cfg = cls.load(preset, flags=flags, environ=dict(os.environ))
        if extra["data"] is not None:
            spec = data_spec_from_path(extra["data"])
            if "prepared" not in spec:  # keep the preset's other data options (limit, filters, ...)
                kept = {} if isinstance(cfg.data, PreparedData) else cfg.data.model_dump(exclude_unset=True)
                spec = {
                    **{k: v for k, v in kept.items() if k not in ("comments", "submissions", "shp")},
                    **spec,
                }
            cfg = cfg.with_data(spec)
    except FileNotFoundError as exc:
        raise ConfigError(str(exc)) from None
    return cfg


def run(cfg: ExperimentConfig, *, quick: bool, data: Path | None, force: bool) -> None:
    """Run the paper's experiment: RM variants × exposure conditions → PPO → evaluation → experiment.md."""
    from karma.experiment.stages import run_experiment

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    report = run_experiment(cfg, force=force)
    typer.echo(f"experiment report: {report}")


experiment = command(
    ExperimentConfig,
    run,
    prefix=ENV_PREFIX,
    help=run.__doc__,
    sections=False,
    build=_build,
    config_help=f"a YAML file, or a preset: {' | '.join(PRESETS)} (default: default)",
    extra=[
        parameter(
            "quick",
            Annotated[bool, typer.Option("--quick", help="the `quick` preset (~30 min on a 2-core CPU)")],
            default=False,
        ),
        parameter(
            "data",
            Annotated[
                Path | None,
                typer.Option(
                    "--data", help="dumps folder/file or a prepared folder (replaces the config's data)"
                ),
            ],
        ),
        parameter(
            "force",
            Annotated[bool, typer.Option("--force", help="redo every stage instead of resuming")],
            default=False,
        ),
    ],
)
