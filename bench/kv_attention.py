"""Decode attention speed per KV cache mode against fp16 and the memory a long context takes, on the default
model's attention shape (30 layers, 9 query heads over 3 KV heads, head_dim 64); with --ttft, the time to first
token of a request whose 500-token prefix another request computed before. Prints tables; run from the repository
root: `python -m bench.kv_attention --help`.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

# Before numba is imported: reuse compiled kernels across runs.
os.environ.setdefault("NUMBA_CACHE_DIR", os.path.join(os.path.dirname(os.path.dirname(__file__)), ".numba_cache"))

import numpy as np

from bench.kv_quality import default_text
from engine import load_model
from engine.config import DEFAULT_KV_CACHE_DTYPE, CacheConfig, KVCacheDType, ModelArgs, SchedulerConfig
from engine.default_model import pull_default_model
from engine.detokenizer import IncrementalDetokenizer
from engine.engine import LLMEngine
from engine.kernels.attention import paged_attention, plan_attention
from engine.kernels.kv_quant import store_window, write_kv
from engine.kv_cache import KVCache, bytes_per_token, window_bytes_per_seq
from engine.loaded_model import LoadedModel
from engine.request import Request
from engine.runtime import configure_threads
from engine.sampling import SamplingParams

SMOLLM2_ARGS = ModelArgs(architecture="llama", hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3,
                         intermediate_size=1536, vocab_size=49152, max_position_embeddings=8192)
MODES: tuple[KVCacheDType, ...] = ("fp16", "int8", "q4", "q3")


def filled_cache(args: ModelArgs, dtype: KVCacheDType, num_tokens: int, seed: int = 0) -> KVCache:
    """One sequence (id 0) of `num_tokens` random keys and values in every layer, written in 512-token chunks the
    way a prefill writes them (blocks and exact window)."""
    rng = np.random.default_rng(seed)
    cache = KVCache.for_tokens(args, num_tokens, dtype)
    cache.allocate(0, num_tokens)
    tables, slots = cache.block_tables([0]), cache.window_slots([0])
    for first in range(0, num_tokens, 512):
        positions = np.arange(first, min(first + 512, num_tokens), dtype=np.int32)  # (chunk,) int32
        seq_index = np.zeros(positions.size, dtype=np.int32)  # (chunk,) int32
        plan = plan_attention(seq_index, positions, cache.layout)
        shape = (positions.size, args.num_kv_heads, args.head_dim)
        for layer in range(args.num_layers):
            k = rng.standard_normal(shape, dtype=np.float32)  # (chunk, num_kv_heads, head_dim) float32
            v = rng.standard_normal(shape, dtype=np.float32)
            exact = write_kv(k, v, cache.pool[layer], cache.layout, tables, seq_index, positions)
            store_window(exact, cache.window[layer], cache.layout, seq_index, positions, slots, plan.window_starts)
    return cache


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def context_rss_growth(args: ModelArgs, dtype: KVCacheDType, num_tokens: int) -> tuple[int, int]:
    """Resident memory a `num_tokens` context adds to a 512 MiB pool (written like a prefill) -> (measured growth,
    expected: tokens x bytes per token x layers, plus one sequence's exact-window buffer)."""
    rng = np.random.default_rng(0)
    cache = KVCache.from_config(args, CacheConfig(512 << 20, dtype), max_num_seqs=16)
    shape = (512, args.num_kv_heads, args.head_dim)
    k = rng.standard_normal(shape, dtype=np.float32)  # (512, num_kv_heads, head_dim) float32, reused per chunk
    v = rng.standard_normal(shape, dtype=np.float32)
    cache.allocate(0, num_tokens)
    tables, slots = cache.block_tables([0]), cache.window_slots([0])
    before = rss_bytes()
    for first in range(0, num_tokens, 512):
        positions = np.arange(first, min(first + 512, num_tokens), dtype=np.int32)  # (chunk,) int32
        seq_index = np.zeros(positions.size, dtype=np.int32)  # (chunk,) int32
        plan = plan_attention(seq_index, positions, cache.layout)
        for layer in range(args.num_layers):
            exact = write_kv(k[:positions.size], v[:positions.size], cache.pool[layer], cache.layout, tables,
                             seq_index, positions)
            store_window(exact, cache.window[layer], cache.layout, seq_index, positions, slots, plan.window_starts)
    growth = rss_bytes() - before
    window = window_bytes_per_seq(args, cache.layout)
    return growth, num_tokens * bytes_per_token(args, dtype) * args.num_layers + window


def decode_attention_ms(args: ModelArgs, dtype: KVCacheDType, context: int, budget_s: float) -> float:
    """Median time of one decode token's attention over all layers at position context - 1, in ms (the token's
    own write is done once, outside the timing)."""
    cache = filled_cache(args, dtype, context)
    rng = np.random.default_rng(1)
    q = rng.standard_normal((1, args.num_heads, args.head_dim), dtype=np.float32)  # (1, num_heads, head_dim)
    new = rng.standard_normal((1, args.num_kv_heads, args.head_dim), dtype=np.float32)  # (1, num_kv_heads, head_dim)
    tables, slots = cache.block_tables([0]), cache.window_slots([0])
    seq_index = np.zeros(1, dtype=np.int32)  # (1,) int32
    positions = np.array([context - 1], dtype=np.int32)  # (1,) int32
    plan = plan_attention(seq_index, positions, cache.layout)
    exact = [write_kv(new, new, cache.pool[layer], cache.layout, tables, seq_index, positions)
             for layer in range(args.num_layers)]
    durations = []
    deadline = time.perf_counter() + budget_s
    while len(durations) < 3 or time.perf_counter() < deadline:
        start = time.perf_counter()
        for layer in range(args.num_layers):
            paged_attention(q, exact[layer], cache.pool[layer], cache.window[layer], cache.layout, tables, seq_index,
                            positions, slots, plan)
        durations.append(time.perf_counter() - start)
    return float(np.median(durations)) * 1e3


def time_to_first_token_s(engine: LLMEngine, model: LoadedModel, prompt: list[int], request_id: str) -> float:
    """Run one request (max_tokens 1) alone through the engine -> seconds from submission to its token."""
    done: list[float] = []
    request = Request(request_id, prompt, SamplingParams(temperature=0.0, max_tokens=1),
                      IncrementalDetokenizer(model.tokenizer, prompt), frozenset(), model.args.max_position_embeddings,
                      lambda output: done.append(time.perf_counter()))
    start = time.perf_counter()
    engine.add_request(request)
    while engine.has_work:
        engine.step()
    return done[0] - start


def prefix_ttft(model: LoadedModel, dtype: KVCacheDType, prefix: list[int]) -> tuple[float, float, int]:
    """TTFT of a request sharing `prefix` with one that ran before -> (seconds without prefix caching, with it,
    prefix tokens reused)."""
    timings = []
    for caching in (False, True):
        engine = LLMEngine(model, SchedulerConfig(max_num_batched_tokens=1024),
                           CacheConfig(256 << 20, dtype, enable_prefix_caching=caching))
        time_to_first_token_s(engine, model, [*prefix, 11, 12, 13], "first")
        reused = engine.cache.tokens_in(len(engine.cache.match_prefix([*prefix, 21, 22, 23])))
        timings.append(time_to_first_token_s(engine, model, [*prefix, 21, 22, 23], "second"))
    return timings[0], timings[1], reused


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--budget-s", type=float, default=1.0, help="timing budget per mode and context")
    parser.add_argument("--memory-tokens", type=int, default=4000, help="context whose resident memory is measured")
    parser.add_argument("--ttft", nargs="*", metavar="MODE", help="measure prefix-sharing TTFT in these modes (the "
                        "default model; none given: fp16 and the default mode)")
    parser.add_argument("--prefix-tokens", type=int, default=500)
    parser.add_argument("--threads", type=int, default=None, help="kernel threads (default: every core); on a "
                        "machine others are using, 1 gives stable numbers")
    options = parser.parse_args()
    threads = configure_threads(options.threads)
    args = SMOLLM2_ARGS
    fp16_bytes = bytes_per_token(args, "fp16")
    print(f"decode attention per token, {args.num_layers} layers, {args.num_heads}/{args.num_kv_heads} heads, "
          f"head_dim {args.head_dim}, {threads} threads; ratio = fp16 time / mode time")
    baseline: dict[int, float] = {}
    for dtype in MODES:
        cells = []
        for context in options.contexts:
            ms = decode_attention_ms(args, dtype, context, options.budget_s)
            baseline.setdefault(context, ms)
            cells.append(f"ctx{context}={ms:.3f}ms (x{baseline[context] / ms:.2f})")
        per_token = bytes_per_token(args, dtype)
        print(f"mode={dtype:<5} bytes/token/layer={per_token} ({per_token / fp16_bytes:.3f}x fp16) " + " ".join(cells))
    if options.ttft is not None:
        model = load_model(pull_default_model(log=lambda message: None), progress=lambda done, total: None)
        prefix = model.tokenizer.encode(default_text().read_text())[:options.prefix_tokens]
        print(f"time to first token of a request whose first {len(prefix)} tokens a previous request computed")
        for dtype in options.ttft or ["fp16", DEFAULT_KV_CACHE_DTYPE]:
            cold_s, warm_s, reused = prefix_ttft(model, dtype, prefix)
            print(f"mode={dtype:<5} without prefix caching={cold_s:.2f}s with={warm_s:.2f}s ({reused} tokens reused) "
                  f"gain x{cold_s / warm_s:.1f}")
    print(f"resident memory added by a {options.memory_tokens}-token context (expected: tokens x bytes/token x "
          f"layers + one exact-window buffer, which the last window may only partly fill)")
    context_rss_growth(args, "fp16", 64)  # loads the kernels, which would count as growth
    for dtype in MODES:
        growth, expected = context_rss_growth(args, dtype, options.memory_tokens)
        print(f"mode={dtype:<5} measured={growth / 1e6:.2f} MB expected={expected / 1e6:.2f} MB "
              f"(x{growth / expected:.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
