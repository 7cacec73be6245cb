"""Model management (admin token; mounted only when KARMA_ADMIN_TOKEN is set): list, load, hot swap, unload.

Paths must resolve (symlinks followed) inside one of the configured model roots.
"""

from __future__ import annotations

import asyncio
from pathlib import Path as FsPath
from typing import Annotated

from fastapi import APIRouter, Depends, Path

from karma.protocol import (
    MODEL_NAME_PATTERN,
    LoadModelRequest,
    ModelInfo,
    ModelList,
    SwapModelRequest,
    SwapResponse,
)
from karma.rm.model import CONFIG_NAME
from services.reward_api.api.deps import RegistryDep, SettingsDep, require_admin
from services.reward_api.api.errors import ServiceError, responses
from services.reward_api.api.routes.health import model_info
from services.reward_api.core.config import Settings

router = APIRouter(prefix="/v1/models", tags=["admin"], dependencies=[Depends(require_admin)])
Name = Annotated[str, Path(pattern=MODEL_NAME_PATTERN)]


def confine(path: str, settings: Settings) -> FsPath:
    """The real folder behind `path` if it lies inside a model root (after resolving `..` and symlinks)."""
    if not settings.model_roots:
        raise ServiceError(403, "no model roots are configured (KARMA_MODEL_ROOTS / --model-root)")
    shown = path if len(path) <= 200 else path[:200] + "..."
    try:
        candidate = FsPath(path).expanduser()
        if not candidate.is_absolute():
            candidate = settings.model_roots[0] / candidate
        real = candidate.resolve()
        inside = any(real == root or real.is_relative_to(root) for root in settings.model_roots)
        is_model = inside and (real / CONFIG_NAME).is_file()
    except (OSError, ValueError, RuntimeError) as exc:  # name too long, NUL byte, symlink loop
        raise ServiceError(422, f"invalid path {shown!r}: {type(exc).__name__}", "model_load") from None
    if not inside:
        raise ServiceError(403, f"path {shown!r} is outside the configured model roots")
    if not is_model:
        raise ServiceError(
            422, f"path {shown!r} is not a KARMA reward-model folder (no {CONFIG_NAME})", "model_load"
        )
    return real


async def _in_thread(fn, *args):
    try:
        return await asyncio.to_thread(fn, *args)
    except (OSError, ValueError) as exc:  # unreadable weights / config: the folder, not the server, is wrong
        raise ServiceError(
            422, f"could not load the model: {type(exc).__name__}: {exc}", "model_load"
        ) from None


@router.get("", response_model=ModelList, responses=responses(401, 403), summary="List loaded models")
async def list_models(registry: RegistryDep) -> ModelList:
    return ModelList(
        default_model=registry.default, models=[model_info(h, registry, True) for h in registry.handles()]
    )


@router.post(
    "",
    response_model=ModelInfo,
    status_code=201,
    responses=responses(401, 403, 409, 422),
    summary="Load a model under a new name",
)
async def load_model(body: LoadModelRequest, registry: RegistryDep, settings: SettingsDep) -> ModelInfo:
    path = confine(body.path, settings)
    handle = await _in_thread(registry.add, body.name, path)
    return model_info(handle, registry, True)


@router.put(
    "/{name}",
    response_model=SwapResponse,
    responses=responses(401, 403, 404, 422),
    summary="Hot swap a model to a new folder",
)
async def swap_model(
    name: Name, body: SwapModelRequest, registry: RegistryDep, settings: SettingsDep
) -> SwapResponse:
    """Loads the new folder beside the old model, switches atomically, lets requests already holding the old
    model finish on it, then frees it. No request fails; each reply names the version that scored it."""
    registry.get(name)  # 404 before loading anything
    path = confine(body.path, settings)
    new, old = await _in_thread(registry.swap, name, path)
    return SwapResponse(model=model_info(new, registry, True), previous_version=old.version)


@router.delete(
    "/{name}",
    response_model=ModelInfo,
    responses=responses(401, 403, 404, 409, 422),
    summary="Unload a model",
)
async def delete_model(name: Name, registry: RegistryDep) -> ModelInfo:
    handle = registry.get(name)
    info = model_info(handle, registry, True)
    await asyncio.to_thread(registry.remove, name)
    return info
