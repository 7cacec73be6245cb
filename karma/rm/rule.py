"""Rule-based reward models: positive controls with a known optimum, served like any reward-model folder.

A rule folder holds `karma_rule.json` (a `RuleSpec`: one or more weighted rules, summed) and no weights.
`RewardModel.load` (hence `karma serve`, the trainer's in-process reward and `karma rm eval`) loads it as a
`RuleRewardModel`, which has the scoring interface of `karma.rm.model.RewardModel` (`encode` → `forward`
in batches, `score`, `normalize`, `version`, `max_length`, `config`), so the service's batching worker runs
it unchanged. The folder also holds a `karma_rm.json` stub, because tools that recognise a reward-model
folder by that file (`karma serve`'s settings, the admin routes, `karma rm eval`) must accept it; the spec
in `karma_rule.json` is the only source of the scores.

Rules read the response only (never the context or metadata) and count *words* as whitespace-separated
tokens (`len(text.split())`):

- `length_window`: 1 for `min_words <= words <= max_words`, falling linearly by 1 per `scale` words outside
  (`1 - distance / scale`), floored at `floor` when one is set.
- `marker`: 1 when the response contains any of `markers` (case-insensitive, at a word start: "thank"
  matches "Thanks"); with `count: true`, the number of distinct markers present.
- `distinct_n`: the response's distinct word n-grams / its n-grams (`n` 2 by default; lower-cased words), in
  [0, 1]: 1 when no n-gram repeats (and for a response shorter than `n` words), falling as it repeats itself.
- `refusal`: 1 when the response contains one of `phrases` ("I can't", "as an AI", ...; case-insensitive, at
  a word start, `'` and `’` alike), else 0 — give it a negative weight to penalise refusals.
- `format`: 1 when the regular expression `pattern` matches the response (`re.search`; `full: true` for
  `re.fullmatch`), else 0.

`karma rm rule --kind length_window --min-words 5 --max-words 15 --out DIR` writes a folder.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

RULE_CONFIG_NAME = "karma_rule.json"


class RuleSpecError(ValueError):
    """A rule spec that does not validate (unknown kind, bad bounds, unknown field...)."""


class _Rule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    weight: float = Field(1.0, description="multiplies this rule's value in the sum")


class LengthWindowRule(_Rule):
    """1 inside [min_words, max_words]; 1 - distance / scale outside (floored at `floor` if set)."""

    kind: Literal["length_window"] = "length_window"
    min_words: int = Field(ge=0)
    max_words: int = Field(ge=0)
    scale: float = Field(10.0, gt=0, description="words outside the window per unit of reward lost")
    floor: float | None = Field(None, description="lowest value (None: keeps falling)")

    @model_validator(mode="after")
    def _bounds(self) -> LengthWindowRule:
        if self.min_words > self.max_words:
            raise ValueError(f"min_words ({self.min_words}) must be <= max_words ({self.max_words})")
        if self.floor is not None and self.floor > 1:
            raise ValueError(f"floor ({self.floor}) must be <= 1, the value inside the window")
        return self

    def value(self, text: str) -> float:
        n = count_words(text)
        distance = max(self.min_words - n, n - self.max_words, 0)
        v = 1.0 - distance / self.scale
        return v if self.floor is None else max(v, self.floor)


class MarkerRule(_Rule):
    """Presence of politeness markers: 1 if any is present (or, with `count`, how many distinct ones)."""

    kind: Literal["marker"] = "marker"
    markers: list[str] = Field(default_factory=lambda: ["please", "thank"], min_length=1)
    count: bool = Field(False, description="count distinct markers present instead of 0/1")

    @model_validator(mode="after")
    def _markers(self) -> MarkerRule:
        empty = [i for i, m in enumerate(self.markers) if not m.strip()]
        if empty:
            raise ValueError(f"markers must be non-empty strings (empty at position(s) {empty})")
        return self

    @cached_property
    def _patterns(self) -> list[re.Pattern[str]]:
        return [re.compile(r"(?<!\w)" + re.escape(m.strip()), re.IGNORECASE) for m in self.markers]

    def value(self, text: str) -> float:
        hits = sum(1 for p in self._patterns if p.search(text))
        return float(hits) if self.count else float(hits > 0)


def word_ngrams(text: str, n: int) -> list[tuple[str, ...]]:
    """The lower-cased whitespace-word n-grams of `text` (what `distinct_n` counts)."""
    words = text.lower().split()
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


class DistinctNRule(_Rule):
    """Repetition penalty: distinct word n-grams / n-grams of the response (1 = nothing repeats)."""

    kind: Literal["distinct_n"] = "distinct_n"
    n: int = Field(2, ge=1, le=8, description="n-gram size, in words")

    def value(self, text: str) -> float:
        grams = word_ngrams(text, self.n)
        return len(set(grams)) / len(grams) if grams else 1.0


#: phrases that open a refusal in chat models' replies (matched case-insensitively at a word start)
REFUSAL_PHRASES = (
    "I can't",
    "I cannot",
    "I won't",
    "I am unable",
    "I'm unable",
    "I'm sorry, but",
    "I am sorry, but",
    "as an AI",
    "I'm not able to",
)


class RefusalRule(_Rule):
    """1 when the response holds a refusal phrase, else 0 (use a negative weight to penalise refusals)."""

    kind: Literal["refusal"] = "refusal"
    phrases: list[str] = Field(default_factory=lambda: list(REFUSAL_PHRASES), min_length=1)

    @model_validator(mode="after")
    def _phrases(self) -> RefusalRule:
        empty = [i for i, m in enumerate(self.phrases) if not m.strip()]
        if empty:
            raise ValueError(f"phrases must be non-empty strings (empty at position(s) {empty})")
        return self

    @cached_property
    def _pattern(self) -> re.Pattern[str]:
        alternatives = "|".join(re.escape(_plain_quotes(p.strip())) for p in self.phrases)
        return re.compile(rf"(?<!\w)(?:{alternatives})", re.IGNORECASE)

    def value(self, text: str) -> float:
        return float(self._pattern.search(_plain_quotes(text)) is not None)


def _plain_quotes(text: str) -> str:
    return text.replace("\u2019", "'")


class FormatRule(_Rule):
    """1 when the regular expression `pattern` matches the response (`re.search`, or `re.fullmatch`)."""

    kind: Literal["format"] = "format"
    pattern: str = Field(min_length=1, description="a Python regular expression")
    full: bool = Field(False, description="the whole response must match (re.fullmatch)")
    ignore_case: bool = False

    @model_validator(mode="after")
    def _compiles(self) -> FormatRule:
        try:
            re.compile(self.pattern)
        except re.error as exc:
            raise ValueError(f"pattern {self.pattern!r} is not a valid regular expression: {exc}") from None
        return self

    @cached_property
    def _regex(self) -> re.Pattern[str]:
        return re.compile(self.pattern, re.IGNORECASE if self.ignore_case else 0)

    def value(self, text: str) -> float:
        match = self._regex.fullmatch(text) if self.full else self._regex.search(text)
        return float(match is not None)


Rule = Annotated[
    LengthWindowRule | MarkerRule | DistinctNRule | RefusalRule | FormatRule, Field(discriminator="kind")
]
KINDS = ("length_window", "marker", "distinct_n", "refusal", "format")


class RuleSpec(BaseModel):
    """The content of karma_rule.json: the score of a response is the weighted sum of its rules."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format_version: Literal[1] = 1
    rules: list[Rule] = Field(min_length=1)

    @property
    def version(self) -> str:
        """Content hash of the spec (stable across key order and formatting of the file)."""
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()[:12]

    def describe(self) -> str:
        return "+".join(r.kind for r in self.rules)

    def score(self, text: str) -> float:
        return float(sum(r.weight * r.value(text) for r in self.rules))

    @classmethod
    def parse(cls, data: str | bytes | dict[str, Any], *, where: str = RULE_CONFIG_NAME) -> RuleSpec:
        """Validate a spec; any problem raises `RuleSpecError` naming each bad field."""
        try:
            if isinstance(data, dict):
                return cls.model_validate(data)
            return cls.model_validate_json(data)
        except ValidationError as exc:
            problems = "; ".join(_describe_error(e) for e in exc.errors())
            raise RuleSpecError(f"{where}: invalid rule spec: {problems}") from None


