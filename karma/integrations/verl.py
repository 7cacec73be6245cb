"""A verl custom reward function that scores rollouts with the KARMA reward service (`karma serve`).

verl has no setting that points its reward loop at an external reward-model URL (`reward.reward_model`
launches its own vLLM on a model folder); its extension point for outside rewards is a custom reward
function, and this module is one:

    reward.custom_reward_function.path=pkg://karma.integrations.verl
    reward.custom_reward_function.name=compute_score_async        # or compute_score (sync)

verl (0.9) calls it once per rollout as `compute_score(data_source=..., solution_str=..., ground_truth=...,
extra_info=..., **kwargs)` — an `async def` is awaited on the reward-loop worker's event loop, a plain
function runs in that loop's thread pool — and both return `{"score": float, "karma_truncated": 0.0|1.0}`:
verl takes "score" as the reward and logs the other keys.

What is scored:

* the response: `solution_str` (verl decodes the response alone, without special tokens). If it holds a
  whole chat-templated conversation, its last assistant turn is the response (`karma.chat`).
* the context: verl does not pass the prompt to a reward function, so put it in each row's `extra_info`
  when making the dataset: `extra_info["prompt"]` — the chat messages (system ones are dropped) or a string
  (chat-templated or not). Also read, in this order: "raw_prompt", "question" (verl's GSM8K preprocessing
  writes it), "context". Without any, the earlier turns of a conversation in `solution_str`, else none.
* metadata for the `full` variant: `extra_info["metadata"]` (the /v1/score metadata fields).

Settings come from verl's `reward_kwargs` (merged into every call:
`+reward.custom_reward_function.reward_kwargs.url=http://rm:8000`), else from the environment of the
reward workers: `url` / KARMA_REWARD_URL (default http://127.0.0.1:8000; comma-separated = replicas),
`model` / KARMA_REWARD_MODEL (`/models/{model}/…`; default the service's default model), `api_key` /
KARMA_REWARD_API_KEY, `normalize` / KARMA_REWARD_NORMALIZE (1/true: normalised scores; default raw),
`chat_template` / KARMA_REWARD_CHAT_TEMPLATE (default auto), `ready_timeout_s` /
KARMA_REWARD_READY_TIMEOUT_S (how long the first call waits for `/ready`, default 300).

Each event loop has one `karma.client.RewardClient` per (url, model, api key) — one connection pool,
retries with backoff on connect errors / 5xx / 429, `RewardServiceError` on final failure (never a silent
0). The sync variant runs the same coroutine on one background event loop per process.
"""

from __future__ import annotations

import asyncio
import os
import threading
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from karma import chat
from karma.client import RewardClient
from karma.protocol import ScoreItem

URL_ENV = "KARMA_REWARD_URL"
DEFAULT_URL = "http://127.0.0.1:8000"
MODEL_ENV = "KARMA_REWARD_MODEL"
API_KEY_ENV = "KARMA_REWARD_API_KEY"
NORMALIZE_ENV = "KARMA_REWARD_NORMALIZE"
CHAT_TEMPLATE_ENV = "KARMA_REWARD_CHAT_TEMPLATE"
READY_TIMEOUT_ENV = "KARMA_REWARD_READY_TIMEOUT_S"

#: where the prompt is looked for in `extra_info`, in this order
PROMPT_KEYS = ("prompt", "raw_prompt", "question", "context")


@dataclass(frozen=True)
class Options:
    url: str = DEFAULT_URL
    model: str | None = None
    api_key: str | None = None
    normalize: bool = False
    chat_template: str = chat.AUTO
    ready_timeout_s: float = 300.0

    @classmethod
    def from_kwargs(cls, kwargs: Mapping[str, Any]) -> Options:
        """verl's reward_kwargs first, then the environment, then the defaults."""

        def pick(key: str, env: str) -> Any:
            value = kwargs.get(key)
            return os.environ.get(env) if value is None or value == "" else value

        normalize = pick("normalize", NORMALIZE_ENV)
        if isinstance(normalize, str):
            normalize = normalize.strip().lower() in ("1", "true", "yes", "on")
        return cls(
            url=str(pick("url", URL_ENV) or DEFAULT_URL),
            model=pick("model", MODEL_ENV) or None,
            api_key=pick("api_key", API_KEY_ENV) or None,
            normalize=bool(normalize),
            chat_template=str(pick("chat_template", CHAT_TEMPLATE_ENV) or chat.AUTO),
            ready_timeout_s=float(pick("ready_timeout_s", READY_TIMEOUT_ENV) or 300.0),
        )


# --------------------------------------------------------------------------------------------- what is scored
def _present(value: Any) -> bool:
    if value is None:
        return False
    try:
        return len(value) > 0  # str, list, numpy array (parquet lists arrive as arrays)
    except TypeError:
        return True


