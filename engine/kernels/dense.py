"""Deterministic float32 matmul for unquantized (F32/F16/BF16) weights, batch invariant by construction.

Never calls BLAS: its reduction order depends on the batch size. Arrays in, arrays out: no model knowledge.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

# Every output is Σ_k x[k]·w[k] in one fixed order, whatever the batch: product k goes into float32 partial sum k % 16
# (in increasing k), and the 16 partial sums are added as a fixed tree (lane i + lane i+8, then i + i+4, ...). The lanes
# are an LLVM <16 x float> vector, which every x86 target legalizes (one zmm, two ymm or four xmm): no CPU check needed.
_NUM_LANES = 16

_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
_FLOATS = ir.VectorType(ir.FloatType(), _NUM_LANES)


def _lane_indices(indices: list[int]) -> ir.Constant:
    return ir.Constant(ir.VectorType(_I32, len(indices)), [ir.Constant(_I32, i) for i in indices])


def _row_pointer(context, builder: ir.IRBuilder, array_type, array_value, row: ir.Value) -> tuple[ir.Value, ir.Value]:
    """(i8* to array[row, 0], number of columns) of a C-contiguous 2-D array."""
    array = context.make_array(array_type)(context, builder, array_value)
    row_stride_bytes = builder.extract_value(array.strides, 0)
    data = builder.bitcast(array.data, ir.IntType(8).as_pointer())
    return builder.gep(data, [builder.mul(row, row_stride_bytes)]), builder.extract_value(array.shape, 1)


def _load_floats(builder: ir.IRBuilder, base: ir.Value, element: ir.Value, num_valid: ir.Value | None) -> ir.Value:
    """16 floats from base[element:]; with num_valid, only that many are read and the rest are zero (row tails)."""
    pointer = builder.bitcast(builder.gep(base, [builder.mul(element, ir.Constant(_I64, 4))]), _FLOATS.as_pointer())
    if num_valid is None:
        return builder.load(pointer, align=1)
    bits = builder.sub(builder.shl(ir.Constant(_I64, 1), num_valid), ir.Constant(_I64, 1))
    mask = builder.bitcast(builder.trunc(bits, ir.IntType(_NUM_LANES)), ir.VectorType(ir.IntType(1), _NUM_LANES))
    fnty = ir.FunctionType(_FLOATS, [_FLOATS.as_pointer(), _I32, mask.type, _FLOATS])
    fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.masked.load.v16f32.p0")
    return builder.call(fn, [pointer, ir.Constant(_I32, 1), mask, ir.Constant(_FLOATS, None)])


def _sum_lanes_ir(builder: ir.IRBuilder, lanes: ir.Value) -> ir.Value:
    width = _NUM_LANES
    while width > 1:
        width //= 2
        low = builder.shuffle_vector(lanes, lanes, _lane_indices(list(range(width))))
        high = builder.shuffle_vector(lanes, lanes, _lane_indices(list(range(width, 2 * width))))
        lanes = builder.fadd(low, high)
    return builder.extract_element(lanes, ir.Constant(_I32, 0))


@intrinsic
def _dot_rows(typingctx, x, token, w, row):
    """(x, token, w, row) -> float32: x[token] · w[row] in the lane order above (fmul then fadd, never fused)."""
    signature = types.float32(x, token, w, row)

    def codegen(context, builder, sig, args):
        x_row, num_cols = _row_pointer(context, builder, sig.args[0], args[0],
                                       context.cast(builder, args[1], sig.args[1], types.int64))
        w_row, _ = _row_pointer(context, builder, sig.args[2], args[2],
                                context.cast(builder, args[3], sig.args[3], types.int64))
        lanes = cgutils.alloca_once_value(builder, ir.Constant(_FLOATS, None))
        num_steps = builder.udiv(num_cols, ir.Constant(_I64, _NUM_LANES))
        with cgutils.for_range(builder, num_steps) as loop:
            start = builder.mul(loop.index, ir.Constant(_I64, _NUM_LANES))
            x_values = _load_floats(builder, x_row, start, None)
            products = builder.fmul(x_values, _load_floats(builder, w_row, start, None))
            builder.store(builder.fadd(builder.load(lanes), products), lanes)
        tail = builder.urem(num_cols, ir.Constant(_I64, _NUM_LANES))
        with builder.if_then(builder.icmp_unsigned("!=", tail, ir.Constant(_I64, 0))):
            start = builder.mul(num_steps, ir.Constant(_I64, _NUM_LANES))
            x_values = _load_floats(builder, x_row, start, tail)
            products = builder.fmul(x_values, _load_floats(builder, w_row, start, tail))
            builder.store(builder.fadd(builder.load(lanes), products), lanes)
        return _sum_lanes_ir(builder, builder.load(lanes))

    return signature, codegen


@njit(cache=True, nogil=True, parallel=True)
def _matmul_f32(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    out = np.empty((x.shape[0], w.shape[0]), np.float32)  # (num_tokens, N) float32
    # Tokens inside the row loop: the weight row stays in L1 while every token reads it.
    for row in prange(w.shape[0]):
        for token in range(x.shape[0]):
            out[token, row] = _dot_rows(x, token, w, row)
    return out


def matmul_f32(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """y = x @ w.T: x (T, K) float32, w (N, K) float32, both C-contiguous -> (T, N) float32. Batch invariant."""
    for name, array in (("x", x), ("w", w)):
        if not isinstance(array, np.ndarray) or array.dtype != np.float32 or array.ndim != 2:
            raise ValueError(f"{name} must be a 2-D float32 array, got {getattr(array, 'dtype', type(array))}")
        if not array.flags.c_contiguous:
            raise ValueError(f"{name} must be C-contiguous (use np.ascontiguousarray)")
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"x has {x.shape[1]} columns but w has {w.shape[1]} (in_features must match)")
    return _matmul_f32(x, w)
