"""Fused per-token Numba kernels for the glue between matmuls: RMSNorm (with the residual add), rotate-half RoPE, and
the gated activations. One call each instead of several numpy passes, so a small model's decode step is not
dominated by interpreter overhead. Float32 throughout, each token reduced in a fixed order (batch invariant).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

# Inputs with fewer values than this run on the calling thread alone: a parallel region's start and join cost more
# than they do (a decode step of a few sequences). Read by the Python wrappers only, never inside a kernel.
PARALLEL_MIN_VALUES = 16384


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x: (T, D) float32 -> x / sqrt(mean(x²) + eps) * weight, a new (T, D) float32 array."""
    _check_rows(x, weight)
    out = np.empty_like(x)
    (_rms_norm if x.size >= PARALLEL_MIN_VALUES else _rms_norm_serial)(x, weight, np.float32(eps), out)
    return out


def add_rms_norm(hidden: np.ndarray, delta: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """hidden += delta in place (the residual stream), then return rms_norm(hidden) as a new array."""
    _check_rows(hidden, weight)
    if delta.shape != hidden.shape or delta.dtype != np.float32:
        raise ValueError(f"delta {delta.shape} {delta.dtype} must match hidden {hidden.shape} float32")
    out = np.empty_like(hidden)
    (_add_rms_norm if hidden.size >= PARALLEL_MIN_VALUES else _add_rms_norm_serial)(
        hidden, np.ascontiguousarray(delta), weight, np.float32(eps), out)
    return out


def apply_rope(x: np.ndarray, positions: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> None:
    """Rotate x (num_tokens, num_heads, head_dim) float32 in place, rotate-half pairs (j, j + head_dim / 2);
    cos, sin: (max_positions, head_dim // 2) float32 tables; positions: (num_tokens,) int32."""
    if x.dtype != np.float32 or x.ndim != 3 or x.shape[2] != 2 * cos.shape[1] or x.shape[0] != positions.shape[0]:
        raise ValueError(f"x {x.shape} {x.dtype} does not fit positions {positions.shape} and tables {cos.shape}")
    _apply_rope(x, positions, cos, sin)


def gated_activation(gate_up: np.ndarray, relu2: bool) -> np.ndarray:
    """gate_up: (T, 2F) float32, gate in the first F columns and up in the last F -> act(gate) * up, (T, F).

    relu2: relu(g)² (BitNet b1.58); otherwise silu(g) = g / (1 + e^-g) (Llama).
    """
    if gate_up.dtype != np.float32 or gate_up.ndim != 2 or gate_up.shape[1] % 2:
        raise ValueError(f"gate_up must be (T, 2F) float32, got {gate_up.shape} {gate_up.dtype}")
    out = np.empty((gate_up.shape[0], gate_up.shape[1] // 2), dtype=np.float32)
    (_gated_activation if gate_up.size >= PARALLEL_MIN_VALUES else _gated_activation_serial)(gate_up, relu2, out)
    return out


def _check_rows(x: np.ndarray, weight: np.ndarray) -> None:
    if x.dtype != np.float32 or x.ndim != 2 or not x.flags.c_contiguous or weight.shape != (x.shape[1],):
        raise ValueError(f"x must be C-contiguous (T, D) float32 with a (D,) weight, got {x.shape} {x.dtype}, "
                         f"{weight.shape}")


_LANES = 16  # partial sums of squares per row: one 512-bit register of float32


@njit(cache=True, nogil=True, inline="always")
def _sum_of_squares(row):  # pragma: no cover - jitted
    """Σ row[d]² in a fixed order that vectorizes without reassociation: element d goes to partial sum d % 16 (in
    increasing d), then the 16 partial sums are added in lane order. A single running sum would be one serial chain of
    adds (a 6912-wide row took ~6 us)."""
    partial = np.zeros(_LANES, dtype=np.float32)  # (16,) float32
    num_full = row.shape[0] // _LANES * _LANES
    for base in range(0, num_full, _LANES):
        chunk = row[base:base + _LANES]
        for lane in range(_LANES):
            partial[lane] += chunk[lane] * chunk[lane]
    for d in range(num_full, row.shape[0]):
        partial[d - num_full] += row[d] * row[d]
    total = np.float32(0.0)
    for lane in range(_LANES):
        total += partial[lane]
    return total


@njit(cache=True, nogil=True, inline="always")
def _normalize_row(row, weight, eps, out_row):  # pragma: no cover - jitted
    inverse = np.float32(1.0) / np.sqrt(_sum_of_squares(row) / np.float32(row.shape[0]) + eps)
    for d in range(row.shape[0]):
        out_row[d] = row[d] * inverse * weight[d]


@njit(cache=True, nogil=True, parallel=True)
def _rms_norm(x, weight, eps, out):  # pragma: no cover - jitted
    for t in prange(x.shape[0]):
        _normalize_row(x[t], weight, eps, out[t])


@njit(cache=True, nogil=True, parallel=True)
def _add_rms_norm(hidden, delta, weight, eps, out):  # pragma: no cover - jitted
    for t in prange(hidden.shape[0]):
        for d in range(hidden.shape[1]):
            hidden[t, d] += delta[t, d]
        _normalize_row(hidden[t], weight, eps, out[t])


# Serial twins for small inputs (a decode step of a few sequences): the same per-row code without a parallel region's
# start and join, which cost more than the rows (3 rows of 2560: 5.5 us in parallel, 2 us for one row alone).


@njit(cache=True, nogil=True)
def _rms_norm_serial(x, weight, eps, out):  # pragma: no cover - jitted
    for t in range(x.shape[0]):
        _normalize_row(x[t], weight, eps, out[t])


@njit(cache=True, nogil=True)
def _add_rms_norm_serial(hidden, delta, weight, eps, out):  # pragma: no cover - jitted
    for t in range(hidden.shape[0]):
        for d in range(hidden.shape[1]):
            hidden[t, d] += delta[t, d]
        _normalize_row(hidden[t], weight, eps, out[t])


@njit(cache=True, nogil=True)
def _apply_rope(x, positions, cos, sin):  # pragma: no cover - jitted
    half = cos.shape[1]
    for t in range(x.shape[0]):
        position = positions[t]
        for h in range(x.shape[1]):
            for j in range(half):
                first = x[t, h, j]
                second = x[t, h, j + half]
                x[t, h, j] = first * cos[position, j] - second * sin[position, j]
                x[t, h, j + half] = second * cos[position, j] + first * sin[position, j]


@intrinsic
def _float_from_bits(typingctx, bits):  # pragma: no cover - compile-time
    """int32 bit pattern -> the float32 it encodes (a free register reinterpretation)."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


@njit(cache=True, nogil=True, inline="always")
def _exp(x):  # pragma: no cover - jitted
    """exp(x) within ~2 ulp for |x| <= 87 (inputs beyond are clamped), branch-free so a loop of it vectorizes; libm's
    expf is a scalar call per element. x = n ln2 + r with |r| <= ln2 / 2, e^r by its Taylor series to r^7 (truncation
    < 6e-9), times 2^n built from bits; ln2 is split so n times its first part is exact."""
    clamped = min(max(x, np.float32(-87.0)), np.float32(87.0))
    n = np.rint(clamped * np.float32(1.4426950408889634))
    r = (clamped - n * np.float32(0.693145751953125)) - n * np.float32(1.428606765330187e-06)
    # Horner's rule written out: a loop over a tuple of coefficients would keep the element loop from vectorizing
    poly = np.float32(1.0 / 5040.0) * r + np.float32(1.0 / 720.0)
    poly = poly * r + np.float32(1.0 / 120.0)
    poly = poly * r + np.float32(1.0 / 24.0)
    poly = poly * r + np.float32(1.0 / 6.0)
    poly = poly * r + np.float32(0.5)
    poly = poly * r + np.float32(1.0)
    poly = poly * r + np.float32(1.0)
    return poly * _float_from_bits((np.int32(n) + np.int32(127)) << np.int32(23))


@njit(cache=True, nogil=True, inline="always")
def _gate_row(gate_up, relu2, out, t):  # pragma: no cover - jitted
    width = out.shape[1]
    gates, ups, row = gate_up[t, :width], gate_up[t, width:], out[t]  # (width,) float32 each
    if relu2:  # one branch per row, not per element, so each loop vectorizes
        for f in range(width):
            active = max(gates[f], np.float32(0.0))
            row[f] = active * active * ups[f]
    else:
        for f in range(width):
            row[f] = gates[f] / (np.float32(1.0) + _exp(-gates[f])) * ups[f]


# error_model="numpy": a float division by zero gives inf rather than raising, so the loops carry no per-element
# check and vectorize (1 + e^-g is never zero anyway).
@njit(cache=True, nogil=True, parallel=True, error_model="numpy")
def _gated_activation(gate_up, relu2, out):  # pragma: no cover - jitted
    for t in prange(gate_up.shape[0]):
        _gate_row(gate_up, relu2, out, t)


@njit(cache=True, nogil=True, error_model="numpy")
def _gated_activation_serial(gate_up, relu2, out):  # pragma: no cover - jitted
    for t in range(gate_up.shape[0]):
        _gate_row(gate_up, relu2, out, t)