def _text(content: Any) -> str:
    """Message content as text: a string, or the text parts of a multimodal content list."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Mapping):
        return str(content.get("text", ""))
    try:
        parts = list(content)
    except TypeError:
        return str(content)
    return "\n".join(
        str(p.get("text", "")) for p in parts if isinstance(p, Mapping) and p.get("type", "text") == "text"
    )


def _messages_context(messages: Any) -> list[dict[str, str]]:
    out = []
    for m in messages:
        if isinstance(m, Mapping):
            role = str(m.get("role") or "user")
            if role != "system":
                out.append({"role": role, "content": _text(m.get("content"))})
        else:
            out.append({"role": "user", "content": str(m)})
    return out


def score_item(
    solution_str: str, extra_info: Mapping[str, Any] | None = None, chat_template: str = chat.AUTO
) -> ScoreItem:
    """The (context, response, metadata) scored for one verl rollout (see the module docstring)."""
    info = extra_info if isinstance(extra_info, Mapping) else {}
    template = chat.resolve(chat_template)
    conv = chat.conversation(solution_str or "", None, template)
    prompt = next((info[k] for k in PROMPT_KEYS if _present(info.get(k))), None)
    if prompt is None:
        context: Any = conv.context
    elif isinstance(prompt, str):
        context = chat.prompt_context(prompt, template)
    else:
        context = _messages_context(prompt)
    metadata = info.get("metadata")
    return ScoreItem(
        context=context,
        response=conv.response,
        metadata=dict(metadata) if isinstance(metadata, Mapping) else None,
    )


# --------------------------------------------------------------------------------------------- clients
@dataclass
class _Connection:
    client: RewardClient
    ready: asyncio.Task


_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple, _Connection]] = (
    weakref.WeakKeyDictionary()
)


async def _client(opts: Options) -> RewardClient:
    """This event loop's client for these options, once its service answered /ready."""
    per_loop = _clients.setdefault(asyncio.get_running_loop(), {})
    key = (opts.url, opts.model, opts.api_key)
    conn = per_loop.get(key)
    if conn is None:
        client = RewardClient(opts.url, api_key=opts.api_key, model=opts.model)
        conn = per_loop[key] = _Connection(
            client, asyncio.ensure_future(client.wait_ready(opts.ready_timeout_s))
        )
    try:
        await asyncio.shield(conn.ready)
    except Exception:
        if per_loop.get(key) is conn:  # the next call starts over (the service may come up later)
            del per_loop[key]
            await conn.client.aclose()
        raise
    return conn.client


async def compute_score_async(
    data_source: Any = None,
    solution_str: str = "",
    ground_truth: Any = None,
    extra_info: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> dict[str, float]:
    """verl's custom reward function, `async def` (verl awaits it on its reward loop). `data_source` and
    `ground_truth` are not used; `kwargs` are verl's reward_kwargs (see Options) and whatever else verl passes
    (`reward_router_address`, `reward_model_tokenizer`: ignored)."""
    opts = Options.from_kwargs(kwargs)
    item = score_item(solution_str, extra_info, opts.chat_template)
    client = await _client(opts)
    result = await client.score([item], normalize=opts.normalize)
    return {"score": float(result.scores[0]), "karma_truncated": float(result.truncated[0])}


_background: tuple[int, asyncio.AbstractEventLoop, threading.Thread] | None = None
_background_lock = threading.Lock()


def _background_loop() -> asyncio.AbstractEventLoop:
    """One event loop per process, in a daemon thread, for the sync variant (recreated after a fork)."""
    global _background
    with _background_lock:
        if _background is None or _background[0] != os.getpid() or not _background[2].is_alive():
            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=loop.run_forever, name="karma-verl-reward", daemon=True)
            thread.start()
            _background = (os.getpid(), loop, thread)
        return _background[1]


def compute_score(
    data_source: Any = None,
    solution_str: str = "",
    ground_truth: Any = None,
    extra_info: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> dict[str, float]:
    """verl's custom reward function, sync (verl runs it in a thread pool): `compute_score_async` run on this
    process's background event loop, so every thread shares one connection pool."""
    coro = compute_score_async(data_source, solution_str, ground_truth, extra_info, **kwargs)
    return asyncio.run_coroutine_threadsafe(coro, _background_loop()).result()


def close() -> None:
    """Close the sync variant's clients and stop its background loop (a later call starts a new one)."""
    global _background
    with _background_lock:
        current, _background = _background, None
    if current is None or current[0] != os.getpid():
        return
    _, loop, thread = current

    async def shutdown() -> None:
        for conn in _clients.pop(loop, {}).values():
            conn.ready.cancel()
            await conn.client.aclose()

    asyncio.run_coroutine_threadsafe(shutdown(), loop).result(timeout=30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=30)
    loop.close()
