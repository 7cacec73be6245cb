"""Wire schemas of the reward service, shared by the server (`services/reward_api`) and the client
(`karma.client`). Pydantic only: importing this module pulls in neither torch nor FastAPI.

Three request dialects score the same model:

* `/v1/score` — ours: (context, response, metadata) items, raw or normalised scores, a `truncated` flag.
* `/get_reward` — OpenRLHF's remote reward model (`query`, `prompts`, `labels` → `rewards`, `scores`).
* `/classify` — vLLM's pooling API as verl's reward loop calls it (`input` / `messages` → `data[].probs`).

Our own requests refuse unknown fields (a typo must not silently change a score); the two compatibility
dialects ignore fields they do not use, as the servers they imitate do.
"""

from __future__ import annotations

import math
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.json_schema import SkipJsonSchema

#: model names as they appear in URLs (`/models/{name}/v1/score`)
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
ModelName = Annotated[
    str, Field(pattern=MODEL_NAME_PATTERN, description="model name, as used in /models/{name}/")
]

ErrorType = Literal[
    "validation",  # 422
    "payload_too_large",  # 413 (body), 431 (headers)
    "timeout",  # 408: the request body did not arrive within body_timeout_s
    "overloaded",  # 429
    "unauthorized",  # 401
    "forbidden",  # 403
    "not_found",  # 404
    "method_not_allowed",  # 405
    "conflict",  # 409
    "unsupported_media_type",  # 415
    "not_ready",  # 503
    "model_load",  # 422: a folder that is not a loadable reward model
    "internal",  # 500
]


class _Strict(BaseModel):
    # strict: no silent coercion ("1" is not 1, 0 is not false) — the JSON types are the contract
    model_config = ConfigDict(extra="forbid", strict=True)


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class ErrorBody(BaseModel):
    """The one error body every route returns."""

    error: str
    error_type: ErrorType


# --------------------------------------------------------------------------------------------- /v1/score
MetadataValue = str | int | float | bool | None


class Turn(_Strict):
    """One message of the context; only `content` is read (roles are accepted for chat-style callers)."""

    role: str = Field("user", max_length=64)
    content: str


class Metadata(BaseModel):
    """What the `full` variant reads (all optional; a missing key renders as "?"). Other keys are accepted
    and ignored by the templates."""

    model_config = ConfigDict(extra="allow", strict=True)
    __pydantic_extra__: dict[str, MetadataValue]

    subreddit: str | None = Field(None, max_length=128)
    depth: int | None = Field(None, ge=0, le=100_000)
    seconds_since_post: float | None = Field(None, allow_inf_nan=False, ge=-1e12, le=1e12)
    seconds_since_parent: float | None = Field(None, allow_inf_nan=False, ge=-1e12, le=1e12)
    created_utc: float | None = Field(
        None, allow_inf_nan=False, ge=0, le=253_402_300_799, description="unix seconds (year <= 9999)"
    )
    sibling_count: int | None = Field(None, ge=0, le=10_000_000)

    @model_validator(mode="before")
    @classmethod
    def _plain_values(cls, data: Any) -> Any:
        """numpy scalars → Python, NaN (pandas' missing value) → null, integral floats → int for counts."""
        if not isinstance(data, dict):
            return data
        out = {}
        for key, value in data.items():
            if hasattr(value, "item") and callable(value.item):
                value = value.item()
            if isinstance(value, float) and math.isnan(value):
                value = None
            elif key in ("depth", "sibling_count") and isinstance(value, float) and value.is_integer():
                value = int(value)  # 2.0 is an integer in JSON Schema too (pandas makes ints float)
            out[key] = value
        return out


class ScoreItem(_Strict):
    """One (context, response) pair. `context` is a string or a list of turns, root first."""

    context: str | list[Turn] = Field("", description="thread context: post, then ancestor comments")
    response: str = Field(description="the text being scored (never truncated unless it alone is too long)")
    metadata: Metadata | None = Field(None, description="read by the `full` variant")

    def rm_metadata(self) -> dict[str, Any] | None:
        return None if self.metadata is None else self.metadata.model_dump(exclude_none=True)


