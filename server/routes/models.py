"""GET /v1/models and /v1/models/{id}: every loaded model, plus `default`, the alias of the active one."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from server import protocol
from server.errors import APIError
from server.registry import DEFAULT_ALIAS, UnknownModelError
from server.routes.common import app_state, require_api_key

router = APIRouter(dependencies=[Depends(require_api_key)])


@router.get("/v1/models", response_model=protocol.ModelList)
async def list_models(http_request: Request) -> protocol.ModelList:
    registry = app_state(http_request).registry
    cards = [protocol.ModelCard(id=served.id, created=served.created_s) for served in registry.models.values()]
    if registry.active is not None:
        cards.append(protocol.ModelCard(id=DEFAULT_ALIAS, created=registry.active.created_s))
    return protocol.ModelList(data=cards)


@router.get("/v1/models/{model_id}", response_model=protocol.ModelCard)
async def get_model(model_id: str, http_request: Request) -> protocol.ModelCard:
    registry = app_state(http_request).registry
    try:
        served = registry.get(model_id)
    except UnknownModelError:
        raise APIError.model_not_found(model_id, ", ".join(["default", *registry.models])) from None
    return protocol.ModelCard(id=model_id, created=served.created_s)
