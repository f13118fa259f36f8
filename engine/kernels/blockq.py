"""GGUF block formats Q4_0, Q4_1, Q8_0: weight and activation quantizers, row dequantizers and int8-dot matmuls in three
paths that give identical bits (AVX-512 VNNI and target-independent SIMD, both llvmlite IR; plain Numba as the obvious
fallback), with int8 activations or 16-bit ones ("A16", two int8 digits per value). Arrays in, arrays out: no model
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
# i + i+4, ...). Sixteen float32 lanes are one 512-bit register; every path follows this order, so all give the same
# bits, and a token's output never depends on the other tokens of the batch.
_NUM_LANES = 16

# dtype instances, so the per-call checks can compare by identity
_INT8, _UINT8, _INT32, _FLOAT32 = np.dtype(np.int8), np.dtype(np.uint8), np.dtype(np.int32), np.dtype(np.float32)
_UINT16 = np.dtype(np.uint16)  # weight block scales and minimums: IEEE half bit patterns, as GGUF stores them

_FMT_Q4_0 = 0
_FMT_Q4_1 = 1
_FMT_Q8_0 = 2

# A16 activations: per block, code c = round(x / d) with d = max|x| / (127 · 256), written as two int8 digits
# c = 256·coarse + fine. coarse = floor((c + 128) / 256) in [-127, 127] is (up to ties) the int8 mode's code
# round(x / d1), d1 = max|x| / 127 = 256·d, and fine in [-128, 127] is the code of the residual x - d1·coarse at step
# d1 / 256. The residual is at most d1 / 2, so that step (rather than d1 / 127) lets the fine digit span the whole int8
# range: |c| <= 32512 is a 16-bit code whose rounding error, d / 2 = max|x| / 65024 per value, is 256 times below the
# int8 mode's. A fixed power-of-two ratio (rather than d2 = max|r| / 127, which is ~d1 / 254 anyway over 32 values and
# needs a second float scale) makes each block's 256·Σ w·coarse + Σ w·fine one exact int32, a shift and an add: a
# block still costs one float multiply, in the int8 mode's order.
_A16_RADIX = 256
_A16_MAX_CODE = 127 * _A16_RADIX

# ---------------------------------------------------------------------------------------------------------------------
# Quantizers: ggml's reference rounding in float32 operations (no fused multiply-add), so codes match gguf's bytes.


@intrinsic
def _float_from_bits(typingctx, bits):
    """int32 bit pattern -> the float32 it encodes."""

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


@intrinsic
def _bits_from_float(typingctx, value):
    """float32 -> its int32 bit pattern."""

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.int32(types.float32), codegen


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


@njit(cache=True, nogil=True)
def _quantize_row_a16(x_row: np.ndarray, xq_row: np.ndarray, xd_row: np.ndarray, xsum_row: np.ndarray) -> None:
    """One row to A16 digits (see _A16_RADIX): x_row (K,) float32 -> xq_row (2, K) int8 (coarse, fine digits),
    xd_row (K // 32,) float32 = max|x| / 32512 per block, xsum_row (K // 32,) int32 = Σ c per block."""
    bits = x_row.view(np.int32)  # (K,) int32
    for block in range(xd_row.shape[0]):
        start = block * 32
        amax_bits = np.int32(0)
        for col in range(start, start + 32):
            amax_bits = max(amax_bits, bits[col] & np.int32(0x7FFFFFFF))
        scale = _float_from_bits(amax_bits) / np.float32(_A16_MAX_CODE)
        # 1 / scale must stay finite: a block whose scale is below the smallest normal float32 (max|x| < 4e-34) is 0
        if scale < np.float32(1.1754944e-38):
            scale = np.float32(0.0)
        inverse = np.float32(1.0) / scale if scale != 0 else np.float32(0.0)
        total = np.int32(0)
        for col in range(start, start + 32):
            value = x_row[col] * inverse
            magnitude = abs(value)
            rounded = np.floor(magnitude)
            rounded += np.float32(1.0) if magnitude - rounded >= np.float32(0.5) else np.float32(0.0)
            code = np.int32(rounded)
            code = -code if value < 0 else code
            coarse = (code + np.int32(128)) >> 8  # floor((c + 128) / 256): |c| <= 32512, so |coarse| <= 127
            xq_row[0, col] = coarse
            xq_row[1, col] = code - (coarse << 8)
            total += code
        xd_row[block] = scale
        xsum_row[block] = total


@njit(cache=True, nogil=True)
def _quantize_a16_blocks(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    num_tokens, num_cols = x.shape
    xq = np.empty((num_tokens, 2, num_cols), np.int8)  # (num_tokens, 2, K) int8: coarse digits, then fine digits
    xd = np.empty((num_tokens, num_cols // 32), np.float32)  # (num_tokens, K // 32) float32
    xsum = np.empty((num_tokens, num_cols // 32), np.int32)  # (num_tokens, K // 32) int32
    for token in range(num_tokens):
        _quantize_row_a16(x[token], xq[token], xd[token], xsum[token])
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
    _check("x", x, _FLOAT32, 2)
    _check_in_features(x.shape[1])
    return _quantize_q8_blocks(x)


def quantize_a16_blocks(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Activations to 16-bit codes per block of 32, two int8 digits each (see _A16_RADIX): x ≈ xd·(256·coarse + fine).

    x: (num_tokens, K) float32, K % 32 == 0 -> xq (num_tokens, 2, K) int8 (xq[:, 0] coarse digits in [-127, 127],
    xq[:, 1] fine digits in [-128, 127]), xd (num_tokens, K // 32) float32 = max|block| / 32512, xsum (num_tokens,
    K // 32) int32 = Σ (256·coarse + fine) over each block.
    """
    _check("x", x, _FLOAT32, 2)
    _check_in_features(x.shape[1])
    return _quantize_a16_blocks(x)


def quantize_q8_0(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weights to Q8_0: w (N, K) float32 -> wq (N, K) int8, wd (N, K // 32) uint16 fp16 scales (bit patterns)."""
    _check("w", w, _FLOAT32, 2)
    _check_in_features(w.shape[1])
    wq, wd, _ = _quantize_q8_blocks(w)
    return wq, _round_to_fp16(wd)


def quantize_q4_0(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weights to Q4_0: w (N, K) float32 -> wq (N, K // 2) uint8 in GGUF nibble order, wd (N, K // 32) uint16 fp16
    scales (bit patterns)."""
    _check("w", w, _FLOAT32, 2)
    _check_in_features(w.shape[1])
    wq, wd, _ = _quantize_q4(w, _FMT_Q4_0)
    return wq, _round_to_fp16(wd)


def quantize_q4_1(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weights to Q4_1: w (N, K) float32 -> wq (N, K // 2) uint8, wd and wm (N, K // 32) uint16 fp16 scales and
    minimums (bit patterns)."""
    _check("w", w, _FLOAT32, 2)
    _check_in_features(w.shape[1])
    wq, wd, wm = _quantize_q4(w, _FMT_Q4_1)
    return wq, _round_to_fp16(wd), _round_to_fp16(wm)


def _round_to_fp16(values: np.ndarray) -> np.ndarray:
    """GGUF stores block scales as fp16: codes are computed with the float32 scale, then the scale is rounded ->
    the same shape of uint16 half bit patterns."""
    return values.astype(np.float16).view(np.uint16)


def halves_to_float32(halves: np.ndarray) -> np.ndarray:
    """uint16 IEEE half bit patterns (block scales, minimums) -> float32 values of the same shape (exact)."""
    return halves.view(np.float16).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------------
# Code layout. Q4 codes are stored per row in "kernel order": each full group of 16 blocks is interleaved so that bytes
# 4i..4i+3 of block l sit at 64·i + 4·l, i.e. one 64-byte vector holds 4 bytes of each of the 16 blocks and vpdpbusd
# leaves block l's partial dot in int32 lane l; no shuffles are needed to gather a block's dot. The < 16 blocks left
# at the end of a row stay in GGUF order. Scales are untouched; the byte count is unchanged. Q8_0 codes stay in GGUF
# order everywhere: other kernels (the 16-bit-activation output head) read a Q8_0 table's codes directly.


def _group_shape(codes: np.ndarray) -> tuple[int, int, int]:
    """(num_rows, bytes in full groups, bytes per block) of a uint8 Q4 codes array (16 bytes per block)."""
    if codes.dtype != np.uint8 or codes.ndim != 2:
        raise ValueError(f"kernel order applies to 2-D uint8 Q4 codes, got {codes.dtype} with {codes.ndim} dims")
    block_bytes = 16
    group_bytes = 16 * block_bytes
    return codes.shape[0], codes.shape[1] // group_bytes * group_bytes, block_bytes


def to_kernel_order(codes: np.ndarray) -> np.ndarray:
    """(N, K // 2) uint8 Q4 codes in GGUF order -> a new array in kernel order."""
    num_rows, grouped_bytes, block_bytes = _group_shape(codes)
    out = np.array(codes, order="C")
    num_groups = grouped_bytes // (16 * block_bytes)
    # (N, group, block, quad, byte) -> (N, group, quad, block, byte)
    groups = codes[:, :grouped_bytes].reshape(num_rows, num_groups, 16, block_bytes // 4, 4)
    out[:, :grouped_bytes] = groups.transpose(0, 1, 3, 2, 4).reshape(num_rows, grouped_bytes)
    return out


def to_gguf_order(codes: np.ndarray) -> np.ndarray:
    """The inverse of to_kernel_order: (N, K // 2) uint8 Q4 codes in kernel order -> a new array in GGUF order."""
    num_rows, grouped_bytes, block_bytes = _group_shape(codes)
    out = np.array(codes, order="C")
    num_groups = grouped_bytes // (16 * block_bytes)
    # (N, group, quad, block, byte) -> (N, group, block, quad, byte)
    groups = codes[:, :grouped_bytes].reshape(num_rows, num_groups, block_bytes // 4, 16, 4)
    out[:, :grouped_bytes] = groups.transpose(0, 1, 3, 2, 4).reshape(num_rows, grouped_bytes)
    return out


@njit(cache=True, nogil=True)
def _block_base_stride(block: int, num_groups: int, block_bytes: int) -> tuple[int, int]:
    """Byte j of a block's codes is at base + (j // 4) · stride + j % 4 in its row; num_groups is the number of
    interleaved 16-block groups at the start of the row (0 for Q8_0, whose rows are all in GGUF order)."""
    if block < num_groups * 16:
        return block // 16 * 16 * block_bytes + block % 16 * 4, 64
    return block * block_bytes, 4


# ---------------------------------------------------------------------------------------------------------------------
# Row dequantizers: the embedding lookup of a block-quantized table.


@njit(cache=True, nogil=True)
def _half_value(bits: np.uint16) -> np.float32:
    """An IEEE half's bit pattern -> its float32 value, exactly, by integer moves (no F16C needed): the exponent and
    mantissa shift into place and the exponent is rebiased (15 -> 127); a subnormal half is rebuilt as a normal float
    minus 2^-14, and infinities and NaNs get the float exponent. The same steps as the vector path's
    _halves_to_floats, so every path sees the same scales."""
    wide = np.uint32(bits)
    exponent = wide & np.uint32(0x7C00)
    moved = ((wide & np.uint32(0x7FFF)) << np.uint32(13)) + np.uint32(0x38000000)
    if exponent == 0:
        magnitude = _float_from_bits(np.int32(moved + np.uint32(0x00800000))) - np.float32(2.0 ** -14)
    elif exponent == np.uint32(0x7C00):
        magnitude = _float_from_bits(np.int32(moved + np.uint32(0x38000000)))
    else:
        magnitude = _float_from_bits(np.int32(moved))
    sign = np.int32((wide & np.uint32(0x8000)) << np.uint32(16))
    return _float_from_bits(_bits_from_float(magnitude) | sign)


@njit(cache=True, nogil=True)
def _dequantize_rows(wq: np.ndarray, wd: np.ndarray, wm: np.ndarray, row_ids: np.ndarray, fmt: int) -> np.ndarray:
    num_blocks = wd.shape[1]
    block_bytes = 32 if fmt == _FMT_Q8_0 else 16
    out = np.empty((row_ids.shape[0], num_blocks * 32), np.float32)  # (num_rows, K) float32
    num_groups = 0 if fmt == _FMT_Q8_0 else num_blocks // 16
    for i in range(row_ids.shape[0]):
        row = row_ids[i]
        for block in range(num_blocks):
            base, stride = _block_base_stride(block, num_groups, block_bytes)
            scale = _half_value(wd[row, block])
            minimum = _half_value(wm[row, block]) if fmt == _FMT_Q4_1 else np.float32(0.0)
            for j in range(block_bytes):
                code = np.int32(wq[row, base + j // 4 * stride + j % 4])
                col = block * 32 + j
                if fmt == _FMT_Q8_0:
                    out[i, col] = np.float32((code ^ 128) - 128) * scale
                elif fmt == _FMT_Q4_0:
                    out[i, col] = np.float32((code & 15) - 8) * scale
                    out[i, col + 16] = np.float32((code >> 4) - 8) * scale
                else:
                    out[i, col] = np.float32(code & 15) * scale + minimum
                    out[i, col + 16] = np.float32(code >> 4) * scale + minimum
    return out


def dequantize_rows_q4_0(wq: np.ndarray, wd: np.ndarray, row_ids: np.ndarray) -> np.ndarray:
    """Rows of a Q4_0 matrix (codes in kernel order) to float32: (nibble - 8) · d. row_ids (num_rows,) int64 ->
    (num_rows, K) float32."""
    check_weights(wq, wd, None, _UINT8)
    return _dequantize_rows(wq, wd, wd, _checked_row_ids(row_ids, wq.shape[0]), _FMT_Q4_0)


def dequantize_rows_q4_1(wq: np.ndarray, wd: np.ndarray, wm: np.ndarray, row_ids: np.ndarray) -> np.ndarray:
    """Rows of a Q4_1 matrix (kernel order) to float32: nibble · d + m. -> (num_rows, K) float32."""
    check_weights(wq, wd, wm, _UINT8)
    return _dequantize_rows(wq, wd, wm, _checked_row_ids(row_ids, wq.shape[0]), _FMT_Q4_1)


def dequantize_rows_q8_0(wq: np.ndarray, wd: np.ndarray, row_ids: np.ndarray) -> np.ndarray:
    """Rows of a Q8_0 matrix (GGUF order) to float32: q · d. -> (num_rows, K) float32."""
    check_weights(wq, wd, None, _INT8)
    return _dequantize_rows(wq.view(np.uint8), wd, wd, _checked_row_ids(row_ids, wq.shape[0]), _FMT_Q8_0)


# ---------------------------------------------------------------------------------------------------------------------
# Portable matmuls: one int32 dot per block, then the lane-ordered float32 accumulation described at the top. Every
# matmul takes xq (T, K) int8 codes or (T, 2, K) int8 A16 digits: read as (T, num_digits, K), one digit for int8.


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
def _activation_code(digits: np.ndarray, col: int) -> np.int32:
    """The integer code of one activation from its digits (num_digits, K) int8, most significant first, base 256."""
    code = np.int32(0)
    for digit in range(digits.shape[0]):
        code = code * np.int32(_A16_RADIX) + np.int32(digits[digit, col])
    return code


@njit(cache=True, nogil=True)
def _dot_block(wq_row: np.ndarray, digits: np.ndarray, block: int, fmt: int) -> tuple[int, int]:
    """(Σ code·q, Σ q) over one block of a row, q the activation codes of one token from its digits (num_digits, K)
    int8: the A16 digits' two dots come out of one pass over the weights. Q4 (kernel order): code byte j holds
    elements j (low nibble), j + 16 (high nibble)."""
    block_bytes = 32 if fmt == _FMT_Q8_0 else 16
    base, stride = _block_base_stride(block, 0 if fmt == _FMT_Q8_0 else digits.shape[1] // 512, block_bytes)
    dot = np.int32(0)
    total = np.int32(0)
    for j in range(block_bytes):
        code = np.int32(wq_row[base + j // 4 * stride + j % 4])
        low = _activation_code(digits, block * 32 + j)
        if fmt == _FMT_Q8_0:
            dot += ((code ^ 128) - 128) * low
        else:
            high = _activation_code(digits, block * 32 + 16 + j)
            dot += (code & 15) * low + (code >> 4) * high
            total += low + high
    return dot, total


@njit(cache=True, nogil=True, parallel=True)
def _matmul_portable(
    xq: np.ndarray, xd: np.ndarray, xsum: np.ndarray, wq: np.ndarray, wd: np.ndarray, wm: np.ndarray, fmt: int
) -> np.ndarray:
    num_tokens = xq.shape[0]
    num_rows, num_blocks = wd.shape
    digits = xq.reshape((num_tokens, -1, num_blocks * 32))  # (num_tokens, num_digits, K) int8
    out = np.empty((num_tokens, num_rows), np.float32)  # (num_tokens, N) float32
    for row in prange(num_rows):
        lanes = np.empty(_NUM_LANES, np.float32)  # (16,) float32 partial sums of this row and one token
        for token in range(num_tokens):
            lanes[:] = 0
            for block in range(num_blocks):
                dot, total = _dot_block(wq[row], digits[token], block, fmt)
                scale = _half_value(wd[row, block]) * xd[token, block]
                if fmt == _FMT_Q4_1:
                    act_sum = xd[token, block] * np.float32(xsum[token, block])
                    product = np.float32(dot) * scale + _half_value(wm[row, block]) * act_sum
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


@njit(cache=True, nogil=True)
def _quantize_a16_matmul_portable(
    x: np.ndarray, wq: np.ndarray, wd: np.ndarray, wm: np.ndarray, fmt: int
) -> np.ndarray:
    xq, xd, xsum = _quantize_a16_blocks(x)
    return _matmul_portable(xq, xd, xsum, wq, wd, wm, fmt)


# ---------------------------------------------------------------------------------------------------------------------
# Vector matmuls (llvmlite IR). A step covers 16 blocks of a weight row: a byte dot (vpdpbusd on VNNI, unsigned × signed
# bytes, 4 products per int32 lane) of each 64-byte weight vector with its activation vector leaves block l's partial
# dot in lane l (Q4 kernel order); in GGUF order (Q8_0 rows, Q4 row tails) pairwise shuffles fold each block's 4 (Q4)
# or 8 (Q8) lanes.
# The 16 block dots are scaled and added to the 16 float32 lanes as one vector. Signed weights ride the unsigned
# operand via an offset and a correction: Σ (n - 8)·q = Σ n·q - 8·Σq for Q4_0, Σ w·q = Σ (w + 128)·q - 128·Σq for Q8_0.
# A16: each unpacked weight vector meets both activation digits (two byte dots), so the weights are read once; the block
# dot 256·Σ w·coarse + Σ w·fine is then an exact int32 (|.| < 2^29), scaled like an int8 one.

_I8 = ir.IntType(8)
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
_BYTES = ir.VectorType(_I8, 64)
_INTS = ir.VectorType(_I32, 16)
_FLOATS = ir.VectorType(ir.FloatType(), 16)
_HALVES = ir.VectorType(ir.IntType(16), 16)  # 16 block scales as IEEE half bit patterns
_MANGLED = {str(_BYTES): "v64i8", str(_FLOATS): "v16f32", str(_HALVES): "v16i16"}
_TOKENS_PER_TILE = 4  # tokens computed together: each loaded and unpacked weight vector serves four tokens
# How far ahead, in row tiles of the same thread, a tile prefetches the weight bytes it will read; see _emit_tile_dot.
_PREFETCH_TILES_AHEAD = 3


def _const(value: int) -> ir.Constant:
    return ir.Constant(_I64, value)


def _splat_bytes(value: int) -> ir.Constant:
    return ir.Constant(_BYTES, [ir.Constant(_I8, value)] * 64)


def _lane_indices(indices: list[int]) -> ir.Constant:
    return ir.Constant(ir.VectorType(_I32, len(indices)), [ir.Constant(_I32, i) for i in indices])


def _row_pointer(context, builder: ir.IRBuilder, array_type, array_value, row: ir.Value) -> tuple[ir.Value, ir.Value]:
    """(i8* to the start of array[row], size of dimension 1) of a C-contiguous array of 2 or more dimensions."""
    array = context.make_array(array_type)(context, builder, array_value)
    row_stride_bytes = builder.extract_value(array.strides, 0)
    data = builder.bitcast(array.data, _I8.as_pointer())
    return builder.gep(data, [builder.mul(row, row_stride_bytes)]), builder.extract_value(array.shape, 1)


def _prefetch(builder: ir.IRBuilder, base: ir.Value, byte_offset: ir.Value) -> None:
    """Read prefetch into all cache levels (a hint: addresses past the end of the array are harmless)."""
    fnty = ir.FunctionType(ir.VoidType(), [_I8.as_pointer(), _I32, _I32, _I32])
    fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
    builder.call(fn, [builder.gep(base, [byte_offset]), ir.Constant(_I32, 0), ir.Constant(_I32, 3),
                      ir.Constant(_I32, 1)])


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


def _halves_to_floats(builder: ir.IRBuilder, halves: ir.Value) -> ir.Value:
    """<16 x i16> IEEE half bit patterns -> <16 x float>, exactly, in integer vector IR (no F16C needed): the steps
    of _half_value, each case computed for every lane and the right one selected."""
    def splat(value: int) -> ir.Constant:
        return ir.Constant(_INTS, [ir.Constant(_I32, value)] * 16)

    wide = builder.zext(halves, _INTS)
    exponent = builder.and_(wide, splat(0x7C00))
    moved = builder.add(builder.shl(builder.and_(wide, splat(0x7FFF)), splat(13)), splat(0x38000000))
    subnormal = builder.fsub(builder.bitcast(builder.add(moved, splat(0x00800000)), _FLOATS),
                             ir.Constant(_FLOATS, [ir.Constant(ir.FloatType(), 2.0 ** -14)] * 16))
    special = builder.add(moved, splat(0x38000000))  # infinities and NaNs: the float exponent is all ones
    magnitude = builder.select(builder.icmp_unsigned("==", exponent, splat(0x7C00)), special, moved)
    magnitude = builder.select(builder.icmp_unsigned("==", exponent, splat(0)), builder.bitcast(subnormal, _INTS),
                               magnitude)
    sign = builder.shl(builder.and_(wide, splat(0x8000)), splat(16))
    return builder.bitcast(builder.or_(magnitude, sign), _FLOATS)


def _dot_bytes(builder: ir.IRBuilder, acc: ir.Value, unsigned_bytes: ir.Value, signed_bytes: ir.Value,
               vnni: bool) -> ir.Value:
    """acc + Σ over each int32 lane's 4 bytes of unsigned × signed products (exact, no saturation).

    vnni: one vpdpbusd. Otherwise the same sum in target-independent vector IR (widen, multiply, add pairs twice),
    which LLVM lowers to pmaddwd-style code on any x86 (or NEON), so the "simd" path needs no CPU check.
    """
    if vnni:
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(_INTS, [_INTS, _INTS, _INTS]), "llvm.x86.avx512.vpdpbusd.512"
        )
        return builder.call(fn, [acc, builder.bitcast(unsigned_bytes, _INTS), builder.bitcast(signed_bytes, _INTS)])
    wide = ir.VectorType(_I32, 64)
    products = builder.mul(builder.zext(unsigned_bytes, wide), builder.sext(signed_bytes, wide))  # <64 x i32>
    for width in (32, 16):
        evens = builder.shuffle_vector(products, products, _lane_indices(list(range(0, 2 * width, 2))))
        odds = builder.shuffle_vector(products, products, _lane_indices(list(range(1, 2 * width, 2))))
        products = builder.add(evens, odds)
    return builder.add(acc, products)


def _fold_pairs(builder: ir.IRBuilder, first: ir.Value, second: ir.Value) -> ir.Value:
    """Lane i < 8: first[2i] + first[2i+1]; lane 8 + i: second[2i] + second[2i+1]. Halves the lanes per block."""
    evens = builder.shuffle_vector(first, second, _lane_indices(list(range(0, 32, 2))))
    odds = builder.shuffle_vector(first, second, _lane_indices(list(range(1, 32, 2))))
    return builder.add(evens, odds)


def _emit_step(builder: ir.IRBuilder, fmt: int, vnni: bool, weight_rows: list[dict], token_rows: list[dict],
               lanes: list[list], block0: ir.Value, tail: ir.Value | None, num_active_loads: int,
               prefetch: dict) -> None:
    """Adds the scaled dots of blocks block0 .. block0 + 15 to lanes[row][token] for every row and token of the tile.

    tail: number of real blocks (< 16) in a row's last, partial step, else None. Only the first num_active_loads
    weight vectors hold real blocks; the rest are known zeros and cost nothing. Each weight vector is loaded and
    unpacked once for all tokens and activation digits.
    prefetch: {"wanted": i1, "wq" and "wd": byte distances to the next row tile}; when wanted, the step first
    prefetches the same bytes of the next tile's rows.
    """
    bytes_per_block = 32 if fmt == _FMT_Q8_0 else 16
    num_loads = bytes_per_block // 4  # 64-byte weight vectors per 16 blocks
    weight_offset = builder.mul(block0, _const(bytes_per_block))
    act_offset = builder.mul(block0, _const(32))
    scale_offset = builder.mul(block0, _const(4))  # of the activations' float32 and int32 per-block values
    half_offset = builder.mul(block0, _const(2))  # of the weights' fp16 scales and minimums
    with builder.if_then(prefetch["wanted"], likely=True):
        for rows in weight_rows:
            for load in range(num_active_loads):
                _prefetch(builder, rows["wq"], builder.add(builder.add(weight_offset, _const(64 * load)),
                                                           prefetch["wq"]))
            for name in ("wd", "wm") if fmt == _FMT_Q4_1 else ("wd",):
                _prefetch(builder, rows[name], builder.add(half_offset, prefetch["wd"]))
    float_mask = None if tail is None else _prefix_mask(builder, tail, 16)
    zero = ir.Constant(_INTS, None)
    num_parts = 1 if fmt == _FMT_Q8_0 else 2
    radix_bits = ir.Constant(_INTS, [ir.Constant(_I32, _A16_RADIX.bit_length() - 1)] * 16)
    kernel_order = tail is None and fmt != _FMT_Q8_0
    # Kernel order: lane l of every vector belongs to block l, so byte dots may share an accumulator: two weight
    # vectors per chain (4 dependent dots) measured fastest, against 1 (more adds) and 4 (longer chains). GGUF order
    # needs one vector per weight vector, for the fold below.
    loads_per_chain = 2 if kernel_order else 1
    # Rows outside, tokens inside: only one row's unpacked weights are live at a time, and each activation vector is
    # loaded where a byte dot uses it. Holding every token's activations for all rows needed more than the 32 vector
    # registers, and the spills cost more than reloading from L1.
    for rows, row_lanes in zip(weight_rows, lanes, strict=True):
        unsigned_weights = []  # [load]: the unsigned operands, Q4 (low nibbles, high nibbles), Q8 (w + 128,)
        for load in range(num_active_loads):
            mask = None
            if tail is not None and load == num_active_loads - 1:
                valid_bytes = builder.sub(builder.mul(tail, _const(bytes_per_block)), _const(64 * load))
                mask = _prefix_mask(builder, valid_bytes, 64)
            weights = _load(builder, rows["wq"], builder.add(weight_offset, _const(64 * load)), _BYTES, mask)
            if fmt == _FMT_Q8_0:
                unsigned_weights.append((builder.xor(weights, _splat_bytes(0x80)),))
            else:
                high = builder.and_(builder.lshr(weights, _splat_bytes(4)), _splat_bytes(15))
                unsigned_weights.append((builder.and_(weights, _splat_bytes(15)), high))
        scales = _halves_to_floats(builder, _load(builder, rows["wd"], half_offset, _HALVES, float_mask))
        mins = None
        if fmt == _FMT_Q4_1:
            mins = _halves_to_floats(builder, _load(builder, rows["wm"], half_offset, _HALVES, float_mask))
        for acts, cell in zip(token_rows, row_lanes, strict=True):
            dots = None  # <16 x i32>: lane i = the code dot of block block0 + i, digits combined most significant first
            for digit_row in acts["xp"]:
                block_dots = []  # one partial dot vector per chain of weight vectors
                for first in range(0, num_active_loads, loads_per_chain):
                    dot = zero
                    for load in range(first, min(first + loads_per_chain, num_active_loads)):
                        for part in range(num_parts):
                            # The activations were laid out to meet the weight vectors byte for byte (see
                            # _pad_activations).
                            act = _load(builder, digit_row,
                                        builder.add(act_offset, _const(64 * (num_parts * load + part))), _BYTES, None)
                            dot = _dot_bytes(builder, dot, unsigned_weights[load][part], act, vnni)
                    block_dots.append(dot)
                if kernel_order:
                    while len(block_dots) > 1:
                        block_dots = [builder.add(block_dots[i], block_dots[i + 1])
                                      for i in range(0, len(block_dots), 2)]
                else:
                    # GGUF order: each 64-byte vector covers 4 (Q4) or 2 (Q8) whole blocks; fold lanes to one per block.
                    block_dots += [zero] * (num_loads - num_active_loads)
                    while len(block_dots) > 1:
                        block_dots = [_fold_pairs(builder, block_dots[i], block_dots[i + 1])
                                      for i in range(0, len(block_dots), 2)]
                dots = block_dots[0] if dots is None else builder.add(builder.shl(dots, radix_bits), block_dots[0])
            if fmt != _FMT_Q4_1:
                dots = builder.sub(dots, _load(builder, acts["xc"], scale_offset, _INTS, None))
            act_scales = _load(builder, acts["xd"], scale_offset, _FLOATS, None)
            products = builder.fmul(builder.sitofp(dots, _FLOATS), builder.fmul(scales, act_scales))
            if mins is not None:
                act_sums = _load(builder, acts["xs"], scale_offset, _FLOATS, None)
                products = builder.fadd(products, builder.fmul(mins, act_sums))
            builder.store(builder.fadd(builder.load(cell), products), cell)


def _sum_lanes_ir(builder: ir.IRBuilder, lanes: ir.Value) -> ir.Value:
    width = 16
    while width > 1:
        width //= 2
        low = builder.shuffle_vector(lanes, lanes, _lane_indices(list(range(width))))
        high = builder.shuffle_vector(lanes, lanes, _lane_indices(list(range(width, 2 * width))))
        lanes = builder.fadd(low, high)
    return builder.extract_element(lanes, ir.Constant(_I32, 0))


def _digit_pointers(context, builder: ir.IRBuilder, array_type, array_value, token: ir.Value) -> list[ir.Value]:
    """i8* to each activation digit's padded row of one token: xp (T, padded K) int8 holds one digit (int8 codes),
    (T, 2, padded K) int8 two (A16). The count is the array's number of dimensions, known when the kernel compiles."""
    row, _ = _row_pointer(context, builder, array_type, array_value, token)
    if array_type.ndim == 2:
        return [row]
    digit_stride_bytes = builder.extract_value(context.make_array(array_type)(context, builder, array_value).strides, 1)
    return [row, builder.gep(row, [digit_stride_bytes])]


def _emit_tile_dot(context, builder: ir.IRBuilder, sig, args, fmt: int, vnni: bool) -> ir.Value:
    """Outputs (rows[r], tokens[t]) of the lane-ordered block sum, returned as a flat tuple of float32, row-major."""
    weight_rows = []
    for row in cgutils.unpack_tuple(builder, args[3], sig.args[3].count):
        row = context.cast(builder, row, sig.args[3].dtype, types.int64)
        weight_rows.append({})
        for name, position in (("wq", 0), ("wd", 1), ("wm", 2)):
            weight_rows[-1][name], num_blocks = _row_pointer(context, builder, sig.args[position], args[position], row)
    # num_blocks: columns of wm, the last array read, of shape (N, K // 32)
    token_rows = []
    for token in cgutils.unpack_tuple(builder, args[8], sig.args[8].count):
        token = context.cast(builder, token, sig.args[8].dtype, types.int64)
        token_rows.append({name: _row_pointer(context, builder, sig.args[position], args[position], token)[0]
                           for name, position in (("xd", 5), ("xc", 6), ("xs", 7))})
        token_rows[-1]["xp"] = _digit_pointers(context, builder, sig.args[4], args[4], token)
    lanes = [[cgutils.alloca_once_value(builder, ir.Constant(_FLOATS, None)) for _ in token_rows] for _ in weight_rows]
    # Streaming weights from DRAM, the hardware prefetcher alone leaves half the bandwidth unused: the tile that
    # starts at token 0 (every row tile has one) prefetches the bytes of the row tile _PREFETCH_TILES_AHEAD ahead as
    # it reads its own. Measured on a 128256 x 2560 Q4_0 head at 1 token, 2 threads, same process, 40 rounds: while
    # the shared DRAM gave 79-82 GB/s, one tile ahead read 44-49 GB/s and three 68-79; while it gave 45-50 GB/s, both
    # read 32-42 GB/s (three ahead about 4% less). Without prefetching: 27 GB/s.
    first_token = context.cast(builder, builder.extract_value(args[8], 0), sig.args[8].dtype, types.int64)
    prefetch = {"wanted": builder.icmp_signed("==", first_token, _const(0))}
    for name, position in (("wq", 0), ("wd", 1)):
        stride = builder.extract_value(context.make_array(sig.args[position])(context, builder, args[position]).strides,
                                       0)
        prefetch[name] = builder.mul(stride, _const(_PREFETCH_TILES_AHEAD * len(weight_rows)))
    num_steps = builder.udiv(num_blocks, _const(16))
    num_loads = 8 if fmt == _FMT_Q8_0 else 4
    with cgutils.for_range(builder, num_steps) as loop:
        block0 = builder.mul(loop.index, _const(16))
        _emit_step(builder, fmt, vnni, weight_rows, token_rows, lanes, block0, None, num_loads, prefetch)
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
        _emit_step(builder, fmt, vnni, weight_rows, token_rows, lanes, block0, tail, num_active_loads, prefetch)
        builder.branch(done)
    builder.position_at_end(done)
    results = [_sum_lanes_ir(builder, builder.load(cell)) for row_lanes in lanes for cell in row_lanes]
    return context.make_tuple(builder, sig.return_type, results)


def _make_tile_dot(fmt: int, vnni: bool):
    """An intrinsic (wq, wd, wm, rows, xp, xd, xc, xs, tokens) -> tuple of float32, one per (row, token), row-major."""

    def tile_dot(typingctx, wq, wd, wm, rows, xp, xd, xc, xs, tokens):
        if xp.ndim not in (2, 3):
            raise TypeError(f"xp must be (T, padded K) or (T, 2, padded K) int8, got {xp}")
        num_outputs = rows.count * tokens.count
        signature = types.UniTuple(types.float32, num_outputs)(wq, wd, wm, rows, xp, xd, xc, xs, tokens)

        def codegen(context, builder, sig, args):
            return _emit_tile_dot(context, builder, sig, args, fmt, vnni)

        return signature, codegen

    tile_dot.__name__ = f"_tile_dot_{('q4_0', 'q4_1', 'q8_0')[fmt]}_{'vnni' if vnni else 'simd'}"
    return intrinsic(tile_dot)


# Only the functions that call the vnni intrinsics ever emit vpdpbusd, and they are compiled only when called.
_tile_dot_q4_0_vnni = _make_tile_dot(_FMT_Q4_0, vnni=True)
_tile_dot_q4_1_vnni = _make_tile_dot(_FMT_Q4_1, vnni=True)
_tile_dot_q8_0_vnni = _make_tile_dot(_FMT_Q8_0, vnni=True)
_tile_dot_q4_0_simd = _make_tile_dot(_FMT_Q4_0, vnni=False)
_tile_dot_q4_1_simd = _make_tile_dot(_FMT_Q4_1, vnni=False)
_tile_dot_q8_0_simd = _make_tile_dot(_FMT_Q8_0, vnni=False)


@njit(cache=True, nogil=True)
def _pad_activations(
    xq: np.ndarray, xd: np.ndarray, xsum: np.ndarray, fmt: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The activation side of the VNNI step, laid out to meet each 64-byte weight vector byte for byte, and zero-padded
    to whole steps of 16 blocks so no activation load is masked. xq (T, K) int8 codes or (T, 2, K) int8 A16 digits
    -> xp of the same dimensions, each digit's row laid out alike; xc and xs are taken over the whole codes.

    Q4 full groups of 16 blocks: the 4 low-nibble partners of code bytes 4i..4i+3 of block l (elements 4i..4i+3) go
    to lane l of vector 2i, the 4 high-nibble partners (elements 16+4i..16+4i+3) to lane l of vector 2i+1. Q4 tail
    blocks: per 4 blocks their 64 low-nibble partners then their 64 high-nibble ones, matching GGUF-order codes.
    Q8_0: natural order.
    """
    num_tokens, num_cols = xq.shape[0], xq.shape[-1]
    num_blocks = num_cols // 32
    num_grouped = 0 if fmt == _FMT_Q8_0 else num_blocks // 16 * 16
    padded_blocks = (num_blocks + 15) // 16 * 16
    xp = np.zeros((*xq.shape[:-1], padded_blocks * 32), np.int8)  # (num_tokens, [2,] padded K) int8, weight order
    digits = xq.reshape((num_tokens, -1, num_cols))  # (num_tokens, num_digits, K) int8 view
    padded_digits = xp.reshape((num_tokens, -1, padded_blocks * 32))  # (num_tokens, num_digits, padded K) int8 view
    xdp = np.zeros((num_tokens, padded_blocks), np.float32)  # (num_tokens, padded K // 32) float32
    xc = np.zeros((num_tokens, padded_blocks), np.int32)  # (num_tokens, padded K // 32) int32 offset correction
    xs = np.zeros((num_tokens, padded_blocks), np.float32)  # (num_tokens, padded K // 32) float32 xd · Σq (Q4_1)
    correction = 128 if fmt == _FMT_Q8_0 else 8 if fmt == _FMT_Q4_0 else 0
    for token in range(num_tokens):
        for digit in range(digits.shape[1]):
            # Quads (4 consecutive activations) stay together: move them as int32 words.
            words = digits[token, digit].view(np.int32)  # (K // 4,) int32
            padded_words = padded_digits[token, digit].view(np.int32)  # (padded K // 4,) int32
            for block in range(num_blocks):
                for quad in range(8):
                    if block < num_grouped:
                        dst = block // 16 * 128 + block % 16 + quad % 4 * 32 + quad // 4 * 16
                    elif fmt == _FMT_Q8_0:
                        dst = block * 8 + quad
                    else:
                        tail = block - num_grouped
                        dst = num_grouped * 8 + tail // 4 * 32 + tail % 4 * 4 + quad // 4 * 16 + quad % 4
                    padded_words[dst] = words[block * 8 + quad]
        for block in range(num_blocks):
            total = np.int32(0)  # Σ codes = Σ digit sums, most significant first, base 256
            for digit in range(digits.shape[1]):
                digit_sum = np.int32(0)
                for col in range(block * 32, block * 32 + 32):
                    digit_sum += np.int32(digits[token, digit, col])
                total = total * np.int32(_A16_RADIX) + digit_sum
            xdp[token, block] = xd[token, block]
            xc[token, block] = correction * total
            xs[token, block] = xd[token, block] * np.float32(xsum[token, block])
    return xp, xdp, xc, xs


@njit(cache=True, nogil=True)
def _tile_dot_simd(
    wq: np.ndarray, wd: np.ndarray, wm: np.ndarray, rows: tuple, xp: np.ndarray, xdp: np.ndarray, xc: np.ndarray,
    xs: np.ndarray, tokens: tuple, fmt: int,
) -> tuple:
    if fmt == _FMT_Q4_0:
        return _tile_dot_q4_0_simd(wq, wd, wm, rows, xp, xdp, xc, xs, tokens)
    if fmt == _FMT_Q4_1:
        return _tile_dot_q4_1_simd(wq, wd, wm, rows, xp, xdp, xc, xs, tokens)
    return _tile_dot_q8_0_simd(wq, wd, wm, rows, xp, xdp, xc, xs, tokens)


# The drivers: each prange iteration owns output rows 2·pair and 2·pair + 1 (an odd last row is both, written twice
# with one value). Tokens inside the row loop: the two weight rows stay in L1 while every token reads them.
# On VNNI each format has its own driver calling its tile function directly. A driver that chose the format per tile
# compiled all three formats' steps into one function whose registers spilled to a 7.6 KB stack frame: Q4_1 A16 on
# SmolLM2 shapes took 1.1-1.4x as long at 1 token and up to 2x at 8 and 64 (Numba cannot cache a kernel that takes
# the tile function as an argument, hence three drivers). The portable SIMD path keeps one dispatching driver.


@njit(cache=True, nogil=True, inline="always")
def _store_pair(out: np.ndarray, tile: tuple, rows: tuple, token: int) -> None:
    """A tile's outputs, row-major (rows[0]'s tokens, then rows[1]'s), into out[token + i, row]."""
    num_tokens = len(tile) // 2
    for i in range(num_tokens):
        out[token + i, rows[0]] = tile[i]
        out[token + i, rows[1]] = tile[num_tokens + i]


@njit(cache=True, nogil=True, parallel=True)
def _matmul_padded_q4_0_vnni(
    xp: np.ndarray, xdp: np.ndarray, xc: np.ndarray, xs: np.ndarray, wq: np.ndarray, wd: np.ndarray, wm: np.ndarray,
) -> np.ndarray:
    num_tokens, num_rows = xp.shape[0], wq.shape[0]
    out = np.empty((num_tokens, num_rows), np.float32)  # (num_tokens, N) float32
    num_tiled = num_tokens - num_tokens % _TOKENS_PER_TILE
    for pair in prange((num_rows + 1) // 2):
        rows = (2 * pair, min(2 * pair + 1, num_rows - 1))
        for token in range(0, num_tiled, _TOKENS_PER_TILE):
            _store_pair(out, _tile_dot_q4_0_vnni(wq, wd, wm, rows, xp, xdp, xc, xs,
                                                 (token, token + 1, token + 2, token + 3)), rows, token)
        for token in range(num_tiled, num_tokens):
            _store_pair(out, _tile_dot_q4_0_vnni(wq, wd, wm, rows, xp, xdp, xc, xs, (token,)), rows, token)
    return out


@njit(cache=True, nogil=True, parallel=True)
def _matmul_padded_q4_1_vnni(
    xp: np.ndarray, xdp: np.ndarray, xc: np.ndarray, xs: np.ndarray, wq: np.ndarray, wd: np.ndarray, wm: np.ndarray,
) -> np.ndarray:
    num_tokens, num_rows = xp.shape[0], wq.shape[0]
    out = np.empty((num_tokens, num_rows), np.float32)  # (num_tokens, N) float32
    num_tiled = num_tokens - num_tokens % _TOKENS_PER_TILE
    for pair in prange((num_rows + 1) // 2):
        rows = (2 * pair, min(2 * pair + 1, num_rows - 1))
        for token in range(0, num_tiled, _TOKENS_PER_TILE):
            _store_pair(out, _tile_dot_q4_1_vnni(wq, wd, wm, rows, xp, xdp, xc, xs,
                                                 (token, token + 1, token + 2, token + 3)), rows, token)
        for token in range(num_tiled, num_tokens):
            _store_pair(out, _tile_dot_q4_1_vnni(wq, wd, wm, rows, xp, xdp, xc, xs, (token,)), rows, token)
    return out


@njit(cache=True, nogil=True, parallel=True)
def _matmul_padded_q8_0_vnni(
    xp: np.ndarray, xdp: np.ndarray, xc: np.ndarray, xs: np.ndarray, wq: np.ndarray, wd: np.ndarray, wm: np.ndarray,
) -> np.ndarray:
    num_tokens, num_rows = xp.shape[0], wq.shape[0]
    out = np.empty((num_tokens, num_rows), np.float32)  # (num_tokens, N) float32
    num_tiled = num_tokens - num_tokens % _TOKENS_PER_TILE
    for pair in prange((num_rows + 1) // 2):
        rows = (2 * pair, min(2 * pair + 1, num_rows - 1))
        for token in range(0, num_tiled, _TOKENS_PER_TILE):
            _store_pair(out, _tile_dot_q8_0_vnni(wq, wd, wm, rows, xp, xdp, xc, xs,
                                                 (token, token + 1, token + 2, token + 3)), rows, token)
        for token in range(num_tiled, num_tokens):
            _store_pair(out, _tile_dot_q8_0_vnni(wq, wd, wm, rows, xp, xdp, xc, xs, (token,)), rows, token)
    return out


@njit(cache=True, nogil=True, parallel=True)
def _matmul_padded_simd(
    xp: np.ndarray, xdp: np.ndarray, xc: np.ndarray, xs: np.ndarray, wq: np.ndarray, wd: np.ndarray, wm: np.ndarray,
    fmt: int,
) -> np.ndarray:
    num_tokens, num_rows = xp.shape[0], wq.shape[0]
    out = np.empty((num_tokens, num_rows), np.float32)  # (num_tokens, N) float32
    num_tiled = num_tokens - num_tokens % _TOKENS_PER_TILE
    for pair in prange((num_rows + 1) // 2):
        rows = (2 * pair, min(2 * pair + 1, num_rows - 1))
        for token in range(0, num_tiled, _TOKENS_PER_TILE):
            _store_pair(out, _tile_dot_simd(wq, wd, wm, rows, xp, xdp, xc, xs, (token, token + 1, token + 2, token + 3),
                                            fmt), rows, token)
        for token in range(num_tiled, num_tokens):
            _store_pair(out, _tile_dot_simd(wq, wd, wm, rows, xp, xdp, xc, xs, (token,), fmt), rows, token)
    return out


@njit(cache=True, nogil=True)
def _matmul_vnni(
    xq: np.ndarray, xd: np.ndarray, xsum: np.ndarray, wq: np.ndarray, wd: np.ndarray, wm: np.ndarray, fmt: int
) -> np.ndarray:
    xp, xdp, xc, xs = _pad_activations(xq, xd, xsum, fmt)
    if fmt == _FMT_Q4_0:
        return _matmul_padded_q4_0_vnni(xp, xdp, xc, xs, wq, wd, wm)
    if fmt == _FMT_Q4_1:
        return _matmul_padded_q4_1_vnni(xp, xdp, xc, xs, wq, wd, wm)
    return _matmul_padded_q8_0_vnni(xp, xdp, xc, xs, wq, wd, wm)


@njit(cache=True, nogil=True)
def _matmul_simd(
    xq: np.ndarray, xd: np.ndarray, xsum: np.ndarray, wq: np.ndarray, wd: np.ndarray, wm: np.ndarray, fmt: int
) -> np.ndarray:
    xp, xdp, xc, xs = _pad_activations(xq, xd, xsum, fmt)
    return _matmul_padded_simd(xp, xdp, xc, xs, wq, wd, wm, fmt)


@njit(cache=True, nogil=True)
def _quantize_matmul_vnni(x: np.ndarray, wq: np.ndarray, wd: np.ndarray, wm: np.ndarray, fmt: int) -> np.ndarray:
    xq, xd, xsum = _quantize_q8_blocks(x)
    return _matmul_vnni(xq, xd, xsum, wq, wd, wm, fmt)


@njit(cache=True, nogil=True)
def _quantize_matmul_simd(x: np.ndarray, wq: np.ndarray, wd: np.ndarray, wm: np.ndarray, fmt: int) -> np.ndarray:
    xq, xd, xsum = _quantize_q8_blocks(x)
    return _matmul_simd(xq, xd, xsum, wq, wd, wm, fmt)


@njit(cache=True, nogil=True)
def _quantize_a16_matmul_vnni(x: np.ndarray, wq: np.ndarray, wd: np.ndarray, wm: np.ndarray, fmt: int) -> np.ndarray:
    xq, xd, xsum = _quantize_a16_blocks(x)
    return _matmul_vnni(xq, xd, xsum, wq, wd, wm, fmt)


@njit(cache=True, nogil=True)
def _quantize_a16_matmul_simd(x: np.ndarray, wq: np.ndarray, wd: np.ndarray, wm: np.ndarray, fmt: int) -> np.ndarray:
    xq, xd, xsum = _quantize_a16_blocks(x)
    return _matmul_simd(xq, xd, xsum, wq, wd, wm, fmt)


# ---------------------------------------------------------------------------------------------------------------------
# Public wrappers: check dtype, shape and C order (cheaply: a decode step makes hundreds of calls), then call the path
# chosen once at import. The private twins take every format's codes as raw uint8 bytes (Q8_0's int8 codes viewed as
# uint8, reinterpreted inside), so each kernel compiles one signature for all three formats.


def _select_kernel_path() -> str:
    """'avx512_vnni' when the CPU and JIT target allow it, else 'simd'; BITSERVE_KERNELS=portable forces plain Numba."""
    requested = os.environ.get("BITSERVE_KERNELS", "auto")
    if requested not in ("auto", "portable"):
        raise ValueError(f"BITSERVE_KERNELS={requested!r}: expected 'auto' or 'portable'")
    if requested == "portable":
        return "portable"
    return "avx512_vnni" if detect_cpu_features().has_avx512_vnni else "simd"


KERNEL_PATH = _select_kernel_path()
_MATMUL = {"avx512_vnni": _matmul_vnni, "simd": _matmul_simd, "portable": _matmul_portable}[KERNEL_PATH]
_QUANTIZE_MATMUL = {
    "avx512_vnni": _quantize_matmul_vnni, "simd": _quantize_matmul_simd, "portable": _quantize_matmul_portable
}[KERNEL_PATH]
_QUANTIZE_A16_MATMUL = {
    "avx512_vnni": _quantize_a16_matmul_vnni, "simd": _quantize_a16_matmul_simd,
    "portable": _quantize_a16_matmul_portable,
}[KERNEL_PATH]

def _check(name: str, array: np.ndarray, dtype: np.dtype, shape: tuple[int, ...] | int) -> None:
    """array must be a C-contiguous ndarray of dtype with this shape (or, given an int, this many dimensions)."""
    if (
        type(array) is np.ndarray
        and array.dtype is dtype  # identity first: builtin native dtypes are singletons, and `is` is cheapest
        and (array.shape == shape if type(shape) is tuple else array.ndim == shape)
        and array.flags.c_contiguous
    ):
        return
    if not isinstance(array, np.ndarray):
        raise ValueError(f"{name} must be a numpy array, got {type(array).__name__}")
    if array.dtype != dtype:
        raise ValueError(f"{name} must be {dtype.name}, got {array.dtype}")
    if isinstance(shape, tuple) and array.shape != shape:
        raise ValueError(f"{name} has shape {array.shape}, expected {shape}")
    if not isinstance(shape, tuple) and array.ndim != shape:
        raise ValueError(f"{name} must have {shape} dimensions, got shape {array.shape}")
    if not array.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous (use np.ascontiguousarray)")


def _check_in_features(in_features: int) -> None:
    if in_features <= 0 or in_features % BLOCK_SIZE:
        raise ValueError(f"in_features must be a positive multiple of {BLOCK_SIZE}, got {in_features}")


def check_weights(wq: np.ndarray, wd: np.ndarray, wm: np.ndarray | None, code_dtype: np.dtype | type) -> int:
    """Checks a block-quantized weight in structure-of-arrays form (codes int8 for Q8_0, uint8 nibble pairs for Q4);
    returns in_features. Raises ValueError naming the array at fault."""
    # Fast path in one expression: every decode step checks hundreds of weights that are almost always fine.
    if (
        type(wq) is np.ndarray and wq.dtype is code_dtype and wq.ndim == 2 and wq.flags.c_contiguous
        and type(wd) is np.ndarray and wd.dtype is _UINT16 and wd.flags.c_contiguous
        and (wm is None or (type(wm) is np.ndarray and wm.dtype is _UINT16 and wm.flags.c_contiguous
                            and wm.shape == wd.shape))
    ):
        in_features = wq.shape[1] * (1 if code_dtype is _INT8 else 2)
        if in_features > 0 and in_features % BLOCK_SIZE == 0 and wd.shape == (wq.shape[0], in_features // BLOCK_SIZE):
            return in_features
    code_dtype = np.dtype(code_dtype)
    _check("wq", wq, code_dtype, 2)
    in_features = wq.shape[1] * (1 if code_dtype == _INT8 else 2)
    _check_in_features(in_features)
    _check("wd", wd, _UINT16, (wq.shape[0], in_features // BLOCK_SIZE))
    if wm is not None:
        _check("wm", wm, _UINT16, wd.shape)
    return in_features


def _check_activations(xq: np.ndarray, xd: np.ndarray, xsum: np.ndarray | None, in_features: int,
                       num_digits: int = 1) -> None:
    """int8 codes (num_digits 1): xq (T, K) int8; A16 digits (num_digits 2): xq (T, 2, K) int8."""
    _check("xq", xq, _INT8, 2 if num_digits == 1 else 3)
    if num_digits > 1 and xq.shape[1] != num_digits:
        raise ValueError(f"xq must have shape (T, {num_digits}, K) for {num_digits} digits, got {xq.shape}")
    if xq.shape[-1] != in_features:
        raise ValueError(f"xq has {xq.shape[-1]} columns but the weight has in_features={in_features}")
    _check("xd", xd, _FLOAT32, (xq.shape[0], in_features // BLOCK_SIZE))
    if xsum is not None:
        _check("xsum", xsum, _INT32, xd.shape)


def _check_float_input(x: np.ndarray, in_features: int) -> None:
    _check("x", x, _FLOAT32, 2)
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
    uint8 nibble pairs in kernel order (to_kernel_order), wd (N, K // 32) uint16 fp16 scales -> (T, N) float32
    = Σ_b wd·xd·Σ (nibble - 8)·q, summed in the fixed order described at the top of this module."""
    _check_activations(xq, xd, None, check_weights(wq, wd, None, _UINT8))
    return _MATMUL(xq, xd, np.zeros(xd.shape, np.int32), wq, wd, wd, _FMT_Q4_0)


def matmul_q4_1(
    xq: np.ndarray, xd: np.ndarray, xsum: np.ndarray, wq: np.ndarray, wd: np.ndarray, wm: np.ndarray
) -> np.ndarray:
    """y = x @ W.T for Q4_1 weights (wq in kernel order). xsum (T, K // 32) int32 = Σ xq per block, wm (N, K // 32)
    uint16 fp16 block minimums -> (T, N) float32 = Σ_b [wd·xd·Σ nibble·q + wm·xd·xsum]."""
    _check_activations(xq, xd, xsum, check_weights(wq, wd, wm, _UINT8))
    return _MATMUL(xq, xd, xsum, wq, wd, wm, _FMT_Q4_1)


def matmul_q8_0(xq: np.ndarray, xd: np.ndarray, wq: np.ndarray, wd: np.ndarray) -> np.ndarray:
    """y = x @ W.T for Q8_0 weights. wq (N, K) int8 (GGUF order), wd (N, K // 32) uint16 fp16 scales
    -> (T, N) float32 = Σ_b wd·xd·Σ w·q."""
    _check_activations(xq, xd, None, check_weights(wq, wd, None, _INT8))
    return _MATMUL(xq, xd, np.zeros(xd.shape, np.int32), wq.view(np.uint8), wd, wd, _FMT_Q8_0)


def quantize_matmul_q4_0(x: np.ndarray, wq: np.ndarray, wd: np.ndarray) -> np.ndarray:
    """quantize_q8_blocks(x) then matmul_q4_0, in one call (no intermediate arrays cross into Python).
    x (T, K) float32 -> (T, N) float32, the same bits as the two calls."""
    _check_float_input(x, check_weights(wq, wd, None, _UINT8))
    return _QUANTIZE_MATMUL(x, wq, wd, wd, _FMT_Q4_0)


def quantize_matmul_q4_1(x: np.ndarray, wq: np.ndarray, wd: np.ndarray, wm: np.ndarray) -> np.ndarray:
    """quantize_q8_blocks(x) then matmul_q4_1, in one call. x (T, K) float32 -> (T, N) float32."""
    _check_float_input(x, check_weights(wq, wd, wm, _UINT8))
    return _QUANTIZE_MATMUL(x, wq, wd, wm, _FMT_Q4_1)


def quantize_matmul_q8_0(x: np.ndarray, wq: np.ndarray, wd: np.ndarray) -> np.ndarray:
    """quantize_q8_blocks(x) then matmul_q8_0, in one call. x (T, K) float32 -> (T, N) float32."""
    _check_float_input(x, check_weights(wq, wd, None, _INT8))
    return _QUANTIZE_MATMUL(x, wq.view(np.uint8), wd, wd, _FMT_Q8_0)


def matmul_q4_0_a16(xq: np.ndarray, xd: np.ndarray, wq: np.ndarray, wd: np.ndarray) -> np.ndarray:
    """matmul_q4_0 with A16 activations: xq (T, 2, K) int8 digits, xd (T, K // 32) float32 from quantize_a16_blocks
    -> (T, N) float32 = Σ_b wd·xd·Σ (nibble - 8)·(256·coarse + fine), in the same fixed order."""
    _check_activations(xq, xd, None, check_weights(wq, wd, None, _UINT8), num_digits=2)
    return _MATMUL(xq, xd, np.zeros(xd.shape, np.int32), wq, wd, wd, _FMT_Q4_0)


def matmul_q4_1_a16(
    xq: np.ndarray, xd: np.ndarray, xsum: np.ndarray, wq: np.ndarray, wd: np.ndarray, wm: np.ndarray
) -> np.ndarray:
    """matmul_q4_1 with A16 activations from quantize_a16_blocks (xsum (T, K // 32) int32 = Σ codes per block)
    -> (T, N) float32 = Σ_b [wd·xd·Σ nibble·(256·coarse + fine) + wm·xd·xsum]."""
    _check_activations(xq, xd, xsum, check_weights(wq, wd, wm, _UINT8), num_digits=2)
    return _MATMUL(xq, xd, xsum, wq, wd, wm, _FMT_Q4_1)


def matmul_q8_0_a16(xq: np.ndarray, xd: np.ndarray, wq: np.ndarray, wd: np.ndarray) -> np.ndarray:
    """matmul_q8_0 with A16 activations from quantize_a16_blocks -> (T, N) float32
    = Σ_b wd·xd·Σ w·(256·coarse + fine)."""
    _check_activations(xq, xd, None, check_weights(wq, wd, None, _INT8), num_digits=2)
    return _MATMUL(xq, xd, np.zeros(xd.shape, np.int32), wq.view(np.uint8), wd, wd, _FMT_Q8_0)


def quantize_matmul_q4_0_a16(x: np.ndarray, wq: np.ndarray, wd: np.ndarray) -> np.ndarray:
    """quantize_a16_blocks(x) then matmul_q4_0_a16, in one call. x (T, K) float32 -> (T, N) float32."""
    _check_float_input(x, check_weights(wq, wd, None, _UINT8))
    return _QUANTIZE_A16_MATMUL(x, wq, wd, wd, _FMT_Q4_0)


def quantize_matmul_q4_1_a16(x: np.ndarray, wq: np.ndarray, wd: np.ndarray, wm: np.ndarray) -> np.ndarray:
    """quantize_a16_blocks(x) then matmul_q4_1_a16, in one call. x (T, K) float32 -> (T, N) float32."""
    _check_float_input(x, check_weights(wq, wd, wm, _UINT8))
    return _QUANTIZE_A16_MATMUL(x, wq, wd, wm, _FMT_Q4_1)


def quantize_matmul_q8_0_a16(x: np.ndarray, wq: np.ndarray, wd: np.ndarray) -> np.ndarray:
    """quantize_a16_blocks(x) then matmul_q8_0_a16, in one call. x (T, K) float32 -> (T, N) float32."""
    _check_float_input(x, check_weights(wq, wd, None, _INT8))
    return _QUANTIZE_A16_MATMUL(x, wq.view(np.uint8), wd, wd, _FMT_Q8_0)
