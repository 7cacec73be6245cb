"""Composed rewards: a weighted sum of served reward models and rules, served under a name like any model.

A composition folder holds `karma_compose.yaml` (a `CompositionSpec`; JSON is YAML too) and a `karma_rm.json`
stub (`"kind": "compose"`), so `karma serve --model NAME=PATH` and the admin load / swap routes take it like
any reward-model folder. Its score is

    score(item) = Σ_i weight_i · component_i(item)

where a component is either a *model* — another model served by the same service, by name (its current
version: swapping it changes the composed version and scores) — or a *rule* (one rule of `karma.rm.rule`,
computed on the response). Every component has a name, unique in the composition (default: the model name,
or the rule's kind), under which `/v1/score` reports its values and `/metrics` counts it.

```yaml
components:
  - model: context          # a served model, scored through its own batching worker
    weight: 1.0
  - model: full
    weight: 0.5
  - rule: {kind: length_window, min_words: 5, max_words: 60, scale: 20, floor: -1}
    weight: 0.2
  - rule: {kind: distinct_n, n: 2}
    weight: 0.5
    name: repetition
```

Resolving model names to served models is the service's job (`services.reward_api.engine.ModelRegistry`);
this module holds the spec, its validation (errors name the bad key), and the folder writer.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, model_validator

from karma.protocol import ModelName
from karma.rm.rule import KINDS, Rule

COMPOSE_CONFIG_NAME = "karma_compose.yaml"


class CompositionSpecError(ValueError):
    """A composition that does not validate (unknown key, no components, a duplicate name, a bad rule...)."""


class _Component(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    weight: float = Field(1.0, allow_inf_nan=False, description="multiplies this component in the sum")
    name: ModelName | None = Field(None, description="how replies and metrics call it (default: see above)")


class ModelComponent(_Component):
    """A model served by the same service, scored through its own handle (shared batches, admission, cache)."""

    model: ModelName

    @property
    def label(self) -> str:
        return self.name or self.model


class RuleComponent(_Component):
    """One rule of `karma.rm.rule` (its own `weight` must stay 1: weight the component instead)."""

    rule: Rule

    @model_validator(mode="after")
    def _one_weight(self) -> RuleComponent:
        if self.rule.weight != 1.0:
            raise ValueError(
                f"rule.weight ({self.rule.weight:g}) must be left at 1: set the component's weight instead"
            )
        return self

    @property
    def label(self) -> str:
        return self.name or self.rule.kind


def _component_kind(value: Any) -> str:
    if isinstance(value, Mapping):
        return "ModelComponent" if "model" in value else "RuleComponent"
    return type(value).__name__


Component = Annotated[
    Annotated[ModelComponent, Tag("ModelComponent")] | Annotated[RuleComponent, Tag("RuleComponent")],
    Discriminator(_component_kind),
]


class CompositionSpec(BaseModel):
    """The content of karma_compose.yaml."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format_version: Literal[1] = 1
    components: list[Component] = Field(min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _component_kinds(cls, data: Any) -> Any:
        """Say which key is wrong: a component is `{model: NAME}` or `{rule: {...}}`, exactly one of them."""
        if isinstance(data, Mapping) and isinstance(data.get("components"), list):
            for i, comp in enumerate(data["components"]):
                if not isinstance(comp, Mapping):
                    raise ValueError(  # noqa: TRY004 - pydantic reports ValueErrors only
                        f"components.{i}: a component is a mapping, not {type(comp).__name__}"
                    )
                kinds = [k for k in ("model", "rule") if k in comp]
                if len(kinds) != 1:
                    keys = ", ".join(map(str, comp)) or "none"
                    raise ValueError(
                        f"components.{i}: give exactly one of `model` (a served model's name) and `rule` "
                        f"(a rule spec) (keys given: {keys})"
                    )
        return data

    @model_validator(mode="after")
    def _unique_names(self) -> CompositionSpec:
        seen: set[str] = set()
        for i, comp in enumerate(self.components):
            if comp.label in seen:
                raise ValueError(
                    f"components.{i}: component name {comp.label!r} is used twice; give one a `name`"
                )
            seen.add(comp.label)
        return self

    @property
    def models(self) -> list[str]:
        """The served models this composition reads, in order."""
        return [c.model for c in self.components if isinstance(c, ModelComponent)]

    @property
    def version(self) -> str:
        """Content hash of the definition (the served version also hashes the component models' versions)."""
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()[:12]

    def served_version(self, model_versions: Mapping[str, str]) -> str:
        """The composed model's version: a hash of the definition and of its model components' versions."""
        parts = {"spec": self.version, "models": {m: model_versions[m] for m in self.models}}
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]

    def describe(self) -> str:
        return "+".join(f"{c.weight:g}*{c.label}" for c in self.components)

    @classmethod
    def parse(
        cls, data: str | bytes | Mapping[str, Any], *, where: str = COMPOSE_CONFIG_NAME
    ) -> CompositionSpec:
        """Validate a composition from YAML / JSON text or a mapping; any problem raises
        `CompositionSpecError` naming each bad key."""
        import yaml

        if isinstance(data, str | bytes):
            try:
                data = yaml.safe_load(data)
            except yaml.YAMLError as exc:
                raise CompositionSpecError(f"{where}: not valid YAML or JSON: {exc}") from None
        if not isinstance(data, Mapping):
            raise CompositionSpecError(
                f"{where}: invalid composition: expected a mapping with `components`, got {type(data).__name__}"
            )
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            problems = "; ".join(_describe_error(e) for e in exc.errors())
            raise CompositionSpecError(f"{where}: invalid composition: {problems}") from None

    @classmethod
    def load(cls, path: str | Path) -> CompositionSpec:
        """The spec of a composition folder."""
        file = Path(path) / COMPOSE_CONFIG_NAME
        if not file.is_file():
            raise FileNotFoundError(f"{path} is not a composed reward: {COMPOSE_CONFIG_NAME} is missing")
        return cls.parse(file.read_text(), where=str(file))


def _describe_error(err: dict[str, Any]) -> str:
    # drop union branch names from the location: components.0.RuleComponent.rule.marker.count -> ...rule.count
    skip = {"ModelComponent", "RuleComponent", *KINDS}
    loc = ".".join(str(p) for p in err.get("loc", ()) if p not in skip)
    msg = str(err.get("msg", "")).removeprefix("Value error, ")
    return f"{loc}: {msg}" if loc else msg


def is_composition(path: str | Path) -> bool:
    return (Path(path) / COMPOSE_CONFIG_NAME).is_file()


def write_compose_folder(spec: CompositionSpec, out: str | Path) -> Path:
    """Write `karma_compose.yaml` (the spec) and the `karma_rm.json` stub; returns the folder."""
    import yaml

    from karma.rm.folder import write_manifest

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    body = spec.model_dump(mode="json", exclude_none=True)
    (out / COMPOSE_CONFIG_NAME).write_text(yaml.safe_dump(body, sort_keys=False))
    write_manifest(
        out, kind="compose", spec_file=COMPOSE_CONFIG_NAME, describe=spec.describe(), version=spec.version
    )
    return out
