"""Model management (admin token; mounted only when KARMA_ADMIN_TOKEN is set): list, load, hot swap, unload,
and choose the default model.

Paths must resolve (symlinks followed) inside one of the configured model roots.
"""

from __future__ import annotations

import asyncio
from pathlib import Path as FsPath
from typing import Annotated

from fastapi import APIRouter, Depends, Path

from karma.protocol import (
    MODEL_NAME_PATTERN,
    DefaultModelRequest,
    LoadModelRequest,
    ModelInfo,
    ModelList,
    SwapModelRequest,
    SwapResponse,
)
from karma.rm.folder import CONFIG_NAME
from services.reward_api.api.deps import RegistryDep, SettingsDep, require_admin
from services.reward_api.api.errors import TRANSPORT_ERRORS, ServiceError, responses
from services.reward_api.api.routes.health import model_info
from services.reward_api.core.config import Settings
from services.reward_api.engine import EngineError

router = APIRouter(
    prefix="/v1",
    tags=["admin"],
    dependencies=[Depends(require_admin)],
    responses=responses(*TRANSPORT_ERRORS),
)
Name = Annotated[str, Path(pattern=MODEL_NAME_PATTERN)]


def confine(path: str, settings: Settings) -> FsPath:
    """The real folder behind `path` if it is a reward-model folder inside a model root (after resolving `..`
    and symlinks); 403 for anything else — outside the roots, missing, or not a reward-model folder: the admin
    may load reward-model folders under the roots, nothing else (and a 404 would say the *model* is unknown)."""
    if not settings.model_roots:
        raise ServiceError(403, "no model roots are configured (KARMA_MODEL_ROOTS / --model-root)")
    shown = path if len(path) <= 200 else path[:200] + "..."
    try:
        candidate = FsPath(path).expanduser()
        if not candidate.is_absolute():
            candidate = settings.model_roots[0] / candidate
        real = candidate.resolve()
        inside = any(real == root or real.is_relative_to(root) for root in settings.model_roots)
        exists = inside and real.is_dir()
        is_model = exists and (real / CONFIG_NAME).is_file()
    except OSError as exc:  # a name too long for the file system: no such folder can exist
        raise ServiceError(403, f"no folder at {shown!r} ({exc.strerror or type(exc).__name__})") from None
    except (ValueError, RuntimeError) as exc:  # symlink loop
        raise ServiceError(422, f"invalid path {shown!r}: {type(exc).__name__}", "model_load") from None
    if not inside:
        raise ServiceError(403, f"path {shown!r} is outside the configured model roots")
    if not exists:
        raise ServiceError(403, f"no folder at {shown!r} under the model roots")
    if not is_model:
        raise ServiceError(403, f"no KARMA reward-model folder at {shown!r} (no {CONFIG_NAME} in it)")
    return real


async def _load_in_thread(path: FsPath, fn, *args, **kwargs):
    """Run a blocking load; any failure to read the folder is the folder's fault (422 naming it), not the
    server's: a corrupt safetensors file raises safetensors' own error, a bad config pydantic's."""
    try:
        return await asyncio.to_thread(fn, *args, **kwargs)
    except (ServiceError, EngineError):
        raise
    except Exception as exc:  # noqa: BLE001 - untrusted folder contents; the message names what failed
        weights = sorted(p.name for p in path.glob("*.safetensors"))
        where = f"{path}" + (f" (weights: {', '.join(weights)})" if weights else "")
        raise ServiceError(
            422, f"could not load the model from {where}: {type(exc).__name__}: {exc}", "model_load"
        ) from None


@router.get("/models", response_model=ModelList, responses=responses(401, 403), summary="List loaded models")
async def list_models(registry: RegistryDep) -> ModelList:
    return ModelList(
        default_model=registry.default, models=[model_info(h, registry, True) for h in registry.handles()]
    )


@router.post(
    "/models",
    response_model=ModelInfo,
    status_code=201,
    responses=responses(401, 403, 409, 422),
    summary="Load a model under a new name",
)
async def load_model(body: LoadModelRequest, registry: RegistryDep, settings: SettingsDep) -> ModelInfo:
    path = confine(body.path, settings)
    handle = await _load_in_thread(path, registry.add, body.name, path)
    return model_info(handle, registry, True)


@router.put(
    "/models/{name}",
    response_model=SwapResponse,
    responses=responses(401, 403, 404, 409, 422),
    summary="Hot swap a model to a new folder",
)
async def swap_model(
    name: Name, body: SwapModelRequest, registry: RegistryDep, settings: SettingsDep
) -> SwapResponse:
    """Loads the new folder (a composition folder too) beside the old model, switches atomically, lets
    requests already holding the old model finish on it, then frees it. No request fails; each reply names the
    version that scored it. A folder of another variant is refused (409) unless `force` is true."""
    registry.get(name)  # 404 before loading anything
    path = confine(body.path, settings)
    new, old = await _load_in_thread(path, registry.swap, name, path, force=body.force)
    return SwapResponse(model=model_info(new, registry, True), previous_version=old.version)


@router.delete(
    "/models/{name}",
    response_model=ModelInfo,
    responses=responses(401, 403, 404, 409, 422),
    summary="Unload a model",
)
async def delete_model(name: Name, registry: RegistryDep) -> ModelInfo:
    handle = registry.get(name)
    info = model_info(handle, registry, True)
    await asyncio.to_thread(registry.remove, name)
    return info


@router.put(
    "/default-model",
    response_model=ModelList,
    responses=responses(401, 403, 404, 422),
    summary="Choose the model behind the un-prefixed routes",
)
async def set_default_model(body: DefaultModelRequest, registry: RegistryDep) -> ModelList:
    """`/v1/score`, `/get_reward` and `/classify` score with this model from the next request on; requests
    already running finish on the model they started with."""
    registry.set_default(body.name)
    return await list_models(registry)
