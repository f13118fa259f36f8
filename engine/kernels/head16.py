"""Output-head kernel for Q8_0 weights with 16-bit activations: logits precise enough that int8 activation rounding
cannot pick the next token. Arrays in, arrays out; no other kernel file is imported.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

BLOCK_SIZE = 32


def quantize_x16_blocks(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x: (T, K) float32, K % 32 == 0 -> xq (T, K) int16, xd (T, K // 32) float32 with x ≈ xq · xd per block."""
    if x.dtype != np.float32 or x.ndim != 2 or not x.flags.c_contiguous or x.shape[1] % BLOCK_SIZE:
        raise ValueError(f"x must be C-contiguous (T, K) float32 with K % 32 == 0, got {x.shape} {x.dtype}")
    return _quantize_x16_blocks(x)


def matmul_q8_0_x16(xq: np.ndarray, xd: np.ndarray, wq: np.ndarray, wd: np.ndarray) -> np.ndarray:
    """Σ_blocks wd·xd·(Σ wq·xq) -> (T, N) float32; wq (N, K) int8, wd (N, K // 32) float32.

    Blocks are accumulated in increasing order per (token, row), so a row's logits are the same in any batch.
    """
    if xq.dtype != np.int16 or wq.dtype != np.int8 or xd.dtype != np.float32 or wd.dtype != np.float32:
        raise ValueError("expected int16 activations, int8 weights and float32 scales")
    if xq.shape[1] != wq.shape[1] or xd.shape != (xq.shape[0], xq.shape[1] // BLOCK_SIZE) or \
            wd.shape != (wq.shape[0], wq.shape[1] // BLOCK_SIZE):
        raise ValueError(f"shapes disagree: xq {xq.shape}, xd {xd.shape}, wq {wq.shape}, wd {wd.shape}")
    out = np.empty((xq.shape[0], wq.shape[0]), dtype=np.float32)
    _matmul_q8_0_x16(xq, xd, wq, wd, out)
    return out


@njit(cache=True, nogil=True)
def _quantize_x16_blocks(x):  # pragma: no cover - jitted
    num_tokens, in_features = x.shape
    num_blocks = in_features // BLOCK_SIZE
    xq = np.empty((num_tokens, in_features), dtype=np.int16)  # (T, K) int16
    xd = np.empty((num_tokens, num_blocks), dtype=np.float32)  # (T, K // 32) float32
    for t in range(num_tokens):
        for b in range(num_blocks):
            start = b * BLOCK_SIZE
            amax = np.float32(0.0)
            for j in range(start, start + BLOCK_SIZE):
                amax = max(amax, abs(x[t, j]))
            scale = amax / np.float32(32767.0)
            inverse = np.float32(1.0) / scale if scale > 0 else np.float32(0.0)
            xd[t, b] = scale
            for j in range(start, start + BLOCK_SIZE):
                xq[t, j] = np.int16(np.rint(x[t, j] * inverse))
    return xq, xd


@njit(cache=True, nogil=True, parallel=True)
def _matmul_q8_0_x16(xq, xd, wq, wd, out):  # pragma: no cover - jitted
    num_tokens, in_features = xq.shape
    num_blocks = in_features // BLOCK_SIZE
    for n in prange(wq.shape[0]):
        for t in range(num_tokens):
            acc = np.float32(0.0)
            for b in range(num_blocks):
                start = b * BLOCK_SIZE
                block_sum = np.int32(0)
                for j in range(start, start + BLOCK_SIZE):
                    block_sum += np.int32(wq[n, j]) * np.int32(xq[t, j])
                acc += wd[n, b] * xd[t, b] * np.float32(block_sum)
            out[t, n] = acc
