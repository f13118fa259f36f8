"""KV cache record formats: quantize each new token's keys and values into its (token, KV head) records in a block,
plus a plain numpy decoder of those records that tests and benchmarks check the attention kernels against.
Kernels and format constants only; which block a token lives in is engine/kv_cache.py's business.
"""

from __future__ import annotations

import enum
import math
from typing import NamedTuple

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from engine.kernels.elementwise import PARALLEL_MIN_VALUES

# Values per absmax scale. 32 is the smallest group that keeps 3-bit records at <= 0.22x fp16 with 16-bit scales
# (head_dim 64: 24 code bytes + 2 scales x 2 bytes = 28 bytes, against 128).
GROUP_SIZE = 32
HALF_MAX = 65504.0  # largest finite IEEE half; fp16 records clamp to it rather than store infinities


class KVFormat(enum.IntEnum):
    """How one (token, KV head) record stores head_dim values. Quantized codes are c = round(x / d) + 2^(bits-1),
    with one IEEE-half scale d per group of GROUP_SIZE values: d = -m / 2^(bits-1) for the value m of largest
    magnitude, so m gets the code 0 and the whole range [-2^(bits-1), 2^(bits-1) - 1] is used (as in GGUF Q4_0)."""

    FP32 = 0  # head_dim float32: exact, for logits() and the fixture tests
    FP16 = 1  # head_dim IEEE halves: the reference mode
    INT8 = 2  # head_dim codes, one per byte; then the scales. Also the format of every sequence's sink tokens
    Q4 = 3  # byte i holds the codes of values i (bits 0-3) and i + head_dim/2 (bits 4-7); then the scales
    # A plane of 2-bit low parts, byte i holding values i + s * head_dim/4 at bits 2s..2s+1 (s = 0..3), then a plane
    # of high bits in value order (value d at bit d % 8 of byte d / 8): 8 values in 3 bytes. One shift and mask of
    # the low plane, and of the high bits of the same head_dim/4 values read as one integer, decode a quarter of the
    # head in one vector loop. Then the scales.
    Q3 = 4


CODE_BITS = {KVFormat.INT8: 8, KVFormat.Q4: 4, KVFormat.Q3: 3}


class KVLayout(NamedTuple):
    """Where one layer's keys and values sit, passed to the kernels as it is (a tuple of ints).

    A block is `[K records | V records]`, each `num_tokens x num_kv_heads` records in token-major order, where
    num_tokens is block_size, except in a sequence's first block when sink_tokens > 0: that block holds the first
    sink_tokens tokens as INT8 records (attention sinks stay at 8 bits) in the same number of bytes.

    Exact window: a sequence's logical blocks are grouped in windows of window_blocks blocks. A query reads the keys
    and values of its own window as IEEE halves, from a per-sequence window buffer (tokens of earlier steps) or from
    this step's new tokens, and only earlier windows from the quantized blocks. Windows start at block boundaries
    at fixed positions, so what a query reads never depends on how its sequence was chunked or batched.
    """

    format: int  # KVFormat of ordinary blocks
    num_kv_heads: int
    head_dim: int
    group_size: int  # values per scale in quantized records
    block_size: int  # tokens per ordinary block
    record_bytes: int  # bytes per (token, KV head) record in an ordinary block
    sink_tokens: int  # tokens in a sequence's first block, as INT8 records; 0: the first block is an ordinary one
    sink_record_bytes: int  # bytes per INT8 record
    rotate: int  # 1: K and V rows are stored Hadamard-rotated (the attention rotates queries and outputs to match)
    window_blocks: int  # logical blocks per exact window; 0: no window, every key is read from the blocks


def record_bytes(fmt: KVFormat, head_dim: int) -> int:
    """Bytes of one (token, KV head) record, scales included."""
    if fmt == KVFormat.FP32:
        return 4 * head_dim
    if fmt == KVFormat.FP16:
        return 2 * head_dim
    return head_dim * CODE_BITS[fmt] // 8 + 2 * (head_dim // GROUP_SIZE)


