"""Numba attention over a paged float KV cache: write new keys/values, then causal attention for a flat token batch.

Kernels only: arrays in, arrays out. Block allocation and sequence bookkeeping live in engine/kv_cache.py.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange


def write_kv(
    k: np.ndarray, v: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray,
    block_tables: np.ndarray, seq_index: np.ndarray, positions: np.ndarray,
) -> None:
    """Store each token's key and value at its position in its sequence's blocks.

    k, v: (num_tokens, num_kv_heads, head_dim) float32
    k_cache, v_cache: (num_blocks, block_size, num_kv_heads, head_dim) float32, one layer's pool
    block_tables: (num_seqs, max_blocks_per_seq) int32; seq_index, positions: (num_tokens,) int32
    """
    _check_batch(k, k_cache, block_tables, seq_index, positions)
    _write_kv(k, v, k_cache, v_cache, block_tables, seq_index, positions)


def paged_attention(
    q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray,
    block_tables: np.ndarray, seq_index: np.ndarray, positions: np.ndarray,
) -> np.ndarray:
    """Causal attention of every query token over its own sequence's cache, positions 0..position inclusive.

    q: (num_tokens, num_heads, head_dim) float32, RoPE applied -> (num_tokens, num_heads, head_dim) float32.
    The cache must already hold this batch's keys and values (write_kv first), so prefill chunks and decode tokens
    are one code path. Each (token, head) is reduced in the same order whatever the batch, so output is batch invariant.
    """
    _check_batch(q, k_cache, block_tables, seq_index, positions)
    if q.shape[1] % k_cache.shape[2]:
        raise ValueError(f"num_heads {q.shape[1]} is not a multiple of num_kv_heads {k_cache.shape[2]}")
    out = np.empty_like(q)
    _paged_attention(q, k_cache, v_cache, block_tables, seq_index, positions, np.float32(1.0 / math.sqrt(q.shape[2])),
                     out)
    return out


def _check_batch(x: np.ndarray, cache: np.ndarray, block_tables: np.ndarray, seq_index: np.ndarray,
                 positions: np.ndarray) -> None:
    if x.dtype != np.float32 or cache.dtype != np.float32 or not x.flags.c_contiguous:
        raise ValueError("expected C-contiguous float32 activations and a float32 cache")
    if x.shape[2] != cache.shape[3]:
        raise ValueError(f"head_dim {x.shape[2]} does not match the cache's {cache.shape[3]}")
    if seq_index.dtype != np.int32 or positions.dtype != np.int32 or block_tables.dtype != np.int32:
        raise ValueError("block_tables, seq_index and positions must be int32")
    if not (seq_index.shape[0] == positions.shape[0] == x.shape[0]):
        raise ValueError("seq_index and positions need one entry per token")
    if positions.size and positions.max() >= block_tables.shape[1] * cache.shape[1]:
        raise ValueError("a position lies past the blocks in its block table")


@njit(cache=True, nogil=True)
def _write_kv(k, v, k_cache, v_cache, block_tables, seq_index, positions):  # pragma: no cover - jitted
    block_size = k_cache.shape[1]
    for t in range(k.shape[0]):
        block = block_tables[seq_index[t], positions[t] // block_size]
        offset = positions[t] % block_size
        k_cache[block, offset] = k[t]
        v_cache[block, offset] = v[t]


@njit(cache=True, nogil=True, parallel=True)
def _paged_attention(q, k_cache, v_cache, block_tables, seq_index, positions, scale, out):  # pragma: no cover
    num_tokens, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    queries_per_kv = num_heads // num_kv_heads
    for item in prange(num_tokens * num_heads):
        t = item // num_heads
        h = item % num_heads
        g = h // queries_per_kv
        context = positions[t] + 1
        table = block_tables[seq_index[t]]
        scores = np.empty(context, dtype=np.float32)  # (context,) float32
        best = np.float32(-np.inf)
        for j in range(context):
            key = k_cache[table[j // block_size], j % block_size, g]
            dot = np.float32(0.0)
            for d in range(head_dim):
                dot += q[t, h, d] * key[d]
            dot *= scale
            scores[j] = dot
            best = max(best, dot)
        total = np.float32(0.0)
        for j in range(context):
            scores[j] = np.exp(scores[j] - best)
            total += scores[j]
        acc = np.zeros(head_dim, dtype=np.float32)  # (head_dim,) float32
        for j in range(context):
            value = v_cache[table[j // block_size], j % block_size, g]
            weight = scores[j] / total
            for d in range(head_dim):
                acc[d] += weight * value[d]
        out[t, h] = acc
