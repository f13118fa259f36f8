"""One engine step: schedule -> execute (one forward over a flat batch) -> update_from_output (sample, detokenize,
stop). Owns the KV cache and the scheduler of one model. Engine thread only; engine/engine_loop.py runs it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from engine.config import CacheConfig, SchedulerConfig
from engine.kv_cache import KVCache
from engine.loaded_model import LoadedModel
from engine.model import ForwardBatch
from engine.request import FinishReason, Request, RequestOutput, RequestStatus, TokenLogprob
from engine.scheduler import Scheduler, SchedulerOutput

logger = logging.getLogger(__name__)


class RequestRejectedError(ValueError):
    """A request that can never run on this engine (too long for the context or the KV cache)."""


@dataclass
class FinishedRequestStats:
    finish_reason: FinishReason
    e2e_s: float  # arrival to finish
    queue_s: float  # arrival to first scheduled (the whole life, if never scheduled)
    num_prompt_tokens: int
    num_output_tokens: int


@dataclass
class StepStats:
    """What one step did, for metrics. Built on the engine thread, read by whoever observes steps."""

    duration_s: float = 0.0
    num_batched_tokens: int = 0
    num_seqs: int = 0  # sequences in the forward batch
    num_prompt_tokens: int = 0  # prompt tokens of requests whose prefill completed this step (cached ones included)
    num_generated_tokens: int = 0
    num_running: int = 0
    num_waiting: int = 0
    num_preempted: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    kv_bytes_used: int = 0  # blocks and window buffers held by sequences
    time_to_first_token_s: list[float] = field(default_factory=list)
    inter_token_latency_s: list[float] = field(default_factory=list)
    finished: list[FinishedRequestStats] = field(default_factory=list)


class LLMEngine:
    def __init__(self, model: LoadedModel, scheduler_config: SchedulerConfig, cache_config: CacheConfig) -> None:
        self.model = model
        self.cache = KVCache.from_config(model.args, cache_config, scheduler_config.max_num_seqs)
        self.scheduler = Scheduler(scheduler_config, self.cache)
        self.requests: dict[str, Request] = {}
        self._last_token_s: dict[str, float] = {}  # request id -> when its latest token was sampled
        self._finished: list[FinishedRequestStats] = []  # finished since the last step's stats were built

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    def check_fits(self, num_prompt_tokens: int, max_tokens: int) -> None:
        """Raise RequestRejectedError unless prompt + max_tokens fit the context and the whole KV cache."""
        total = num_prompt_tokens + max_tokens
        context = self.model.args.max_position_embeddings
        if total > context:
            raise RequestRejectedError(
                f"this model's maximum context length is {context} tokens; the request has {num_prompt_tokens} "
                f"prompt tokens and asks for {max_tokens} more ({total} in all). Shorten the prompt or max_tokens.")
        capacity = self.cache.capacity_tokens
        if total > capacity:
            raise RequestRejectedError(f"the request needs {total} tokens of KV cache, but the whole cache holds "
                                       f"{capacity}; raise --kv-cache-bytes")

    def add_request(self, request: Request) -> None:
        self.check_fits(len(request.prompt_ids), request.params.max_tokens)
        self.requests[request.request_id] = request
        self.scheduler.add(request)

    def fail(self, request: Request, message: str) -> None:
        """Finish a request that could not be added, reporting why to its owner."""
        request.status = RequestStatus.FINISHED
        request.finish_reason = FinishReason.ERROR
        self._emit_finished(request, "", [], [], error=message)

    def abort(self, request_id: str) -> None:
        request = self.requests.get(request_id)
        if request is not None and not request.is_finished:
            self.scheduler.finish(request, FinishReason.ABORT)
            self._emit_finished(request, "", [], [])

    def step(self) -> StepStats:
        start = time.monotonic()
        plan = self.scheduler.schedule()
        stats = StepStats(num_preempted=len(plan.preempted))
        for request in plan.expired:
            self._emit_finished(request, "", [], [])
        if plan.scheduled:
            stats.num_batched_tokens = plan.num_batched_tokens
            stats.num_seqs = len(plan.scheduled)
            try:
                logits = self._execute(plan)
            except Exception as exc:  # one bad step fails its own requests only; the engine keeps serving
                logger.exception("engine step failed; failing its %d requests", len(plan.scheduled))
                for request, _ in plan.scheduled:
                    self.scheduler.finish(request, FinishReason.ERROR)
                    self._emit_finished(request, "", [], [], error=f"engine step failed: {exc}")
            else:
                self._update_from_output(plan, logits, stats)
        stats.duration_s = time.monotonic() - start
        return self.snapshot(stats)

    def snapshot(self, stats: StepStats | None = None) -> StepStats:
        """Fill in queue and cache state (and requests finished since the last stats) without stepping; used after
        aborts leave the engine idle, so gauges never keep showing a request that is gone."""
        stats = stats or StepStats()
        stats.num_running = len(self.scheduler.running)
        stats.num_waiting = len(self.scheduler.waiting)
        stats.kv_blocks_used = self.cache.num_used_blocks
        stats.kv_blocks_total = self.cache.num_blocks
        stats.kv_bytes_used = self.cache.num_used_bytes
        stats.finished, self._finished = self._finished, []
        return stats

    def _execute(self, plan: SchedulerOutput) -> np.ndarray:
        """One forward over every scheduled token -> (num_sampled, vocab_size) float32 logits."""
        num_tokens = plan.num_batched_tokens
        token_ids = np.empty(num_tokens, dtype=np.int64)  # (num_tokens,) int64
        positions = np.empty(num_tokens, dtype=np.int32)  # (num_tokens,) int32
        seq_index = np.empty(num_tokens, dtype=np.int32)  # (num_tokens,) int32
        logits_rows = []
        offset = 0
        for row, (request, num_new) in enumerate(plan.scheduled):
            first = request.num_computed_tokens
            token_ids[offset:offset + num_new] = [request.token_at(i) for i in range(first, first + num_new)]
            positions[offset:offset + num_new] = np.arange(first, first + num_new, dtype=np.int32)
            seq_index[offset:offset + num_new] = row
            offset += num_new
            if first + num_new == request.num_tokens:  # the chunk reaches the newest token: sample after it
                logits_rows.append(offset - 1)
        seq_ids = [id(request) for request, _ in plan.scheduled]
        batch = ForwardBatch(token_ids, positions, seq_index, self.cache.block_tables(seq_ids),
                             np.asarray(logits_rows, dtype=np.int64), self.cache.window_slots(seq_ids))
        return self.model.transformer.forward(batch, self.cache)

    def _update_from_output(self, plan: SchedulerOutput, logits: np.ndarray, stats: StepStats) -> None:
        now = time.monotonic()
        sampled_row = 0
        for request, num_new in plan.scheduled:
            request.num_computed_tokens += num_new
            if not request.output_ids and request.num_computed_tokens == request.num_tokens:
                # The whole prompt once, when its prefill completes: tokens reused from the prefix cache count too,
                # and a recompute after preemption (output_ids not empty) is not new prompt traffic.
                stats.num_prompt_tokens += len(request.prompt_ids)
            if request.num_computed_tokens < request.num_tokens:
                continue  # a prefill chunk that did not reach the end of the prompt yet
            row = logits[sampled_row]
            sampled_row += 1
            try:
                token_id, logprob, top = request.sampler.sample(row, request.output_counts)
                self._append_token(request, token_id, logprob, top, now, stats)
            except Exception as exc:  # one request's sampling or detokenizing failure must not stop the engine
                logger.exception("request %s failed after its forward pass", request.request_id)
                if not request.is_finished:
                    self.scheduler.finish(request, FinishReason.ERROR)
                    self._emit_finished(request, "", [], [], error=f"sampling failed: {exc}")

    def _append_token(self, request: Request, token_id: int, logprob: float, top: list[tuple[int, float]] | None,
                      now: float, stats: StepStats) -> None:
        params = request.params
        request.output_ids.append(token_id)
        request.output_counts[token_id] += 1
        stats.num_generated_tokens += 1
        last = self._last_token_s.get(request.request_id)
        if last is None:
            stats.time_to_first_token_s.append(now - request.arrival_s)
        else:
            stats.inter_token_latency_s.append(now - last)
        self._last_token_s[request.request_id] = now
        logprobs = [TokenLogprob(token_id, logprob, top)] if params.logprobs else []
        reason = None
        text = ""
        stopped_by_string = False
        if token_id in request.eos_token_ids and not params.ignore_eos:
            reason = FinishReason.STOP
        else:
            text, stopped_by_string = request.stop_matcher.push(request.detokenizer.push(token_id))
            if stopped_by_string:
                reason = FinishReason.STOP
            elif len(request.output_ids) >= params.max_tokens or request.num_tokens >= request.max_total_tokens:
                reason = FinishReason.LENGTH
        if reason is None:
            request.on_output(RequestOutput(request.request_id, text, [token_id], logprobs, False, None,
                                            len(request.prompt_ids), len(request.output_ids)))
            return
        if not stopped_by_string:
            # Release what was held back as a possible stop-string prefix or an unfinished character.
            text += request.stop_matcher.push(request.detokenizer.flush())[0] + request.stop_matcher.flush()
        self.scheduler.finish(request, reason)
        self._emit_finished(request, text, [token_id], logprobs)

    def _emit_finished(self, request: Request, text: str, token_ids: list[int], logprobs: list[TokenLogprob],
                       error: str | None = None) -> None:
        now = time.monotonic()
        self.requests.pop(request.request_id, None)
        self._last_token_s.pop(request.request_id, None)
        assert request.status is RequestStatus.FINISHED and request.finish_reason is not None
        queued_until = request.first_scheduled_s if request.first_scheduled_s is not None else now
        self._finished.append(FinishedRequestStats(request.finish_reason, now - request.arrival_s,
                                                   queued_until - request.arrival_s, len(request.prompt_ids),
                                                   len(request.output_ids)))
        request.on_output(RequestOutput(request.request_id, text, token_ids, logprobs, True, request.finish_reason,
                                        len(request.prompt_ids), len(request.output_ids), error))
