"""Numba attention over the paged, quantized KV cache: a decode kernel (one new token of each of many sequences) and
a chunked-prefill kernel (causal within the chunk, plus the cached blocks). Both decode kv_quant.py's records one block
at a time into small scratch, never into a float copy of the cache; block allocation lives in engine/kv_cache.py."""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from engine.kernels.kv_quant import KVFormat, KVLayout, hadamard_rows

PREFILL_TILE = 16  # query tokens of one sequence per prefill work item: blocks are dequantized once per tile
PREFETCH_BLOCKS = 8  # blocks whose records a work item has requested ahead of the one it decodes


class AttentionPlan(NamedTuple):
    """How a flat batch's query rows split between the two kernels; built once per forward, used by every layer."""

    decode_rows: np.ndarray  # (num_decode,) int32, rows of sequences that have exactly one token in the batch
    # (num_tiles, 2) int32, [first row, end row) of up to PREFILL_TILE rows of one sequence, all in one exact window
    prefill_tiles: np.ndarray
    seq_first_row: np.ndarray  # (num_seqs,) int32, batch row of each sequence's first token
    window_starts: np.ndarray  # (num_seqs,) int32, first position of the window of each sequence's last token
    row_window_starts: np.ndarray  # (num_tokens,) int32, first position of each row's own window