class ScoreRequest(_Strict):
    items: list[ScoreItem] = Field(
        min_length=1, description="at most max_client_batch_size items (see /info)"
    )
    normalize: bool = Field(
        False,
        description="standardise with the model's saved validation mean/std; when absent, the server's "
        "per-model default (`--normalize-model`, off unless set)",
    )
    truncate: bool = Field(
        True, description="cut over-long context from the left (true) or reject the request with 422 (false)"
    )
    components: bool = Field(
        False,
        description="also return each component's values per item (a composed reward's components, unweighted; "
        "a plain model is its own one component)",
    )
    group_normalize: bool = Field(
        False,
        description="z-score the scores within the items sharing one context (GRPO / RLOO callers): "
        "(s - mean) / std over the group, population std; 0 for a group of one or of equal scores",
    )


class ScoreResponse(BaseModel):
    model: str
    version: str = Field(description="content hash of the model that produced every score in this response")
    scores: list[float]
    truncated: list[bool]
    components: dict[str, list[float]] | None = Field(
        None,
        description="with `components: true`: each component's value per item, before weighting and group "
        "normalisation (scores = Σ weight · component, then group-normalised if asked)",
    )


# --------------------------------------------------------------------------------------------- OpenRLHF
class GetRewardRequest(_Lenient):
    """OpenRLHF `--reward.remote_url`: each query is prompt + response as decoded text (chat markup and
    special tokens kept; the service reads them off, see `karma.chat`)."""

    query: list[str] = Field(min_length=1)
    prompts: list[str] | None = None
    labels: list[Any] | None = Field(
        None,
        description="any JSON per query (OpenRLHF sends its dataset's label column as is); a label that is "
        "an object — or a string holding a JSON object — may carry `metadata` (the fields of /v1/score's "
        "metadata) for the `full` variant; everything else in labels is ignored",
    )
    normalize: bool | None = Field(
        None,
        description="our extension (OpenRLHF never sends it); default: the server's `normalize_models`",
    )


class GetRewardResponse(BaseModel):
    rewards: list[float]
    scores: list[float] = Field(description="sigmoid(rewards), in [0, 1]")
    extra_logs: dict[str, list[float]]


# --------------------------------------------------------------------------------------------- vLLM
class ClassifyRequest(_Lenient):
    """vLLM `/classify`: an `input` text is scored as a response without context — unless it is
    chat-templated (e.g. rendered with the RM folder's chat template), then its last assistant turn is the
    response and the earlier turns its context; with `messages`, the last message is the response and the
    earlier ones its context."""

    model_config = ConfigDict(
        extra="ignore",
        strict=True,
        # exactly one of input / messages, stated in the schema too (a client or fuzzer reads it there)
        json_schema_extra={"oneOf": [{"required": ["input"]}, {"required": ["messages"]}]},
    )

    model: str | None = None
    input: str | Annotated[list[str], Field(min_length=1)] | SkipJsonSchema[None] = None
    messages: Annotated[list[Turn], Field(min_length=1)] | SkipJsonSchema[None] = None
    use_activation: bool | None = Field(None, description="sigmoid on the score (default true, as vLLM)")
    activation: bool | None = Field(None, description="older name of use_activation")
    normalize: bool | None = Field(
        None, description="our extension: standardise before the activation; default: the model's setting"
    )

    @model_validator(mode="before")
    @classmethod
    def _exactly_one(cls, data: Any) -> Any:
        if isinstance(data, dict):
            given = [k for k in ("input", "messages") if k in data]
            if len(given) != 1:
                raise ValueError("send exactly one of `input` (text or list of texts) and `messages`")
            if data[given[0]] is None:
                raise ValueError(f"`{given[0]}` is null")
        return data


class ClassifyData(BaseModel):
    index: int
    label: str | None
    probs: list[float]
    num_classes: int


class ClassifyUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int
    completion_tokens: int = 0


