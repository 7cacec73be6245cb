"""PPO / RLOO / GRPO trainer with vLLM (or transformers) rollouts and rewards from a `RewardSource`.

    from services.policy_trainer import train
    out = train("run.yaml")            # or a TrainConfig / nested dict; returns the output folder

The output folder holds the final policy as a standard Hugging Face folder (LoRA merged), `metrics.jsonl`,
`tensorboard/`, `checkpoints/` and `train_config.yaml`. See docs/trainer.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from services.policy_trainer.config import TrainConfig


def train(config: TrainConfig | dict[str, Any] | str | Path, **kwargs: Any) -> Path:
    """Run a training job in this process and return its output folder (see `trainer.train`)."""
    from services.policy_trainer.trainer import train as _train

    return _train(config, **kwargs)


__all__ = ["train"]
