"""/metrics against a real server: every DESIGN §6 family with its `model` label, buckets from milliseconds to minutes,
and counters that match the traffic sent exactly (requests, prompt tokens, generated tokens, latency observations)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.server_process import ServerProcess

MODEL_ID = "SmolLM2-135M-Instruct.Q4_1"
SETTLE_S = 30.0  # bound on the wait for the engine thread's last step statistics to reach /metrics

# DESIGN §6, by type; each carries the `model` label.
HISTOGRAMS = ("bitserve_time_to_first_token_seconds", "bitserve_inter_token_latency_seconds",
              "bitserve_e2e_request_latency_seconds", "bitserve_request_queue_time_seconds",
              "bitserve_engine_step_seconds", "bitserve_batch_size")
COUNTERS = ("bitserve_prompt_tokens", "bitserve_generation_tokens", "bitserve_requests")
GAUGES = ("bitserve_num_requests_running", "bitserve_num_requests_waiting", "bitserve_kv_cache_usage_ratio",
          "bitserve_kv_cache_bytes", "bitserve_model_weight_bytes")


@pytest.fixture(scope="module")
def server(default_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("server") / "server.log"
    process = ServerProcess(default_model_path, "--max-num-seqs", "4", "--max-num-batched-tokens", "64",
                            log_path=log)
    try:
        yield process.wait_ready()
    finally:
        process.stop()


def _samples(server: ServerProcess) -> list:
    text = httpx.get(f"{server.base_url}/metrics").text
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


def _value(samples: list, name: str, **labels: str) -> float:
    return sum(s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


async def _traffic(base_url: str) -> list[tuple[int, int]]:
    """Chat and legacy completions, streamed and not, several at once; (prompt, completion) tokens of each, as the
    responses report them. ignore_eos makes every request generate exactly its max_tokens."""
    client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120)
    fixed = {"temperature": 0, "extra_body": {"ignore_eos": True}}

    async def chat(content: str, max_tokens: int) -> tuple[int, int]:
        reply = await client.chat.completions.create(model="default", messages=[{"role": "user", "content": content}],
                                                     max_tokens=max_tokens, **fixed)
        return reply.usage.prompt_tokens, reply.usage.completion_tokens

    async def chat_stream(content: str, max_tokens: int) -> tuple[int, int]:
        stream = await client.chat.completions.create(
            model="default", messages=[{"role": "user", "content": content}], max_tokens=max_tokens, stream=True,
            stream_options={"include_usage": True}, **fixed)
        usage = [chunk.usage async for chunk in stream if chunk.usage is not None][-1]
        return usage.prompt_tokens, usage.completion_tokens

    async def completion(prompt: str, max_tokens: int, stream: bool) -> tuple[int, int]:
        if not stream:
            reply = await client.completions.create(model="default", prompt=prompt, max_tokens=max_tokens, **fixed)
            return reply.usage.prompt_tokens, reply.usage.completion_tokens
        chunks = await client.completions.create(model="default", prompt=prompt, max_tokens=max_tokens, stream=True,
                                                 stream_options={"include_usage": True}, **fixed)
        usage = [chunk.usage async for chunk in chunks if chunk.usage is not None][-1]
        return usage.prompt_tokens, usage.completion_tokens

    long_question = "Explain, step by step, how a bicycle stays upright while moving. " * 6  # several prefill chunks
    return list(await asyncio.gather(
        chat("What is the capital of France?", 5), chat(long_question, 9), chat_stream("Name three colours.", 7),
        chat_stream("Count to ten.", 1), completion("The capital of France is", 6, stream=False),
        completion("Once upon a time", 4, stream=True)))


def test_counters_match_the_traffic_exactly(server: ServerProcess) -> None:
    before = _samples(server)
    sent = asyncio.run(_traffic(server.base_url))
    num_requests = len(sent)
    deadline = time.monotonic() + SETTLE_S
    while True:
        # The reply reaches the client during a step; the step's statistics are published right after it.
        after = _samples(server)
        settled = _value(after, "bitserve_requests_total") - _value(before, "bitserve_requests_total") >= num_requests
        if settled or time.monotonic() > deadline:
            break
        time.sleep(0.05)

    def delta(name: str, **labels: str) -> float:
        return _value(after, name, model=MODEL_ID, **labels) - _value(before, name, model=MODEL_ID, **labels)

    prompt_tokens = sum(prompt for prompt, _ in sent)
    generated_tokens = sum(completion for _, completion in sent)
    assert generated_tokens == 5 + 9 + 7 + 1 + 6 + 4
    assert delta("bitserve_requests_total", finish_reason="length") == num_requests
    assert delta("bitserve_requests_total") == num_requests
    assert delta("bitserve_prompt_tokens_total") == prompt_tokens
    assert delta("bitserve_generation_tokens_total") == generated_tokens
    # One observation per request, or per token after a request's first one.
    for histogram in ("bitserve_time_to_first_token_seconds", "bitserve_e2e_request_latency_seconds",
                      "bitserve_request_queue_time_seconds"):
        assert delta(f"{histogram}_count") == num_requests, histogram
    assert delta("bitserve_inter_token_latency_seconds_count") == generated_tokens - num_requests
    # Steps computed every generated token but each request's last (sampled, never fed back), and at most every
    # prompt token (fewer when a shared prefix is reused from the KV cache).
    decoded = generated_tokens - num_requests
    assert decoded < delta("bitserve_batch_size_sum") <= prompt_tokens + decoded
    assert delta("bitserve_num_requests_running") == 0 and _value(after, "bitserve_num_requests_running") == 0
    for route, num_sent in (("/v1/chat/completions", 4), ("/v1/completions", 2)):
        labels = {"route": route, "status": "200"}
        assert (_value(after, "bitserve_http_requests_total", **labels)
                - _value(before, "bitserve_http_requests_total", **labels)) == num_sent, route


def test_every_family_is_exported_with_the_model_label(server: ServerProcess) -> None:
    openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0).chat.completions.create(
        model="default", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    samples = _samples(server)
    names = {s.name for s in samples}
    for family in HISTOGRAMS:
        for suffix in ("_bucket", "_sum", "_count"):
            labelled = [s for s in samples if s.name == family + suffix]
            assert labelled and all(s.labels["model"] == MODEL_ID for s in labelled), family + suffix
    for family in (*[f"{c}_total" for c in COUNTERS], *GAUGES):
        labelled = [s for s in samples if s.name == family]
        assert labelled and all(s.labels["model"] == MODEL_ID for s in labelled), family
    assert {s.labels["result"] for s in samples if s.name == "bitserve_model_swaps_total"} == {"success", "failure"}
    assert "process_resident_memory_bytes" in names and "process_cpu_seconds_total" in names
    assert _value(samples, "bitserve_model_weight_bytes", model=MODEL_ID) > 50e6
    assert _value(samples, "bitserve_kv_cache_bytes", model=MODEL_ID) > 0


def test_latency_buckets_span_milliseconds_to_minutes(server: ServerProcess) -> None:
    for family in HISTOGRAMS[:-1]:
        bounds = sorted(float(s.labels["le"]) for s in _samples(server) if s.name == f"{family}_bucket")
        assert bounds[0] <= 0.001 and bounds[-2] >= 120 and bounds[-1] == float("inf"), family
