"""GGUF block formats Q4_0, Q4_1, Q8_0: weight and activation quantizers, row dequantizers and int8-dot matmuls, with an
AVX-512 VNNI path (llvmlite IR) and a portable Numba path that give identical bits. Arrays in, arrays out: no model
knowledge, no file parsing.
"""

from __future__ import annotations

import os

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from engine.kernels.cpu_features import detect_cpu_features

BLOCK_SIZE = 32  # elements per GGUF block, each with its own scale
# Every output is a sum over blocks in one fixed order, whatever the batch: block b's scaled dot goes into float32
# partial sum b % 16 (in increasing b), and the 16 partial sums are added as a fixed tree (lane i + lane i+8, then
# i + i+4, ...). Sixteen float32 lanes are one 512-bit register; the portable path follows the same order, so both paths
# give the same bits.
_NUM_LANES = 16

_FMT_Q4_0 = 0
_FMT_Q4_1 = 1
_FMT_Q8_0 = 2

# ---------------------------------------------------------------------------------------------------------------------
# Quantizers: ggml's reference rounding in float32 operations (no fused multiply-add), so codes match gguf's bytes.


@intrinsic
def _float_from_bits(typingctx, bits):
    """int32 bit pattern -> the float32 it encodes."""

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


@njit(cache=True, nogil=True)
def _quantize_row_q8(x_row: np.ndarray, xq_row: np.ndarray, xd_row: np.ndarray, xsum_row: np.ndarray) -> None:
    """One row: per block of 32, scale = max|x| / 127 and code = roundf(x · (1 / scale)), ties away from zero.

    x_row (K,) float32 -> xq_row (K,) int8, xd_row (K // 32,) float32, xsum_row (K // 32,) int32. Branch-free loops
    so LLVM vectorizes them; max|x| is taken on the bit patterns (sign cleared), which order like the magnitudes.
    """
    bits = x_row.view(np.int32)  # (K,) int32
    for block in range(xd_row.shape[0]):
        start = block * 32
        amax_bits = np.int32(0)
        for col in range(start, start + 32):
            amax_bits = max(amax_bits, bits[col] & np.int32(0x7FFFFFFF))
        scale = _float_from_bits(amax_bits) / np.float32(127.0)
        inverse = np.float32(1.0) / scale if scale != 0 else np.float32(0.0)
        total = np.int32(0)
        for col in range(start, start + 32):
            value = x_row[col] * inverse
            magnitude = abs(value)
            rounded = np.floor(magnitude)
            rounded += np.float32(1.0) if magnitude - rounded >= np.float32(0.5) else np.float32(0.0)
            code = np.int32(rounded)
            code = -code if value < 0 else code
            xq_row[col] = code
            total += code
        xd_row[block] = scale
        xsum_row[block] = total


