"""Dependencies: the app's state (settings, registry, metrics), credentials, and the model a request scores with.

Models are reached only through these (never a module-level model), so a test can swap the registry or a
model lease with `app.dependency_overrides`.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import AsyncIterator, Iterable
from typing import Annotated

from fastapi import Depends, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from karma.protocol import MODEL_NAME_PATTERN
from services.reward_api.api.errors import ServiceError
from services.reward_api.core.config import Settings
from services.reward_api.core.metrics import Metrics
from services.reward_api.engine import Handle, ModelRegistry
from services.reward_api.monitor import ScoreMonitor


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_registry(request: Request) -> ModelRegistry:
    return request.app.state.registry


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


def get_monitor(request: Request) -> ScoreMonitor:
    return request.app.state.monitor


SettingsDep = Annotated[Settings, Depends(get_settings)]
RegistryDep = Annotated[ModelRegistry, Depends(get_registry)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
MonitorDep = Annotated[ScoreMonitor, Depends(get_monitor)]

# Two schemes, so the OpenAPI document can drop the API-key one when no key is configured (main.py).
_api_key = HTTPBearer(
    auto_error=False, scheme_name="ApiKey", description="KARMA_API_KEY (or the admin token)"
)
_admin = HTTPBearer(auto_error=False, scheme_name="AdminToken", description="KARMA_ADMIN_TOKEN")
ApiKeyCredentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_api_key)]
AdminCredentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_admin)]


def _matches(given: str, secret) -> bool:
    return secret is not None and secrets.compare_digest(given.encode(), secret.get_secret_value().encode())


def _missing() -> ServiceError:
    return ServiceError(
        401,
        "missing credentials: send `Authorization: Bearer <token>`",
        headers={"WWW-Authenticate": "Bearer"},
    )


def check_items(n: int, settings: Settings, what: str = "items") -> None:
    """422 above max_client_batch_size: the OpenAPI document states the limit as `maxItems`, so more is a
    schema violation (the body byte limit, which no schema states, is the 413)."""
    if n > settings.max_client_batch_size:
        raise ServiceError(
            422,
            f"{n} {what} in one request; the limit is max_client_batch_size={settings.max_client_batch_size}",
        )


_SURROGATE = re.compile("[\ud800-\udfff]")


def check_text(fields: Iterable[tuple[str, object]]) -> None:
    """422 for the first (where, text) whose text is not valid Unicode: JSON's `\\ud800` escape reads into a
    lone surrogate, which no tokenizer (nor UTF-8) takes. Values that are not strings are skipped. O(text) in
    C; run it off the event loop with the rest of the item building."""
    for where, text in fields:
        if isinstance(text, str) and (found := _SURROGATE.search(text)):
            raise ServiceError(
                422,
                f"{where}: lone surrogate U+{ord(found.group()):04X} at character {found.start()} is not "
                "valid Unicode text",
            )


def require_api_key(settings: SettingsDep, creds: ApiKeyCredentials) -> None:
    """Scoring routes and /info: open unless KARMA_API_KEY is set (the admin token is accepted too)."""
    if settings.api_key is None:
        return
    if creds is None:
        raise _missing()
    if not (
        _matches(creds.credentials, settings.api_key) or _matches(creds.credentials, settings.admin_token)
    ):
        raise ServiceError(401, "invalid API key", headers={"WWW-Authenticate": "Bearer"})


def require_admin(settings: SettingsDep, creds: AdminCredentials) -> None:
    """Model management: the admin token only (these routes are not mounted without one)."""
    if creds is None:
        raise _missing()
    if _matches(creds.credentials, settings.admin_token):
        return
    if _matches(creds.credentials, settings.api_key):
        raise ServiceError(403, "the API key may score but not manage models; use the admin token")
    raise ServiceError(401, "invalid admin token", headers={"WWW-Authenticate": "Bearer"})


async def default_model(registry: RegistryDep) -> AsyncIterator[Handle]:
    """The default model, leased for the whole request (a hot swap waits for it)."""
    with registry.lease(None) as handle:
        yield handle


async def named_model(
    registry: RegistryDep,
    name: Annotated[str, Path(pattern=MODEL_NAME_PATTERN, description="model name (see GET /info)")],
) -> AsyncIterator[Handle]:
    """The model named in `/models/{name}/...`; 404 listing the known names."""
    with registry.lease(name) as handle:
        yield handle