def window_start(positions: np.ndarray, layout: KVLayout) -> np.ndarray:
    """(n,) int32 positions -> (n,) int32 first position of the exact window holding each (0 without windows)."""
    if layout.window_blocks == 0:
        return np.zeros_like(positions)
    sinks, block_size = layout.sink_tokens, layout.block_size
    logical = np.where(positions < sinks, 0, (sinks > 0) + (positions - sinks) // block_size)
    first = logical // layout.window_blocks * layout.window_blocks  # first logical block of the window
    if sinks == 0:
        return (first * block_size).astype(np.int32)
    return np.where(first == 0, 0, sinks + (first - 1) * block_size).astype(np.int32)


def plan_attention(seq_index: np.ndarray, positions: np.ndarray, layout: KVLayout) -> AttentionPlan:
    """seq_index, positions: (num_tokens,) int32, each sequence's rows contiguous and in position order, sequences
    numbered 0..num_seqs-1 (rows of the block tables)."""
    num_tokens = seq_index.shape[0]
    # (num_runs,) int64 each: first row and end row of each sequence's run of rows
    starts = np.flatnonzero(np.r_[True, seq_index[1:] != seq_index[:-1]]) if num_tokens else np.empty(0, np.int64)
    ends = np.r_[starts[1:], num_tokens].astype(np.int64)
    row_windows = window_start(positions, layout)  # (num_tokens,) int32
    seq_first_row = np.zeros(int(seq_index.max()) + 1 if num_tokens else 0, dtype=np.int32)  # (num_seqs,) int32
    seq_first_row[seq_index[starts]] = starts
    window_starts = np.zeros_like(seq_first_row)  # (num_seqs,) int32
    window_starts[seq_index[starts]] = row_windows[ends - 1]
    single = ends - starts == 1
    tiles = []
    for start, end in zip(starts[~single], ends[~single], strict=True):
        # A tile never straddles a window boundary: all its rows read the same blocks quantized.
        cuts = np.flatnonzero(row_windows[start + 1:end] != row_windows[start:end - 1]) + start + 1
        for first, last in zip(np.r_[start, cuts], np.r_[cuts, end], strict=True):
            tiles += [(row, min(row + PREFILL_TILE, last)) for row in range(first, last, PREFILL_TILE)]
    return AttentionPlan(starts[single].astype(np.int32), np.array(tiles, dtype=np.int32).reshape(-1, 2),
                         seq_first_row, window_starts, row_windows)


def paged_attention(q: np.ndarray, exact: np.ndarray, pool: np.ndarray, window: np.ndarray, layout: KVLayout,
                    block_tables: np.ndarray, seq_index: np.ndarray, positions: np.ndarray, window_slots: np.ndarray,
                    plan: AttentionPlan) -> np.ndarray:
    """Causal attention of every query row over its own sequence's positions 0..position (inclusive).

    q: (num_tokens, num_heads, head_dim) float32, RoPE applied -> (num_tokens, num_heads, head_dim) float32.
    exact: (num_tokens, 2, num_kv_heads, head_dim) float32, this batch's keys and values as write_kv returned them.
    pool: (num_blocks, block_bytes) uint8 and window: (num_slots, 2, window_tokens, num_kv_heads, head_dim) uint16,
    one layer; write_kv must have stored this batch first. window_slots: (num_seqs,) int32.
    A query's result depends only on its own row and sequence, never on the rest of the batch, its chunking or
    which kernel served it (both run the same per-query arithmetic in the same order): output is batch invariant.
    """
    num_tokens, num_heads, head_dim = q.shape
    if q.dtype != np.float32 or not q.flags.c_contiguous or head_dim != layout.head_dim:
        raise ValueError(f"q must be C-contiguous float32 with head_dim {layout.head_dim}, got {q.dtype} {q.shape}")
    if num_heads % layout.num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {layout.num_kv_heads}")
    if pool.dtype != np.uint8 or pool.ndim != 2 or not pool.flags.c_contiguous:
        raise ValueError("pool must be one layer's C-contiguous (num_blocks, block_bytes) uint8 blocks")
    if window.dtype != np.uint16 or window.ndim != 5 or exact.dtype != np.float32 or exact.ndim != 4:
        raise ValueError("window must be uint16 (num_slots, 2, tokens, heads, head_dim), exact float32 (tokens, 2, "
                         "heads, head_dim)")
    for name, x in (("block_tables", block_tables), ("seq_index", seq_index), ("positions", positions),
                    ("window_slots", window_slots)):
        if x.dtype != np.int32:
            raise ValueError(f"{name} must be int32, got {x.dtype}")
    if not seq_index.shape[0] == positions.shape[0] == num_tokens:
        raise ValueError("seq_index and positions need one entry per token")
    scale = np.float32(1.0 / math.sqrt(head_dim))
    # The cache holds rotated keys; rotating the queries too leaves every dot product unchanged.
    queries = hadamard_rows(q) * scale if layout.rotate else q * scale  # (num_tokens, num_heads, head_dim)
    out = np.empty_like(q)  # (num_tokens, num_heads, head_dim) float32; every row is written by one kernel
    if plan.decode_rows.size:
        _attend_decode(queries, exact, pool, window, layout, block_tables, seq_index, positions, window_slots,
                       plan.seq_first_row, plan.row_window_starts, plan.decode_rows, out)
    if plan.prefill_tiles.size:
        _attend_prefill(queries, exact, pool, window, layout, block_tables, seq_index, positions, window_slots,
                        plan.seq_first_row, plan.row_window_starts, plan.prefill_tiles, out)
    # Outputs are weighted sums of rotated values: rotate back (the transform is its own inverse).
    return hadamard_rows(out) if layout.rotate else out


@intrinsic
def _bits_float(typingctx, bits):  # pragma: no cover - compile-time
    """uint32 IEEE bit pattern -> float32 (a free register reinterpretation)."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.uint32), codegen


@intrinsic
def _float_bits(typingctx, value):  # pragma: no cover - compile-time
    """float32 -> its IEEE bit pattern as uint32."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


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


@njit(cache=True, nogil=True)
def _block_geometry(logical, layout):  # pragma: no cover - jitted
    """-> (first position, tokens, record format, record bytes) of a sequence's `logical`-th block."""
    sinks = layout.sink_tokens
    if sinks == 0:
        return logical * layout.block_size, layout.block_size, layout.format, layout.record_bytes
    if logical == 0:
        return 0, sinks, KVFormat.INT8, layout.sink_record_bytes
    return sinks + (logical - 1) * layout.block_size, layout.block_size, layout.format, layout.record_bytes


@njit(cache=True, nogil=True)
def _load_records(block, halves, floats, first_offset, stride, fmt, group_size, out):  # pragma: no cover - jitted
    """Decode len(out) records of one block, at byte offsets first_offset + j * stride, into out: (n, head_dim)
    float32. block: (block_bytes,) uint8, with halves and floats the same bytes as uint16 and float32 (records and
    scales sit at even offsets, fp32 records at multiples of 4). One call per block, not per record: the format
    branch and the call stay out of the token loop. Float records copy in loops from 0 over a slice, which the
    compiler vectorizes; quantized ones decode in vector IR, one row slice per record (each slice costs two
    reference-count updates; the scalar loops over up to seven slices per record made a decode query over INT8 or
    Q4 blocks 5-10% slower)."""
    num_records, head_dim = out.shape
    if fmt == KVFormat.FP32:
        for j in range(num_records):
            start = (first_offset + j * stride) // 4
            values, row = floats[start:start + head_dim], out[j]
            for d in range(head_dim):
                row[d] = values[d]
        return
    if fmt == KVFormat.FP16:
        for j in range(num_records):
            start = (first_offset + j * stride) // 2
            values, row = halves[start:start + head_dim], out[j]
            for d in range(head_dim):
                row[d] = _half_value(values[d])
        return
    if fmt == KVFormat.INT8:
        levels, code_bytes = 128, head_dim
    elif fmt == KVFormat.Q4:
        levels, code_bytes = 8, head_dim // 2
    else:
        levels, code_bytes = 4, head_dim * 3 // 8
    quarter = head_dim // 4
    for j in range(num_records):
        start = first_offset + j * stride
        row = out[j]
        if fmt == KVFormat.INT8:
            _byte_codes(block, start, head_dim // _LANES, row)
        elif fmt == KVFormat.Q4:
            _nibble_codes(block, start, code_bytes // _LANES, row)
        elif quarter % _LANES == 0:  # Q3, head_dim a multiple of 64
            _q3_codes(block, start, quarter // _LANES, row)
        else:
            for part in range(4):
                first_byte = start + quarter + part * quarter // 8
                for i in range(quarter):
                    high = (block[first_byte + i // 8] >> (i % 8)) & 1
                    row[part * quarter + i] = np.float32(((block[start + i] >> (2 * part)) & 3) | (high << 2))
        _scale_codes(block, start + code_bytes, np.float32(levels), group_size, row)


# ---------------------------------------------------------------------------------------------------------------------
# The online-softmax fold in explicit 16-lane vectors (llvmlite IR). Written out because plain Numba loops over the same
# work ran 2-3x slower: LLVM vectorizes a loop 64 iterations at a time and left 16-key loops scalar, and every row
# slice costs reference counting. Sixteen keys are one chunk: their 16 scores are one
# vector, masked to -inf past the visible keys, exponentiated as one vector. Every sum runs in a fixed order (fused
# multiply-adds over the head dimension in increasing order, then fixed trees), so a query's bits never depend on the
# kernel or batch that serves it.

_F32 = ir.FloatType()
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
_LANES = 16
_VF = ir.VectorType(_F32, _LANES)
_VI = ir.VectorType(_I32, _LANES)


def _splat_float(value: float) -> ir.Constant:
    return ir.Constant(_VF, [ir.Constant(_F32, value)] * _LANES)


def _shuffle_mask(indices: list[int]) -> ir.Constant:
    return ir.Constant(ir.VectorType(_I32, len(indices)), [ir.Constant(_I32, i) for i in indices])


def _broadcast(builder: ir.IRBuilder, scalar: ir.Value, vector_type) -> ir.Value:
    """A vector with every lane equal to scalar."""
    single = builder.insert_element(ir.Constant(vector_type, None), scalar, ir.Constant(_I32, 0))
    return builder.shuffle_vector(single, ir.Constant(vector_type, None), _shuffle_mask([0] * _LANES))


def _vector_call(builder: ir.IRBuilder, name: str, result_type, operands: list) -> ir.Value:
    fnty = ir.FunctionType(result_type, [operand.type for operand in operands])
    return builder.call(cgutils.get_or_insert_function(builder.module, fnty, name), operands)


def _fma(builder: ir.IRBuilder, a: ir.Value, b: ir.Value, c: ir.Value) -> ir.Value:
    """a · b + c rounded once (llvm.fma: the same bits on every target)."""
    return _vector_call(builder, "llvm.fma.v16f32", _VF, [a, b, c])


def _vector_exp(builder: ir.IRBuilder, x: ir.Value) -> ir.Value:
    """exp(x) on 16 lanes, within 1 ulp for x <= 0 (0 below -87), with no libm call: x = n ln2 + r with |r| <= ln2 / 2,
    e^r by its Taylor series to r^7 (truncation < 6e-9), times 2^n from bits. ln2 is split in two parts, the first
    with few mantissa bits so n times it is exact and r keeps full precision."""
    clamped = builder.select(builder.fcmp_ordered(">", x, _splat_float(-87.0)), x, _splat_float(-87.0))
    n = _vector_call(builder, "llvm.rint.v16f32", _VF, [builder.fmul(clamped, _splat_float(1.4426950408889634))])
    r = builder.fsub(builder.fsub(clamped, builder.fmul(n, _splat_float(0.693145751953125))),
                     builder.fmul(n, _splat_float(1.428606765330187e-06)))
    poly = _splat_float(1.0 / 5040.0)
    for coefficient in (1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0):
        poly = builder.fadd(builder.fmul(poly, r), _splat_float(coefficient))
    exponent = builder.add(builder.fptosi(n, _VI), ir.Constant(_VI, [ir.Constant(_I32, 127)] * _LANES))
    power = builder.bitcast(builder.shl(exponent, ir.Constant(_VI, [ir.Constant(_I32, 23)] * _LANES)), _VF)
    return builder.select(builder.fcmp_ordered(">", x, _splat_float(-87.0)), builder.fmul(poly, power),
                          _splat_float(0.0))


def _lane_sums(builder: ir.IRBuilder, vectors: list[ir.Value]) -> ir.Value:
    """16 vectors -> one vector whose lane j is the sum of vectors[j]'s lanes, by a fixed tree of pairwise folds."""
    level = [(vector, [j]) for j, vector in enumerate(vectors)]
    width = _LANES
    while len(level) > 1:
        width //= 2
        folded = []
        for (left, left_ids), (right, right_ids) in zip(level[0::2], level[1::2], strict=True):
            # Each input holds len(ids) sums, each spread over `2 * width` lanes; halve every sum's lanes.
            groups = len(left_ids)
            low, high = [], []
            for source in range(2):
                for group in range(groups):
                    base = source * _LANES + group * 2 * width
                    low += range(base, base + width)
                    high += range(base + width, base + 2 * width)
            folded.append((builder.fadd(builder.shuffle_vector(left, right, _shuffle_mask(low)),
                                        builder.shuffle_vector(left, right, _shuffle_mask(high))),
                           left_ids + right_ids))
        level = folded
    vector, ids = level[0]
    return builder.shuffle_vector(vector, vector, _shuffle_mask([ids.index(j) for j in range(_LANES)]))


def _horizontal(builder: ir.IRBuilder, vector: ir.Value, combine) -> ir.Value:
    """Lane 0 of a fixed tree over the 16 lanes (lane i with lane i + 8, then i + 4, ...)."""
    width = _LANES
    while width > 1:
        width //= 2
        vector = combine(vector, builder.shuffle_vector(vector, vector, _shuffle_mask(
            list(range(width, 2 * width)) + list(range(width, _LANES)))))
    return builder.extract_element(vector, ir.Constant(_I32, 0))


def _element_pointer(context, builder: ir.IRBuilder, array_type, array_value, indices: list[ir.Value]) -> ir.Value:
    """float* to array[indices..., 0] of a float32 array, through its strides."""
    array = context.make_array(array_type)(context, builder, array_value)
    offset = ir.Constant(_I64, 0)
    for axis, index in enumerate(indices):
        offset = builder.add(offset, builder.mul(index, builder.extract_value(array.strides, axis)))
    data = builder.bitcast(array.data, ir.IntType(8).as_pointer())
    return builder.bitcast(builder.gep(data, [offset]), _F32.as_pointer())


def _load_vector(builder: ir.IRBuilder, pointer: ir.Value, element: ir.Value) -> ir.Value:
    return builder.load(builder.bitcast(builder.gep(pointer, [element]), _VF.as_pointer()), align=4)


def _record_operands(context, builder: ir.IRBuilder, sig, args) -> tuple[ir.Value, ir.Value, ir.Value]:
    """For the record decoders' (block, start, num_chunks, out) arguments: i8* to the record's first byte, the
    chunk count as i64, and float* to out's first element."""
    block_type, start_type, chunks_type, out_type = sig.args
    data = builder.bitcast(context.make_array(block_type)(context, builder, args[0]).data, ir.IntType(8).as_pointer())
    record = builder.gep(data, [context.cast(builder, args[1], start_type, types.int64)])
    num_chunks = context.cast(builder, args[2], chunks_type, types.int64)
    out_ptr = builder.bitcast(context.make_array(out_type)(context, builder, args[3]).data, _F32.as_pointer())
    return record, num_chunks, out_ptr


@intrinsic
def _q3_codes(typingctx, block, start, num_chunks, out):  # pragma: no cover - compile-time
    """The 3-bit codes of the Q3 record at byte `start` of block ((block_bytes,) uint8) as floats in out
    ((4 · 16 · num_chunks,) float32, C-contiguous), unscaled: 16 lanes at a time, value i of quarter s from bits 2s of
    low-plane byte i and bit i of the quarter's high bits, read 16 at a time as one little-endian int16 and shifted
    per lane. The plain loop it replaces stayed scalar (a variable shift per lane): at 2000 positions of the 2B4T
    shape a decode query's attention took 502 us per layer with it, 383 with this."""
    signature = types.void(block, start, num_chunks, out)

    def codegen(context, builder, sig, args):
        record, num_chunks, out_ptr = _record_operands(context, builder, sig, args)
        quarter = builder.mul(num_chunks, ir.Constant(_I64, _LANES))
        bytes_16 = ir.VectorType(ir.IntType(8), _LANES)
        lane_ids = ir.Constant(_VI, [ir.Constant(_I32, j) for j in range(_LANES)])
        ones, threes = (ir.Constant(_VI, [ir.Constant(_I32, v)] * _LANES) for v in (1, 3))
        with cgutils.for_range(builder, num_chunks) as chunk_loop:
            first = builder.mul(chunk_loop.index, ir.Constant(_I64, _LANES))  # value index within each quarter
            low_plane = builder.load(builder.bitcast(builder.gep(record, [first]), bytes_16.as_pointer()), align=1)
            low_plane = builder.zext(low_plane, _VI)
            for part in range(4):
                high_byte = builder.add(builder.add(quarter, builder.mul(ir.Constant(_I64, part), builder.udiv(
                    quarter, ir.Constant(_I64, 8)))), builder.udiv(first, ir.Constant(_I64, 8)))
                high_word = builder.load(builder.bitcast(builder.gep(record, [high_byte]),
                                                         ir.IntType(16).as_pointer()), align=1)
                high = builder.and_(builder.lshr(_broadcast(builder, builder.zext(high_word, _I32), _VI), lane_ids),
                                    ones)
                low = builder.and_(builder.lshr(low_plane, ir.Constant(_VI, [ir.Constant(_I32, 2 * part)] * _LANES)),
                                   threes)
                codes = builder.or_(low, builder.shl(high, ir.Constant(_VI, [ir.Constant(_I32, 2)] * _LANES)))
                target = builder.gep(out_ptr, [builder.add(builder.mul(ir.Constant(_I64, part), quarter), first)])
                builder.store(builder.sitofp(codes, _VF), builder.bitcast(target, _VF.as_pointer()), align=4)
        return context.get_dummy_value()

    return signature, codegen


def _make_whole_byte_codes(nibbles: bool):
    """An intrinsic (block, start, num_chunks, out) -> None writing, as floats, the codes of the record at byte
    `start` of block ((block_bytes,) uint8) into out (C-contiguous float32), 16 code bytes per chunk: one code per
    byte (INT8) or two (Q4: the low nibble of byte i is value i, the high nibble value len(out) / 2 + i)."""

    def whole_byte_codes(typingctx, block, start, num_chunks, out):  # pragma: no cover - compile-time
        signature = types.void(block, start, num_chunks, out)

        def codegen(context, builder, sig, args):
            record, num_chunks, out_ptr = _record_operands(context, builder, sig, args)
            half = builder.mul(num_chunks, ir.Constant(_I64, _LANES))  # code bytes: the high nibbles' first value
            bytes_16 = ir.VectorType(ir.IntType(8), _LANES)
            with cgutils.for_range(builder, num_chunks) as chunk_loop:
                first = builder.mul(chunk_loop.index, ir.Constant(_I64, _LANES))
                codes = builder.zext(builder.load(builder.bitcast(builder.gep(record, [first]),
                                                                  bytes_16.as_pointer()), align=1), _VI)
                parts = [(codes, first)]
                if nibbles:
                    parts = [(builder.and_(codes, ir.Constant(_VI, [ir.Constant(_I32, 15)] * _LANES)), first),
                             (builder.lshr(codes, ir.Constant(_VI, [ir.Constant(_I32, 4)] * _LANES)),
                              builder.add(half, first))]
                for values, offset in parts:
                    builder.store(builder.sitofp(values, _VF),
                                  builder.bitcast(builder.gep(out_ptr, [offset]), _VF.as_pointer()), align=4)
            return context.get_dummy_value()

        return signature, codegen

    whole_byte_codes.__name__ = "_nibble_codes" if nibbles else "_byte_codes"
    return intrinsic(whole_byte_codes)


_byte_codes = _make_whole_byte_codes(nibbles=False)
_nibble_codes = _make_whole_byte_codes(nibbles=True)


def _half_to_float(builder: ir.IRBuilder, bits: ir.Value) -> ir.Value:
    """An IEEE half's bit pattern (i16) -> float, by _half_value's integer steps (the same bits)."""
    wide = builder.zext(bits, _I32)
    moved = builder.add(builder.shl(builder.and_(wide, ir.Constant(_I32, 0x7FFF)), ir.Constant(_I32, 13)),
                        ir.Constant(_I32, 0x38000000))
    normal = builder.bitcast(moved, _F32)
    subnormal = builder.fsub(builder.bitcast(builder.add(moved, ir.Constant(_I32, 0x00800000)), _F32),
                             ir.Constant(_F32, 2.0 ** -14))
    is_normal = builder.icmp_unsigned("!=", builder.and_(wide, ir.Constant(_I32, 0x7C00)), ir.Constant(_I32, 0))
    magnitude = builder.bitcast(builder.select(is_normal, normal, subnormal), _I32)
    sign = builder.shl(builder.and_(wide, ir.Constant(_I32, 0x8000)), ir.Constant(_I32, 16))
    return builder.bitcast(builder.or_(magnitude, sign), _F32)


@intrinsic
def _scale_codes(typingctx, block, start, levels, group_size, out):  # pragma: no cover - compile-time
    """out[d] = (out[d] - levels) · scale of d's group, in float32, for the codes of a record whose IEEE-half group
    scales sit at byte `start` of block ((block_bytes,) uint8); out: (head_dim,) float32, C-contiguous, head_dim
    and group_size multiples of 16."""
    signature = types.void(block, start, levels, group_size, out)

    def codegen(context, builder, sig, args):
        block_type, start_type, _, size_type, out_type = sig.args
        data = builder.bitcast(context.make_array(block_type)(context, builder, args[0]).data,
                               ir.IntType(8).as_pointer())
        scales = builder.bitcast(builder.gep(data, [context.cast(builder, args[1], start_type, types.int64)]),
                                 ir.IntType(16).as_pointer())
        levels = _broadcast(builder, args[2], _VF)
        group_size = context.cast(builder, args[3], size_type, types.int64)
        out_array = context.make_array(out_type)(context, builder, args[4])
        out_ptr = builder.bitcast(out_array.data, _F32.as_pointer())
        num_groups = builder.udiv(builder.extract_value(out_array.shape, 0), group_size)
        vectors_per_group = builder.udiv(group_size, ir.Constant(_I64, _LANES))
        with cgutils.for_range(builder, num_groups) as group_loop:
            scale = _half_to_float(builder, builder.load(builder.gep(scales, [group_loop.index]), align=1))
            scale_vector = _broadcast(builder, scale, _VF)
            first = builder.mul(group_loop.index, group_size)
            with cgutils.for_range(builder, vectors_per_group) as vector_loop:
                pointer = builder.bitcast(builder.gep(out_ptr, [builder.add(first, builder.mul(
                    vector_loop.index, ir.Constant(_I64, _LANES)))]), _VF.as_pointer())
                values = builder.fmul(builder.fsub(builder.load(pointer, align=4), levels), scale_vector)
                builder.store(values, pointer, align=4)
        return context.get_dummy_value()

    return signature, codegen


@intrinsic
def _fold_block(typingctx, q, row, head, keys, values, num_visible, acc, query, best, total):
    """Folds keys/values[:num_visible] (each (n, head_dim) float32, C-contiguous) into the online softmax of query
    vector q[row, head] ((num_tokens, num_heads, head_dim) float32): acc[query] ((num_queries, head_dim) float32,
    updated in place) holds its weighted values, best and total the running max score and sum of
    exp(score - best) -> (best, total). Which keys a query sees in a block is fixed by positions, so the chunks, and
    the bits, are the same in every kernel and batch. head_dim is a multiple of 16 (KVLayout checks it)."""
    signature = types.UniTuple(types.float32, 2)(q, row, head, keys, values, num_visible, acc, query, best, total)

    def codegen(context, builder, sig, args):
        q_type, row_type, head_type, keys_type, values_type, visible_type, acc_type, query_type = sig.args[:8]
        q_value, row_value, head_value, keys_value, values_value, visible_value, acc_value, query_value = args[:8]
        best, total = args[8], args[9]
        as_i64 = [context.cast(builder, value, value_type, types.int64) for value, value_type in
                  ((row_value, row_type), (head_value, head_type), (visible_value, visible_type),
                   (query_value, query_type))]
        row, head, num_visible, query = as_i64
        keys_array = context.make_array(keys_type)(context, builder, keys_value)
        head_dim = builder.extract_value(keys_array.shape, 1)
        num_vectors = builder.udiv(head_dim, ir.Constant(_I64, _LANES))
        query_ptr = _element_pointer(context, builder, q_type, q_value, [row, head])
        acc_ptr = _element_pointer(context, builder, acc_type, acc_value, [query])
        key_ptr = _element_pointer(context, builder, keys_type, keys_value, [])
        value_ptr = _element_pointer(context, builder, values_type, values_value, [])
        best_cell = cgutils.alloca_once_value(builder, best)
        total_cell = cgutils.alloca_once_value(builder, total)
        lane_ids = ir.Constant(_VI, [ir.Constant(_I32, j) for j in range(_LANES)])
        num_chunks = builder.udiv(builder.add(num_visible, ir.Constant(_I64, _LANES - 1)), ir.Constant(_I64, _LANES))
        with cgutils.for_range(builder, num_chunks) as chunk_loop:
            first = builder.mul(chunk_loop.index, ir.Constant(_I64, _LANES))
            in_chunk = builder.sub(num_visible, first)
            in_chunk = builder.select(builder.icmp_signed("<", in_chunk, ir.Constant(_I64, _LANES)), in_chunk,
                                      ir.Constant(_I64, _LANES))
            # Lanes past the visible keys read the last visible row (in bounds) and are masked out below.
            last = builder.sub(in_chunk, ir.Constant(_I64, 1))
            rows = [builder.add(first, builder.select(builder.icmp_signed("<", ir.Constant(_I64, j), in_chunk),
                                                      ir.Constant(_I64, j), last))
                    for j in range(_LANES)]
            row_offsets = [builder.mul(key_row, head_dim) for key_row in rows]
            # Scores: key j's dot with the query, one fused multiply-add chain per key over the head dimension.
            dot_cells = [cgutils.alloca_once_value(builder, _splat_float(0.0)) for _ in range(_LANES)]
            with cgutils.for_range(builder, num_vectors) as dim_loop:
                dim = builder.mul(dim_loop.index, ir.Constant(_I64, _LANES))
                query_vector = _load_vector(builder, query_ptr, dim)
                for cell, offset in zip(dot_cells, row_offsets, strict=True):
                    key_vector = _load_vector(builder, key_ptr, builder.add(offset, dim))
                    builder.store(_fma(builder, query_vector, key_vector, builder.load(cell)), cell)
            scores = _lane_sums(builder, [builder.load(cell) for cell in dot_cells])
            visible = builder.icmp_signed("<", lane_ids, _broadcast(builder, builder.trunc(in_chunk, _I32), _VI))
            scores = builder.select(visible, scores, _splat_float(-math.inf))
            old_best = builder.load(best_cell)
            chunk_best = _horizontal(builder, scores, lambda a, b: builder.select(
                builder.fcmp_ordered(">", a, b), a, b))
            new_best = builder.select(builder.fcmp_ordered(">", chunk_best, old_best), chunk_best, old_best)
            new_best_vector = _broadcast(builder, new_best, _VF)
            old_best_vector = _broadcast(builder, old_best, _VF)
            # exp(old best - new best) is exactly 1 when the best did not change, 0 on the first chunk
            correction = _vector_exp(builder, builder.fsub(old_best_vector, new_best_vector))
            weights = _vector_exp(builder, builder.fsub(scores, new_best_vector))
            weight_sum = _horizontal(builder, weights, builder.fadd)
            builder.store(builder.fadd(builder.fmul(builder.load(total_cell),
                                                    builder.extract_element(correction, ir.Constant(_I32, 0))),
                                       weight_sum), total_cell)
            builder.store(new_best, best_cell)
            splats = [builder.shuffle_vector(weights, weights, ir.Constant(_VI, [ir.Constant(_I32, j)] * _LANES))
                      for j in range(_LANES)]
            with cgutils.for_range(builder, num_vectors) as dim_loop:
                dim = builder.mul(dim_loop.index, ir.Constant(_I64, _LANES))
                acc_vector = builder.fmul(_load_vector(builder, acc_ptr, dim), correction)
                for weight, offset in zip(splats, row_offsets, strict=True):
                    value_vector = _load_vector(builder, value_ptr, builder.add(offset, dim))
                    acc_vector = _fma(builder, weight, value_vector, acc_vector)
                builder.store(acc_vector, builder.bitcast(builder.gep(acc_ptr, [dim]), _VF.as_pointer()), align=4)
        return context.make_tuple(builder, sig.return_type, [builder.load(best_cell), builder.load(total_cell)])

    return signature, codegen


@njit(cache=True, nogil=True)
def _load_exact(exact, window, slot, which, kv_head, first_position, chunk_start, chunk_first_row, window_from,
                out):  # pragma: no cover - jitted
    """Keys (which=0) or values (1) of positions first_position.. as the exact window holds them, into out:
    (n, head_dim) float32: this batch's tokens from `exact`, earlier ones from the sequence's window buffer.
    Full indices rather than row slices: a slice per record costs two reference-count updates, more than its copy."""
    head_dim = out.shape[1]
    for j in range(out.shape[0]):
        position = first_position + j
        if position >= chunk_start:
            source = chunk_first_row + position - chunk_start
            for d in range(head_dim):
                out[j, d] = exact[source, which, kv_head, d]
        else:
            offset = position - window_from
            for d in range(head_dim):
                out[j, d] = _half_value(window[slot, which, offset, kv_head, d])


@intrinsic
def _prefetch_lines(typingctx, array, first, num_bytes):  # pragma: no cover - compile-time
    """Read prefetch of num_bytes of a C-contiguous array from flat element `first` on, one hint per 64-byte line
    (a hint: nothing is loaded into registers, nothing waits)."""
    signature = types.void(array, first, num_bytes)

    def codegen(context, builder, sig, args):
        array_type, first_type, bytes_type = sig.args
        data = builder.bitcast(context.make_array(array_type)(context, builder, args[0]).data,
                               ir.IntType(8).as_pointer())
        itemsize = ir.Constant(_I64, context.get_abi_sizeof(context.get_data_type(array_type.dtype)))
        start = builder.mul(context.cast(builder, args[1], first_type, types.int64), itemsize)
        num_lines = builder.udiv(builder.add(context.cast(builder, args[2], bytes_type, types.int64),
                                             ir.Constant(_I64, 63)), ir.Constant(_I64, 64))
        fnty = ir.FunctionType(ir.VoidType(), [ir.IntType(8).as_pointer(), _I32, _I32, _I32])
        prefetch = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        with cgutils.for_range(builder, num_lines) as loop:
            address = builder.gep(data, [builder.add(start, builder.mul(loop.index, ir.Constant(_I64, 64)))])
            builder.call(prefetch, [address, ir.Constant(_I32, 0), ir.Constant(_I32, 3), ir.Constant(_I32, 1)])
        return context.get_dummy_value()

    return signature, codegen


@njit(cache=True, nogil=True)
def _prefetch_block(pool, window, layout, table, slot, kv_head, logical, last_position, chunk_start, window_from,
                    quantized_until):  # pragma: no cover - jitted
    """Requests the records of KV head `kv_head` that logical block `logical` holds for positions up to
    last_position: from the quantized blocks, or from the window buffer (this batch's own tokens are hot already).
    In a decode step these lines are cold (the layer's weights streamed through since it last ran); requested
    PREFETCH_BLOCKS blocks ahead of their decoding, their misses overlap instead of arriving one at a time."""
    start, count, _, size = _block_geometry(logical, layout)
    if start > last_position:
        return
    num_kv_heads = layout.num_kv_heads
    end = min(start + count, last_position + 1)
    if start < quantized_until:
        first = table[logical] * pool.shape[1] + kv_head * size  # flat byte of the block's first K record
        for j in range(end - start):
            _prefetch_lines(pool, first + j * num_kv_heads * size, size)  # key
            _prefetch_lines(pool, first + (count + j) * num_kv_heads * size, size)  # value
        return
    window_tokens, head_dim = window.shape[2], layout.head_dim
    for position in range(start, min(end, chunk_start)):
        for which in range(2):
            record = ((slot * 2 + which) * window_tokens + position - window_from) * num_kv_heads + kv_head
            _prefetch_lines(window, record * head_dim, 2 * head_dim)


@njit(cache=True, nogil=True)
def _attend_rows(q, exact, pool, window, layout, table, positions, slot, chunk_first_row, window_from, first_row,
                 end_row, kv_head, out):  # pragma: no cover - jitted
    """Attention of rows first_row..end_row-1 (one sequence, consecutive positions, one exact window that starts
    at window_from) for the query heads that share KV head `kv_head`. Blocks are visited in order; each block's
    keys and values are decoded once for all these queries (from the quantized blocks before window_from, exact
    from there on), then each query folds the block into its running max, sum and weighted values (online softmax).

    q: (num_tokens, num_heads, head_dim) float32, scaled; table: (max_blocks,) int32 block ids of the sequence;
    chunk_first_row: batch row of the sequence's first token in this batch.
    """
    head_dim = layout.head_dim
    num_kv_heads = layout.num_kv_heads
    group = q.shape[1] // num_kv_heads
    num_queries = (end_row - first_row) * group
    last_position = positions[end_row - 1]
    chunk_start = positions[chunk_first_row]
    quantized_until = window_from if layout.window_blocks > 0 else last_position + 1
    most = max(layout.block_size, layout.sink_tokens)
    keys = np.empty((most, head_dim), dtype=np.float32)  # (most, head_dim) float32, one block's decoded keys
    values = np.empty((most, head_dim), dtype=np.float32)  # (most, head_dim) float32
    acc = np.zeros((num_queries, head_dim), dtype=np.float32)  # (num_queries, head_dim) float32, sum p * v
    best = np.full(num_queries, -np.inf, dtype=np.float32)  # (num_queries,) float32, running max score
    total = np.zeros(num_queries, dtype=np.float32)  # (num_queries,) float32, running sum of exp(score - best)
    pool_halves = pool.view(np.uint16)  # (num_blocks, block_bytes // 2) uint16, the same bytes
    pool_floats = pool.view(np.float32)  # (num_blocks, block_bytes // 4) float32, the same bytes
    for ahead in range(PREFETCH_BLOCKS):
        _prefetch_block(pool, window, layout, table, slot, kv_head, ahead, last_position, chunk_start, window_from,
                        quantized_until)
    logical = 0
    while True:
        start, count, fmt, size = _block_geometry(logical, layout)
        if start > last_position:
            break
        _prefetch_block(pool, window, layout, table, slot, kv_head, logical + PREFETCH_BLOCKS, last_position,
                        chunk_start, window_from, quantized_until)
        num_loaded = min(count, last_position + 1 - start)
        if start < quantized_until:
            block_id = table[logical]
            block, halves, floats = pool[block_id], pool_halves[block_id], pool_floats[block_id]
            v_base = count * num_kv_heads * size
            stride = num_kv_heads * size
            _load_records(block, halves, floats, kv_head * size, stride, fmt, layout.group_size, keys[:num_loaded])
            _load_records(block, halves, floats, v_base + kv_head * size, stride, fmt, layout.group_size,
                          values[:num_loaded])
        else:
            _load_exact(exact, window, slot, 0, kv_head, start, chunk_start, chunk_first_row, window_from,
                        keys[:num_loaded])
            _load_exact(exact, window, slot, 1, kv_head, start, chunk_start, chunk_first_row, window_from,
                        values[:num_loaded])
        for row in range(first_row, end_row):
            num_visible = min(num_loaded, positions[row] + 1 - start)
            if num_visible <= 0:
                continue
            for member in range(group):
                head = kv_head * group + member
                query = (row - first_row) * group + member
                best[query], total[query] = _fold_block(q, row, head, keys, values, num_visible, acc, query,
                                                        best[query], total[query])
        logical += 1
    for row in range(first_row, end_row):
        for member in range(group):
            query = (row - first_row) * group + member
            for d in range(head_dim):
                out[row, kv_head * group + member, d] = acc[query, d] / total[query]


@njit(cache=True, nogil=True, parallel=True)
def _attend_decode(q, exact, pool, window, layout, block_tables, seq_index, positions, window_slots, seq_first_row,
                   row_window_starts, rows, out):  # pragma: no cover - jitted
    """One query row per sequence, sequences of any lengths; one work item per (sequence, KV head)."""
    num_kv_heads = layout.num_kv_heads
    for item in prange(rows.shape[0] * num_kv_heads):
        row = rows[item // num_kv_heads]
        seq = seq_index[row]
        _attend_rows(q, exact, pool, window, layout, block_tables[seq], positions, window_slots[seq],
                     seq_first_row[seq], row_window_starts[row], row, row + 1, item % num_kv_heads, out)


@njit(cache=True, nogil=True, parallel=True)
def _attend_prefill(q, exact, pool, window, layout, block_tables, seq_index, positions, window_slots, seq_first_row,
                    row_window_starts, tiles, out):  # pragma: no cover - jitted
    """Chunks of consecutive query rows per sequence, causal among themselves and over the cached blocks before
    them; one work item per (tile of a sequence's rows, KV head)."""
    num_kv_heads = layout.num_kv_heads
    for item in prange(tiles.shape[0] * num_kv_heads):
        first_row = tiles[item // num_kv_heads, 0]
        seq = seq_index[first_row]
        _attend_rows(q, exact, pool, window, layout, block_tables[seq], positions, window_slots[seq],
                     seq_first_row[seq], row_window_starts[first_row], first_row, tiles[item // num_kv_heads, 1],
                     item % num_kv_heads, out)
