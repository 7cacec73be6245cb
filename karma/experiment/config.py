"""The experiment's config: one typed section per stage, each the stage's own config type, so a wrong key
fails when the config loads, not an hour into stage 4."""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator

from karma.config import Cli, ConfigError, load, options, to_yaml
from karma.data.prepare import PrepareConfig
from karma.eval.run import PolicyEvalConfig
from karma.protocol import MODEL_NAME_PATTERN
from karma.rm.compose import CompositionSpec
from karma.rm.evaluate import RMEvalConfig
from karma.rm.template import VARIANTS
from karma.rm.train import RMHyperParams
from services.policy_trainer.config import TrainSections

PRESETS = ("quick", "cpu", "default", "demo")
DATA_SUFFIXES = (".zst", ".jsonl", ".json", ".ndjson", ".parquet")
ENV_PREFIX = "KARMA_EXPERIMENT_"


class PreparedData(BaseModel):
    """`data: {prepared: DIR}`: an already prepared data folder (`karma data prepare --out DIR`)."""

    model_config = ConfigDict(extra="forbid")

    prepared: str = Field(description="a `karma data prepare` output folder")


class DumpData(PrepareConfig):
    """`data:` as `karma data prepare` options (dumps to prepare; the experiment chooses `out`)."""


def _data_kind(value: Any) -> str:
    if isinstance(value, dict):
        return "prepared" if "prepared" in value else "dumps"
    return "prepared" if isinstance(value, PreparedData) else "dumps"


ExperimentData = Annotated[
    Annotated[PreparedData, Tag("prepared")] | Annotated[DumpData, Tag("dumps")], Discriminator(_data_kind)
]


class ExperimentRM(RMHyperParams):
    """`rm:` — the variants to train, and the `karma rm train` hyper-parameters they share."""

    variants: list[Literal[VARIANTS]] = Field(
        default_factory=lambda: ["full", "context"], min_length=1, description="RM variants to train"
    )


