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
reward workers, else the defaults:

==================  =================================  ======================================================
reward_kwargs       environment                        meaning (default)
==================  =================================  ======================================================
url                 KARMA_REWARD_URL                   the service (http://127.0.0.1:8000; a,b = replicas)
model               KARMA_REWARD_MODEL                 `/models/{model}/...` (the service's default model)
api_key             KARMA_REWARD_API_KEY               bearer token (none)
normalize           KARMA_REWARD_NORMALIZE             1/true: normalised scores (raw)
chat_template       KARMA_REWARD_CHAT_TEMPLATE         how templated text is split into turns (auto)
ready_timeout_s     KARMA_REWARD_READY_TIMEOUT_S       how long the first call waits for `/ready` (300)
deadline_s          KARMA_REWARD_DEADLINE_S            how long one rollout's score is retried (120)
on_missing_prompt   KARMA_REWARD_ON_MISSING_PROMPT     a row without a prompt: warn / error / ignore (warn)
==================  =================================  ======================================================

Any other `reward_kwargs` key is an error that names it and the accepted ones (a typo such as `modle=` must
not score with the default model); verl's own `reward_router_address` / `reward_model_tokenizer` are
accepted and not used.

Each event loop has one `karma.client.RewardClient` per (url, model, api key, deadline) — one connection
pool, the same retries as karma's own trainer: connect errors / 5xx / 429 fail over to another replica at
once, else back off with jitter, until `deadline_s` runs out (not a count of tries: a 12-13 s restart of a
lone replica is ridden out); then `RewardServiceError` (never a silent 0). The sync variant runs the same
coroutine on one background event loop per process.

A row without a prompt (none of the `extra_info` keys above, and no earlier turns in `solution_str`) is
scored without context, which is rarely meant: it logs a warning once per process, is counted
(`missing_prompt_rows()`, and `"karma_missing_prompt": 1.0` in the returned dict, which verl keeps with the
row's reward_extra_info), and with `on_missing_prompt=error` raises instead.

Which verl reward manager: the default (`naive`) and `dapo` take either variant; verl's `remote` manager
(`reward.reward_manager.name=remote`, scoring in separate worker processes) refuses `async def` functions at
start ("Async reward score is not supported in remote reward manager"), so with it use `compute_score`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import difflib
import logging
import os
import threading
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from karma import chat
from karma.client import ADAPTER_DEADLINE_S, RewardClient
from karma.protocol import ScoreItem

log = logging.getLogger(__name__)

URL_ENV = "KARMA_REWARD_URL"
DEFAULT_URL = "http://127.0.0.1:8000"
MODEL_ENV = "KARMA_REWARD_MODEL"
API_KEY_ENV = "KARMA_REWARD_API_KEY"
NORMALIZE_ENV = "KARMA_REWARD_NORMALIZE"
CHAT_TEMPLATE_ENV = "KARMA_REWARD_CHAT_TEMPLATE"
READY_TIMEOUT_ENV = "KARMA_REWARD_READY_TIMEOUT_S"
DEADLINE_ENV = "KARMA_REWARD_DEADLINE_S"
ON_MISSING_PROMPT_ENV = "KARMA_REWARD_ON_MISSING_PROMPT"

#: where the prompt is looked for in `extra_info`, in this order
PROMPT_KEYS = ("prompt", "raw_prompt", "question", "context")
#: what a row without a prompt does
ON_MISSING_PROMPT = ("warn", "error", "ignore")
#: keyword arguments verl itself adds to the call (with a reward router); accepted, not used
VERL_KWARGS = frozenset({"reward_router_address", "reward_model_tokenizer"})


@dataclass(frozen=True)
class Options:
    url: str = DEFAULT_URL
    model: str | None = None
    api_key: str | None = None
    normalize: bool = False
    chat_template: str = chat.AUTO
    ready_timeout_s: float = 300.0
    deadline_s: float = ADAPTER_DEADLINE_S
    on_missing_prompt: str = "warn"

    def __post_init__(self) -> None:
        for key in ("ready_timeout_s", "deadline_s"):
            if not getattr(self, key) > 0:
                raise ValueError(
                    f"karma.integrations.verl: {key} must be > 0 seconds, got {getattr(self, key)}"
                )
        if self.on_missing_prompt not in ON_MISSING_PROMPT:
            raise ValueError(
                f"karma.integrations.verl: on_missing_prompt must be one of {', '.join(ON_MISSING_PROMPT)}, "
                f"got {self.on_missing_prompt!r}"
            )

    @classmethod
    def keys(cls) -> list[str]:
        """The accepted reward_kwargs keys."""
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_kwargs(cls, kwargs: Mapping[str, Any]) -> Options:
        """verl's reward_kwargs first, then the environment, then the defaults. An unknown key is a TypeError
        naming it and the accepted keys; a bad value a ValueError naming its key."""
        accepted = cls.keys()
        unknown = sorted(set(kwargs) - set(accepted) - VERL_KWARGS)
        if unknown:
            hints = [
                f"{k!r} (did you mean {close[0]!r}?)"
                if (close := difflib.get_close_matches(k, accepted, 1))
                else repr(k)
                for k in unknown
            ]
            raise TypeError(
                f"karma.integrations.verl: unknown reward_kwargs key{'s' if len(unknown) > 1 else ''} "
                f"{', '.join(hints)}; accepted: {', '.join(accepted)}"
            )

        def pick(key: str, env: str) -> Any:
            value = kwargs.get(key)
            return os.environ.get(env) if value is None or value == "" else value

        def seconds(key: str, env: str, default: float) -> float:
            value = pick(key, env)
            if value is None or value == "":
                return default
            try:
                return float(value)
            except (TypeError, ValueError):
                raise ValueError(
                    f"karma.integrations.verl: {key} ({env}) must be a number of seconds, got {value!r}"
                ) from None

        normalize = pick("normalize", NORMALIZE_ENV)
        if isinstance(normalize, str):
            normalize = normalize.strip().lower() in ("1", "true", "yes", "on")
        return cls(
            url=str(pick("url", URL_ENV) or DEFAULT_URL),
            model=pick("model", MODEL_ENV) or None,
            api_key=pick("api_key", API_KEY_ENV) or None,
            normalize=bool(normalize),
            chat_template=str(pick("chat_template", CHAT_TEMPLATE_ENV) or chat.AUTO),
            ready_timeout_s=seconds("ready_timeout_s", READY_TIMEOUT_ENV, 300.0),
            deadline_s=seconds("deadline_s", DEADLINE_ENV, ADAPTER_DEADLINE_S),
            on_missing_prompt=str(pick("on_missing_prompt", ON_MISSING_PROMPT_ENV) or "warn").strip().lower(),
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


_missing = {"rows": 0, "warned": False}
_missing_lock = threading.Lock()


def missing_prompt_rows() -> int:
    """Rows scored without a prompt in this process so far."""
    return _missing["rows"]


def _missing_prompt(opts: Options, extra_info: Any) -> None:
    """A row without a prompt: counted; an error, a warning (once per process) or nothing, by the option."""
    keys = sorted(extra_info) if isinstance(extra_info, Mapping) else []
    problem = (
        f"a row has no prompt: extra_info has none of {', '.join(map(repr, PROMPT_KEYS))} "
        f"(its keys: {', '.join(map(repr, keys)) or 'none'}) and solution_str holds no earlier turns"
    )
    if opts.on_missing_prompt == "error":
        raise ValueError(
            f"karma.integrations.verl: {problem}; put the prompt in extra_info['prompt'] when making the "
            "dataset (on_missing_prompt=error)"
        )
    with _missing_lock:
        _missing["rows"] += 1
        warn = opts.on_missing_prompt == "warn" and not _missing["warned"]
        _missing["warned"] |= warn
    if warn:
        log.warning(
            "karma.integrations.verl: %s, so it is scored without context. Put the prompt in "
            "extra_info['prompt'] when making the dataset (on_missing_prompt=error stops on such rows, "
            "=ignore silences this). Counted as 'karma_missing_prompt' in each returned dict; this warning "
            "is shown once per process.",
            problem,
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
    key = (opts.url, opts.model, opts.api_key, opts.deadline_s)
    conn = per_loop.get(key)
    if conn is None:
        client = RewardClient(
            opts.url, api_key=opts.api_key, model=opts.model, deadline_s=opts.deadline_s, max_retries=None
        )
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
    `ground_truth` are not used; `kwargs` are verl's reward_kwargs (see Options) and what verl itself passes
    (`reward_router_address`, `reward_model_tokenizer`: not used); any other key raises."""
    opts = Options.from_kwargs(kwargs)
    item = score_item(solution_str, extra_info, opts.chat_template)
    if not item.context:
        _missing_prompt(opts, extra_info)
    client = await _client(opts)
    result = await client.score([item], normalize=opts.normalize)
    return {
        "score": float(result.scores[0]),
        "karma_truncated": float(result.truncated[0]),
        "karma_missing_prompt": 0.0 if item.context else 1.0,
    }


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
