"""Overload, soak and disconnects against a real server on 127.0.0.1: twice as many clients as the server holds get
only 200 or 429 (with Retry-After), admitted requests keep a bounded p95 latency, and nothing leaks afterwards:
no KV block, no running request, no growing RSS.

The server holds `max_num_seqs` running plus `max_queue` waiting requests: its capacity. The p95 bound comes from
that and from the latency of a full batch measured at warm-up: an admitted request finds at most `max_queue` requests
waiting and `max_num_seqs` running ahead of it, and a full batch completes `max_num_seqs` of them at a time.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.server_process import ServerProcess
from tests.test_robustness_faults import wait_idle

QUESTION = [{"role": "user", "content": "Tell me about the sea."}]
MAX_TOKENS = 16
# Room for the HTTP work around the engine and for other processes on the same 2 cores.
LATENCY_SLACK = 2.0
RSS_DRIFT_LIMIT = 0.05


@dataclass
class LoadReport:
    statuses: Counter[int] = field(default_factory=Counter)
    missing_retry_after: int = 0
    latencies_s: list[float] = field(default_factory=list)  # of admitted (200) requests
    errors: list[str] = field(default_factory=list)  # anything but a 200 or a well-formed 429

    @property
    def p95_s(self) -> float:
        return statistics.quantiles(self.latencies_s, n=20)[-1] if len(self.latencies_s) >= 2 else 0.0


async def _one_request(client: httpx.AsyncClient, stream: bool, report: LoadReport) -> float:
    """One chat completion; returns how long to wait before the next (Retry-After on a 429)."""
    body = {"model": "default", "messages": QUESTION, "max_tokens": MAX_TOKENS, "ignore_eos": True, "stream": stream}
    start = time.monotonic()
    async with client.stream("POST", "/v1/chat/completions", json=body) as reply:
        text = (await reply.aread()).decode(errors="replace")
    report.statuses[reply.status_code] += 1
    if reply.status_code == 429:
        retry_after = reply.headers.get("retry-after")
        if retry_after is None or not retry_after.isdigit():
            report.missing_retry_after += 1
            return 1.0
        return float(retry_after)
    if reply.status_code != 200:
        report.errors.append(f"{reply.status_code}: {text[:200]}")
    elif stream and not text.rstrip().endswith("data: [DONE]"):
        report.errors.append(f"stream did not end with [DONE]: {text[-200:]}")
    else:
        report.latencies_s.append(time.monotonic() - start)
    return 0.0


async def _client(client: httpx.AsyncClient, index: int, until_s: float, report: LoadReport) -> None:
    rng = random.Random(index)
    while time.monotonic() < until_s:
        try:
            backoff_s = await _one_request(client, stream=index % 2 == 1, report=report)
        except httpx.HTTPError as exc:
            report.errors.append(f"{type(exc).__name__}: {exc}")
            backoff_s = 1.0
        # Retry-After is whole seconds; clients spread their retries over it, as SDKs add jitter.
        await asyncio.sleep(backoff_s * rng.uniform(0.5, 1.0))


async def _run_load(base_url: str, num_clients: int, duration_s: float, timeout_s: float) -> LoadReport:
    report = LoadReport()
    limits = httpx.Limits(max_connections=num_clients, max_keepalive_connections=num_clients)
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout_s, limits=limits) as client:
        until_s = time.monotonic() + duration_s
        await asyncio.gather(*[_client(client, index, until_s, report) for index in range(num_clients)])
    return report


async def _full_batch_latency_s(base_url: str, batch_size: int, timeout_s: float) -> float:
    """Median latency of `batch_size` concurrent requests: one full batch, the unit of service under load."""
    report = LoadReport()
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout_s) as client:
        for _ in range(2):
            await asyncio.gather(*[_one_request(client, stream=False, report=report) for _ in range(batch_size)])
    assert report.statuses == {200: 2 * batch_size}, report
    return statistics.median(report.latencies_s)


def _overload(default_model_path: Path, log_path: Path, max_num_seqs: int, max_queue: int, duration_s: float,
              request_timeout_s: float, warmup_s: float = 0.0, extra_flags: tuple[str, ...] = ()
              ) -> tuple[LoadReport, float, dict[str, float], dict[str, float]]:
    """Twice the capacity in clients for warmup_s, then again for duration_s; returns the report of the second run,
    the p95 bound, and the metrics once idle after the warm-up and after the run."""
    capacity = max_num_seqs + max_queue
    process = ServerProcess(default_model_path, "--max-num-seqs", str(max_num_seqs), "--max-queue", str(max_queue),
                            "--request-timeout-s", str(request_timeout_s), *extra_flags, log_path=log_path)
    try:
        process.wait_ready()
        batch_s = asyncio.run(_full_batch_latency_s(process.base_url, max_num_seqs, request_timeout_s))
        if warmup_s:
            _check_only_200_and_429(asyncio.run(_run_load(process.base_url, 2 * capacity, warmup_s,
                                                          request_timeout_s)))
        warm = wait_idle(process.base_url)
        report = asyncio.run(_run_load(process.base_url, 2 * capacity, duration_s, request_timeout_s))
        idle = wait_idle(process.base_url)
    finally:
        process.stop()
    bound_s = min(request_timeout_s, (max_queue / max_num_seqs + 2) * batch_s * LATENCY_SLACK)
    mib = 2**20
    print(f"\noverload: {2 * capacity} clients for {duration_s:.0f} s against capacity {capacity} "
          f"({max_num_seqs} running + {max_queue} queued): {dict(report.statuses)}, admitted p95 "
          f"{report.p95_s:.2f} s (bound {bound_s:.2f} s; full batch {batch_s:.2f} s), RSS after "
          f"{warmup_s:.0f} s warm-up {warm['process_resident_memory_bytes'] / mib:.0f} MiB, after the run "
          f"{idle['process_resident_memory_bytes'] / mib:.0f} MiB, KV usage after "
          f"{idle['bitserve_kv_cache_usage_ratio']}, running after {idle['bitserve_num_requests_running']:.0f}")
    return report, bound_s, warm, idle


def _check_only_200_and_429(report: LoadReport) -> None:
    assert not report.errors, report.errors[:5]
    assert set(report.statuses) <= {200, 429}, report.statuses
    assert report.missing_retry_after == 0


def _check_overload(report: LoadReport, bound_s: float) -> None:
    _check_only_200_and_429(report)
    assert report.statuses[200] > 0 and report.statuses[429] > 0, f"not an overload: {report.statuses}"
    assert report.p95_s <= bound_s, f"admitted p95 {report.p95_s:.2f} s over the bound {bound_s:.2f} s"


def test_overload_short(default_model_path: Path, tmp_path: Path) -> None:
    report, bound_s, _, idle = _overload(default_model_path, tmp_path / "server.log", max_num_seqs=4, max_queue=4,
                                         duration_s=20, request_timeout_s=60)
    _check_overload(report, bound_s)
    assert idle["bitserve_kv_cache_usage_ratio"] == 0


@pytest.mark.slow
def test_overload_soak_two_minutes(default_model_path: Path, tmp_path: Path) -> None:
    # A 32 MiB KV pool: the blocks kept as cached prefixes (a quarter of the pool, every prompt here is new) are all
    # in use within the warm-up, so what RSS does afterwards is the server's own, not the pool filling up.
    report, bound_s, warm, idle = _overload(default_model_path, tmp_path / "server.log", max_num_seqs=8, max_queue=8,
                                            duration_s=120, request_timeout_s=120, warmup_s=30,
                                            extra_flags=("--kv-cache-bytes", str(32 << 20)))
    _check_overload(report, bound_s)
    assert idle["bitserve_kv_cache_usage_ratio"] == 0
    drift = idle["process_resident_memory_bytes"] / warm["process_resident_memory_bytes"] - 1
    assert abs(drift) < RSS_DRIFT_LIMIT, f"RSS drifted {drift:+.1%} after warm-up (limit {RSS_DRIFT_LIMIT:.0%})"


# --- disconnects --------------------------------------------------------------------------------------------------

NUM_DISCONNECTS = 100


async def _disconnect_mid_stream(client: httpx.AsyncClient, index: int, content_chunks: Counter[int]) -> None:
    """Open a stream and drop the connection after `index % 4` content chunks (0: while still queued)."""
    body = {"model": "default", "messages": QUESTION, "max_tokens": 64, "ignore_eos": True, "stream": True}
    wanted = index % 4
    async with client.stream("POST", "/v1/chat/completions", json=body) as reply:
        assert reply.status_code == 200
        seen = 0
        async for line in reply.aiter_lines():
            if seen >= wanted:
                break
            if '"content":"' in line and '"content":""' not in line:
                seen += 1
    content_chunks[seen] += 1


def test_hundred_clients_disconnect_mid_stream(default_model_path: Path, tmp_path: Path) -> None:
    process = ServerProcess(default_model_path, "--max-num-seqs", "8", "--max-queue", str(NUM_DISCONNECTS),
                            log_path=tmp_path / "server.log")
    try:
        process.wait_ready()
        content_chunks: Counter[int] = Counter()

        async def run() -> None:
            limits = httpx.Limits(max_connections=NUM_DISCONNECTS)
            async with httpx.AsyncClient(base_url=process.base_url, timeout=120, limits=limits) as client:
                await asyncio.gather(*[_disconnect_mid_stream(client, index, content_chunks)
                                       for index in range(NUM_DISCONNECTS)])

        asyncio.run(asyncio.wait_for(run(), 300))
        idle = wait_idle(process.base_url)
        print(f"\ndisconnects: {NUM_DISCONNECTS} streams dropped after 0-3 content chunks {dict(content_chunks)}; "
              f"running {idle['bitserve_num_requests_running']:.0f}, KV usage {idle['bitserve_kv_cache_usage_ratio']}")
        assert sum(content_chunks.values()) == NUM_DISCONNECTS
        assert idle["bitserve_num_requests_running"] == 0 and idle["bitserve_kv_cache_usage_ratio"] == 0
        finished = idle["bitserve_requests_total"]
        assert finished >= NUM_DISCONNECTS, f"only {finished:.0f} requests finished"
        after = httpx.post(f"{process.base_url}/v1/chat/completions", timeout=60, json={
            "model": "default", "messages": QUESTION, "max_tokens": 4})
        assert after.status_code == 200
    finally:
        process.stop()
