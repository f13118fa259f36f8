"""One API call's generation: build the engine requests for its n choices, then collect or stream their outputs.

Speaks engine types on one side and protocol (pydantic) objects on the other; knows nothing of routes or HTTP status.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from fastapi import Request as HTTPRequest

from engine.detokenizer import IncrementalDetokenizer
from engine.request import FinishReason, Request, RequestOutput, TokenLogprob
from engine.sampling import SamplingParams
from server import protocol
from server.registry import ServedModel
from server.streaming import OutputChannel, RequestGroup


class EngineFailure(RuntimeError):
    """The engine failed while serving this request (not the client's fault)."""


@dataclass
class ChoiceResult:
    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    num_output_tokens: int = 0


def build_group(served: ServedModel, prompt_ids: list[int], params: SamplingParams, timeout_s: float) -> RequestGroup:
    """The engine requests behind one API call, with one output channel each on the running event loop."""
    loop = asyncio.get_running_loop()
    tokenizer = served.model.tokenizer
    base_id = uuid.uuid4().hex
    deadline_s = time.monotonic() + timeout_s
    requests, channels = [], []
    for index in range(params.n):
        channel = OutputChannel(loop)
        requests.append(Request(
            request_id=f"{base_id}-{index}",
            prompt_ids=list(prompt_ids),
            params=params,
            detokenizer=IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens=True),
            eos_token_ids=frozenset(served.model.eos_token_ids),
            max_total_tokens=served.model.args.max_position_embeddings,
            on_output=channel.put,
            deadline_s=deadline_s,
            choice_index=index,
        ))
        channels.append(channel)
    return RequestGroup(served.engine_loop, requests, channels)


async def collect(group: RequestGroup, http_request: HTTPRequest) -> list[ChoiceResult]:
    """Wait for every choice to finish; aborts the group if the client disconnects first."""
    results = [ChoiceResult() for _ in group.requests]
    collector = asyncio.ensure_future(_collect(group, results))
    watcher = asyncio.ensure_future(_wait_for_disconnect(http_request))
    try:
        await asyncio.wait({collector, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not collector.done():
            raise asyncio.CancelledError("client disconnected")
        return collector.result()
    finally:
        watcher.cancel()
        collector.cancel()
        group.abort_unfinished()


async def _collect(group: RequestGroup, results: list[ChoiceResult]) -> list[ChoiceResult]:
    async for index, output in group.outputs():
        _accumulate(results[index], output)
    return results


def _accumulate(result: ChoiceResult, output: RequestOutput) -> None:
    if output.error is not None:
        raise EngineFailure(output.error)
    result.text.append(output.text)
    result.logprobs.extend(output.logprobs)
    result.num_output_tokens = output.num_output_tokens
    if output.finished:
        result.finish_reason = output.finish_reason


async def _wait_for_disconnect(http_request: HTTPRequest) -> None:
    while not await http_request.is_disconnected():
        await asyncio.sleep(0.2)


async def stream_outputs(group: RequestGroup) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(choice index, output) as they come; the group is aborted if the consumer stops early (client went away)."""
    try:
        async for index, output in group.outputs():
            if output.error is not None:
                raise EngineFailure(output.error)
            yield index, output
    finally:
        group.abort_unfinished()


def api_finish_reason(reason: FinishReason | None) -> protocol.FinishReason:
    """OpenAI knows `stop` and `length`; an aborted request never reaches a client that is still listening."""
    return "length" if reason is FinishReason.LENGTH else "stop"


def chat_logprobs(logprobs: list[TokenLogprob], token_text: Callable[[int], str]) -> protocol.ChoiceLogprobs:
    def entry_fields(token_id: int, logprob: float) -> dict[str, object]:
        text = token_text(token_id)  # decoded once per token: both `token` and `bytes` come from it
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return protocol.ChoiceLogprobs(content=[
        protocol.TokenLogprob(**entry_fields(entry.token_id, entry.logprob),
                              top_logprobs=[protocol.TopLogprob(**entry_fields(tid, lp))
                                            for tid, lp in entry.top_logprobs or []])
        for entry in logprobs
    ])


def completion_logprobs(logprobs: list[TokenLogprob], token_text: Callable[[list[int]], str]
                        ) -> protocol.CompletionLogprobs:
    """The legacy parallel-list shape; text offsets count characters from the start of the completion."""
    tokens = [token_text([entry.token_id]) for entry in logprobs]
    offsets, position = [], 0
    for token in tokens:
        offsets.append(position)
        position += len(token)
    return protocol.CompletionLogprobs(
        tokens=tokens,
        token_logprobs=[entry.logprob for entry in logprobs],
        top_logprobs=[{token_text([tid]): lp for tid, lp in entry.top_logprobs or []} for entry in logprobs],
        text_offset=offsets,
    )
