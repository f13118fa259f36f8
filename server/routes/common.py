"""What every generation route shares: app state lookup, API-key auth, model resolution, admission, and the SSE
body's common course (outputs, engine failure, usage, [DONE])."""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from fastapi import Request

from engine.engine import RequestRejectedError
from engine.engine_loop import QueueFullError
from engine.request import RequestOutput
from engine.sampling import SamplingParams
from server.errors import APIError
from server.generation import EngineFailure, build_group, stream_outputs
from server.metrics import Metrics
from server.registry import ModelRegistry, ServedModel, UnknownModelError
from server.settings import ServerSettings
from server.streaming import RequestGroup, sse_event

# A full queue drains in about this long on a busy CPU box; clients back off at least this much.
RETRY_AFTER_S = 1


@dataclass
class AppState:
    settings: ServerSettings
    registry: ModelRegistry
    metrics: Metrics
    ready: bool = False
    draining: bool = False
    system_fingerprint: str = field(default="fp_bitserve")


def app_state(request: Request) -> AppState:
    return request.app.state.bitserve


def require_api_key(request: Request) -> None:
    """FastAPI dependency: when API keys are configured, the bearer token must be one of them (constant-time)."""
    keys = app_state(request).settings.api_keys
    if not keys:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    supplied = token.strip().encode() if scheme.lower() == "bearer" else b""
    # Compare against every key so the time taken does not reveal which key (or how much of one) matched.
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(supplied, key.encode())
    if not matched:
        raise APIError.authentication("Incorrect API key provided." if supplied else
                                      "Missing API key: send 'Authorization: Bearer <key>'.")


def resolve_model(state: AppState, name: str) -> ServedModel:
    if not state.ready or state.draining:
        raise APIError.service_unavailable("the server is not ready: the model is loading or the server is stopping")
    try:
        return state.registry.get(name)
    except UnknownModelError:
        available = ", ".join(["default", *state.registry.models])
        raise APIError.model_not_found(name, available) from None


def default_max_tokens(served: ServedModel, num_prompt_tokens: int) -> int:
    """With no max_tokens from the client: whatever context is left after the prompt."""
    return max(1, served.model.args.max_position_embeddings - num_prompt_tokens)


def admit(state: AppState, served: ServedModel, prompt_ids: list[int], params: SamplingParams) -> RequestGroup:
    """Check the request fits, then queue it; 400 if it can never fit, 429 if the queue is full."""
    vocab_size = served.model.args.vocab_size
    if any(not 0 <= token_id < vocab_size for token_id, _ in params.logit_bias):
        raise APIError.invalid_request(f"logit_bias token ids must lie in [0, {vocab_size}) for this model",
                                       param="logit_bias")
    try:
        served.engine_loop.engine.check_fits(len(prompt_ids), params.max_tokens)
    except RequestRejectedError as exc:
        raise APIError.invalid_request(str(exc), param="messages", code="context_length_exceeded") from None
    group = build_group(served, prompt_ids, params, state.settings.request_timeout_s)
    try:
        group.submit()
    except QueueFullError as exc:
        raise APIError.rate_limited(f"server busy: {exc}; retry after {RETRY_AFTER_S} s", RETRY_AFTER_S) from None
    return group


async def stream_events(group: RequestGroup, output_events: Callable[[int, RequestOutput], list[bytes]],
                        usage_event: Callable[[int], bytes] | None) -> AsyncIterator[bytes]:
    """The SSE events of a streamed group after its opening ones: output_events(choice index, output) for each engine
    output, an OpenAI error event (and nothing more) if the engine fails, then usage_event(output tokens) when the
    client asked for usage, then [DONE]."""
    num_output_tokens = 0
    try:
        async for index, output in stream_outputs(group):
            num_output_tokens += len(output.token_ids)
            for event in output_events(index, output):
                yield event
    except EngineFailure as exc:
        yield sse_event(APIError.server_error(str(exc)).body())
        return
    if usage_event is not None:
        yield usage_event(num_output_tokens)
    yield sse_event("[DONE]")
