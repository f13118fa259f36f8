"""POST /v1/chat/completions: validate, render the chat template, admit, then answer in JSON or as an SSE stream."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from engine.request import RequestOutput
from server import protocol
from server.errors import APIError
from server.generation import EngineFailure, api_finish_reason, chat_logprobs, collect
from server.registry import ServedModel
from server.routes.common import (
    AppState,
    admit,
    app_state,
    default_max_tokens,
    require_api_key,
    resolve_model,
    stream_events,
)
from server.streaming import RequestGroup, sse_event

router = APIRouter(dependencies=[Depends(require_api_key)])


@router.post("/v1/chat/completions", response_model=protocol.ChatCompletion)
async def chat_completions(body: protocol.ChatCompletionRequest, http_request: Request):
    state = app_state(http_request)
    served = resolve_model(state, body.model)
    try:
        prompt_ids = served.model.tokenizer.apply_chat_template(body.template_messages(), add_generation_prompt=True,
                                                                tokenize=True)
    except ValueError as exc:
        raise APIError.invalid_request(f"chat template: {exc}", param="messages") from None
    if not prompt_ids:
        raise APIError.invalid_request("the chat template rendered these messages to an empty prompt",
                                       param="messages")
    params = body.to_sampling_params(default_max_tokens(served, len(prompt_ids)))
    group = admit(state, served, prompt_ids, params)
    if body.stream:
        chunks = _chat_stream(state, served, group, body, len(prompt_ids))
        return StreamingResponse(chunks, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    try:
        results = await collect(group, http_request)
    except EngineFailure as exc:
        raise APIError.server_error(str(exc)) from None
    token_text = _token_text(served)
    return protocol.ChatCompletion(
        model=served.id, system_fingerprint=state.system_fingerprint,
        choices=[protocol.ChatCompletionChoice(
            index=index, message=protocol.AssistantMessage(content="".join(result.text)),
            logprobs=chat_logprobs(result.logprobs, token_text) if params.logprobs else None,
            finish_reason=api_finish_reason(result.finish_reason)) for index, result in enumerate(results)],
        usage=protocol.Usage.of(len(prompt_ids), sum(r.num_output_tokens for r in results)),
    )


async def _chat_stream(state: AppState, served: ServedModel, group: RequestGroup, body: protocol.ChatCompletionRequest,
                       num_prompt_tokens: int) -> AsyncIterator[bytes]:
    chunk_id, created, token_text = protocol.chat_completion_id(), int(time.time()), _token_text(served)

    def chunk(choices: list[protocol.ChatCompletionChunkChoice], usage: protocol.Usage | None = None) -> bytes:
        return sse_event(protocol.ChatCompletionChunk(
            id=chunk_id, created=created, model=served.id, system_fingerprint=state.system_fingerprint,
            choices=choices, usage=usage).model_dump(mode="json"))

    yield chunk([protocol.ChatCompletionChunkChoice(index=i, delta=protocol.DeltaMessage(role="assistant", content=""))
                 for i in range(len(group.requests))])

    def output_events(index: int, output: RequestOutput) -> list[bytes]:
        events = []
        logprobs = chat_logprobs(output.logprobs, token_text) if output.logprobs else None
        if output.text or logprobs:
            events.append(chunk([protocol.ChatCompletionChunkChoice(
                index=index, delta=protocol.DeltaMessage(content=output.text), logprobs=logprobs)]))
        if output.finished:
            events.append(chunk([protocol.ChatCompletionChunkChoice(
                index=index, delta=protocol.DeltaMessage(), finish_reason=api_finish_reason(output.finish_reason))]))
        return events

    def usage_event(num_output_tokens: int) -> bytes:
        return chunk([], protocol.Usage.of(num_prompt_tokens, num_output_tokens))

    async for event in stream_events(group, output_events, usage_event if body.include_usage else None):
        yield event


def _token_text(served: ServedModel) -> Callable[[int], str]:
    tokenizer = served.model.tokenizer
    return lambda token_id: tokenizer.decode([token_id])
