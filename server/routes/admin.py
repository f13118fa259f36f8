"""The admin API (DESIGN §7): list, load, activate and unload models, behind the admin token. Mounted only when an
admin token is configured; the work itself is ModelRegistry's.
"""

from __future__ import annotations

import contextlib
import hmac
from collections.abc import Iterator

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from server.errors import APIError
from server.registry import (
    DEFAULT_ALIAS,
    InsufficientMemoryError,
    ModelConflictError,
    ModelState,
    PathEscapeError,
    UnknownModelError,
    UnsafePathError,
    resolve_in_models_dir,
)
from server.routes.common import app_state

# Ids appear in URLs, metric labels and logs: keep them to a plain, bounded alphabet.
MODEL_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"


def require_admin_token(request: Request) -> None:
    """FastAPI dependency: 401 without a bearer token, 403 with a wrong one (compared in constant time)."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise APIError.authentication("Missing admin token: send 'Authorization: Bearer <admin token>'.")
    expected = app_state(request).settings.admin_token or ""
    if not hmac.compare_digest(token.strip().encode(), expected.encode()):
        raise APIError.permission_denied("Incorrect admin token.")


router = APIRouter(prefix="/admin", dependencies=[Depends(require_admin_token)])


class ModelIdBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(pattern=MODEL_ID_PATTERN)


class LoadBody(ModelIdBody):
    path: str = Field(min_length=1, max_length=4096, description="relative to the models directory")
    activate: bool = False


class AdminModel(BaseModel):
    id: str
    state: ModelState
    active: bool
    path: str | None
    progress: float
    message: str | None
    weight_bytes: int | None
    kv_cache_bytes: int | None
    num_running: int
    num_waiting: int


class AdminModelList(BaseModel):
    object: str = "list"
    active: str | None
    data: list[AdminModel]


@router.get("/models", response_model=AdminModelList)
async def list_models(http_request: Request) -> AdminModelList:
    return _listing(http_request)


@router.post("/models/load", response_model=AdminModel, status_code=202)
async def load(body: LoadBody, http_request: Request) -> AdminModel:
    state = app_state(http_request)
    if not state.ready:  # the first model is still loading, under an id not yet known here
        raise APIError.service_unavailable("the server is still loading its first model; retry when /ready answers")
    if body.id == DEFAULT_ALIAS:
        raise APIError.invalid_request(f"'{DEFAULT_ALIAS}' always names the active model; pick another id", "id")
    with _admin_errors():
        path = resolve_in_models_dir(state.settings.models_dir, body.path)
        job = state.registry.start_load(body.id, path, body.activate)
    return AdminModel.model_validate(job.status(), from_attributes=True)


@router.post("/models/activate", response_model=AdminModelList)
async def activate(body: ModelIdBody, http_request: Request) -> AdminModelList:
    with _admin_errors():
        app_state(http_request).registry.activate(body.id)
    return _listing(http_request)


@router.post("/models/unload", response_model=AdminModelList, status_code=202)
async def unload(body: ModelIdBody, http_request: Request) -> AdminModelList:
    with _admin_errors():
        app_state(http_request).registry.unload(body.id)
    return _listing(http_request)


def _listing(http_request: Request) -> AdminModelList:
    registry = app_state(http_request).registry
    return AdminModelList(active=registry.active_id, data=[
        AdminModel.model_validate(status, from_attributes=True) for status in registry.statuses()])


@contextlib.contextmanager
def _admin_errors() -> Iterator[None]:
    """The registry's refusals as HTTP answers; their messages are written for the operator."""
    try:
        yield
    except UnknownModelError as exc:
        raise APIError(404, f"no model with id {exc.args[0]!r} is loaded", param="id", code="model_not_found") from None
    except UnsafePathError as exc:
        raise APIError.invalid_request(str(exc), param="path", code="invalid_path") from None
    except PathEscapeError as exc:
        raise APIError(403, str(exc), param="path", code="path_outside_models_dir") from None
    except FileNotFoundError as exc:
        raise APIError(404, str(exc), param="path", code="model_file_not_found") from None
    except ModelConflictError as exc:
        raise APIError(409, str(exc), code="model_state_conflict") from None
    except InsufficientMemoryError as exc:
        raise APIError(507, str(exc), type="server_error", code="insufficient_memory") from None
