"""`karma serve`: the reward service on uvicorn. Every option mirrors a `Settings` field and may instead come
from its environment variable (`KARMA_<FIELD>`); an option given on the command line wins."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

log = logging.getLogger(__name__)


def build_settings(**options):
    """Settings from the options the user gave (None = not given → env var or default)."""
    from pydantic import ValidationError

    from services.reward_api.core.config import Settings

    given = {k: v for k, v in options.items() if v is not None and v != []}
    try:
        return Settings(**given)
    except ValidationError as exc:
        lines = [f"  {'.'.join(str(x) for x in e['loc']) or 'settings'}: {e['msg']}" for e in exc.errors()]
        raise typer.BadParameter("invalid settings:\n" + "\n".join(lines)) from None


def serve(
    model: Annotated[
        list[str] | None,
        typer.Option(
            "--model", "-m", help="NAME=PATH of a reward-model folder; repeat for several [KARMA_MODELS]"
        ),
    ] = None,
    default: Annotated[
        str | None,
        typer.Option("--default", help="model behind the un-prefixed routes [KARMA_DEFAULT_MODEL]"),
    ] = None,
    host: Annotated[str | None, typer.Option(help="bind address; loopback by default [KARMA_HOST]")] = None,
    port: Annotated[int | None, typer.Option(help="port, default 8000 [KARMA_PORT]")] = None,
    api_key: Annotated[
        str | None, typer.Option(help="require `Authorization: Bearer KEY` on scoring routes [KARMA_API_KEY]")
    ] = None,
    admin_token: Annotated[
        str | None, typer.Option(help="enable model management routes with this token [KARMA_ADMIN_TOKEN]")
    ] = None,
    model_root: Annotated[
        list[Path] | None,
        typer.Option(
            "--model-root", help="folder admin routes may load from; repeatable [KARMA_MODEL_ROOTS]"
        ),
    ] = None,
    device: Annotated[str | None, typer.Option(help="auto | cpu | cuda[:N] [KARMA_DEVICE]")] = None,
    dtype: Annotated[
        str | None,
        typer.Option(help="auto | float32 | bfloat16 | float16 (auto: fp32 CPU, bf16 GPU) [KARMA_DTYPE]"),
    ] = None,
    max_client_batch_size: Annotated[
        int | None,
        typer.Option(
            help="items per request, 422 above (the schema says maxItems) [KARMA_MAX_CLIENT_BATCH_SIZE]"
        ),
    ] = None,
    max_body_bytes: Annotated[
        int | None, typer.Option(help="body size, 413 above [KARMA_MAX_BODY_BYTES]")
    ] = None,
    max_queue_items: Annotated[
        int | None, typer.Option(help="queued items per model, 429 above [KARMA_MAX_QUEUE_ITEMS]")
    ] = None,
    max_queue_wait_s: Annotated[
        float | None,
        typer.Option(
            help="429 when the queued work ahead would wait longer than this [KARMA_MAX_QUEUE_WAIT_S]"
        ),
    ] = None,
    max_batch_tokens: Annotated[
        int | None, typer.Option(help="padded tokens per forward batch [KARMA_MAX_BATCH_TOKENS]")
    ] = None,
    max_wait_ms: Annotated[
        float | None, typer.Option(help="how long a batch waits to fill [KARMA_MAX_WAIT_MS]")
    ] = None,
    padding_tolerance: Annotated[
        float | None,
        typer.Option(
            help="a batch's longest item may be this fraction longer than its shortest [KARMA_PADDING_TOLERANCE]"
        ),
    ] = None,
    retry_after_s: Annotated[
        int | None, typer.Option(help="Retry-After with 429 [KARMA_RETRY_AFTER_S]")
    ] = None,
    torch_threads: Annotated[
        int | None, typer.Option(help="torch intra-op threads [KARMA_TORCH_THREADS]")
    ] = None,
    log_level: Annotated[
        str | None, typer.Option(help="debug | info | warning | error [KARMA_LOG_LEVEL]")
    ] = None,
    chat_template: Annotated[
        list[str] | None,
        typer.Option(
            "--chat-template",
            help="[NAME=]TEMPLATE: how /get_reward and /classify read chat markup — auto (default), none, "
            "chatml, llama3, gemma, mistral, or a tokenizer folder; without NAME= for every model; "
            "repeatable [KARMA_CHAT_TEMPLATES]",
        ),
    ] = None,
    normalize_model: Annotated[
        list[str] | None,
        typer.Option(
            "--normalize-model",
            help="model whose scores are normalised unless a request says otherwise (* = all); repeatable "
            "[KARMA_NORMALIZE_MODELS]",
        ),
    ] = None,
) -> None:
    """Serve KARMA reward models over HTTP: /v1/score, /get_reward (OpenRLHF), /classify (vLLM/verl)."""
    settings = build_settings(
        models=model,
        default_model=default,
        host=host,
        port=port,
        api_key=api_key,
        admin_token=admin_token,
        model_roots=model_root,
        device=device,
        dtype=dtype,
        max_client_batch_size=max_client_batch_size,
        max_body_bytes=max_body_bytes,
        max_queue_items=max_queue_items,
        max_queue_wait_s=max_queue_wait_s,
        max_batch_tokens=max_batch_tokens,
        max_wait_ms=max_wait_ms,
        padding_tolerance=padding_tolerance,
        retry_after_s=retry_after_s,
        torch_threads=torch_threads,
        log_level=log_level,
        chat_templates=chat_template,
        normalize_models=normalize_model,
    )
    if not settings.models:
        raise typer.BadParameter("no model to serve: pass --model NAME=PATH (or set KARMA_MODELS)")
    if settings.host not in ("127.0.0.1", "localhost", "::1") and settings.api_key is None:
        log.warning("serving on %s without an API key: anyone who can reach it can score", settings.host)

    import uvicorn

    from services.reward_api.main import create_app

    logging.getLogger().setLevel(settings.log_level.upper())
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=settings.log_level == "debug",
    )