class ClassifyResponse(BaseModel):
    id: str = Field(default_factory=lambda: f"classify-{uuid.uuid4().hex}")
    object: Literal["list"] = "list"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    data: list[ClassifyData]
    usage: ClassifyUsage


# --------------------------------------------------------------------------------------------- operations
class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"


class ReadyResponse(BaseModel):
    ready: bool
    models: dict[str, Literal["loading", "ready", "failed"]]
    errors: dict[str, str] = {}


class ModelInfo(BaseModel):
    name: str
    version: str
    variant: str
    objective: str
    backbone: str
    template_version: int
    max_length: int
    dtype: str
    device: str
    default: bool
    loaded_at: float
    path: str | None = Field(None, description="folder; shown on admin routes only")


class Limits(BaseModel):
    max_client_batch_size: int
    max_body_bytes: int
    max_queue_items: int
    max_queue_wait_s: float
    max_batch_tokens: int
    max_wait_ms: float
    padding_tolerance: float
    score_cache_items: int = Field(description="recent scores kept per model version (0: no cache)")
    monitor_window: int = Field(description="recent items per model in the monitor's statistics (0: off)")


class InfoResponse(BaseModel):
    service: Literal["karma-reward"] = "karma-reward"
    default_model: str | None
    models: list[ModelInfo]
    limits: Limits
    auth: dict[str, bool] = Field(description="which credentials are configured: api_key, admin")


class MonitorStats(BaseModel):
    """Rolling statistics of what one model scored: its last `n` items (at most `window`), of one version
    (the window restarts when the version changes). `null` where a figure is undefined (no items; a
    correlation with a constant side)."""

    version: str
    window: int
    n: int = Field(description="items in the window")
    score_mean: float | None
    score_std: float | None = Field(description="population std (ddof 0)")
    length_mean: float | None = Field(description="response length, in whitespace-separated words")
    score_length_corr: float | None = Field(
        description="Pearson correlation of score and response length in words"
    )
    distinct_1: float | None = Field(
        description="distinct word unigrams / unigrams over the window's responses"
    )
    distinct_2: float | None = Field(
        description="distinct word bigrams / bigrams over the window's responses"
    )
    duplicate_rate: float | None = Field(description="1 - distinct responses / responses")
    truncated_share: float | None = Field(description="share of items whose input was cut")


class MonitorResponse(BaseModel):
    models: dict[str, MonitorStats]


class ModelList(BaseModel):
    default_model: str | None
    models: list[ModelInfo]


#: a folder path: no NUL byte (no file system takes one)
FolderPath = Annotated[str, Field(min_length=1, max_length=4096, pattern=r"^[^\x00]+$")]


class LoadModelRequest(_Strict):
    name: ModelName
    path: FolderPath


class SwapModelRequest(_Strict):
    path: FolderPath
    force: bool = Field(
        False, description="swap even if the new folder's variant differs from the current one"
    )


class DefaultModelRequest(_Strict):
    name: ModelName


class SwapResponse(BaseModel):
    model: ModelInfo
    previous_version: str


def sigmoid(x: float) -> float:
    """`scores` of /get_reward and `probs` of /classify: the raw score squashed into (0, 1), overflow-safe."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


def as_score_item(item: Any) -> ScoreItem:
    """A ScoreItem from a ScoreItem, a dict, or anything with context/response/metadata attributes."""
    if isinstance(item, ScoreItem):
        return item
    if isinstance(item, dict):
        return ScoreItem.model_validate(item)
    if hasattr(item, "response"):
        ctx = getattr(item, "context", "") or ""
        if not isinstance(ctx, str):
            ctx = [t if isinstance(t, dict) else {"role": "user", "content": str(t)} for t in ctx]
        return ScoreItem.model_validate(
            {"context": ctx, "response": item.response, "metadata": getattr(item, "metadata", None)}
        )
    raise TypeError(
        f"cannot score a {type(item).__name__}: expected ScoreItem, dict or an object with .response"
    )