class ExperimentConfig(BaseModel):
    """One experiment: every size, seed and path. Each section is its stage's own config type."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("karma", description="label used in reports")
    out: str = Field("runs/experiment", description="output folder")
    seed: int = Field(0, description="seed of every stage (unless a section sets its own)")
    smoke: bool = Field(
        False,
        description="a smoke-scale run (exercises the pipeline, underpowered by design): experiment.md says so",
    )
    data: ExperimentData = Field(description="`karma data prepare` options, or {prepared: DIR}")
    rm: ExperimentRM = Field(default_factory=ExperimentRM)
    rm_eval: RMEvalConfig = Field(default_factory=RMEvalConfig)
    serve: Annotated[dict[str, Any], Cli(hidden=True)] = Field(
        default_factory=dict, description="extra `karma serve` settings (its field names)"
    )
    conditions: Annotated[dict[str, str], Cli(hidden=True)] = Field(
        min_length=1,
        description="exposure condition -> prompt source: 'reddit' (the prepared data), 'politeness' (Stanford "
        "politeness requests minus the evaluation hold-out) or 'file:PATH'",
    )
    train: TrainSections = Field(
        default_factory=TrainSections,
        description="trainer sections (model, rollout, ppo, run, ...) shared by every PPO run",
    )
    eval: PolicyEvalConfig = Field(default_factory=PolicyEvalConfig)
    composed: Annotated[dict[str, CompositionSpec], Cli(hidden=True)] = Field(
        default_factory=dict,
        description="optional extra rewards, NAME -> composition (karma.rm.compose): an RM variant composed "
        "with rule components, e.g. the `context` RM + a length window + a repetition penalty; each is "
        "served beside the variants, PPO'd under every condition, and compared head-to-head with the policy "
        "of the variant it builds on (claim 6)",
    )

    @field_validator("conditions")
    @classmethod
    def _conditions(cls, value: dict[str, str]) -> dict[str, str]:
        for cond, spec in value.items():
            if spec not in ("reddit", "politeness") and not spec.startswith("file:"):
                raise ValueError(
                    f"condition {cond!r}: prompt source must be 'reddit', 'politeness' or 'file:PATH', got {spec!r}"
                )
        return value

    @field_validator("serve")
    @classmethod
    def _serve(cls, value: dict[str, Any]) -> dict[str, Any]:
        from services.reward_api.core.config import Settings

        owned = {"models", "default_model", "host"}  # the experiment serves its own RMs on loopback
        known = set(Settings.model_fields) - owned
        bad = sorted(set(value) - known)
        if bad:
            raise ValueError(
                f"unknown `karma serve` setting(s) {', '.join(bad)}; expected {', '.join(sorted(known))}"
            )
        Settings(**value)  # the values, checked as `karma serve` would
        return value

    @field_validator("composed")
    @classmethod
    def _composed(cls, value: dict[str, CompositionSpec], info: Any) -> dict[str, CompositionSpec]:
        variants = list(info.data["rm"].variants) if "rm" in info.data else []
        for name, spec in value.items():
            if not re.fullmatch(MODEL_NAME_PATTERN, name) or name in VARIANTS:
                raise ValueError(f"composed reward name {name!r} must be a model name other than a variant")
            if not spec.models:
                raise ValueError(f"composed reward {name!r} has no model component (it would be a rule only)")
            missing = [m for m in spec.models if m not in variants]
            if missing:
                raise ValueError(
                    f"composed reward {name!r} reads {', '.join(missing)}, not among rm.variants "
                    f"({', '.join(variants)})"
                )
        return value

    def composed_base(self, name: str) -> str:
        """The variant a composed reward builds on (its first model component): its policy is the comparison."""
        return self.composed[name].models[0]

    @property
    def variants(self) -> list[str]:
        return list(self.rm.variants)

    @property
    def judge(self) -> str:
        """The RM whose score is reported for every policy's generated replies (side effects)."""
        return "context" if "context" in self.variants else self.variants[0]

    def serve_flags(self) -> list[str]:
        """`serve:` as `karma serve` flags (the generated ones: `chat_templates` -> `--chat-template`). Without
        `torch_threads` the service gets `karma.threads.service_threads()`: it runs beside the trainer."""
        from karma.threads import service_threads
        from services.reward_api.core.config import Settings

        by_name = {opt.name: opt for opt in options(Settings)}
        flags: list[str] = []
        if "torch_threads" not in self.serve:
            flags += [by_name["torch_threads"].flag, str(service_threads())]
        for key, value in self.serve.items():
            if key == "port":
                continue
            for v in value if isinstance(value, list) else [value]:
                flags += [by_name[key].flag, str(v)]
        return flags

    def with_data(self, spec: dict[str, Any]) -> ExperimentConfig:
        """A validated copy with another `data:` section."""
        return type(self)(**{**self.model_dump(exclude_unset=True), "data": spec})

    @classmethod
    def load(
        cls,
        preset_or_path: str,
        overrides: dict[str, Any] | None = None,
        *,
        flags: dict[str, Any] | None = None,
        environ: dict[str, str] | None = None,
    ) -> ExperimentConfig:
        """A preset or YAML file, then dotted `overrides` ({"train.run.steps": 2}), the environment
        (`KARMA_EXPERIMENT_<FIELD>` for the top-level fields, when `environ` is given) and `flags`."""
        import yaml

        if preset_or_path in PRESETS:
            text = resources.files("karma").joinpath(f"configs/experiment_{preset_or_path}.yaml").read_text()
            source = f"preset {preset_or_path}"
        else:
            path = Path(preset_or_path)
            if not path.is_file():
                raise FileNotFoundError(
                    f"experiment config not found: {path} (or use a preset: {', '.join(PRESETS)})"
                )
            text, source = path.read_text(), str(path)
        raw = yaml.safe_load(text) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: an experiment config must be a mapping")
        for key, value in (overrides or {}).items():
            _set_dotted(raw, key, value)
        try:
            return load(
                cls,
                file=raw,
                flags=flags,
                sections=False,
                prefix=None if environ is None else ENV_PREFIX,
                environ=environ,
            )
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None

    def to_yaml(self) -> str:
        return to_yaml(self)


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    node = tree
    *parents, last = key.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value


def data_spec_from_path(path: str | Path) -> dict[str, Any]:
    """`--data PATH` → the experiment's `data` section.

    PATH may be a prepared folder (has card.json), a folder of dumps (RC_* = comments, RS_* / *submissions* =
    submissions, other .jsonl/.parquet = SHP rows), or one such file.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"--data path does not exist: {p}")
    if p.is_dir() and (p / "card.json").exists() and (p / "examples.parquet").exists():
        return {"prepared": str(p)}
    files = sorted(f for f in p.iterdir() if f.is_file()) if p.is_dir() else [p]
    spec: dict[str, list[str]] = {"comments": [], "submissions": [], "shp": []}
    for f in files:
        name = f.name.lower()
        if not name.endswith(DATA_SUFFIXES):
            continue
        if name.startswith("rs_") or "submission" in name:
            spec["submissions"].append(str(f))
        elif name.startswith("rc_") or "comment" in name or name.endswith(".zst"):
            spec["comments"].append(str(f))
        else:
            spec["shp"].append(str(f))
    spec = {k: v for k, v in spec.items() if v}
    if not spec:
        raise FileNotFoundError(
            f"no Pushshift dumps (RC_*/RS_* .zst/.jsonl) or SHP rows (.jsonl/.parquet) found in {p}"
        )
    return spec
