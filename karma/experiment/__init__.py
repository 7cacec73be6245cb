"""`karma experiment`: the paper's design at the scale this machine allows, from one YAML config.

    prepare data ─▶ train RM variants (full, context) ─▶ evaluate karma prediction
                 ─▶ one reward service on loopback serving every variant (/models/{variant}/…)
                 ─▶ PPO a policy against each variant × exposure condition (Reddit vs non-Reddit prompts)
                 ─▶ evaluate base and every policy ─▶ paired comparison ─▶ experiment.md, claim by claim

One module per concern: `config.py` (the typed config, presets, `--data` discovery), `stages.py` (the
pipeline; each stage resumable), `report.py` (experiment.md: claims, verdicts, power), `cli.py` (the command).
`karma demo` is this pipeline with the `demo` preset (one variant, one condition).
"""

from karma.experiment.config import PRESETS, ExperimentConfig, data_spec_from_path
from karma.experiment.report import (
    ALPHA,
    NO_CHANGE,
    PLAUSIBLE_EFFECT,
    POWER,
    claims,
    training_summary,
    write_report,
)
from karma.experiment.stages import ExperimentError, politeness_train_prompts, reward_service, run_experiment

__all__ = [
    "ALPHA",
    "NO_CHANGE",
    "PLAUSIBLE_EFFECT",
    "POWER",
    "PRESETS",
    "ExperimentConfig",
    "ExperimentError",
    "claims",
    "data_spec_from_path",
    "politeness_train_prompts",
    "reward_service",
    "run_experiment",
    "training_summary",
    "write_report",
]