def _describe_error(err: dict[str, Any]) -> str:
    loc = ".".join(str(p) for p in err.get("loc", ()) if p not in KINDS)
    msg = str(err.get("msg", "")).removeprefix("Value error, ")
    return f"{loc}: {msg}" if loc else msg


def count_words(text: str) -> int:
    """Words as the rules count them: whitespace-separated tokens."""
    return len(text.split())


# ------------------------------------------------------------------ text statistics (the monitors share them)
def distinct_n(responses: Sequence[str], n: int) -> float | None:
    """Corpus-level distinct-n: distinct lower-cased word n-grams / all n-grams over `responses` (the
    `distinct_n` rule is this over one response); None when there is no n-gram at all. Read by the
    reward-hacking monitors of the service (`services/reward_api/monitor.py`) and the trainer
    (`services/policy_trainer/monitor.py`)."""
    seen: set[tuple[str, ...]] = set()
    total = 0
    for text in responses:
        grams = word_ngrams(text, n)
        seen.update(grams)
        total += len(grams)
    return len(seen) / total if total else None


def duplicate_rate(responses: Sequence[str]) -> float | None:
    """1 - distinct responses / responses (exact string equality); None for no responses."""
    return 1 - len(set(responses)) / len(responses) if responses else None


def pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Pearson correlation of two equal-length sequences; None for fewer than 2 points or a constant side."""
    n = len(x)
    if n != len(y):
        raise ValueError(f"pearson: {n} x values but {len(y)} y values")
    if n < 2:
        return None
    mx, my = math.fsum(x) / n, math.fsum(y) / n
    sxx = math.fsum((a - mx) ** 2 for a in x)
    syy = math.fsum((b - my) ** 2 for b in y)
    if sxx <= 1e-24 * n * max(1.0, mx * mx) or syy <= 1e-24 * n * max(1.0, my * my):
        return None
    sxy = math.fsum((a - mx) * (b - my) for a, b in zip(x, y, strict=True))
    return max(-1.0, min(1.0, sxy / math.sqrt(sxx * syy)))


@dataclass
class RuleEncoded:
    """One item for the batching worker: the response text; its length (for the token budget) is in words."""

    response: str
    truncated: bool = False

    def __len__(self) -> int:
        return max(count_words(self.response), 1)


class RuleRMConfig(BaseModel):
    """What `/info` reports for a rule model (the fields `KarmaRMConfig` has there)."""

    variant: str = "response"  # rules read the response only
    objective: str = "rule"
    backbone: str
    template_version: int = 0
    version: str
    spec: RuleSpec


class RuleRewardModel:
    """A `RuleSpec` behind the scoring interface of `RewardModel` (no weights, no tokenizer, no torch)."""

    device = "cpu"
    dtype = "float64"
    max_length = 0  # no token limit: nothing is ever truncated

    def __init__(self, spec: RuleSpec):
        self.spec = spec
        self.config = RuleRMConfig(backbone=f"rule:{spec.describe()}", version=spec.version, spec=spec)

    @classmethod
    def load(cls, path: str | Path, **_: Any) -> RuleRewardModel:
        """Load `path/karma_rule.json`; device / dtype arguments are accepted and ignored."""
        file = Path(path) / RULE_CONFIG_NAME
        if not file.is_file():
            raise FileNotFoundError(f"{path} is not a rule reward model: {RULE_CONFIG_NAME} is missing")
        return cls(RuleSpec.parse(file.read_text(), where=str(file)))

    @property
    def version(self) -> str:
        return self.spec.version

    def encode(self, item: Any, truncate: bool = True) -> RuleEncoded:
        return RuleEncoded(str(item.response))

    def forward(self, batch: Sequence[RuleEncoded]) -> list[float]:
        return [self.spec.score(e.response) for e in batch]

    def score(
        self, items: Sequence[Any], *, normalize: bool = False, batch_size: int = 32, truncate: bool = True
    ) -> list[float]:
        return self.forward([self.encode(it) for it in items])

    def normalize(self, scores: Sequence[float]) -> list[float]:
        """Identity: a rule's scale is its own (`normalize: true` changes nothing)."""
        return [float(s) for s in scores]


def write_rule_folder(spec: RuleSpec, out: str | Path) -> Path:
    """Write `karma_rule.json` (the spec) and the `karma_rm.json` stub; returns the folder."""
    from karma.rm.folder import write_manifest

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / RULE_CONFIG_NAME).write_text(spec.model_dump_json(indent=2) + "\n")
    write_manifest(
        out, kind="rule", spec_file=RULE_CONFIG_NAME, describe=spec.describe(), version=spec.version
    )
    return out
