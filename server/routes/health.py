"""Liveness (/health), readiness (/ready: a model is loaded and its kernels warm) and Prometheus (/metrics)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.errors import APIError
from server.routes.common import app_state

router = APIRouter()


@router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/ready")
async def ready(http_request: Request) -> dict[str, str]:
    state = app_state(http_request)
    active = state.registry.active
    if not state.ready or state.draining or active is None or not active.engine_loop.is_alive:
        raise APIError.service_unavailable("not ready: the model is loading or the server is stopping")
    return {"status": "ready", "model": active.id}


@router.get("/metrics")
async def metrics(http_request: Request) -> Response:
    return Response(generate_latest(app_state(http_request).metrics.registry), media_type=CONTENT_TYPE_LATEST)
