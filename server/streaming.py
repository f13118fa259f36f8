"""The bridge from the engine thread to asyncio: per-request queues fed with call_soon_threadsafe, and SSE framing."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from engine.engine_loop import EngineLoop
from engine.request import Request, RequestOutput


class OutputChannel:
    """Carries one request's outputs from the engine thread to the handler's event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queue: asyncio.Queue[RequestOutput] = asyncio.Queue()

    def put(self, output: RequestOutput) -> None:
        """Engine thread: never blocks, never touches asyncio objects directly."""
        self._loop.call_soon_threadsafe(self._queue.put_nowait, output)

    async def get(self) -> RequestOutput:
        return await self._queue.get()


class RequestGroup:
    """The engine requests behind one HTTP request (n choices), submitted together and aborted together."""

    def __init__(self, engine_loop: EngineLoop, requests: list[Request], channels: list[OutputChannel]) -> None:
        self.engine_loop = engine_loop
        self.requests = requests
        self.channels = channels
        self._finished = [False] * len(requests)

    def submit(self) -> None:
        """Raises QueueFullError (nothing submitted) when the admission queue cannot take all of them."""
        for index, request in enumerate(self.requests):
            try:
                self.engine_loop.submit(request)
            except Exception:
                for submitted in self.requests[:index]:
                    self.engine_loop.abort(submitted.request_id)
                raise

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(choice index, output) in arrival order until every choice has finished."""
        pending = {asyncio.ensure_future(channel.get()): index for index, channel in enumerate(self.channels)}
        try:
            while pending:
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for future in done:
                    index = pending.pop(future)
                    output = future.result()
                    if output.finished:
                        self._finished[index] = True
                    else:
                        pending[asyncio.ensure_future(self.channels[index].get())] = index
                    yield index, output
        finally:
            for future in pending:
                future.cancel()

    def abort_unfinished(self) -> None:
        """Called when the client goes away or the handler fails: frees the KV blocks of what is still running."""
        for request, finished in zip(self.requests, self._finished, strict=True):
            if not finished:
                self.engine_loop.abort(request.request_id)


def sse_event(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    return f"data: {data}\n\n".encode()
