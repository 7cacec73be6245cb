"""`karma train`: PPO / RLOO / GRPO a policy against the reward service.

    karma train --config run.yaml
    karma train --prompts file:../shared/data/eval/politeness/wikipedia.annotated.csv \\
        --reward-url http://127.0.0.1:8000 --engine vllm --steps 20 --output-dir runs/ppo

The flags are generated from `TrainConfig` (`services/policy_trainer/config.py`; `kl_coef` -> `--kl-coef`):
defaults < `--config FILE` < environment (`KARMA_TRAIN_<FIELD>`) < flags. This module imports no torch.
"""

from __future__ import annotations

import logging
from pathlib import Path

import typer

from karma.config import command
from services.policy_trainer.config import ENV_PREFIX, TrainConfig

log = logging.getLogger(__name__)


def run_training(cfg: TrainConfig) -> None:
    """PPO / RLOO / GRPO a policy against the reward service (or an in-process reward model)."""
    from services.policy_trainer.distributed import RankFailedError
    from services.policy_trainer.monitor import RewardHackingError
    from services.policy_trainer.prompts import PromptSourceError
    from services.policy_trainer.rewards import RewardUnavailableError
    from services.policy_trainer.trainer import Trainer, TrainingDivergedError

    trainer = Trainer(cfg)
    try:
        result = trainer.fit()
    except (
        RewardUnavailableError,
        TrainingDivergedError,
        RewardHackingError,
        RankFailedError,
        PromptSourceError,
        FileNotFoundError,
        FileExistsError,
        ValueError,
    ) as exc:
        # bad input, a dead reward service or a diverged update: one clear line, not a traceback
        # (PolicyLoadError and CheckpointLoadError are ValueErrors); trainer_result.json holds the details
        typer.echo(f"karma train: {type(exc).__name__}: {exc}", err=True)
        raise typer.Exit(1) from None
    finally:
        trainer.close()
    if not trainer.dist.is_main:  # one report per run, not per rank
        return
    typer.echo(f"{result['status']} at step {result['step']}: {result['output_dir']}")
    if "heldout" in result:
        h = result["heldout"]
        typer.echo(
            f"held-out reward ({h['n']} prompts): base {h['base_mean']:.4f} -> trained {h['trained_mean']:.4f}, "
            f"delta {h['delta']:+.4f} [{h['ci_low']:.4f}, {h['ci_high']:.4f}], p = {h['p']:.4g} "
            f"(MDE {h['mde']:.4f}); {Path(result['output_dir']) / 'heldout_reward.json'}"
        )


train = command(
    TrainConfig,
    run_training,
    prefix=ENV_PREFIX,
    help=run_training.__doc__,
    config_help="YAML file with the sections model, data, rollout, reward, ppo, run, eval",
)
