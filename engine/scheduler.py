"""Continuous batching: which tokens of which requests the next engine step computes (vLLM v1's shape).

Each request only tracks num_computed_tokens, so a prefill chunk and a decode token are the same thing: the next
tokens whose K/V are not cached yet. A request admitted with the same leading tokens as blocks already computed
(a shared system prompt, or its own tokens before a preemption) starts from those blocks. Engine thread only.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from engine.config import SchedulerConfig
from engine.kv_cache import KVCache
from engine.request import FinishReason, Request, RequestStatus


@dataclass
class SchedulerOutput:
    scheduled: list[tuple[Request, int]]  # (request, number of tokens computed for it this step), batch order
    num_batched_tokens: int  # sum of the scheduled token counts, at most max_num_batched_tokens
    preempted: list[Request] = field(default_factory=list)  # requests whose blocks were freed to make room
    expired: list[Request] = field(default_factory=list)  # requests past their deadline, finished as ABORT


class Scheduler:
    def __init__(self, config: SchedulerConfig, cache: KVCache) -> None:
        self.config = config
        self.cache = cache
        self.waiting: deque[Request] = deque()  # FCFS; preempted requests go back to the front
        self.running: list[Request] = []  # in admission order; the newest is preempted first

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def finish(self, request: Request, reason: FinishReason) -> None:
        """Finish a request wherever it is and free its blocks."""
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status is RequestStatus.WAITING:
            self.waiting.remove(request)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        self._release(request)

    def _release(self, request: Request) -> None:
        """Free a request's blocks, leaving the full blocks it computed matchable by later requests."""
        self.cache.register_computed(id(request), request.num_computed_tokens, request.token_at)
        self.cache.free(id(request))

    def schedule(self) -> SchedulerOutput:
        now = time.monotonic()
        for request in self.running:  # the previous step's tokens are computed now: share their full blocks
            self.cache.register_computed(id(request), request.num_computed_tokens, request.token_at)
        expired = [r for r in (*self.running, *self.waiting) if r.deadline_s is not None and now > r.deadline_s]
        for request in expired:
            self.finish(request, FinishReason.ABORT)
        budget = self.config.max_num_batched_tokens
        scheduled: list[tuple[Request, int]] = []
        preempted: list[Request] = []
        # Decode tokens first (one each), then the prefill chunks of running requests, oldest first.
        decoding = [r for r in self.running if r.num_tokens - r.num_computed_tokens == 1]
        prefilling = [r for r in self.running if r.num_tokens - r.num_computed_tokens > 1]
        for request in decoding + prefilling:
            if request.status is not RequestStatus.RUNNING or budget == 0:
                continue
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            fits, refunded = self._allocate_or_preempt(request, num_new, scheduled, preempted)
            budget += refunded
            if fits:
                scheduled.append((request, num_new))
                budget -= num_new
        # Admit waiting requests while there is budget, a free slot and cache room; never overtake the head.
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs and not preempted:
            request = self.waiting[0]  # num_computed_tokens is 0: new, or preempted and freed
            prefix = self.cache.match_prefix(request.prompt_ids + request.output_ids)
            num_cached = self.cache.tokens_in(len(prefix))
            num_new = min(request.num_tokens - num_cached, budget)
            if self.cache.blocks_needed(id(request), num_cached + num_new, prefix) > self.cache.num_free_blocks:
                break
            self.cache.allocate(id(request), num_cached + num_new, prefix)
            request.num_computed_tokens = num_cached
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            if request.first_scheduled_s is None:
                request.first_scheduled_s = now
            self.running.append(request)
            scheduled.append((request, num_new))
            budget -= num_new
        return SchedulerOutput(scheduled, self.config.max_num_batched_tokens - budget, preempted, expired)

    def _allocate_or_preempt(self, request: Request, num_new: int, scheduled: list[tuple[Request, int]],
                             preempted: list[Request]) -> tuple[bool, int]:
        """Make room for `num_new` more tokens of `request`, preempting the newest running requests if needed.

        Preemption is by recompute: the victim's blocks are freed, and it restarts from its prompt plus the tokens
        it already generated. A victim already scheduled this step is unscheduled and its tokens refunded.
        Returns (whether `request` got its blocks, tokens refunded to the budget).
        """
        total = request.num_computed_tokens + num_new
        refunded = 0
        while self.cache.blocks_needed(id(request), total) > self.cache.num_free_blocks:
            victim = self.running.pop()
            self._release(victim)
            victim.num_computed_tokens = 0
            victim.status = RequestStatus.WAITING
            self.waiting.appendleft(victim)
            preempted.append(victim)
            for index, (entry, num_tokens) in enumerate(scheduled):
                if entry is victim:
                    del scheduled[index]
                    refunded += num_tokens
                    break
            if victim is request:
                return False, refunded
        self.cache.allocate(id(request), total)
        return True, refunded
