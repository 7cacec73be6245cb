"""`karma train`: PPO / RLOO / GRPO a policy against the reward service.

    karma train --config run.yaml
    karma train --prompts file:../shared/data/eval/politeness/wikipedia.annotated.csv \\
        --reward-url http://127.0.0.1:8000 --engine vllm --steps 20 --output-dir runs/ppo

Every field of the config dataclasses (`services/policy_trainer/config.py`) is a flag named after it
(`kl_coef` -> `--kl-coef`); flags override the YAML file, which overrides the defaults. The flags are
generated from the dataclasses, so the two cannot drift apart. This module imports no torch.
"""

from __future__ import annotations

import inspect
import logging
import types
import typing
from pathlib import Path
from typing import Annotated, Any

import typer

from services.policy_trainer.config import flag_fields

log = logging.getLogger(__name__)


def _flag_type(tp: Any) -> Any:
    """The CLI type of a config field: always optional (None = not given)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = inner[0]
    return tp | None


def _train(config: Path | None = None, **flags: Any) -> None:
    from services.policy_trainer.config import TrainConfig

    try:
        cfg = TrainConfig.from_sources(config, {k: v for k, v in flags.items() if v is not None and v != []})
    except (ValueError, TypeError, FileNotFoundError) as exc:
        raise typer.BadParameter(str(exc)) from None
    from services.policy_trainer.prompts import PromptSourceError
    from services.policy_trainer.rewards import RewardUnavailableError
    from services.policy_trainer.trainer import Trainer, TrainingDivergedError

    trainer = Trainer(cfg)
    try:
        result = trainer.fit()
    except (
        RewardUnavailableError,
        TrainingDivergedError,
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
    typer.echo(f"{result['status']} at step {result['step']}: {result['output_dir']}")
    if "heldout" in result:
        h = result["heldout"]
        typer.echo(
            f"held-out reward ({h['n']} prompts): base {h['base_mean']:.4f} -> trained {h['trained_mean']:.4f}, "
            f"delta {h['delta']:+.4f} [{h['ci_low']:.4f}, {h['ci_high']:.4f}], p = {h['p']:.4g} "
            f"(MDE {h['mde']:.4f}); {Path(result['output_dir']) / 'heldout_reward.json'}"
        )


def _build_command():
    params = [
        inspect.Parameter(
            "config",
            inspect.Parameter.KEYWORD_ONLY,
            default=None,
            annotation=Annotated[
                Path | None,
                typer.Option(
                    "--config",
                    "-c",
                    help="YAML file with the sections model, data, rollout, reward, ppo, run, eval",
                ),
            ],
        )
    ]
    for section, f, tp in flag_fields():
        flag = "--" + f.name.replace("_", "-")
        ftype = _flag_type(tp)
        base = typing.get_args(ftype)[0]
        if base is bool:
            decl = f"{flag}/--no-{flag[2:]}"
        else:
            decl = flag
        default = f.default if f.default is not _MISSING else f.default_factory()  # type: ignore[misc]
        help_text = f"{f.metadata.get('help', '')} [{section}; default: {default}]"
        params.append(
            inspect.Parameter(
                f.name,
                inspect.Parameter.KEYWORD_ONLY,
                default=None,
                annotation=Annotated[
                    ftype, typer.Option(decl, help=help_text, rich_help_panel=section, show_default=False)
                ],
            )
        )

    def train(**kwargs: Any) -> None:
        """PPO / RLOO / GRPO a policy against the reward service (or an in-process reward model)."""
        _train(**kwargs)

    train.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    train.__annotations__ = {p.name: p.annotation for p in params} | {"return": None}
    return train


_MISSING = __import__("dataclasses").MISSING
train = _build_command()
