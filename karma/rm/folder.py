"""The reward-model folder's manifest, `karma_rm.json` (`KarmaRMConfig`): what every folder kind shares.

A folder is a trained model (weights + tokenizer, `karma.rm.model.RewardModel`), a rule (`karma.rm.rule`) or
a composition (`karma.rm.compose`); each carries this manifest, so the service and the tools tell them apart
by reading one small file. This module imports neither torch nor transformers, and no other folder kind.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from karma.rm.template import TEMPLATE_DOC, TEMPLATE_VERSION

CONFIG_NAME = "karma_rm.json"


class MissingRMConfigError(FileNotFoundError):
    """A model folder without karma_rm.json."""


class ScoreNormalization(BaseModel):
    mean: float = 0.0
    std: float = 1.0


class KarmaRMConfig(BaseModel):
    """Everything needed to score exactly as in training; saved as karma_rm.json."""

    model_config = ConfigDict(extra="allow")

    format_version: int = 1
    variant: Literal["full", "context", "response"]
    objective: Literal["regression", "pairwise", "both"] = "pairwise"
    backbone: str = ""
    template_version: int = TEMPLATE_VERSION
    template: str = ""
    max_length: int = Field(256, ge=8)
    truncation_side: Literal["left", "right"] = "left"
    karma_normalization: str = "log1p"
    score_normalization: ScoreNormalization = ScoreNormalization()
    data_card_sha256: str | None = None
    metrics: dict[str, Any] = {}
    version: str = ""  # content hash of the weights + config; set by RewardModel.save

    def model_post_init(self, _: Any) -> None:
        if not self.template:
            self.template = TEMPLATE_DOC[self.variant]


def load_config(path: str | Path) -> KarmaRMConfig:
    p = Path(path) / CONFIG_NAME
    if not p.exists():
        raise MissingRMConfigError(f"{path} is not a KARMA reward model: {CONFIG_NAME} is missing")
    return KarmaRMConfig.model_validate(json.loads(p.read_text()))


def write_manifest(out: str | Path, *, kind: str, spec_file: str, describe: str, version: str) -> Path:
    """The `karma_rm.json` of a folder without weights (a rule or a composition): it names its kind and its
    spec file, so every tool reads one small file to tell the kinds apart. Returns the file."""
    stub = KarmaRMConfig(
        variant="response",  # a placeholder: such a folder has no input template of its own
        backbone=f"{kind}:{describe}",
        template=f"{kind} reward, spec in {spec_file} (served by `karma serve`)",
        max_length=8,
        version=version,
        kind=kind,
        **{f"{kind}_file": spec_file},
    )
    path = Path(out) / CONFIG_NAME
    path.write_text(stub.model_dump_json(indent=2) + "\n")
    return path