def make_layout(fmt: KVFormat, num_kv_heads: int, head_dim: int, block_size: int, rotate: bool,
                window_tokens: int = 0) -> KVLayout:
    if head_dim % 16:
        raise ValueError(f"the attention kernels need head_dim to be a multiple of 16, got {head_dim}")
    quantized = fmt in CODE_BITS
    if quantized and head_dim % GROUP_SIZE:
        raise ValueError(f"{fmt.name} KV records need head_dim to be a multiple of {GROUP_SIZE}, got {head_dim}; "
                         "use --kv-cache-dtype fp16")
    if rotate and (not quantized or head_dim & (head_dim - 1)):
        raise ValueError(f"Hadamard rotation needs a quantized format and a power-of-two head_dim, got {fmt.name}, "
                         f"{head_dim}")
    if window_tokens % block_size or (window_tokens and not quantized):
        raise ValueError(f"an exact window ({window_tokens} tokens) must be whole blocks of {block_size}, and only "
                         f"quantized formats have one, not {fmt.name}")
    size = record_bytes(fmt, head_dim)
    sink_size = record_bytes(KVFormat.INT8, head_dim)
    # Sinks only where they add precision: as many INT8 records as fit the bytes of an ordinary first block.
    sink_tokens = block_size * size // sink_size if fmt in (KVFormat.Q4, KVFormat.Q3) else 0
    return KVLayout(int(fmt), num_kv_heads, head_dim, GROUP_SIZE, block_size, size, sink_tokens, sink_size,
                    int(rotate), window_tokens // block_size)


def write_kv(k: np.ndarray, v: np.ndarray, pool: np.ndarray, layout: KVLayout, block_tables: np.ndarray,
             seq_index: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Store each token's key and value, in the layout's format, at its position in its sequence's blocks.

    k, v: (num_tokens, num_kv_heads, head_dim) float32, k after RoPE
    pool: (num_blocks, block_bytes) uint8, one layer's blocks
    block_tables: (num_seqs, max_blocks) int32; seq_index, positions: (num_tokens,) int32
    -> (num_tokens, 2, num_kv_heads, head_dim) float32: k and v as an exact window reads them (rotated like the
    blocks, rounded to halves); (0, 2, ...) when the layout has no window.
    """
    shape = (positions.shape[0], layout.num_kv_heads, layout.head_dim)
    for name, x in (("k", k), ("v", v)):
        if x.dtype != np.float32 or x.shape != shape or not x.flags.c_contiguous:
            raise ValueError(f"{name} must be C-contiguous float32 of shape {shape}, got {x.dtype} {x.shape}")
    if pool.dtype != np.uint8 or pool.ndim != 2 or not pool.flags.c_contiguous:
        raise ValueError("pool must be one layer's C-contiguous (num_blocks, block_bytes) uint8 blocks")
    _check_int32(block_tables=block_tables, seq_index=seq_index, positions=positions)
    exact = np.empty((shape[0] if layout.window_blocks else 0, 2, *shape[1:]), dtype=np.float32)  # see -> above
    # One token (single-sequence decode) runs without a parallel region, whose start and join cost more than it.
    (_write_kv if shape[0] > 1 else _write_kv_serial)(k, v, pool, layout, block_tables, seq_index, positions, exact)
    return exact


def store_window(exact: np.ndarray, window: np.ndarray, layout: KVLayout, seq_index: np.ndarray,
                 positions: np.ndarray, window_slots: np.ndarray, window_starts: np.ndarray) -> None:
    """Keep the tokens of each sequence's last window in this batch in its window buffer, for later steps. Call it
    after the attention: a chunk that starts a new window overwrites the previous window, which the chunk's first
    queries may still read.

    exact: (num_tokens, 2, num_kv_heads, head_dim) float32 from write_kv
    window: (num_slots, 2, window_blocks * block_size, num_kv_heads, head_dim) uint16, one layer's window buffers
    window_slots, window_starts: (num_seqs,) int32, each sequence's window buffer and the first position of the
    window holding its last token in this batch
    """
    if layout.window_blocks == 0:
        return
    if window.dtype != np.uint16 or window.ndim != 5 or not window.flags.c_contiguous:
        raise ValueError("window must be one layer's C-contiguous (num_slots, 2, tokens, heads, head_dim) uint16")
    if exact.dtype != np.float32 or exact.shape != (positions.shape[0], 2, *window.shape[3:]):
        raise ValueError(f"exact must be float32 of shape {(positions.shape[0], 2, *window.shape[3:])}")
    _check_int32(seq_index=seq_index, positions=positions, window_slots=window_slots, window_starts=window_starts)
    _store_window(exact, window, seq_index, positions, window_slots, window_starts)


def _check_int32(**arrays: np.ndarray) -> None:
    for name, x in arrays.items():
        if x.dtype != np.int32:
            raise ValueError(f"{name} must be int32, got {x.dtype}")


def quantize_records(x: np.ndarray, fmt: KVFormat, rotate: bool = False) -> np.ndarray:
    """(num_rows, head_dim) float32 -> (num_rows, record_bytes) uint8 records, as write_kv stores them."""
    if x.dtype != np.float32 or x.ndim != 2:
        raise ValueError(f"expected (num_rows, head_dim) float32, got {x.dtype} {x.shape}")
    layout = make_layout(fmt, 1, x.shape[1], 1, rotate)
    out = np.empty((x.shape[0], layout.record_bytes), dtype=np.uint8)  # (num_rows, record_bytes) uint8
    _quantize_rows(np.ascontiguousarray(x), fmt, layout.group_size, rotate, out)
    return out


def dequantize_records(records: np.ndarray, fmt: KVFormat, head_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Reference decoder in plain numpy: (num_rows, record_bytes) uint8 -> values (num_rows, head_dim) float32 and
    each value's quantization step |d| (num_rows, head_dim) float32 (zero for float formats). Rotated records stay
    rotated."""
    num_rows = records.shape[0]
    if fmt == KVFormat.FP32:
        return records.view(np.float32).reshape(num_rows, head_dim).copy(), np.zeros((num_rows, head_dim), np.float32)
    if fmt == KVFormat.FP16:
        values = records.view(np.float16).reshape(num_rows, head_dim).astype(np.float32)
        return values, np.zeros_like(values)
    bits = CODE_BITS[fmt]
    code_bytes = head_dim * bits // 8
    packed = records[:, :code_bytes].astype(np.int32)  # (num_rows, code_bytes) int32
    if fmt == KVFormat.INT8:
        codes = packed
    elif fmt == KVFormat.Q4:
        codes = np.concatenate((packed & 15, packed >> 4), axis=1)
    else:
        quarter = head_dim // 4
        low = np.concatenate([(packed[:, :quarter] >> (2 * s)) & 3 for s in range(4)], axis=1)
        high = np.unpackbits(records[:, quarter:code_bytes], axis=1, bitorder="little").astype(np.int32)
        codes = low | (high << 2)
    scales = records[:, code_bytes:].copy().view(np.float16).astype(np.float32)  # (num_rows, num_groups)
    step = np.repeat(scales, GROUP_SIZE, axis=1)  # (num_rows, head_dim) float32
    values = (codes - (1 << (bits - 1))).astype(np.float32) * step
    return values, np.abs(step)


def hadamard_rows(x: np.ndarray) -> np.ndarray:
    """Orthonormal Walsh-Hadamard transform of every last-axis row: (..., n) float32 -> same shape, n a power of 2.
    The matrix is symmetric, so applying it twice gives the input back (up to rounding)."""
    if x.dtype != np.float32 or x.shape[-1] & (x.shape[-1] - 1):
        raise ValueError(f"expected float32 rows of a power-of-two length, got {x.dtype} {x.shape}")
    out = np.array(x, dtype=np.float32, order="C")  # same shape as x, transformed in place below
    # A decode step's queries are a few rows: the parallel region's start and join would cost more than the rows.
    (_hadamard_rows if out.size >= PARALLEL_MIN_VALUES else _hadamard_rows_serial)(out.reshape(-1, x.shape[-1]))
    return out


@intrinsic
def _float_bits(typingctx, value):  # pragma: no cover - compile-time
    """float32 -> its IEEE bit pattern as uint32 (a free register reinterpretation)."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


@intrinsic
def _bits_float(typingctx, bits):  # pragma: no cover - compile-time
    """uint32 IEEE bit pattern -> float32."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.uint32), codegen


@njit(cache=True, nogil=True)
def _half_bits(value):  # pragma: no cover - jitted
    """float32 -> IEEE half bits, rounded to nearest even, in integer arithmetic (no F16C needed). Every case is
    computed and the right one selected, with no branch, so loops of it vectorize."""
    bits = _float_bits(np.float32(value))
    sign = (bits >> np.uint32(16)) & np.uint32(0x8000)
    bits &= np.uint32(0x7FFFFFFF)
    # |value| >= 2^16: infinity (NaN stays NaN)
    overflow = np.uint32(0x7E00) if bits > np.uint32(0x7F800000) else np.uint32(0x7C00)
    # Below 2^-14, a subnormal half: adding 0.5 leaves its mantissa in the low bits, rounded to nearest even by the FPU.
    subnormal = _float_bits(_bits_float(bits) + np.float32(0.5)) - np.uint32(0x3F000000)
    # Otherwise rebias the exponent (127 -> 15) and add just under half an ulp, plus one when odd: round half to even.
    normal = (bits + np.uint32(0xC8000FFF) + ((bits >> np.uint32(13)) & np.uint32(1))) >> np.uint32(13)
    half = normal if bits >= np.uint32(0x38800000) else subnormal
    half = overflow if bits >= np.uint32(0x47800000) else half
    return np.uint16((half | sign) & np.uint32(0xFFFF))


@njit(cache=True, nogil=True)
def _half_value(bits):  # pragma: no cover - jitted
    """IEEE half bits (uint16) -> float32 by integer moves, branch-free so loops of it vectorize. Exponent and
    mantissa shift into place and the exponent is rebiased (15 -> 127); a subnormal half is rebuilt as a normal
    float minus 2^-14, so no float32 denormal (and its slow microcode path) is ever touched."""
    wide = np.uint32(bits)
    moved = ((wide & np.uint32(0x7FFF)) << np.uint32(13)) + np.uint32(0x38000000)
    normal = _bits_float(moved)
    subnormal = _bits_float(moved + np.uint32(0x00800000)) - np.float32(2.0 ** -14)
    magnitude = normal if wide & np.uint32(0x7C00) else subnormal
    return _bits_float(_float_bits(magnitude) | ((wide & np.uint32(0x8000)) << np.uint32(16)))


_SIXTEEN = 16  # floats per 512-bit vector: the transform's first four stages run inside one register


@intrinsic
def _butterflies_within_sixteens(typingctx, x):  # pragma: no cover - compile-time
    """The stages of width 1, 2, 4 and 8 of the transform, on every run of 16 consecutive values of x ((n,) float32,
    C-contiguous, n a multiple of 16), in place. Element i of a stage of width w becomes x[i] + x[i + w] below its
    partner and x[i - w] - x[i] above it: one permute, one multiply by +-1 (exact) and one add per vector. Each
    element gets the one rounded add of the scalar butterfly, so the bits are those of the loop this replaces."""
    if not (isinstance(x, types.Array) and x.ndim == 1 and x.layout == "C" and x.dtype == types.float32):
        return None
    vector_type = ir.VectorType(ir.FloatType(), _SIXTEEN)

    def codegen(context, builder, signature, args):
        array = context.make_array(signature.args[0])(context, builder, args[0])
        data = builder.bitcast(array.data, vector_type.as_pointer())
        num_vectors = builder.udiv(builder.extract_value(array.shape, 0), ir.Constant(ir.IntType(64), _SIXTEEN))
        with cgutils.for_range(builder, num_vectors) as loop:
            pointer = builder.gep(data, [loop.index])
            values = builder.load(pointer, align=4)
            for width in (1, 2, 4, 8):
                partners = builder.shuffle_vector(values, values, ir.Constant(ir.VectorType(ir.IntType(32), _SIXTEEN),
                                                                              [i ^ width for i in range(_SIXTEEN)]))
                signs = ir.Constant(vector_type, [-1.0 if i & width else 1.0 for i in range(_SIXTEEN)])
                values = builder.fadd(partners, builder.fmul(values, signs))
            builder.store(values, pointer, align=4)
        return context.get_dummy_value()

    return types.void(x), codegen


@njit(cache=True, nogil=True)
def _hadamard_in_place(x):  # pragma: no cover - jitted
    """x: (n,) float32, n a power of two -> H x / sqrt(n), butterflies in a fixed order (batch invariant)."""
    n = x.shape[0]
    width = 1
    if n % _SIXTEEN == 0:
        _butterflies_within_sixteens(x)
        width = _SIXTEEN
    while width < n:
        for start in range(0, n, 2 * width):
            # Loops from 0 over slices: no index can be negative, so LLVM drops the wrap-around checks and vectorizes.
            low, high = x[start:start + width], x[start + width:start + 2 * width]
            for i in range(width):
                a = low[i]
                b = high[i]
                low[i] = a + b
                high[i] = a - b
        width *= 2
    norm = np.float32(1.0 / math.sqrt(n))
    for i in range(n):
        x[i] *= norm


@njit(cache=True, nogil=True, parallel=True)
def _hadamard_rows(x):  # pragma: no cover - jitted
    for row in prange(x.shape[0]):
        _hadamard_in_place(x[row])


@njit(cache=True, nogil=True)
def _hadamard_rows_serial(x):  # pragma: no cover - jitted
    for row in range(x.shape[0]):
        _hadamard_in_place(x[row])


@njit(cache=True, nogil=True)
def _quantize_record(row, fmt, group_size, codes, out):  # pragma: no cover - jitted
    """row: (head_dim,) float32 -> out: (record_bytes,) uint8 in format `fmt`; codes: (head_dim,) uint8 scratch."""
    head_dim = row.shape[0]
    if fmt == KVFormat.FP32:
        values = out.view(np.float32)
        for d in range(head_dim):
            values[d] = row[d]
        return
    if fmt == KVFormat.FP16:
        halves = out.view(np.uint16)
        for d in range(head_dim):
            halves[d] = _half_bits(min(max(row[d], np.float32(-HALF_MAX)), np.float32(HALF_MAX)))
        return
    bits = 8 if fmt == KVFormat.INT8 else (4 if fmt == KVFormat.Q4 else 3)
    levels = 1 << (bits - 1)
    code_bytes = head_dim * bits // 8
    for group in range(head_dim // group_size):
        first = group * group_size
        extreme = np.float32(0.0)  # the value of largest magnitude; it gets code 0 (-levels)
        for d in range(first, first + group_size):
            if abs(row[d]) > abs(extreme):
                extreme = row[d]
        wanted = extreme / np.float32(-levels)
        scale_bits = _half_bits(wanted)
        if abs(_half_value(scale_bits)) < abs(wanted):
            # Round the scale's magnitude up (one more ulp; halves are sign-magnitude), so that no value's code
            # overflows the range: small and subnormal scales lose a lot to rounding.
            scale_bits += np.uint16(1)
        out[code_bytes + 2 * group] = scale_bits & 0xFF
        out[code_bytes + 2 * group + 1] = scale_bits >> 8
        # Codes are rounded against the stored (half) scale, so the decoder's error is at most one step |d|.
        scale = _half_value(scale_bits)
        for d in range(first, first + group_size):
            code = levels
            if scale != 0:
                code = int(np.rint(row[d] / scale)) + levels
            codes[d] = min(max(code, 0), 2 * levels - 1)
    if fmt == KVFormat.INT8:
        for d in range(head_dim):
            out[d] = codes[d]
    elif fmt == KVFormat.Q4:
        half = head_dim // 2
        for i in range(half):
            out[i] = codes[i] | (codes[i + half] << 4)
    else:
        quarter = head_dim // 4
        for i in range(quarter):
            out[i] = ((codes[i] & 3) | ((codes[i + quarter] & 3) << 2) | ((codes[i + 2 * quarter] & 3) << 4)
                      | ((codes[i + 3 * quarter] & 3) << 6))
        for i in range(head_dim // 8):
            high = 0
            for bit in range(8):
                high |= (codes[8 * i + bit] >> 2) << bit
            out[quarter + i] = high


@njit(cache=True, nogil=True)
def _prepare_row(row, rotate, out):  # pragma: no cover - jitted
    """out <- row, Hadamard-rotated when the layout says so; row, out: (head_dim,) float32."""
    out[:] = row
    if rotate:
        _hadamard_in_place(out)


@njit(cache=True, nogil=True, parallel=True)
def _quantize_rows(x, fmt, group_size, rotate, out):  # pragma: no cover - jitted
    for row in prange(x.shape[0]):
        prepared = np.empty(x.shape[1], dtype=np.float32)  # (head_dim,) float32, the (rotated) row
        codes = np.empty(x.shape[1], dtype=np.uint8)  # (head_dim,) uint8
        _prepare_row(x[row], rotate, prepared)
        _quantize_record(prepared, fmt, group_size, codes, out[row])


@njit(cache=True, nogil=True, inline="always")
def _write_token(k, v, pool, layout, block_tables, seq_index, positions, exact, t):  # pragma: no cover - jitted
    """Token t's records and exact rows: its own bytes, so tokens never write the same ones."""
    num_kv_heads = layout.num_kv_heads
    sinks = layout.sink_tokens
    position = positions[t]
    if position < sinks:
        logical, slot, num_slots = 0, position, sinks
        fmt, size = KVFormat.INT8, layout.sink_record_bytes
    else:
        rest = position - sinks
        logical = (1 if sinks > 0 else 0) + rest // layout.block_size
        slot, num_slots = rest % layout.block_size, layout.block_size
        fmt, size = layout.format, layout.record_bytes
    block = pool[block_tables[seq_index[t], logical]]
    prepared = np.empty(layout.head_dim, dtype=np.float32)  # (head_dim,) float32, the (rotated) row
    codes = np.empty(layout.head_dim, dtype=np.uint8)  # (head_dim,) uint8
    for h in range(num_kv_heads):
        k_offset = (slot * num_kv_heads + h) * size
        v_offset = k_offset + num_slots * num_kv_heads * size
        for which in range(2):
            _prepare_row(k[t, h] if which == 0 else v[t, h], layout.rotate, prepared)
            offset = k_offset if which == 0 else v_offset
            _quantize_record(prepared, fmt, layout.group_size, codes, block[offset:offset + size])
            if layout.window_blocks > 0:
                row = exact[t, which, h]
                for d in range(layout.head_dim):
                    row[d] = _half_value(_half_bits(min(max(prepared[d], np.float32(-HALF_MAX)),
                                                        np.float32(HALF_MAX))))


@njit(cache=True, nogil=True, parallel=True)
def _write_kv(k, v, pool, layout, block_tables, seq_index, positions, exact):  # pragma: no cover - jitted
    for t in prange(positions.shape[0]):
        _write_token(k, v, pool, layout, block_tables, seq_index, positions, exact, t)


@njit(cache=True, nogil=True)
def _write_kv_serial(k, v, pool, layout, block_tables, seq_index, positions, exact):  # pragma: no cover - jitted
    for t in range(positions.shape[0]):
        _write_token(k, v, pool, layout, block_tables, seq_index, positions, exact, t)


@njit(cache=True, nogil=True)
def _store_window(exact, window, seq_index, positions, window_slots, window_starts):  # pragma: no cover - jitted
    for t in range(positions.shape[0]):
        seq = seq_index[t]
        if positions[t] < window_starts[seq]:
            continue
        # Halves are exact in float32 and convert back to the same bits.
        rows = exact[t]
        out = window[window_slots[seq], :, positions[t] - window_starts[seq]]
        for which in range(2):
            for h in range(rows.shape[1]):
                for d in range(rows.shape[2]):
                    out[which, h, d] = _half_bits(rows[which, h, d])
