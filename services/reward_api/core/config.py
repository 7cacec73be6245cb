"""The reward service's settings: one pydantic-settings class, every field also an env var `KARMA_<FIELD>`.

`karma serve`'s flags are generated from these fields (`karma.config.command`): defaults < `--config FILE`
< environment < flags. A bad value refuses to start with the field's name and where its value came from.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from karma.config import Cli
from karma.protocol import MODEL_NAME_PATTERN, Limits
from karma.rm.folder import CONFIG_NAME

_NAME = re.compile(MODEL_NAME_PATTERN)


def parse_model_specs(value: Any) -> dict[str, str]:
    """`NAME=PATH` specs (a list, or one string separated by commas), a JSON object, or a dict → {name: path}."""
    if isinstance(value, dict):
        return {str(k): str(v) for k, v in value.items()}
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("{"):
            return parse_model_specs(json.loads(text))
        value = [part for part in text.split(",") if part.strip()]
    out: dict[str, str] = {}
    for spec in value:
        name, sep, path = str(spec).partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise ValueError(f"model spec {spec!r} is not NAME=PATH")
        if name in out:
            raise ValueError(f"model name {name!r} given twice")
        out[name] = path
    return out


class Settings(BaseSettings):
    """Everything `karma serve` can be told; env prefix KARMA_ (e.g. KARMA_API_KEY, KARMA_MAX_WAIT_MS)."""

    model_config = SettingsConfigDict(env_prefix="KARMA_", extra="forbid", validate_default=True)

    models: Annotated[dict[str, Path], NoDecode, Cli("--model", "-m")] = Field(
        default_factory=dict,
        description="NAME=PATH of a reward-model folder to serve; repeatable (env: NAME=PATH[,NAME=PATH] or a "
        "JSON object)",
    )
    default_model: Annotated[str | None, Cli("--default")] = Field(
        None, description="model behind the un-prefixed routes; unset: the first"
    )
    host: str = Field("127.0.0.1", description="bind address (loopback by default)")
    port: int = Field(8000, ge=0, le=65535, description="port (0: any free one)")
    api_key: SecretStr | None = Field(
        None, description="if set, scoring and /info need `Authorization: Bearer KEY`"
    )
    admin_token: SecretStr | None = Field(None, description="enables the model-management routes")
    model_roots: Annotated[list[Path], NoDecode, Cli("--model-root")] = Field(
        default_factory=list,
        description=f"folder admin routes may load models from; repeatable (env: {os.pathsep}-separated)",
    )
    device: str = Field(
        "auto", pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$", description="auto | cpu | cuda[:N] | mps"
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16", "float64"] = Field(
        "auto",
        description="auto: float32 on CPU, bfloat16 on CUDA (float64: numerical checks on tiny models)",
    )
    max_client_batch_size: int = Field(
        256, ge=1, le=65536, description="items per request (422 above: the schema says maxItems)"
    )
    max_body_bytes: int = Field(
        8 * 2**20,
        ge=1024,
        description="request body size (413 above); 8 MiB is 256 items of 32 KB, more text than a 512-token "
        "model reads (each segment is cut to 16 characters a token before tokenising)",
    )
    max_header_bytes: int = Field(
        16 * 2**10,
        ge=1024,
        le=2**20,
        description="request line + headers: 431 above (uvicorn's h11_max_incomplete_event_size also stops "
        "reading a head that arrives in pieces past it: 400)",
    )
    header_timeout_s: float = Field(
        10.0,
        gt=0,
        le=3600,
        description="a connection must send a whole request line and headers within this of connecting (or of "
        "its previous response), else it is closed (uvicorn has no such setting: karma's protocol class)",
    )
    body_timeout_s: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="a request's body must arrive within this of its headers (408 after)",
    )
    keep_alive_s: int = Field(
        5,
        ge=1,
        le=3600,
        description="an idle kept-alive connection is closed after this (uvicorn's timeout_keep_alive)",
    )
    max_queue_items: int = Field(4096, ge=1, description="items waiting per model (429 above)")
    max_queue_wait_s: float = Field(
        5.0,
        gt=0,
        le=3600,
        description="admission by time: 429 when the work queued ahead of a request would keep it waiting "
        "longer than this, at the model's measured throughput",
    )
    max_batch_tokens: int = Field(16384, ge=16, description="padded tokens per forward batch")
    max_wait_ms: float = Field(2.0, ge=0, le=10_000, description="how long a batch waits to fill")
    padding_tolerance: float = Field(
        0.25, ge=0, description="a batch's longest item may be this fraction longer than its shortest"
    )
    retry_after_s: int = Field(
        1,
        ge=1,
        le=3600,
        description="Retry-After with 503, and with 429 before a model's throughput is known",
    )
    torch_threads: int | None = Field(
        None, ge=1, le=1024, description="torch intra-op threads (default: torch's)"
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")
    chat_templates: Annotated[dict[str, str], NoDecode, Cli("--chat-template")] = Field(
        default_factory=dict,
        description="how /get_reward and /classify read chat-templated text, per model: [NAME=]TEMPLATE "
        "with TEMPLATE auto | none | chatml | llama3 | gemma | mistral | a tokenizer folder (its chat "
        "template and special tokens); without NAME= for every model; default auto (see karma.chat)",
    )
    normalize_models: Annotated[list[str], NoDecode, Cli("--normalize-model")] = Field(
        default_factory=list,
        description="models whose scores are normalised unless the request says otherwise ('*': all), for "
        "clients that cannot ask (OpenRLHF)",
    )
    score_cache_items: int = Field(
        100_000,
        ge=0,
        le=100_000_000,
        description="recent scores kept per model version, keyed on a 16-byte hash of the item (0: no cache)",
    )
    monitor_window: int = Field(
        1024,
        ge=0,
        le=1_000_000,
        description="recent items per model in GET /v1/monitor's statistics (0: off)",
    )

    @field_validator("models", mode="before")
    @classmethod
    def _models(cls, value: Any) -> Any:
        return parse_model_specs(value) if value is not None else {}

    @field_validator("models")
    @classmethod
    def _model_folders(cls, value: dict[str, Path]) -> dict[str, Path]:
        for name, path in value.items():
            if not _NAME.match(name):
                raise ValueError(f"model name {name!r} must match {MODEL_NAME_PATTERN}")
            if not (path / CONFIG_NAME).is_file():
                raise ValueError(
                    f"model {name!r}: {path} is not a KARMA reward-model folder (no {CONFIG_NAME})"
                )
        return {name: path.expanduser().resolve() for name, path in value.items()}

    @field_validator("model_roots", mode="before")
    @classmethod
    def _roots(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [p for p in text.split(os.pathsep) if p.strip()]
        return value

    @field_validator("model_roots")
    @classmethod
    def _roots_exist(cls, value: list[Path]) -> list[Path]:
        for root in value:
            if not root.expanduser().is_dir():
                raise ValueError(f"model root {root} is not a directory")
        return [root.expanduser().resolve() for root in value]

    @field_validator("chat_templates", mode="before")
    @classmethod
    def _chat_templates(cls, value: Any) -> Any:
        if value is None:
            return {}
        if isinstance(value, str):
            text = value.strip()
            value = json.loads(text) if text.startswith("{") else [p for p in text.split(",") if p.strip()]
        if isinstance(value, dict):
            return {str(k): str(v) for k, v in value.items()}
        out: dict[str, str] = {}
        for spec in value:
            name, _, template = str(spec).partition("=") if "=" in str(spec) else ("*", "", str(spec))
            name = name.strip() or "*"
            if name in out:
                raise ValueError(f"chat template for {name!r} given twice")
            out[name] = template.strip()
        return out

    @field_validator("chat_templates")
    @classmethod
    def _chat_templates_known(cls, value: dict[str, str]) -> dict[str, str]:
        from karma.chat import check_template

        return {name: check_template(template) for name, template in value.items()}

    @field_validator("normalize_models", mode="before")
    @classmethod
    def _normalize_models(cls, value: Any) -> Any:
        if value is None:
            return []
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [p.strip() for p in text.split(",") if p.strip()]
        return value

    @model_validator(mode="after")
    def _per_model_names(self) -> Settings:
        """Per-model settings must name served models (a typo would silently do nothing), unless models may
        still be added by the admin routes."""
        for field in ("chat_templates", "normalize_models"):
            for name in getattr(self, field):
                if name != "*" and not _NAME.match(name):
                    raise ValueError(f"{field}: model name {name!r} must match {MODEL_NAME_PATTERN} (or *)")
                if name != "*" and self.models and self.admin_token is None and name not in self.models:
                    raise ValueError(
                        f"{field}: {name!r} is not among the served models ({', '.join(self.models)})"
                    )
        return self

    def chat_template(self, model: str) -> str:
        """The chat-template setting of a model (`karma.chat`: auto, none, a name or a tokenizer folder)."""
        return self.chat_templates.get(model) or self.chat_templates.get("*", "auto")

    def normalize_default(self, model: str) -> bool:
        """Whether a request to `model` that does not say `normalize` gets normalised scores."""
        return model in self.normalize_models or "*" in self.normalize_models

    @model_validator(mode="after")
    def _default(self) -> Settings:
        if self.default_model is None and self.models:
            self.default_model = next(iter(self.models))
        if self.default_model is not None and self.default_model not in self.models:
            known = ", ".join(self.models) or "none"
            raise ValueError(f"default model {self.default_model!r} is not among the served models ({known})")
        if self.max_queue_items < self.max_client_batch_size:
            raise ValueError(
                f"max_queue_items ({self.max_queue_items}) must be at least max_client_batch_size "
                f"({self.max_client_batch_size}), or a full-size request could never be queued"
            )
        return self

    def limits(self) -> Limits:
        return Limits(
            max_client_batch_size=self.max_client_batch_size,
            max_body_bytes=self.max_body_bytes,
            max_queue_items=self.max_queue_items,
            max_queue_wait_s=self.max_queue_wait_s,
            max_batch_tokens=self.max_batch_tokens,
            max_wait_ms=self.max_wait_ms,
            padding_tolerance=self.padding_tolerance,
            score_cache_items=self.score_cache_items,
            monitor_window=self.monitor_window,
        )