@njit(cache=True, nogil=True)
def _quantize_q8_blocks(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    num_tokens, num_cols = x.shape
    xq = np.empty((num_tokens, num_cols), np.int8)  # (num_tokens, K) int8
    xd = np.empty((num_tokens, num_cols // 32), np.float32)  # (num_tokens, K // 32) float32
    xsum = np.empty((num_tokens, num_cols // 32), np.int32)  # (num_tokens, K // 32) int32
    for token in range(num_tokens):
        _quantize_row_q8(x[token], xq[token], xd[token], xsum[token])
    return xq, xd, xsum


@njit(cache=True, nogil=True, parallel=True)
def _quantize_q4(w: np.ndarray, fmt: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    num_rows, num_cols = w.shape
    num_blocks = num_cols // 32
    wq = np.empty((num_rows, num_cols // 2), np.uint8)  # (N, K // 2) uint8: GGUF nibble order
    wd = np.empty((num_rows, num_blocks), np.float32)  # (N, K // 32) float32, before fp16 rounding
    wm = np.zeros((num_rows, num_blocks), np.float32)  # (N, K // 32) float32: Q4_1 block minimum, 0 for Q4_0
    for row in prange(num_rows):
        for block in range(num_blocks):
            start = block * 32
            if fmt == _FMT_Q4_0:
                # Q4_0 maps the value of largest magnitude (first one on ties) to code 0: d = max / -8.
                amax = np.float32(0.0)
                signed_max = np.float32(0.0)
                for col in range(start, start + 32):
                    if abs(w[row, col]) > amax:
                        amax = abs(w[row, col])
                        signed_max = w[row, col]
                scale = signed_max / np.float32(-8.0)
                offset = np.float32(0.0)
                bias = np.float32(8.5)
            else:
                low = w[row, start]
                high = w[row, start]
                for col in range(start, start + 32):
                    low = min(low, w[row, col])
                    high = max(high, w[row, col])
                scale = (high - low) / np.float32(15.0)
                offset = low
                bias = np.float32(0.5)
            inverse = np.float32(1.0) / scale if scale != 0 else np.float32(0.0)
            for j in range(16):
                code_low = min(15, int((w[row, start + j] - offset) * inverse + bias))
                code_high = min(15, int((w[row, start + 16 + j] - offset) * inverse + bias))
                wq[row, block * 16 + j] = code_low | (code_high << 4)
            wd[row, block] = scale
            wm[row, block] = offset
    return wq, wd, wm


def quantize_q8_blocks(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Activations to int8 per block of 32, as ggml's Q8_0 reference does (scale = max|block| / 127, ties away from 0).

    x: (num_tokens, K) float32, K % 32 == 0 -> xq (num_tokens, K) int8, xd (num_tokens, K // 32) float32 (not rounded to
    fp16), xsum (num_tokens, K // 32) int32 = Σ xq over each block.
    """
    _check("x", x, np.float32, 2)
    _check_in_features(x.shape[1])
    return _quantize_q8_blocks(x)


def quantize_q8_0(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weights to Q8_0: w (N, K) float32 -> wq (N, K) int8, wd (N, K // 32) float32 holding each block's fp16 scale."""
    wq, wd, _ = quantize_q8_blocks(w)
    return wq, _round_to_fp16(wd)


def quantize_q4_0(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weights to Q4_0: w (N, K) float32 -> wq (N, K // 2) uint8 in GGUF nibble order, wd (N, K // 32) fp16 values."""
    _check("w", w, np.float32, 2)
    _check_in_features(w.shape[1])
    wq, wd, _ = _quantize_q4(w, _FMT_Q4_0)
    return wq, _round_to_fp16(wd)


def quantize_q4_1(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weights to Q4_1: w (N, K) float32 -> wq (N, K // 2) uint8, wd and wm (N, K // 32) fp16 scales and minimums."""
    _check("w", w, np.float32, 2)
    _check_in_features(w.shape[1])
    wq, wd, wm = _quantize_q4(w, _FMT_Q4_1)
    return wq, _round_to_fp16(wd), _round_to_fp16(wm)


def _round_to_fp16(values: np.ndarray) -> np.ndarray:
    """GGUF stores block scales as fp16: codes are computed with the float32 scale, then the scale is rounded."""
    return values.astype(np.float16).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------------
# Row dequantizers: the embedding lookup of a block-quantized table.


@njit(cache=True, nogil=True)
def _dequantize_rows_q4(wq: np.ndarray, wd: np.ndarray, wm: np.ndarray, row_ids: np.ndarray, fmt: int) -> np.ndarray:
    num_cols = wq.shape[1] * 2
    out = np.empty((row_ids.shape[0], num_cols), np.float32)  # (num_rows, K) float32
    for i in range(row_ids.shape[0]):
        row = row_ids[i]
        for block in range(num_cols // 32):
            scale = wd[row, block]
            for j in range(16):
                byte = wq[row, block * 16 + j]
                if fmt == _FMT_Q4_0:
                    out[i, block * 32 + j] = np.float32((byte & 15) - 8) * scale
                    out[i, block * 32 + 16 + j] = np.float32((byte >> 4) - 8) * scale
                else:
                    out[i, block * 32 + j] = np.float32(byte & 15) * scale + wm[row, block]
                    out[i, block * 32 + 16 + j] = np.float32(byte >> 4) * scale + wm[row, block]
    return out


@njit(cache=True, nogil=True)
def _dequantize_rows_q8_0(wq: np.ndarray, wd: np.ndarray, row_ids: np.ndarray) -> np.ndarray:
    num_cols = wq.shape[1]
    out = np.empty((row_ids.shape[0], num_cols), np.float32)  # (num_rows, K) float32
    for i in range(row_ids.shape[0]):
        row = row_ids[i]
        for col in range(num_cols):
            out[i, col] = np.float32(wq[row, col]) * wd[row, col // 32]
    return out


def dequantize_rows_q4_0(wq: np.ndarray, wd: np.ndarray, row_ids: np.ndarray) -> np.ndarray:
    """Rows of a Q4_0 matrix to float32: (nibble - 8) · d. row_ids (num_rows,) int64 -> (num_rows, K) float32."""
    check_weights(wq, wd, None, np.uint8)
    return _dequantize_rows_q4(wq, wd, wd, _checked_row_ids(row_ids, wq.shape[0]), _FMT_Q4_0)


def dequantize_rows_q4_1(wq: np.ndarray, wd: np.ndarray, wm: np.ndarray, row_ids: np.ndarray) -> np.ndarray:
    """Rows of a Q4_1 matrix to float32: nibble · d + m. row_ids (num_rows,) int64 -> (num_rows, K) float32."""
    check_weights(wq, wd, wm, np.uint8)
    return _dequantize_rows_q4(wq, wd, wm, _checked_row_ids(row_ids, wq.shape[0]), _FMT_Q4_1)


def dequantize_rows_q8_0(wq: np.ndarray, wd: np.ndarray, row_ids: np.ndarray) -> np.ndarray:
    """Rows of a Q8_0 matrix to float32: q · d. row_ids (num_rows,) int64 -> (num_rows, K) float32."""
    check_weights(wq, wd, None, np.int8)
    return _dequantize_rows_q8_0(wq, wd, _checked_row_ids(row_ids, wq.shape[0]))


# ---------------------------------------------------------------------------------------------------------------------
# Portable matmuls: one int32 dot per block, then the lane-ordered float32 accumulation described at the top.


@njit(cache=True, nogil=True)
def _sum_lanes(lanes: np.ndarray) -> np.float32:
    """The fixed tree over 16 partial sums that the VNNI path does with shuffles: i + i+8, i + i+4, i + i+2, 0 + 1.

    Folds in place: lanes (16,) float32 is scratch afterwards."""
    width = 16
    while width > 1:
        width //= 2
        for lane in range(width):
            lanes[lane] += lanes[lane + width]
    return lanes[0]


@njit(cache=True, nogil=True)
def _dot_block(wq_row: np.ndarray, xq_row: np.ndarray, block: int, fmt: int) -> tuple[int, int]:
    """(Σ code·q, Σ q) over one block. Q4: code j is the low nibble of byte j, code j + 16 its high nibble."""
    dot = np.int32(0)
    total = np.int32(0)
    if fmt == _FMT_Q8_0:
        for col in range(block * 32, block * 32 + 32):
            dot += np.int32(wq_row[col]) * np.int32(xq_row[col])
        return dot, total
    for j in range(16):
        byte = np.int32(wq_row[block * 16 + j])
        low = np.int32(xq_row[block * 32 + j])
        high = np.int32(xq_row[block * 32 + 16 + j])
        dot += (byte & 15) * low + (byte >> 4) * high
        total += low + high
    return dot, total


@njit(cache=True, nogil=True, parallel=True)
def _matmul_portable(
    xq: np.ndarray, xd: np.ndarray, xsum: np.ndarray, wq: np.ndarray, wd: np.ndarray, wm: np.ndarray, fmt: int
) -> np.ndarray:
    num_tokens = xq.shape[0]
    num_rows, num_blocks = wd.shape
    out = np.empty((num_tokens, num_rows), np.float32)  # (num_tokens, N) float32
    for row in prange(num_rows):
        lanes = np.empty(_NUM_LANES, np.float32)  # (16,) float32 partial sums of this row and one token
        for token in range(num_tokens):
            lanes[:] = 0
            for block in range(num_blocks):
                dot, total = _dot_block(wq[row], xq[token], block, fmt)
                scale = wd[row, block] * xd[token, block]
                if fmt == _FMT_Q4_1:
                    act_sum = xd[token, block] * np.float32(xsum[token, block])
                    product = np.float32(dot) * scale + wm[row, block] * act_sum
                elif fmt == _FMT_Q4_0:
                    product = np.float32(dot - 8 * total) * scale
                else:
                    product = np.float32(dot) * scale
                lanes[block % 16] += product
            out[token, row] = _sum_lanes(lanes)
    return out


@njit(cache=True, nogil=True)
def _quantize_matmul_portable(x: np.ndarray, wq: np.ndarray, wd: np.ndarray, wm: np.ndarray, fmt: int) -> np.ndarray:
    xq, xd, xsum = _quantize_q8_blocks(x)
    return _matmul_portable(xq, xd, xsum, wq, wd, wm, fmt)


# ---------------------------------------------------------------------------------------------------------------------
# AVX-512 VNNI matmuls. A step covers 16 blocks of one weight row: vpdpbusd (unsigned × signed bytes, 4 products per
# int32 lane) leaves 4 lanes per Q4 block (8 per Q8 block), pairwise shuffles fold them to one int32 per block, and the
# 16 block dots are scaled and added to the 16 float32 lanes as one vector. Signed weights ride the unsigned operand via
# an offset and a correction: Σ (n - 8)·q = Σ n·q - 8·Σq for Q4_0, Σ w·q = Σ (w + 128)·q - 128·Σq for Q8_0.

_I8 = ir.IntType(8)
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
_BYTES = ir.VectorType(_I8, 64)
_INTS = ir.VectorType(_I32, 16)
_FLOATS = ir.VectorType(ir.FloatType(), 16)
_MANGLED = {str(_BYTES): "v64i8", str(_FLOATS): "v16f32"}
_PREFETCH_ROWS = int(os.environ.get("PF_ROWS", "4"))
_TOKENS_PER_TILE = 4  # tokens computed together: each loaded and unpacked weight vector serves four tokens


def _const(value: int) -> ir.Constant:
    return ir.Constant(_I64, value)


def _splat_bytes(value: int) -> ir.Constant:
    return ir.Constant(_BYTES, [ir.Constant(_I8, value)] * 64)


def _lane_indices(indices: list[int]) -> ir.Constant:
    return ir.Constant(ir.VectorType(_I32, len(indices)), [ir.Constant(_I32, i) for i in indices])


def _row_pointer(context, builder: ir.IRBuilder, array_type, array_value, row: ir.Value) -> tuple[ir.Value, ir.Value]:
    """(i8* to array[row, 0], number of columns) of a C-contiguous 2-D array."""
    array = context.make_array(array_type)(context, builder, array_value)
    row_stride_bytes = builder.extract_value(array.strides, 0)
    data = builder.bitcast(array.data, _I8.as_pointer())
    return builder.gep(data, [builder.mul(row, row_stride_bytes)]), builder.extract_value(array.shape, 1)


def _prefix_mask(builder: ir.IRBuilder, num_valid: ir.Value, width: int) -> ir.Value:
    """<width x i1> with the first num_valid lanes set, 1 <= num_valid <= width (lane i is bit i of the integer)."""
    bits = builder.sub(builder.shl(_const(1), num_valid), _const(1))
    bits = builder.select(builder.icmp_signed(">=", num_valid, _const(width)), _const(-1), bits)
    if width < 64:
        bits = builder.trunc(bits, ir.IntType(width))
    return builder.bitcast(bits, ir.VectorType(ir.IntType(1), width))


def _load(builder: ir.IRBuilder, base: ir.Value, byte_offset: ir.Value, vec_type, mask: ir.Value | None) -> ir.Value:
    """Unaligned vector load; with a mask, the lanes left out read as zero and touch no memory (row tails)."""
    pointer = builder.bitcast(builder.gep(base, [byte_offset]), vec_type.as_pointer())
    if mask is None:
        return builder.load(pointer, align=1)
    fnty = ir.FunctionType(vec_type, [vec_type.as_pointer(), _I32, mask.type, vec_type])
    fn = cgutils.get_or_insert_function(builder.module, fnty, f"llvm.masked.load.{_MANGLED[str(vec_type)]}.p0")
    return builder.call(fn, [pointer, ir.Constant(_I32, 1), mask, ir.Constant(vec_type, None)])


def _prefetch(builder: ir.IRBuilder, base: ir.Value, byte_offset: ir.Value) -> None:
    """Ask for a cache line of a later row now (prefetches never fault, so rows past the end are harmless)."""
    fnty = ir.FunctionType(ir.VoidType(), [_I8.as_pointer(), _I32, _I32, _I32])
    fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
    builder.call(fn, [builder.gep(base, [byte_offset]), ir.Constant(_I32, 0), ir.Constant(_I32, 3), ir.Constant(_I32, 1)])


def _vpdpbusd(builder: ir.IRBuilder, acc: ir.Value, unsigned_bytes: ir.Value, signed_bytes: ir.Value) -> ir.Value:
    """acc + Σ over each int32 lane's 4 bytes of unsigned × signed products (exact, no saturation)."""
    fn = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(_INTS, [_INTS, _INTS, _INTS]), "llvm.x86.avx512.vpdpbusd.512"
    )
    return builder.call(fn, [acc, builder.bitcast(unsigned_bytes, _INTS), builder.bitcast(signed_bytes, _INTS)])


def _fold_pairs(builder: ir.IRBuilder, first: ir.Value, second: ir.Value) -> ir.Value:
    """Lane i < 8: first[2i] + first[2i+1]; lane 8 + i: second[2i] + second[2i+1]. Halves the lanes per block."""
    evens = builder.shuffle_vector(first, second, _lane_indices(list(range(0, 32, 2))))
    odds = builder.shuffle_vector(first, second, _lane_indices(list(range(1, 32, 2))))
    return builder.add(evens, odds)


def _emit_step(builder: ir.IRBuilder, fmt: int, weight_rows: dict, token_rows: list[dict], token_lanes: list,
               block0: ir.Value, tail: ir.Value | None, num_active_loads: int) -> None:
    """Adds the scaled dots of blocks block0 .. block0 + 15 to each token's lanes.

    tail: number of real blocks (< 16) in a row's last, partial step, else None. Only the first num_active_loads
    weight vectors hold real blocks; the rest are known zeros and cost nothing.
    """
    bytes_per_block = 32 if fmt == _FMT_Q8_0 else 16
    num_loads = bytes_per_block // 4  # 64-byte weight vectors per 16 blocks
    weight_offset = builder.mul(block0, _const(bytes_per_block))
    act_offset = builder.mul(block0, _const(32))
    unsigned_weights = []  # per active load: the unsigned operands, Q4 (low nibbles, high nibbles), Q8 (w + 128,)
    for load in range(num_active_loads):
        mask = None
        if tail is not None and load == num_active_loads - 1:
            valid_bytes = builder.sub(builder.mul(tail, _const(bytes_per_block)), _const(64 * load))
            mask = _prefix_mask(builder, valid_bytes, 64)
        weights = _load(builder, weight_rows["wq"], builder.add(weight_offset, _const(64 * load)), _BYTES, mask)
        if _PREFETCH_ROWS:
            _prefetch(builder, weight_rows["wq_ahead"], builder.add(weight_offset, _const(64 * load)))
        if fmt == _FMT_Q8_0:
            unsigned_weights.append((builder.xor(weights, _splat_bytes(0x80)),))
        else:
            high = builder.and_(builder.lshr(weights, _splat_bytes(4)), _splat_bytes(15))
            unsigned_weights.append((builder.and_(weights, _splat_bytes(15)), high))
    scale_offset = builder.mul(block0, _const(4))
    float_mask = None if tail is None else _prefix_mask(builder, tail, 16)
    weight_scales = _load(builder, weight_rows["wd"], scale_offset, _FLOATS, float_mask)
    if _PREFETCH_ROWS:
        _prefetch(builder, weight_rows["wd_ahead"], scale_offset)
        if fmt == _FMT_Q4_1:
            _prefetch(builder, weight_rows["wm_ahead"], scale_offset)
    if fmt == _FMT_Q4_1:
        weight_mins = _load(builder, weight_rows["wm"], scale_offset, _FLOATS, float_mask)
    zero = ir.Constant(_INTS, None)
    for acts, lanes in zip(token_rows, token_lanes, strict=True):
        block_dots = []
        for load in range(num_loads):
            if load >= num_active_loads:
                block_dots.append(zero)
                continue
            # Q4 activations were permuted to match: per 4 blocks, their 64 low-nibble partners, then the 64 high ones.
            dot = zero
            for part, operand in enumerate(unsigned_weights[load]):
                offset = builder.add(act_offset, _const(64 * (len(unsigned_weights[load]) * load + part)))
                dot = _vpdpbusd(builder, dot, operand, _load(builder, acts["xp"], offset, _BYTES, None))
            block_dots.append(dot)
        while len(block_dots) > 1:
            block_dots = [_fold_pairs(builder, block_dots[i], block_dots[i + 1]) for i in range(0, len(block_dots), 2)]
        dots = block_dots[0]  # <16 x i32>: lane i = block block0 + i
        if fmt != _FMT_Q4_1:
            dots = builder.sub(dots, _load(builder, acts["xc"], scale_offset, _INTS, None))
        scales = builder.fmul(weight_scales, _load(builder, acts["xd"], scale_offset, _FLOATS, None))
        products = builder.fmul(builder.sitofp(dots, _FLOATS), scales)
        if fmt == _FMT_Q4_1:
            min_terms = builder.fmul(weight_mins, _load(builder, acts["xs"], scale_offset, _FLOATS, None))
            products = builder.fadd(products, min_terms)
        builder.store(builder.fadd(builder.load(lanes), products), lanes)


def _sum_lanes_ir(builder: ir.IRBuilder, lanes: ir.Value) -> ir.Value:
    width = 16
    while width > 1:
        width //= 2
        low = builder.shuffle_vector(lanes, lanes, _lane_indices(list(range(width))))
        high = builder.shuffle_vector(lanes, lanes, _lane_indices(list(range(width, 2 * width))))
        lanes = builder.fadd(low, high)
    return builder.extract_element(lanes, ir.Constant(_I32, 0))


def _emit_tile_dot(context, builder: ir.IRBuilder, sig, args, fmt: int) -> ir.Value:
    """Outputs (row, tokens[i]) of the lane-ordered block sum, returned as a tuple of float32."""
    row = context.cast(builder, args[3], sig.args[3], types.int64)
    weight_rows = {}
    row_ahead = builder.add(row, _const(_PREFETCH_ROWS))
    for name, position in (("wq", 0), ("wd", 1), ("wm", 2)):
        weight_rows[name], num_cols = _row_pointer(context, builder, sig.args[position], args[position], row)
        weight_rows[name + "_ahead"], _ = _row_pointer(context, builder, sig.args[position], args[position], row_ahead)
    num_blocks = num_cols  # the last one read is wm, of shape (N, K // 32)
    tokens_type = sig.args[8]
    token_rows = []
    for token in cgutils.unpack_tuple(builder, args[8], tokens_type.count):
        token = context.cast(builder, token, tokens_type.dtype, types.int64)
        token_rows.append({name: _row_pointer(context, builder, sig.args[position], args[position], token)[0]
                           for name, position in (("xp", 4), ("xd", 5), ("xc", 6), ("xs", 7))})
    token_lanes = [cgutils.alloca_once_value(builder, ir.Constant(_FLOATS, None)) for _ in token_rows]
    num_steps = builder.udiv(num_blocks, _const(16))
    num_loads = 8 if fmt == _FMT_Q8_0 else 4
    with cgutils.for_range(builder, num_steps) as loop:
        block0 = builder.mul(loop.index, _const(16))
        _emit_step(builder, fmt, weight_rows, token_rows, token_lanes, block0, None, num_loads)
    tail = builder.urem(num_blocks, _const(16))
    blocks_per_load = 2 if fmt == _FMT_Q8_0 else 4
    num_tail_loads = builder.udiv(builder.add(tail, _const(blocks_per_load - 1)), _const(blocks_per_load))
    block0 = builder.mul(num_steps, _const(16))
    done = builder.append_basic_block("tail_done")
    switch = builder.switch(num_tail_loads, done)
    for num_active_loads in range(1, num_loads + 1):
        case = builder.append_basic_block(f"tail_{num_active_loads}")
        switch.add_case(_const(num_active_loads), case)
        builder.position_at_end(case)
        _emit_step(builder, fmt, weight_rows, token_rows, token_lanes, block0, tail, num_active_loads)
        builder.branch(done)
    builder.position_at_end(done)
    results = [_sum_lanes_ir(builder, builder.load(lanes)) for lanes in token_lanes]
    return context.make_tuple(builder, sig.return_type, results)


def _make_tile_dot(fmt: int):
    """An intrinsic (wq, wd, wm, row, xp, xd, xc, xs, tokens) -> tuple of float32, one per token in the tuple."""

    def tile_dot(typingctx, wq, wd, wm, row, xp, xd, xc, xs, tokens):
        signature = types.UniTuple(types.float32, tokens.count)(wq, wd, wm, row, xp, xd, xc, xs, tokens)

        def codegen(context, builder, sig, args):
            return _emit_tile_dot(context, builder, sig, args, fmt)

        return signature, codegen

    tile_dot.__name__ = f"_tile_dot_{('q4_0', 'q4_1', 'q8_0')[fmt]}_vnni"
    return intrinsic(tile_dot)


_tile_dot_q4_0_vnni = _make_tile_dot(_FMT_Q4_0)
_tile_dot_q4_1_vnni = _make_tile_dot(_FMT_Q4_1)
_tile_dot_q8_0_vnni = _make_tile_dot(_FMT_Q8_0)


@njit(cache=True, nogil=True)
def _pad_activations(
    xq: np.ndarray, xd: np.ndarray, xsum: np.ndarray, fmt: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The activation side of the VNNI step, zero-padded to whole steps of 16 blocks so no activation load is masked."""
    num_tokens, num_cols = xq.shape
    num_blocks = num_cols // 32
    padded_blocks = (num_blocks + 15) // 16 * 16
    xp = np.zeros((num_tokens, padded_blocks * 32), np.int8)  # (num_tokens, padded K) int8, Q4: nibble-partner order
    xdp = np.zeros((num_tokens, padded_blocks), np.float32)  # (num_tokens, padded K // 32) float32
    xc = np.zeros((num_tokens, padded_blocks), np.int32)  # (num_tokens, padded K // 32) int32 offset correction
    xs = np.zeros((num_tokens, padded_blocks), np.float32)  # (num_tokens, padded K // 32) float32 xd · Σq (Q4_1)
    correction = 128 if fmt == _FMT_Q8_0 else 8 if fmt == _FMT_Q4_0 else 0
    for token in range(num_tokens):
        for block in range(num_blocks):
            start = block * 32
            # Q8_0 keeps the natural order; Q4 puts each group of 4 blocks' low-nibble partners (elements 0..15 of each
            # block) in 64 bytes, then their high-nibble partners (16..31) in the next 64.
            low_start = start if fmt == _FMT_Q8_0 else block // 4 * 128 + block % 4 * 16
            high_start = start + 16 if fmt == _FMT_Q8_0 else low_start + 64
            total = np.int32(0)
            for j in range(16):
                low = xq[token, start + j]
                high = xq[token, start + 16 + j]
                xp[token, low_start + j] = low
                xp[token, high_start + j] = high
                total += np.int32(low) + np.int32(high)
            xdp[token, block] = xd[token, block]
            xc[token, block] = correction * total
            xs[token, block] = xd[token, block] * np.float32(xsum[token, block])
    return xp, xdp, xc, xs


@njit(cache=True, nogil=True, parallel=True)
def _matmul_padded_vnni(
    xp: np.ndarray, xdp: np.ndarray, xc: np.ndarray, xs: np.ndarray, wq: np.ndarray, wd: np.ndarray, wm: np.ndarray,
    fmt: int,
) -> np.ndarray:
    num_tokens = xp.shape[0]
    out = np.empty((num_tokens, wq.shape[0]), np.float32)  # (num_tokens, N) float32
    num_tiled = num_tokens - num_tokens % _TOKENS_PER_TILE
    # Tokens inside the row loop: the weight row stays in L1 while every token reads it.
    for row in prange(wq.shape[0]):
        for token in range(0, num_tiled, _TOKENS_PER_TILE):
            tile = (token, token + 1, token + 2, token + 3)
            if fmt == _FMT_Q4_0:
                results = _tile_dot_q4_0_vnni(wq, wd, wm, row, xp, xdp, xc, xs, tile)
            elif fmt == _FMT_Q4_1:
                results = _tile_dot_q4_1_vnni(wq, wd, wm, row, xp, xdp, xc, xs, tile)
            else:
                results = _tile_dot_q8_0_vnni(wq, wd, wm, row, xp, xdp, xc, xs, tile)
            for i in range(_TOKENS_PER_TILE):
                out[token + i, row] = results[i]
        for token in range(num_tiled, num_tokens):
            if fmt == _FMT_Q4_0:
                out[token, row] = _tile_dot_q4_0_vnni(wq, wd, wm, row, xp, xdp, xc, xs, (token,))[0]
            elif fmt == _FMT_Q4_1:
                out[token, row] = _tile_dot_q4_1_vnni(wq, wd, wm, row, xp, xdp, xc, xs, (token,))[0]
            else:
                out[token, row] = _tile_dot_q8_0_vnni(wq, wd, wm, row, xp, xdp, xc, xs, (token,))[0]
    return out


@njit(cache=True, nogil=True)
def _matmul_vnni(
    xq: np.ndarray, xd: np.ndarray, xsum: np.ndarray, wq: np.ndarray, wd: np.ndarray, wm: np.ndarray, fmt: int
) -> np.ndarray:
    xp, xdp, xc, xs = _pad_activations(xq, xd, xsum, fmt)
    return _matmul_padded_vnni(xp, xdp, xc, xs, wq, wd, wm, fmt)


@njit(cache=True, nogil=True)
def _quantize_matmul_vnni(x: np.ndarray, wq: np.ndarray, wd: np.ndarray, wm: np.ndarray, fmt: int) -> np.ndarray:
    xq, xd, xsum = _quantize_q8_blocks(x)
    return _matmul_vnni(xq, xd, xsum, wq, wd, wm, fmt)


# ---------------------------------------------------------------------------------------------------------------------
# Public wrappers: check dtype, shape and C order (cheaply: a decode step makes hundreds of calls), then call the path
# chosen once at import.


def _select_kernel_path() -> str:
    """'avx512_vnni' when the CPU and JIT target allow it, unless BITSERVE_KERNELS=portable forces the fallback."""
    requested = os.environ.get("BITSERVE_KERNELS", "auto")
    if requested not in ("auto", "portable"):
        raise ValueError(f"BITSERVE_KERNELS={requested!r}: expected 'auto' or 'portable'")
    if requested == "auto" and detect_cpu_features().has_avx512_vnni:
        return "avx512_vnni"
    return "portable"


KERNEL_PATH = _select_kernel_path()
_MATMUL = _matmul_vnni if KERNEL_PATH == "avx512_vnni" else _matmul_portable
_QUANTIZE_MATMUL = _quantize_matmul_vnni if KERNEL_PATH == "avx512_vnni" else _quantize_matmul_portable


def _check(name: str, array: np.ndarray, dtype: type, shape: tuple[int, ...] | int) -> None:
    """array must be a C-contiguous ndarray of dtype with this shape (or, given an int, this many dimensions)."""
    if (
        type(array) is np.ndarray
        and array.dtype == dtype
        and (array.shape == shape if isinstance(shape, tuple) else array.ndim == shape)
        and array.flags.c_contiguous
    ):
        return
    if not isinstance(array, np.ndarray):
        raise ValueError(f"{name} must be a numpy array, got {type(array).__name__}")
    if array.dtype != dtype:
        raise ValueError(f"{name} must be {np.dtype(dtype).name}, got {array.dtype}")
    if isinstance(shape, tuple) and array.shape != shape:
        raise ValueError(f"{name} has shape {array.shape}, expected {shape}")
    if not isinstance(shape, tuple) and array.ndim != shape:
        raise ValueError(f"{name} must have {shape} dimensions, got shape {array.shape}")
    raise ValueError(f"{name} must be C-contiguous (use np.ascontiguousarray)")


def _check_in_features(in_features: int) -> None:
    if in_features <= 0 or in_features % BLOCK_SIZE:
        raise ValueError(f"in_features must be a positive multiple of {BLOCK_SIZE}, got {in_features}")


def check_weights(wq: np.ndarray, wd: np.ndarray, wm: np.ndarray | None, code_dtype: type) -> int:
    """Checks a block-quantized weight in structure-of-arrays form (codes int8 for Q8_0, uint8 nibble pairs for Q4);
    returns in_features. Raises ValueError naming the array at fault."""
    _check("wq", wq, code_dtype, 2)
    in_features = wq.shape[1] * (1 if code_dtype == np.int8 else 2)
    _check_in_features(in_features)
    _check("wd", wd, np.float32, (wq.shape[0], in_features // BLOCK_SIZE))
    if wm is not None:
        _check("wm", wm, np.float32, wd.shape)
    return in_features


def _check_activations(xq: np.ndarray, xd: np.ndarray, xsum: np.ndarray | None, in_features: int) -> None:
    _check("xq", xq, np.int8, 2)
    if xq.shape[1] != in_features:
        raise ValueError(f"xq has {xq.shape[1]} columns but the weight has in_features={in_features}")
    _check("xd", xd, np.float32, (xq.shape[0], in_features // BLOCK_SIZE))
    if xsum is not None:
        _check("xsum", xsum, np.int32, xd.shape)


def _check_float_input(x: np.ndarray, in_features: int) -> None:
    _check("x", x, np.float32, 2)
    if x.shape[1] != in_features:
        raise ValueError(f"x has {x.shape[1]} columns but the weight has in_features={in_features}")


def _checked_row_ids(row_ids: np.ndarray, num_rows: int) -> np.ndarray:
    ids = np.ascontiguousarray(row_ids, dtype=np.int64)  # (num_rows,) int64
    if ids.ndim != 1:
        raise ValueError(f"row_ids must be 1-D, got shape {ids.shape}")
    if ids.size and (ids.min() < 0 or ids.max() >= num_rows):
        raise ValueError(f"row_ids must lie in [0, {num_rows}), got min {ids.min()} max {ids.max()}")
    return ids


def matmul_q4_0(xq: np.ndarray, xd: np.ndarray, wq: np.ndarray, wd: np.ndarray) -> np.ndarray:
    """y = x @ W.T for Q4_0 weights. xq (T, K) int8, xd (T, K // 32) float32 from quantize_q8_blocks; wq (N, K // 2)
    uint8 in GGUF nibble order, wd (N, K // 32) float32 -> (T, N) float32 = Σ_b wd·xd·Σ (nibble - 8)·q."""
    _check_activations(xq, xd, None, check_weights(wq, wd, None, np.uint8))
    return _MATMUL(xq, xd, np.zeros(xd.shape, np.int32), wq, wd, wd, _FMT_Q4_0)


def matmul_q4_1(
    xq: np.ndarray, xd: np.ndarray, xsum: np.ndarray, wq: np.ndarray, wd: np.ndarray, wm: np.ndarray
) -> np.ndarray:
    """y = x @ W.T for Q4_1 weights. xsum (T, K // 32) int32 = Σ xq per block, wm (N, K // 32) float32 block minimums
    -> (T, N) float32 = Σ_b [wd·xd·Σ nibble·q + wm·xd·xsum]."""
    _check_activations(xq, xd, xsum, check_weights(wq, wd, wm, np.uint8))
    return _MATMUL(xq, xd, xsum, wq, wd, wm, _FMT_Q4_1)


def matmul_q8_0(xq: np.ndarray, xd: np.ndarray, wq: np.ndarray, wd: np.ndarray) -> np.ndarray:
    """y = x @ W.T for Q8_0 weights. wq (N, K) int8, wd (N, K // 32) float32 -> (T, N) float32 = Σ_b wd·xd·Σ w·q."""
    _check_activations(xq, xd, None, check_weights(wq, wd, None, np.int8))
    return _MATMUL(xq, xd, np.zeros(xd.shape, np.int32), wq, wd, wd, _FMT_Q8_0)


def quantize_matmul_q4_0(x: np.ndarray, wq: np.ndarray, wd: np.ndarray) -> np.ndarray:
    """quantize_q8_blocks(x) then matmul_q4_0, in one call (no intermediate arrays cross into Python).
    x (T, K) float32 -> (T, N) float32, the same bits as the two calls."""
    _check_float_input(x, check_weights(wq, wd, None, np.uint8))
    return _QUANTIZE_MATMUL(x, wq, wd, wd, _FMT_Q4_0)


def quantize_matmul_q4_1(x: np.ndarray, wq: np.ndarray, wd: np.ndarray, wm: np.ndarray) -> np.ndarray:
    """quantize_q8_blocks(x) then matmul_q4_1, in one call. x (T, K) float32 -> (T, N) float32."""
    _check_float_input(x, check_weights(wq, wd, wm, np.uint8))
    return _QUANTIZE_MATMUL(x, wq, wd, wm, _FMT_Q4_1)


def quantize_matmul_q8_0(x: np.ndarray, wq: np.ndarray, wd: np.ndarray) -> np.ndarray:
    """quantize_q8_blocks(x) then matmul_q8_0, in one call. x (T, K) float32 -> (T, N) float32."""
    _check_float_input(x, check_weights(wq, wd, None, np.int8))
    return _QUANTIZE_MATMUL(x, wq, wd, wd, _FMT_Q8_0)
