"""A TRL reward function that scores through the KARMA reward service (`karma serve`):

    from karma.integrations.trl import trl_reward_func
    trainer = GRPOTrainer(..., reward_funcs=[trl_reward_func("http://127.0.0.1:8000")])

(also importable as `karma.client.trl_reward_func`, its former home). Standard (str) and conversational
(list of messages) prompts / completions; per-row metadata from dataset columns; one
`karma.client.RewardClient` per event loop, retrying a failing call as karma's trainer and the verl adapter do:
failing over to another replica at once, else backing off with jitter, until `deadline_s` (default 120 s)
runs out — a restart of a lone replica is ridden out; then `karma.client.RewardServiceError`.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

from karma.client import ADAPTER_DEADLINE_S, RewardClient
from karma.protocol import ScoreItem


def _text(content: Any) -> str:
    """Message content as text: a string, or the text parts of a multimodal content list."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            str(p.get("text", "")) for p in content if isinstance(p, Mapping) and p.get("type") == "text"
        )
    return str(content)


def _context(prompt: Any) -> str | list[dict[str, str]]:
    """A TRL prompt (str, or conversational messages) as our context; system messages are not context."""
    if isinstance(prompt, str):
        return prompt
    return [
        {"role": str(m.get("role", "user")), "content": _text(m.get("content"))}
        for m in prompt
        if m.get("role") != "system"
    ]


def _response(completion: Any) -> str:
    """A TRL completion (str, or a list of messages) as the response text: the assistant messages joined."""
    if isinstance(completion, str):
        return completion
    msgs = [m for m in completion if m.get("role", "assistant") == "assistant"] or list(completion)
    return "\n\n".join(_text(m.get("content")) for m in msgs)


def trl_reward_func(
    url: str | Sequence[str],
    *,
    api_key: str | None = None,
    model: str | None = None,
    normalize: bool = False,
    name: str = "karma_reward",
    metadata_column: str | None = "metadata",
    metadata_columns: Sequence[str] = (),
    deadline_s: float = ADAPTER_DEADLINE_S,
    max_retries: int | None = None,
    **client_kwargs: Any,
):
    """A TRL reward function (`GRPOTrainer(reward_funcs=[trl_reward_func(url)])`) scoring through the service.

    The returned `async def f(prompts, completions, completion_ids=None, **columns) -> list[float]` takes
    TRL 1.16's keyword arguments (`trainer_state`, `log_extra`, `log_metric` and the dataset columns) and
    handles standard (str) and conversational (list of messages) prompts/completions. Per-row metadata for
    the `full` variant comes from a dict column `metadata_column` and/or flat columns `metadata_columns`.
    One `RewardClient` per event loop (TRL awaits async rewards on its own loop thread); `await f.aclose()`
    closes them. The name TRL logs under is `name`. A failing call is retried until `deadline_s` (seconds) runs
    out, however many tries that takes (`max_retries=None`); other `client_kwargs` go to `RewardClient`.
    """
    clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, RewardClient] = weakref.WeakKeyDictionary()

    def client() -> RewardClient:
        loop = asyncio.get_running_loop()
        if loop not in clients:
            clients[loop] = RewardClient(
                url,
                api_key=api_key,
                model=model,
                deadline_s=deadline_s,
                max_retries=max_retries,
                **client_kwargs,
            )
        return clients[loop]

    async def reward(prompts, completions, completion_ids=None, **columns) -> list[float]:
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions")
        items = []
        for i, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
            meta: dict[str, Any] = {}
            if metadata_column and isinstance(columns.get(metadata_column), list):
                meta.update(columns[metadata_column][i] or {})
            for col in metadata_columns:
                meta[col] = columns[col][i]
            items.append(
                ScoreItem(
                    context=_context(prompt),
                    response=_response(completion),
                    metadata=meta or None,  # ScoreItem's validator makes numpy / NaN values plain
                )
            )
        result = await client().score(items, normalize=normalize)
        log_metric = columns.get("log_metric")
        if callable(log_metric) and result.truncated:
            log_metric(f"{name}/truncated_frac", sum(result.truncated) / len(result.truncated))
        return result.scores

    async def aclose() -> None:
        for c in list(clients.values()):
            await c.aclose()
        clients.clear()

    reward.__name__ = reward.__qualname__ = name
    reward.aclose = aclose  # type: ignore[attr-defined]
    return reward
