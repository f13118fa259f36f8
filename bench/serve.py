"""Serving benchmark: streaming chat clients at several concurrencies against a real bitserve on 127.0.0.1.

Reports aggregate output tok/s, time to first token p50/p95, inter-token latency p50/p95 and end-to-end p50, with
llama-server's figures from PEERS.md beside them; `--health-probe` also measures /health latency while a 2,000-token
prefill runs. Run from the repository root: `python -m bench.serve --help`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("NUMBA_CACHE_DIR", str(Path(__file__).resolve().parents[1] / ".numba_cache"))

import httpx

from bench.random_bitnet import write_random_bitnet
from engine.default_model import pull_default_model
from engine.random_model import BITNET_2B4T_ARGS
from tests.server_process import ServerProcess

# llama-server on the default model, PEERS.md: clients -> (output tok/s, TTFT p50 s, TTFT p95 s, e2e p50 s).
LLAMA_SERVER_4_SLOTS = {1: (104, 0.054, 0.069, 0.49), 4: (143, 0.094, 0.129, 1.32), 8: (141, 1.32, 1.83, 2.64)}
TOPICS = ["rivers", "volcanoes", "bridges", "owls", "glaciers", "deserts", "comets", "forests", "harbors", "bees",
          "castles", "tides", "clocks", "lighthouses", "maps", "orchards"]


@dataclass
class RequestTiming:
    ttft_s: float
    token_gaps_s: list[float] = field(default_factory=list)
    e2e_s: float = 0.0
    num_tokens: int = 0  # completion tokens, from the usage chunk
    num_chunks: int = 0  # chunks with text: fewer than tokens when tokens decode to no text (a random model's)


async def one_stream(http: httpx.AsyncClient, prompt: str, max_tokens: int) -> RequestTiming:
    body = {"model": "default", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    timing = RequestTiming(ttft_s=float("nan"))
    last = None
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                timing.num_tokens = chunk["usage"]["completion_tokens"]
            delta = chunk["choices"]
            if not delta or not delta[0]["delta"].get("content"):
                continue
            now = time.perf_counter()
            if last is None:
                timing.ttft_s = now - start
            else:
                timing.token_gaps_s.append(now - last)
            last = now
            timing.num_chunks += 1
    timing.e2e_s = time.perf_counter() - start
    return timing


async def run_level(base_url: str, concurrency: int, duration_s: float, max_tokens: int) -> dict[str, float]:
    timings: list[RequestTiming] = []
    deadline = time.perf_counter() + duration_s

    async def client(index: int) -> None:
        round_index = 0
        async with httpx.AsyncClient(base_url=base_url, timeout=600) as http:
            while time.perf_counter() < deadline:
                topic = TOPICS[(index + round_index) % len(TOPICS)]
                prompt = f"Client {index}, round {round_index}: write a short paragraph about {topic}, with facts."
                timings.append(await one_stream(http, prompt, max_tokens))
                round_index += 1

    start = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(concurrency)))
    elapsed_s = time.perf_counter() - start
    ttfts = sorted(t.ttft_s for t in timings)
    gaps = sorted(gap for t in timings for gap in t.token_gaps_s)
    return {
        "requests": len(timings),
        "output_tok_s": sum(t.num_tokens for t in timings) / elapsed_s,
        "ttft_p50": _percentile(ttfts, 50), "ttft_p95": _percentile(ttfts, 95),
        "itl_p50": _percentile(gaps, 50), "itl_p95": _percentile(gaps, 95),
        "e2e_p50": statistics.median(t.e2e_s for t in timings),
        "tokens_per_chunk": sum(t.num_tokens for t in timings) / max(1, sum(t.num_chunks for t in timings)),
    }


async def health_during_long_prefill(base_url: str, prompt_tokens: int) -> dict[str, float]:
    """Poll /health every 10 ms while one request prefills `prompt_tokens` tokens; latency of each poll."""
    latencies: list[float] = []
    async with httpx.AsyncClient(base_url=base_url, timeout=600) as http:
        body = {"model": "default", "prompt": list(range(100, 100 + prompt_tokens)), "max_tokens": 1}
        long_request = asyncio.ensure_future(http.post("/v1/completions", json=body))
        while not long_request.done():
            start = time.perf_counter()
            (await http.get("/health")).raise_for_status()
            latencies.append(time.perf_counter() - start)
            await asyncio.sleep(0.01)
        prefill_s = (await long_request).elapsed.total_seconds()
    latencies.sort()
    return {"polls": len(latencies), "p50_ms": 1e3 * _percentile(latencies, 50),
            "p99_ms": 1e3 * _percentile(latencies, 99), "max_ms": 1e3 * latencies[-1], "prefill_s": prefill_s}


def _percentile(values: list[float], percent: float) -> float:
    return values[min(len(values) - 1, round(percent / 100 * (len(values) - 1)))] if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", choices=["default", "bitnet-2b4t-random"], default=["default"])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--duration-s", type=float, default=30.0, help="load time per concurrency level")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--health-probe", action="store_true", help="also time /health during a 2,000-token prefill")
    parser.add_argument("--server-flags", default="--max-num-seqs 16", help="extra `bitserve serve` flags")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            model_path = pull_default_model() if name == "default" else \
                write_random_bitnet(BITNET_2B4T_ARGS, Path(tmp) / "bitnet-2b4t-random")
            server = ServerProcess(model_path, *args.server_flags.split(), log_path=Path(tmp) / "server.log")
            try:
                server.wait_ready(timeout_s=900)
                print(f"\n{name}: {args.duration_s:.0f} s per level, max_tokens {args.max_tokens}, temperature 0")
                print("clients  requests  output tok/s  TTFT p50 / p95 (s)  ITL p50 / p95 (ms)  e2e p50 (s)  "
                      "vs llama-server 4 slots")
                for concurrency in args.concurrency:
                    r = asyncio.run(run_level(server.base_url, concurrency, args.duration_s, args.max_tokens))
                    peer = LLAMA_SERVER_4_SLOTS.get(concurrency) if name == "default" else None
                    versus = f"{r['output_tok_s'] / peer[0]:.2f}x tok/s, TTFT p95 {peer[2]:.2f} s" if peer else ""
                    print(f"{concurrency:7d}  {r['requests']:8d}  {r['output_tok_s']:12.1f}  "
                          f"{r['ttft_p50']:8.3f} / {r['ttft_p95']:.3f}  {1e3 * r['itl_p50']:8.1f} / "
                          f"{1e3 * r['itl_p95']:.1f}  {r['e2e_p50']:11.2f}  {versus}")
                    if r["tokens_per_chunk"] > 1.05:  # ITL is then the gap between text chunks, not tokens
                        print(f"         ({r['tokens_per_chunk']:.2f} tokens per text chunk: ITL spans that many)")
                if args.health_probe:
                    h = asyncio.run(health_during_long_prefill(server.base_url, 2000))
                    print(f"/health during a 2,000-token prefill ({h['prefill_s']:.1f} s): {h['polls']} polls, "
                          f"p50 {h['p50_ms']:.1f} ms, p99 {h['p99_ms']:.1f} ms, max {h['max_ms']:.1f} ms")
            finally:
                server.stop()


if __name__ == "__main__":
    main()
