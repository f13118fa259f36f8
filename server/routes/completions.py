"""POST /v1/completions (legacy): a raw text or token-id prompt, no chat template."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from engine.request import RequestOutput
from server import protocol
from server.errors import APIError
from server.generation import EngineFailure, api_finish_reason, collect, completion_logprobs
from server.registry import ServedModel
from server.routes.common import AppState, admit, app_state, require_api_key, resolve_model, stream_events
from server.streaming import RequestGroup, sse_event

router = APIRouter(dependencies=[Depends(require_api_key)])


@router.post("/v1/completions", response_model=protocol.Completion)
async def completions(body: protocol.CompletionRequest, http_request: Request):
    state = app_state(http_request)
    served = resolve_model(state, body.model)
    tokenizer = served.model.tokenizer
    prompt_ids = tokenizer.encode(body.prompt) if isinstance(body.prompt, str) else list(body.prompt)
    if not prompt_ids or max(prompt_ids) >= served.model.args.vocab_size:
        raise APIError.invalid_request(f"the prompt must have at least one token and ids below "
                                       f"{served.model.args.vocab_size}", param="prompt")
    params = body.to_sampling_params()
    group = admit(state, served, prompt_ids, params)
    if body.stream:
        return StreamingResponse(_stream(state, served, group, body, len(prompt_ids)),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    try:
        results = await collect(group, http_request)
    except EngineFailure as exc:
        raise APIError.server_error(str(exc)) from None
    return protocol.Completion(
        model=served.id, system_fingerprint=state.system_fingerprint,
        choices=[protocol.CompletionChoice(
            index=index, text="".join(result.text),
            logprobs=completion_logprobs(result.logprobs, tokenizer.decode) if params.logprobs else None,
            finish_reason=api_finish_reason(result.finish_reason)) for index, result in enumerate(results)],
        usage=protocol.Usage.of(len(prompt_ids), sum(r.num_output_tokens for r in results)),
    )


async def _stream(state: AppState, served: ServedModel, group: RequestGroup, body: protocol.CompletionRequest,
                  num_prompt_tokens: int) -> AsyncIterator[bytes]:
    completion_id, created = protocol.completion_id(), int(time.time())
    decode = served.model.tokenizer.decode

    def chunk(choices: list[protocol.CompletionChoice], usage: protocol.Usage | None = None) -> bytes:
        return sse_event(protocol.Completion(id=completion_id, created=created, model=served.id,
                                             system_fingerprint=state.system_fingerprint, choices=choices,
                                             usage=usage).model_dump(mode="json"))

    def output_events(index: int, output: RequestOutput) -> list[bytes]:
        return [chunk([protocol.CompletionChoice(
            index=index, text=output.text,
            logprobs=completion_logprobs(output.logprobs, decode) if output.logprobs else None,
            finish_reason=api_finish_reason(output.finish_reason) if output.finished else None)])]

    def usage_event(num_output_tokens: int) -> bytes:
        return chunk([], protocol.Usage.of(num_prompt_tokens, num_output_tokens))

    async for event in stream_events(group, output_events, usage_event if body.include_usage else None):
        yield event
