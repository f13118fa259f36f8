"""Prometheus metrics (DESIGN §6, vLLM's semantics under `bitserve_`), updated from engine step statistics only."""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

from engine.engine import StepStats
from engine.request import FinishReason

# CPU serving spans milliseconds (a decode step of a small model) to minutes (a long generation under load).
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5,
                     2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 300.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        r, m = self.registry, ["model"]
        self.time_to_first_token = Histogram("bitserve_time_to_first_token_seconds", "Arrival to first output token.",
                                             m, buckets=LATENCY_BUCKETS_S, registry=r)
        self.inter_token_latency = Histogram("bitserve_inter_token_latency_seconds",
                                             "Time between consecutive output tokens of a request.", m,
                                             buckets=LATENCY_BUCKETS_S, registry=r)
        self.e2e_request_latency = Histogram("bitserve_e2e_request_latency_seconds", "Arrival to finish.", m,
                                             buckets=LATENCY_BUCKETS_S, registry=r)
        self.request_queue_time = Histogram("bitserve_request_queue_time_seconds",
                                            "Arrival to first scheduled in an engine step.", m,
                                            buckets=LATENCY_BUCKETS_S, registry=r)
        self.engine_step = Histogram("bitserve_engine_step_seconds", "Duration of one engine step.", m,
                                     buckets=LATENCY_BUCKETS_S, registry=r)
        self.batch_size = Histogram("bitserve_batch_size", "Tokens computed per engine step.", m,
                                    buckets=BATCH_BUCKETS, registry=r)
        self.prompt_tokens = Counter("bitserve_prompt_tokens", "Prompt tokens prefilled.", m, registry=r)
        self.generation_tokens = Counter("bitserve_generation_tokens", "Tokens generated.", m, registry=r)
        self.requests = Counter("bitserve_requests", "Finished requests.", ["model", "finish_reason"], registry=r)
        self.model_swaps = Counter("bitserve_model_swaps", "Admin model loads (success or failure) and activations.",
                                   ["result"], registry=r)
        self.http_requests = Counter("bitserve_http_requests", "HTTP responses by route and status code.",
                                     ["route", "status"], registry=r)
        self.num_requests_running = Gauge("bitserve_num_requests_running", "Requests in the running batch.", m,
                                          registry=r)
        self.num_requests_waiting = Gauge("bitserve_num_requests_waiting", "Requests waiting for admission.", m,
                                          registry=r)
        self.kv_cache_usage = Gauge("bitserve_kv_cache_usage_ratio", "Fraction of KV cache blocks in use.", m,
                                    registry=r)
        self.kv_cache_bytes = Gauge("bitserve_kv_cache_bytes", "Bytes of the KV cache pool.", m, registry=r)
        self.model_weight_bytes = Gauge("bitserve_model_weight_bytes", "Bytes of model weights held.", m, registry=r)
        for result in ("success", "failure"):
            self.model_swaps.labels(result)  # present at 0 from the start, so rates exist before the first swap

    def register_model(self, model_id: str, weight_bytes: int, kv_cache_bytes: int) -> None:
        self.model_weight_bytes.labels(model_id).set(weight_bytes)
        self.kv_cache_bytes.labels(model_id).set(kv_cache_bytes)
        # Every per-model series exists from the start, at 0: a rate over a window that begins before the first
        # request then counts that request, and a scrape shows every family as soon as the model serves.
        for family in (self.time_to_first_token, self.inter_token_latency, self.e2e_request_latency,
                       self.request_queue_time, self.engine_step, self.batch_size, self.prompt_tokens,
                       self.generation_tokens, self.num_requests_running, self.num_requests_waiting,
                       self.kv_cache_usage):
            family.labels(model_id)
        for reason in FinishReason:
            self.requests.labels(model_id, reason.value)

    def forget_model(self, model_id: str) -> None:
        """Drop an unloaded model's gauges (its counters and histograms keep their history)."""
        for gauge in (self.model_weight_bytes, self.kv_cache_bytes, self.num_requests_running,
                      self.num_requests_waiting, self.kv_cache_usage):
            with contextlib.suppress(KeyError):
                gauge.remove(model_id)

    def observe_step(self, model_id: str, stats: StepStats) -> None:
        """Called on the engine thread after every step; prometheus_client objects are thread-safe."""
        if stats.num_batched_tokens:
            self.engine_step.labels(model_id).observe(stats.duration_s)
            self.batch_size.labels(model_id).observe(stats.num_batched_tokens)
        self.prompt_tokens.labels(model_id).inc(stats.num_prompt_tokens)
        self.generation_tokens.labels(model_id).inc(stats.num_generated_tokens)
        for latency in stats.time_to_first_token_s:
            self.time_to_first_token.labels(model_id).observe(latency)
        for latency in stats.inter_token_latency_s:
            self.inter_token_latency.labels(model_id).observe(latency)
        for finished in stats.finished:
            self.requests.labels(model_id, finished.finish_reason.value).inc()
            self.e2e_request_latency.labels(model_id).observe(finished.e2e_s)
            self.request_queue_time.labels(model_id).observe(finished.queue_s)
        self.num_requests_running.labels(model_id).set(stats.num_running)
        self.num_requests_waiting.labels(model_id).set(stats.num_waiting)
        self.kv_cache_usage.labels(model_id).set(stats.kv_blocks_used / max(stats.kv_blocks_total, 1))
