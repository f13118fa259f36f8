"""BitNet b1.58 (W1.58A8) kernels: ternary packing (2-bit, and TL2 lookup tables at 1.67 bits), per-token int8
activation quantization and exact integer matmuls, each with an AVX-512 path (llvmlite IR) and a portable Numba path.
Arrays in, arrays out: no model knowledge, no imports beyond numpy, numba and llvmlite.
"""

from __future__ import annotations

import os

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from engine.kernels.amx import AMX_AVAILABLE
from engine.kernels.cpu_features import detect_cpu_features
from engine.kernels.ternary_amx import matmul_ternary_amx

BLOCK_WEIGHTS = 256  # weights per packed block
BLOCK_BYTES = 64  # one 512-bit vector: 4 two-bit codes per byte
# Lane accumulators of the VNNI GEMV hold up to 2^16 per block (code 2 masked in place is 128, times |q| <= 128, four
# products per lane); 2^22 inputs keep them, and every int32 sum, clear of overflow.
MAX_IN_FEATURES = 1 << 22
# From this many tokens on, the AMX tile kernel beats the VNNI one (bench/kernels.py, 2B4T shapes: 1.15-1.5x at 33
# tokens, 1.7-2.4x at 64, 1.9-5x at 128; at 16 it loses, 0.64-0.96x, paying to unpack every code to a byte).
AMX_MIN_TOKENS = 32

_ROWS_PER_TILE = 4  # output rows computed together: each activation vector loaded once serves four rows
_TOKENS_PER_TILE = 4  # tokens computed together in a GEMM: each extracted code vector serves four tokens
_TILES_PER_GROUP = 16  # row tiles per parallel iteration (64 rows); see _matmul_ternary_vnni

# TL2 (see the TL2 section): 32 rows per packed tile, one int16 lane each in a 512-bit register.
TL2_TILE_ROWS = 32
_TL2_TABLE_ENTRIES = 16  # 14 sign-folded patterns of three ternary weights, padded to 16 int16 (32 bytes)
# (3, 16) int16: weight i of pattern m (m = 9(w0+1) + 3(w1+1) + (w2+1) for m <= 13); columns 14 and 15 are zero.
_TL2_PATTERN_WEIGHTS = np.array([[m // 9 - 1, (m // 3) % 3 - 1, m % 3 - 1] for m in range(14)] + [[0, 0, 0]] * 2,
                                dtype=np.int16).T.copy()
_TL2_QUADS_PER_FLUSH = 21  # 84 groups × max |entry| 384 < 2^15: int16 lane sums are widened before they can overflow

_I8 = ir.IntType(8)
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
_F64 = ir.DoubleType()
_VEC = ir.VectorType(_I32, 16)  # 64 bytes seen as 16 int32 lanes: the operand type vpdpbusd is declared with
_V32I16 = ir.VectorType(ir.IntType(16), 32)


def _as_i32(value: int) -> int:
    """A 32-bit pattern as the signed value LLVM's constant syntax expects."""
    return value - (1 << 32) if value >= 1 << 31 else value


def _splat(pattern: int) -> ir.Constant:
    return ir.Constant(_VEC, [ir.Constant(_I32, _as_i32(pattern))] * 16)


def _vpdpbusd(builder: ir.IRBuilder, acc: ir.Value, codes: ir.Value, acts: ir.Value) -> ir.Value:
    """acc += Σ over each lane's 4 bytes of unsigned codes × signed activations (non-saturating, exact)."""
    fnty = ir.FunctionType(_VEC, [_VEC, _VEC, _VEC])
    fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.avx512.vpdpbusd.512")
    return builder.call(fn, [acc, codes, acts])


def _reduce_add(builder: ir.IRBuilder, vec: ir.Value) -> ir.Value:
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_I32, [_VEC]), "llvm.vector.reduce.add.v16i32")
    return builder.call(fn, [vec])


def _prefetch(builder: ir.IRBuilder, base: ir.Value, byte_offset: ir.Value) -> None:
    """Read prefetch into all cache levels (locality 3, data cache); a hint, so addresses past the end are harmless."""
    fnty = ir.FunctionType(ir.VoidType(), [_I8.as_pointer(), _I32, _I32, _I32])
    fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
    ptr = builder.gep(base, [byte_offset])
    builder.call(fn, [ptr, ir.Constant(_I32, 0), ir.Constant(_I32, 3), ir.Constant(_I32, 1)])


def _load_vec(builder: ir.IRBuilder, base: ir.Value, byte_offset: ir.Value) -> ir.Value:
    """Unaligned 64-byte load: numpy guarantees no 64-byte alignment."""
    ptr = builder.gep(base, [byte_offset])
    return builder.load(builder.bitcast(ptr, _VEC.as_pointer()), align=1)


def _row_pointer(context, builder: ir.IRBuilder, array_type, array_value, index_type, index) -> ir.Value:
    """Byte pointer (i8*) to the start of array[index] (the first axis) of a C-contiguous array."""
    array = context.make_array(array_type)(context, builder, array_value)
    row_stride_bytes = builder.extract_value(array.strides, 0)
    row = context.cast(builder, index, index_type, types.int64)
    return builder.gep(builder.bitcast(array.data, _I8.as_pointer()), [builder.mul(row, row_stride_bytes)])


def _row_pointers(context, builder: ir.IRBuilder, array_type, array_value, index_type, index_tuple) -> list[ir.Value]:
    """Byte pointers (i8*) to the rows named by a UniTuple of integers."""
    return [_row_pointer(context, builder, array_type, array_value, index_type.dtype, index)
            for index in cgutils.unpack_tuple(builder, index_tuple, index_type.count)]


def _emit_gemv_sums(builder: ir.IRBuilder, code_rows: list, row_stride_bytes: ir.Value, act_row: ir.Value,
                    num_blocks: ir.Value) -> list:
    """Σ c·q of each code row against one activation row.

    Codes are masked in place, not shifted: bit pair i of a byte holds c·4^i, so accumulator i collects 4^i·Σ c·q and
    is divided back exactly (arithmetic shift of a multiple of 4^i) at the end. That saves three shifts per vector.
    Each code load also prefetches the same bytes of the next tile's rows: measured on 6912×2560 with the weights in
    DRAM, 18 GB/s without it and 28 GB/s with it (two or eight rows ahead were slower).
    """
    prefetch_distance_bytes = builder.mul(row_stride_bytes, ir.Constant(_I64, _ROWS_PER_TILE))
    masks = [_splat(0x03030303 << (2 * pair)) for pair in range(4)]
    zero = ir.Constant(_VEC, None)
    accs = [[cgutils.alloca_once_value(builder, zero) for _ in range(4)] for _ in code_rows]
    with cgutils.for_range(builder, num_blocks) as loop:
        code_offset = builder.mul(loop.index, ir.Constant(_I64, BLOCK_BYTES))
        act_offset = builder.mul(loop.index, ir.Constant(_I64, BLOCK_WEIGHTS))
        acts = [_load_vec(builder, act_row, builder.add(act_offset, ir.Constant(_I64, 64 * pair))) for pair in range(4)]
        for code_row, row_accs in zip(code_rows, accs, strict=True):
            packed = _load_vec(builder, code_row, code_offset)
            _prefetch(builder, code_row, builder.add(code_offset, prefetch_distance_bytes))
            for pair in range(4):
                codes = builder.and_(packed, masks[pair])
                builder.store(_vpdpbusd(builder, builder.load(row_accs[pair]), codes, acts[pair]), row_accs[pair])
    sums = []
    for row_accs in accs:
        lanes = builder.load(row_accs[0])
        for pair in range(1, 4):
            lanes = builder.add(lanes, builder.ashr(builder.load(row_accs[pair]), _splat(2 * pair)))
        sums.append(_reduce_add(builder, lanes))
    return sums


def _emit_block_products(builder: ir.IRBuilder, code_rows: list, act_rows: list, block: ir.Value,
                         initial: list | None = None) -> list:
    """initial (zero if None) plus the lane partial sums of Σ c·q over one block, for every (row, token) pair,
    row-major. Codes are extracted once per row and reused across tokens."""
    mask = _splat(0x03030303)
    code_offset = builder.mul(block, ir.Constant(_I64, BLOCK_BYTES))
    act_offset = builder.mul(block, ir.Constant(_I64, BLOCK_WEIGHTS))
    packed = [_load_vec(builder, code_row, code_offset) for code_row in code_rows]
    lanes = list(initial) if initial else [ir.Constant(_VEC, None)] * (len(code_rows) * len(act_rows))
    for pair in range(4):
        pair_offset = builder.add(act_offset, ir.Constant(_I64, 64 * pair))
        acts = [_load_vec(builder, act_row, pair_offset) for act_row in act_rows]
        for row, row_packed in enumerate(packed):
            codes = builder.and_(builder.lshr(row_packed, _splat(2 * pair)), mask)
            for token, token_acts in enumerate(acts):
                slot = row * len(act_rows) + token
                lanes[slot] = _vpdpbusd(builder, lanes[slot], codes, token_acts)
    return lanes


def _emit_gemm_sums(builder: ir.IRBuilder, code_rows: list, act_rows: list, num_blocks: ir.Value) -> list:
    """Σ c·q for every (row, token) pair, row-major."""
    accs = [cgutils.alloca_once_value(builder, ir.Constant(_VEC, None)) for _ in range(len(code_rows) * len(act_rows))]
    with cgutils.for_range(builder, num_blocks) as loop:
        lanes = _emit_block_products(builder, code_rows, act_rows, loop.index, [builder.load(acc) for acc in accs])
        for acc, block_lanes in zip(accs, lanes, strict=True):
            builder.store(block_lanes, acc)
    return [_reduce_add(builder, builder.load(acc)) for acc in accs]


def _emit_horizontal_sums(builder: ir.IRBuilder, vectors: list) -> ir.Value:
    """Lane sums of 1, 2, 4, 8 or 16 <16 x i32> vectors -> <len(vectors) x i32>, lane i = Σ lanes of vectors[i].

    A transposing tree: each step adds the two halves of every lane group of two vectors into one vector, one
    two-source permute per half (vpermt2d), so 16 sums cost 15 steps instead of 16 full reductions.
    """
    num_sums = len(vectors)
    level = [(vector, [index]) for index, vector in enumerate(vectors)]  # (vector, sum ids of its lane groups)
    while len(level) > 1 or 16 // len(level[0][1]) > 1:
        pairs = list(zip(level[::2], level[1::2], strict=True)) if len(level) > 1 else [(level[0], level[0])]
        level = []
        for (left, left_ids), (right, right_ids) in pairs:
            group_lanes = 16 // len(left_ids)
            half = group_lanes // 2
            first, second = [], []
            for group in range(2 * len(left_ids)):
                source = (group % len(left_ids)) * group_lanes + (0 if group < len(left_ids) else 16)
                first += [source + lane for lane in range(half)]
                second += [source + half + lane for lane in range(half)]
            mask_type = ir.VectorType(_I32, 16)
            low = builder.shuffle_vector(left, right, ir.Constant(mask_type, first))
            high = builder.shuffle_vector(left, right, ir.Constant(mask_type, second))
            level.append((builder.add(low, high), left_ids + right_ids))
    vector, ids = level[0]
    lanes = [ids.index(index) for index in range(num_sums)]
    return builder.shuffle_vector(vector, vector, ir.Constant(ir.VectorType(_I32, num_sums), lanes))


@intrinsic
def _dot_tile(typingctx, codes, xq, rows, tokens, num_blocks):
    """Σ c·q over all blocks for each (row, token) of a tile: UniTuple(int32, len(rows) * len(tokens)), row-major.

    codes: (num_rows, num_blocks * 64) uint8, xq: (num_tokens, num_blocks * 256) int8, both C-contiguous;
    rows, tokens: UniTuples of valid indices (a tail tile repeats its last index).
    """
    num_sums = rows.count * tokens.count
    sig = types.UniTuple(types.int32, num_sums)(codes, xq, rows, tokens, num_blocks)

    def codegen(context, builder, signature, args):
        codes_type, xq_type, rows_type, tokens_type, blocks_type = signature.args
        codes_value, xq_value, rows_value, tokens_value, blocks_value = args
        code_rows = _row_pointers(context, builder, codes_type, codes_value, rows_type, rows_value)
        act_rows = _row_pointers(context, builder, xq_type, xq_value, tokens_type, tokens_value)
        num_blocks_i64 = context.cast(builder, blocks_value, blocks_type, types.int64)
        if len(act_rows) == 1:
            codes_array = context.make_array(codes_type)(context, builder, codes_value)
            row_stride_bytes = builder.extract_value(codes_array.strides, 0)
            sums = _emit_gemv_sums(builder, code_rows, row_stride_bytes, act_rows[0], num_blocks_i64)
        else:
            sums = _emit_gemm_sums(builder, code_rows, act_rows, num_blocks_i64)
        return context.make_tuple(builder, signature.return_type, sums)

    return sig, codegen


@intrinsic
def _blockscaled_tile(typingctx, codes, xq, block_scales, block_act_sums, rows, tokens, num_blocks):
    """Σ_b scale[row, b] · (Σ_{block b} T·q) in float64, blocks in increasing order, for each (row, token) of a tile.

    block_scales: (num_rows, num_blocks) float32; block_act_sums: (num_tokens, num_blocks) int32 (Σ q per block).
    Returns UniTuple(float64, len(rows) * len(tokens)), row-major.
    """
    num_sums = rows.count * tokens.count
    sig = types.UniTuple(types.float64, num_sums)(codes, xq, block_scales, block_act_sums, rows, tokens, num_blocks)

    def codegen(context, builder, signature, args):
        codes_type, xq_type, scales_type, act_sums_type, rows_type, tokens_type, blocks_type = signature.args
        codes_value, xq_value, scales_value, act_sums_value, rows_value, tokens_value, blocks_value = args
        code_rows = _row_pointers(context, builder, codes_type, codes_value, rows_type, rows_value)
        act_rows = _row_pointers(context, builder, xq_type, xq_value, tokens_type, tokens_value)
        scale_rows = [builder.bitcast(ptr, ir.FloatType().as_pointer())
                      for ptr in _row_pointers(context, builder, scales_type, scales_value, rows_type, rows_value)]
        act_sum_rows = [builder.bitcast(ptr, _I32.as_pointer())
                        for ptr in _row_pointers(context, builder, act_sums_type, act_sums_value, tokens_type,
                                                 tokens_value)]
        num_blocks_i64 = context.cast(builder, blocks_value, blocks_type, types.int64)
        # Each (row, token) total is one float64 lane, updated as total + f64(block sum) · f64(scale) in block order:
        # the same operations, in the same order, as the portable kernel.
        sum_vector_type = ir.VectorType(_I32, num_sums)
        totals = cgutils.alloca_once_value(builder, ir.Constant(ir.VectorType(_F64, num_sums), None))
        with cgutils.for_range(builder, num_blocks_i64) as loop:
            lanes = _emit_block_products(builder, code_rows, act_rows, loop.index)
            block_sums = _emit_horizontal_sums(builder, lanes)  # (num_sums,) lanes, row-major
            act_sums = ir.Constant(sum_vector_type, None)
            scales = ir.Constant(ir.VectorType(ir.FloatType(), num_sums), None)
            for row, scale_row in enumerate(scale_rows):
                scale = builder.load(builder.gep(scale_row, [loop.index]))
                for token, act_sum_row in enumerate(act_sum_rows):
                    slot = ir.Constant(_I32, row * len(act_rows) + token)
                    act_sums = builder.insert_element(act_sums, builder.load(builder.gep(act_sum_row, [loop.index])),
                                                      slot)
                    scales = builder.insert_element(scales, scale, slot)
            corrected = builder.sitofp(builder.sub(block_sums, act_sums), ir.VectorType(_F64, num_sums))
            product = builder.fmul(corrected, builder.fpext(scales, ir.VectorType(_F64, num_sums)))
            builder.store(builder.fadd(builder.load(totals), product), totals)
        total_lanes = builder.load(totals)
        totals = [builder.extract_element(total_lanes, ir.Constant(_I32, slot)) for slot in range(num_sums)]
        return context.make_tuple(builder, signature.return_type, totals)

    return sig, codegen


@njit(cache=True, nogil=True)
def _tile_rows(row0: int, num_rows: int) -> tuple[int, int, int, int]:
    """Four row indices from row0, the tail repeating the last row (its sums are computed but not stored)."""
    last = num_rows - 1
    return row0, min(row0 + 1, last), min(row0 + 2, last), min(row0 + 3, last)


@njit(cache=True, nogil=True)
def _block_act_sums(xq: np.ndarray) -> np.ndarray:
    """xq: (num_tokens, padded_k) int8 -> (num_tokens, padded_k // 256) int32, Σ q per block."""
    num_tokens, padded_k = xq.shape
    num_blocks = padded_k // BLOCK_WEIGHTS
    sums = np.empty((num_tokens, num_blocks), dtype=np.int32)  # (num_tokens, num_blocks) int32
    for token in range(num_tokens):
        for block in range(num_blocks):
            total = np.int32(0)
            for k in range(block * BLOCK_WEIGHTS, (block + 1) * BLOCK_WEIGHTS):
                total = np.int32(total + xq[token, k])
            sums[token, block] = total
    return sums


@njit(cache=True, nogil=True)
def _store_tile(out: np.ndarray, sums: tuple, act_sum: np.ndarray, row0: int, token0: int,
                num_tile_tokens: int) -> None:
    """out[token0 + t, row0 + r] = sums[r * num_tile_tokens + t] - act_sum[token0 + t] for the tile's valid rows."""
    for r in range(min(_ROWS_PER_TILE, out.shape[1] - row0)):
        for t in range(num_tile_tokens):
            out[token0 + t, row0 + r] = sums[r * num_tile_tokens + t] - act_sum[token0 + t]


@njit(cache=True, nogil=True)
def _store_scaled_tile(out: np.ndarray, sums: tuple, row0: int, token0: int, num_tile_tokens: int) -> None:
    """out[token0 + t, row0 + r] = float32(sums[r * num_tile_tokens + t]) for the tile's valid rows."""
    for r in range(min(_ROWS_PER_TILE, out.shape[1] - row0)):
        for t in range(num_tile_tokens):
            out[token0 + t, row0 + r] = np.float32(sums[r * num_tile_tokens + t])


@njit(cache=True, nogil=True, parallel=True)
def _matmul_ternary_vnni(xq: np.ndarray, act_sum: np.ndarray, codes: np.ndarray) -> np.ndarray:
    num_tokens = xq.shape[0]
    num_rows = codes.shape[0]
    num_blocks = codes.shape[1] // BLOCK_BYTES
    out = np.empty((num_tokens, num_rows), dtype=np.int32)  # (num_tokens, num_rows) int32
    num_tiles = (num_rows + _ROWS_PER_TILE - 1) // _ROWS_PER_TILE
    for group in prange((num_tiles + _TILES_PER_GROUP - 1) // _TILES_PER_GROUP):
        first_tile = group * _TILES_PER_GROUP
        end_tile = min(first_tile + _TILES_PER_GROUP, num_tiles)
        # Tokens outside the tile loop: a token tile's activations (4 × K bytes) stay in L1 across the group's
        # tiles, and the group's codes (64 × K/4 bytes) stay in L2 across token tiles.
        token = 0
        while token + _TOKENS_PER_TILE <= num_tokens:
            tokens = (token, token + 1, token + 2, token + 3)
            for tile in range(first_tile, end_tile):
                rows = _tile_rows(tile * _ROWS_PER_TILE, num_rows)
                sums4 = _dot_tile(codes, xq, rows, tokens, num_blocks)
                _store_tile(out, sums4, act_sum, tile * _ROWS_PER_TILE, token, _TOKENS_PER_TILE)
            token += _TOKENS_PER_TILE
        while token < num_tokens:
            for tile in range(first_tile, end_tile):
                rows = _tile_rows(tile * _ROWS_PER_TILE, num_rows)
                sums1 = _dot_tile(codes, xq, rows, (token,), num_blocks)
                _store_tile(out, sums1, act_sum, tile * _ROWS_PER_TILE, token, 1)
            token += 1
    return out


@njit(cache=True, nogil=True, parallel=True)
def _matmul_ternary_blockscaled_vnni(xq: np.ndarray, codes: np.ndarray, block_scales: np.ndarray) -> np.ndarray:
    num_tokens = xq.shape[0]
    num_rows = codes.shape[0]
    num_blocks = codes.shape[1] // BLOCK_BYTES
    block_act_sums = _block_act_sums(xq)  # (num_tokens, num_blocks) int32
    out = np.empty((num_tokens, num_rows), dtype=np.float32)  # (num_tokens, num_rows) float32
    num_tiles = (num_rows + _ROWS_PER_TILE - 1) // _ROWS_PER_TILE
    for group in prange((num_tiles + _TILES_PER_GROUP - 1) // _TILES_PER_GROUP):
        first_tile = group * _TILES_PER_GROUP
        end_tile = min(first_tile + _TILES_PER_GROUP, num_tiles)
        token = 0
        while token + _TOKENS_PER_TILE <= num_tokens:
            tokens = (token, token + 1, token + 2, token + 3)
            for tile in range(first_tile, end_tile):
                rows = _tile_rows(tile * _ROWS_PER_TILE, num_rows)
                sums4 = _blockscaled_tile(codes, xq, block_scales, block_act_sums, rows, tokens, num_blocks)
                _store_scaled_tile(out, sums4, tile * _ROWS_PER_TILE, token, _TOKENS_PER_TILE)
            token += _TOKENS_PER_TILE
        while token < num_tokens:
            for tile in range(first_tile, end_tile):
                rows = _tile_rows(tile * _ROWS_PER_TILE, num_rows)
                sums1 = _blockscaled_tile(codes, xq, block_scales, block_act_sums, rows, (token,), num_blocks)
                _store_scaled_tile(out, sums1, tile * _ROWS_PER_TILE, token, 1)
            token += 1
    return out


@njit(cache=True, nogil=True)
def _dot_block_portable(codes_row: np.ndarray, xq_row: np.ndarray, block: int) -> int:
    """Σ c·q over one 256-weight block; written so LLVM vectorizes the 64-byte loop with int32 lanes."""
    # Slices of exactly one block: indices 0..63 are provably in range, so LLVM emits plain vector loads.
    packed_block = codes_row[block * BLOCK_BYTES:(block + 1) * BLOCK_BYTES]  # (64,) uint8
    acts = xq_row[block * BLOCK_WEIGHTS:(block + 1) * BLOCK_WEIGHTS]  # (256,) int8
    total = np.int32(0)
    for j in range(BLOCK_BYTES):
        packed = np.int32(packed_block[j])
        part = (packed & 3) * np.int32(acts[j])
        part += ((packed >> 2) & 3) * np.int32(acts[64 + j])
        part += ((packed >> 4) & 3) * np.int32(acts[128 + j])
        part += (packed >> 6) * np.int32(acts[192 + j])
        total = np.int32(total + part)
    return total


@njit(cache=True, nogil=True, parallel=True)
def _matmul_ternary_portable(xq: np.ndarray, act_sum: np.ndarray, codes: np.ndarray) -> np.ndarray:
    num_tokens = xq.shape[0]
    num_rows = codes.shape[0]
    num_blocks = codes.shape[1] // BLOCK_BYTES
    out = np.empty((num_tokens, num_rows), dtype=np.int32)  # (num_tokens, num_rows) int32
    for tile in prange((num_rows + _ROWS_PER_TILE - 1) // _ROWS_PER_TILE):
        row0 = tile * _ROWS_PER_TILE
        for token in range(num_tokens):
            for row in range(row0, min(row0 + _ROWS_PER_TILE, num_rows)):
                total = np.int32(0)
                for block in range(num_blocks):
                    total = np.int32(total + _dot_block_portable(codes[row], xq[token], block))
                out[token, row] = total - act_sum[token]
    return out


@njit(cache=True, nogil=True, parallel=True)
def _matmul_ternary_blockscaled_portable(xq: np.ndarray, codes: np.ndarray, block_scales: np.ndarray) -> np.ndarray:
    num_tokens = xq.shape[0]
    num_rows = codes.shape[0]
    num_blocks = codes.shape[1] // BLOCK_BYTES
    block_act_sums = _block_act_sums(xq)  # (num_tokens, num_blocks) int32
    out = np.empty((num_tokens, num_rows), dtype=np.float32)  # (num_tokens, num_rows) float32
    for tile in prange((num_rows + _ROWS_PER_TILE - 1) // _ROWS_PER_TILE):
        row0 = tile * _ROWS_PER_TILE
        for token in range(num_tokens):
            for row in range(row0, min(row0 + _ROWS_PER_TILE, num_rows)):
                total = 0.0
                for block in range(num_blocks):
                    block_sum = _dot_block_portable(codes[row], xq[token], block) - block_act_sums[token, block]
                    total += np.float64(block_sum) * np.float64(block_scales[row, block])
                out[token, row] = np.float32(total)
    return out


# ---- TL2: lookup tables over groups of three weights (1.67 bits per weight) ----------------------------------------
# Group g holds weights 3g, 3g+1, 3g+2 as the pattern v = 9(w0+1) + 3(w1+1) + (w2+1) in 0..26. Patterns v and 26 - v
# are negatives of each other, so a group is stored as index min(v, 26 - v) in 0..13 (4 bits) plus a sign bit. Per
# token, a table of the 14 partial sums of every group (|entry| <= 3 · 128) is built once and serves every row.
# Packed per tile of 32 rows: word r of a quad holds the indices of row r for groups 4q..4q+3 in nibbles 0..3, so a
# 16-bit shift of one 64-byte vector gives the 32 rows' indices of one group; vpermw reads only the low 5 bits of each
# index, and with the 16-entry table repeated in both register halves the bits above the nibble never matter.


def _vpermw(builder: ir.IRBuilder, table: ir.Value, indices: ir.Value) -> ir.Value:
    """32 int16 lookups (low 5 bits of each index) in a 32-entry int16 table held in one register."""
    fnty = ir.FunctionType(_V32I16, [_V32I16, _V32I16])
    fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.avx512.permvar.hi.512")
    return builder.call(fn, [table, indices])


def _widen_into(builder: ir.IRBuilder, acc16: ir.Value, acc32_pair: tuple) -> None:
    """Add the 32 int16 lane sums into two <16 x i32> accumulators (rows 0-15, rows 16-31) and zero the int16 ones."""
    lanes = builder.load(acc16)
    for half, acc32 in enumerate(acc32_pair):
        lane_ids = ir.Constant(ir.VectorType(_I32, 16), list(range(16 * half, 16 * half + 16)))
        builder.store(builder.add(builder.load(acc32), builder.sext(builder.shuffle_vector(lanes, lanes, lane_ids),
                                                                        _VEC)), acc32)
    builder.store(ir.Constant(_V32I16, None), acc16)


def _emit_tl2_quad(builder: ir.IRBuilder, index_row, sign_row, table_rows: list, acc16: list, quad: ir.Value,
                   prefetch_strides_bytes: tuple) -> None:
    """Adds the four groups of one quad into every token's int16 row accumulators, prefetching the next tile's
    indices and signs at the same position (as the 2-bit GEMV does with its next rows)."""
    index_offset = builder.mul(quad, ir.Constant(_I64, 64))
    index_stride_bytes, sign_stride_bytes = prefetch_strides_bytes
    _prefetch(builder, index_row, builder.add(index_offset, index_stride_bytes))
    sign_offset = builder.mul(quad, ir.Constant(_I64, 16))
    _prefetch(builder, builder.bitcast(sign_row, _I8.as_pointer()), builder.add(sign_offset, sign_stride_bytes))
    words = builder.bitcast(_load_vec(builder, index_row, index_offset), _V32I16)
    repeat_table = ir.Constant(ir.VectorType(_I32, 32), list(range(16)) * 2)
    for nibble in range(4):
        group = builder.add(builder.mul(quad, ir.Constant(_I64, 4)), ir.Constant(_I64, nibble))
        indices = builder.lshr(words, ir.Constant(_V32I16, [4 * nibble] * 32)) if nibble else words
        negative = builder.bitcast(builder.load(builder.gep(sign_row, [group])), ir.VectorType(ir.IntType(1), 32))
        for table_row, acc in zip(table_rows, acc16, strict=True):
            table_ptr = builder.gep(table_row, [builder.mul(group, ir.Constant(_I64, 2 * _TL2_TABLE_ENTRIES))])
            half_table = builder.load(builder.bitcast(table_ptr, ir.VectorType(ir.IntType(16), 16).as_pointer()),
                                      align=1)
            values = _vpermw(builder, builder.shuffle_vector(half_table, half_table, repeat_table), indices)
            total = builder.load(acc)
            builder.store(builder.select(negative, builder.sub(total, values), builder.add(total, values)), acc)


@intrinsic
def _tl2_tile(typingctx, tables, indices, signs, tile, tokens, num_quads):
    """Σ_g ±table[token, g, index] for the 32 rows of one tile: UniTuple(int32, 32 · len(tokens)), row-major.

    tables: (T, num_groups, 16) int16, indices: (num_tiles, num_quads, 32) uint16, signs: (num_tiles, num_groups)
    uint32, all C-contiguous, num_groups = 4 · num_quads. Indices and signs are decoded once for all tokens.
    """
    sig = types.UniTuple(types.int32, 32 * tokens.count)(tables, indices, signs, tile, tokens, num_quads)

    def codegen(context, builder, signature, args):
        tables_type, indices_type, signs_type, tile_type, tokens_type, quads_type = signature.args
        tables_value, indices_value, signs_value, tile_value, tokens_value, quads_value = args
        index_row = _row_pointer(context, builder, indices_type, indices_value, tile_type, tile_value)
        sign_row = builder.bitcast(_row_pointer(context, builder, signs_type, signs_value, tile_type, tile_value),
                                   _I32.as_pointer())
        table_rows = _row_pointers(context, builder, tables_type, tables_value, tokens_type, tokens_value)
        num_quads_i64 = context.cast(builder, quads_value, quads_type, types.int64)
        prefetch_strides_bytes = tuple(
            builder.extract_value(context.make_array(array_type)(context, builder, array_value).strides, 0)
            for array_type, array_value in ((indices_type, indices_value), (signs_type, signs_value)))
        acc16 = [cgutils.alloca_once_value(builder, ir.Constant(_V32I16, None)) for _ in table_rows]
        acc32 = [tuple(cgutils.alloca_once_value(builder, ir.Constant(_VEC, None)) for _ in range(2))
                 for _ in table_rows]
        limit = ir.Constant(_I64, _TL2_QUADS_PER_FLUSH)
        num_chunks = builder.udiv(builder.add(num_quads_i64, ir.Constant(_I64, _TL2_QUADS_PER_FLUSH - 1)), limit)
        with cgutils.for_range(builder, num_chunks) as chunk:
            first_quad = builder.mul(chunk.index, limit)
            remaining = builder.sub(num_quads_i64, first_quad)
            chunk_quads = builder.select(builder.icmp_signed("<", remaining, limit), remaining, limit)
            with cgutils.for_range(builder, chunk_quads) as step:
                quad = builder.add(first_quad, step.index)
                _emit_tl2_quad(builder, index_row, sign_row, table_rows, acc16, quad, prefetch_strides_bytes)
            for acc, acc32_pair in zip(acc16, acc32, strict=True):
                _widen_into(builder, acc, acc32_pair)
        sums = [None] * (32 * len(table_rows))
        for token, acc32_pair in enumerate(acc32):
            for half, acc32_half in enumerate(acc32_pair):
                lanes = builder.load(acc32_half)
                for lane in range(16):
                    sums[(16 * half + lane) * len(table_rows) + token] = builder.extract_element(
                        lanes, ir.Constant(_I32, lane))
        return context.make_tuple(builder, signature.return_type, sums)

    return sig, codegen


@intrinsic
def _group_tables(typingctx, xq_row, num_groups, tables):
    """tables[g, m] = Σ_i w_i(m) · xq_row[3g + i] for g < num_groups: per group, three broadcast activations times
    three constant weight vectors, one 16-lane int16 store (LLVM left the scalar loop as 16 scalar stores).
    xq_row: (>= 3 · num_groups,) int8 and tables: (>= num_groups, 16) int16, both C-contiguous. Generic vector IR,
    so every target (the portable path too) compiles it."""
    sig = types.void(xq_row, num_groups, tables)
    lanes_type = ir.VectorType(ir.IntType(16), _TL2_TABLE_ENTRIES)

    def codegen(context, builder, signature, args):
        xq_type, groups_type, tables_type = signature.args
        activations = builder.bitcast(context.make_array(xq_type)(context, builder, args[0]).data, _I8.as_pointer())
        out = builder.bitcast(context.make_array(tables_type)(context, builder, args[2]).data, lanes_type.as_pointer())
        weights = [ir.Constant(lanes_type, [int(w) for w in _TL2_PATTERN_WEIGHTS[i]]) for i in range(3)]
        broadcast = ir.Constant(ir.VectorType(_I32, _TL2_TABLE_ENTRIES), None)
        with cgutils.for_range(builder, context.cast(builder, args[1], groups_type, types.int64)) as loop:
            first = builder.mul(loop.index, ir.Constant(_I64, 3))
            entries = None
            for i in range(3):
                value = builder.sext(builder.load(builder.gep(activations, [builder.add(first, ir.Constant(_I64, i))])),
                                     ir.IntType(16))
                lanes = builder.insert_element(ir.Constant(lanes_type, ir.Undefined), value, ir.Constant(_I32, 0))
                term = builder.mul(builder.shuffle_vector(lanes, lanes, broadcast), weights[i])
                entries = term if entries is None else builder.add(entries, term)
            builder.store(entries, builder.gep(out, [loop.index]), align=2)
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True, nogil=True)
def _build_tl2_tables(xq: np.ndarray, in_features: int, num_groups: int) -> np.ndarray:
    """xq: (T, >= in_features) int8 -> (T, num_groups, 16) int16; entry m of group g = Σ_i w_i(m) · xq[t, 3g + i],
    with w(m) the pattern m decodes to; inputs past in_features count as zero, entries 14 and 15 are zero."""
    num_tokens = xq.shape[0]
    tables = np.empty((num_tokens, num_groups, _TL2_TABLE_ENTRIES), dtype=np.int16)  # (T, num_groups, 16) int16
    whole_groups = min(num_groups, in_features // 3)  # groups whose three inputs all lie below in_features
    for token in range(num_tokens):
        _group_tables(xq[token], whole_groups, tables[token])
        for group in range(whole_groups, num_groups):
            k = 3 * group
            a0 = np.int16(xq[token, k]) if k < in_features else np.int16(0)
            a1 = np.int16(xq[token, k + 1]) if k + 1 < in_features else np.int16(0)
            a2 = np.int16(xq[token, k + 2]) if k + 2 < in_features else np.int16(0)
            for entry in range(_TL2_TABLE_ENTRIES):
                tables[token, group, entry] = (a0 * _TL2_PATTERN_WEIGHTS[0, entry] + a1 * _TL2_PATTERN_WEIGHTS[1, entry]
                                               + a2 * _TL2_PATTERN_WEIGHTS[2, entry])
    return tables


@njit(cache=True, nogil=True, parallel=True)
def _matmul_ternary_tl2_avx512(tables: np.ndarray, indices: np.ndarray, signs: np.ndarray, num_rows: int) -> np.ndarray:
    num_tokens = tables.shape[0]
    num_quads = indices.shape[1]
    out = np.empty((num_tokens, num_rows), dtype=np.int32)  # (num_tokens, num_rows) int32
    for tile in prange(signs.shape[0]):
        num_valid_rows = min(TL2_TILE_ROWS, num_rows - tile * TL2_TILE_ROWS)
        token = 0
        while token + _TOKENS_PER_TILE <= num_tokens:
            sums4 = _tl2_tile(tables, indices, signs, tile, (token, token + 1, token + 2, token + 3), num_quads)
            for r in range(num_valid_rows):
                for t in range(_TOKENS_PER_TILE):
                    out[token + t, tile * TL2_TILE_ROWS + r] = sums4[_TOKENS_PER_TILE * r + t]
            token += _TOKENS_PER_TILE
        while token < num_tokens:
            sums1 = _tl2_tile(tables, indices, signs, tile, (token,), num_quads)
            for r in range(num_valid_rows):
                out[token, tile * TL2_TILE_ROWS + r] = sums1[r]
            token += 1
    return out


@njit(cache=True, nogil=True, parallel=True)
def _matmul_ternary_tl2_portable(tables: np.ndarray, indices: np.ndarray, signs: np.ndarray,
                                 num_rows: int) -> np.ndarray:
    num_tokens = tables.shape[0]
    num_groups = signs.shape[1]
    out = np.empty((num_tokens, num_rows), dtype=np.int32)  # (num_tokens, num_rows) int32
    for tile in prange(signs.shape[0]):
        for token in range(num_tokens):
            for r in range(min(TL2_TILE_ROWS, num_rows - tile * TL2_TILE_ROWS)):
                total = np.int32(0)
                for group in range(num_groups):
                    index = (indices[tile, group // 4, r] >> (4 * (group % 4))) & 15
                    value = np.int32(tables[token, group, index])
                    negative = np.int32((signs[tile, group] >> r) & 1)
                    total = np.int32(total + ((value ^ -negative) + negative))  # -value when the sign bit is set
                out[token, tile * TL2_TILE_ROWS + r] = total
    return out


# Tables and lookups in one call from the quantized activations: what a layer does per token, without a second
# dispatch and a second set of Python checks.


@njit(cache=True, nogil=True)
def _matmul_ternary_tl2_xq_avx512(xq: np.ndarray, in_features: int, indices: np.ndarray, signs: np.ndarray,
                                  num_rows: int) -> np.ndarray:
    tables = _build_tl2_tables(xq, in_features, signs.shape[1])
    return _matmul_ternary_tl2_avx512(tables, indices, signs, num_rows)


@njit(cache=True, nogil=True)
def _matmul_ternary_tl2_xq_portable(xq: np.ndarray, in_features: int, indices: np.ndarray, signs: np.ndarray,
                                    num_rows: int) -> np.ndarray:
    tables = _build_tl2_tables(xq, in_features, signs.shape[1])
    return _matmul_ternary_tl2_portable(tables, indices, signs, num_rows)


# A whole BitNet layer product for one token in one call: quantize, build tables, look up, scale. A decode step makes
# four of these per layer, so the three Python round trips and their checks saved per product add up.


@njit(cache=True, nogil=True)
def _linear_tl2_avx512(x: np.ndarray, padded_k: int, indices: np.ndarray, signs: np.ndarray, num_rows: int,
                       row_scales: np.ndarray, weight_scale: np.float64) -> np.ndarray:
    xq, x_scale, _ = _quantize_activations(x, padded_k)
    int_sums = _matmul_ternary_tl2_xq_avx512(xq, x.shape[1], indices, signs, num_rows)
    return _scale_int_sums(int_sums, row_scales, x_scale, weight_scale)


@njit(cache=True, nogil=True)
def _linear_tl2_portable(x: np.ndarray, padded_k: int, indices: np.ndarray, signs: np.ndarray, num_rows: int,
                         row_scales: np.ndarray, weight_scale: np.float64) -> np.ndarray:
    xq, x_scale, _ = _quantize_activations(x, padded_k)
    int_sums = _matmul_ternary_tl2_xq_portable(xq, x.shape[1], indices, signs, num_rows)
    return _scale_int_sums(int_sums, row_scales, x_scale, weight_scale)


@njit(cache=True, nogil=True)
def _quantize_activations(x: np.ndarray, padded_k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    num_tokens, in_features = x.shape
    xq = np.zeros((num_tokens, padded_k), dtype=np.int8)  # (num_tokens, padded_k) int8, zero padding
    x_scale = np.empty(num_tokens, dtype=np.float32)  # (num_tokens,) float32
    act_sum = np.empty(num_tokens, dtype=np.int32)  # (num_tokens,) int32
    x_bits = x.view(np.int32)  # (num_tokens, in_features) int32
    for token in range(num_tokens):
        # max|x| on the bit patterns: for non-NaN floats, |x| orders like its bits, and an integer max vectorizes.
        max_bits = np.int32(0)
        for k in range(in_features):
            max_bits = max(max_bits, x_bits[token, k] & 0x7FFFFFFF)
        max_abs = np.array([max_bits], dtype=np.int32).view(np.float32)[0]
        scale = np.float32(127.0) / max(max_abs, np.float32(1e-5))
        total = np.int32(0)
        for k in range(in_features):
            q = min(max(np.rint(x[token, k] * scale), np.float32(-128.0)), np.float32(127.0))
            xq[token, k] = np.int8(q)
            total = np.int32(total + np.int32(q))
        x_scale[token] = scale
        act_sum[token] = total
    return xq, x_scale, act_sum


def padded_in_features(in_features: int) -> int:
    """in_features rounded up to a whole number of 256-weight blocks."""
    return -(-in_features // BLOCK_WEIGHTS) * BLOCK_WEIGHTS


def pack_ternary(ternary: np.ndarray) -> np.ndarray:
    """ternary: (N, K) int8 in {-1, 0, 1} -> codes: (N, padded_k // 4) uint8.

    Each 256-weight block is 64 bytes; byte j holds weights j, j+64, j+128, j+192 of the block in bit pairs 0-1,
    2-3, 4-5, 6-7 as code T+1, so one shift and mask of a 64-byte vector gives 64 consecutive codes.
    Padding weights get code 1 (zero).
    """
    if ternary.ndim != 2 or ternary.dtype != np.int8:
        raise ValueError(f"pack_ternary: expected a 2-D int8 array, got {ternary.ndim}-D {ternary.dtype}")
    if ternary.size and (ternary.min() < -1 or ternary.max() > 1):
        raise ValueError(f"pack_ternary: values must be in {{-1, 0, 1}}, found [{ternary.min()}, {ternary.max()}]")
    num_rows, in_features = ternary.shape
    padded_k = padded_in_features(in_features)
    codes = np.ones((num_rows, padded_k), dtype=np.uint8)  # (N, padded_k) uint8, code 1 = weight 0
    codes[:, :in_features] = ternary + 1
    by_pair = codes.reshape(num_rows, padded_k // BLOCK_WEIGHTS, 4, BLOCK_BYTES)  # (N, num_blocks, 4, 64) uint8
    packed = by_pair[:, :, 0] | (by_pair[:, :, 1] << 2) | (by_pair[:, :, 2] << 4) | (by_pair[:, :, 3] << 6)
    return np.ascontiguousarray(packed.reshape(num_rows, padded_k // 4))


def scale_int_sums(int_sums: np.ndarray, row_scales: np.ndarray | None, x_scale: np.ndarray,
                   weight_scale: float) -> np.ndarray:
    """Exact sums Σ T·q to a BitNet layer's float output, in one pass.

    int_sums (T, N) int32; x_scale (T,) float32, with x ≈ xq / x_scale. With row_scales (N,) float32 (fused
    matrices): f32(Σ) · row_scales[n] · (1 / x_scale[t]), each product rounded to float32 in that order. Without
    (per-tensor weight_scale): f32(Σ) · f32(weight_scale / x_scale[t]), the factor formed in float64 and rounded once.
    -> (T, N) float32, the same bits as those numpy expressions.
    """
    if int_sums.ndim != 2 or int_sums.dtype != np.int32 or x_scale.shape != (int_sums.shape[0],) \
            or x_scale.dtype != np.float32:
        raise ValueError(f"scale_int_sums: expected (T, N) int32 sums and (T,) float32 x_scale, got {int_sums.shape} "
                         f"{int_sums.dtype} and {x_scale.shape} {x_scale.dtype}")
    int_sums = np.ascontiguousarray(int_sums)  # the zero-skipping kernel returns a column slice
    if row_scales is None:
        return _scale_int_sums(int_sums, np.empty(0, np.float32), x_scale, np.float64(weight_scale))
    if row_scales.shape != (int_sums.shape[1],) or row_scales.dtype != np.float32:
        raise ValueError(f"scale_int_sums: row_scales must be ({int_sums.shape[1]},) float32, got {row_scales.shape} "
                         f"{row_scales.dtype}")
    return _scale_int_sums(int_sums, row_scales, x_scale, np.float64(0.0))


@njit(cache=True, nogil=True)
def _scale_int_sums(int_sums: np.ndarray, row_scales: np.ndarray, x_scale: np.ndarray,
                    weight_scale: np.float64) -> np.ndarray:
    num_tokens, num_rows = int_sums.shape
    out = np.empty((num_tokens, num_rows), dtype=np.float32)  # (T, N) float32
    for t in range(num_tokens):
        sums, row = int_sums[t], out[t]
        if row_scales.size:
            inverse = np.float32(1.0) / x_scale[t]
            for n in range(num_rows):
                row[n] = np.float32(sums[n]) * row_scales[n] * inverse
        else:
            factor = np.float32(weight_scale / np.float64(x_scale[t]))
            for n in range(num_rows):
                row[n] = np.float32(sums[n]) * factor
    return out


def unpack_ternary(codes: np.ndarray, in_features: int) -> np.ndarray:
    """codes: (N, padded_k // 4) uint8 from pack_ternary -> (N, in_features) int8 in {-1, 0, 1}."""
    if codes.ndim != 2 or codes.dtype != np.uint8 or codes.shape[1] % BLOCK_BYTES:
        raise ValueError(f"unpack_ternary: expected (N, multiple of 64) uint8, got {codes.shape} {codes.dtype}")
    if not 0 <= in_features <= codes.shape[1] * 4:
        raise ValueError(f"unpack_ternary: in_features={in_features} does not fit {codes.shape[1] * 4} packed weights")
    num_rows = codes.shape[0]
    by_block = codes.reshape(num_rows, -1, 1, BLOCK_BYTES)  # (N, num_blocks, 1, 64) uint8
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    values = ((by_block >> shifts) & 3).astype(np.int8) - 1  # (N, num_blocks, 4, 64) int8
    return np.ascontiguousarray(values.reshape(num_rows, -1)[:, :in_features])


def quantize_activations(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-token absmax int8 quantization (BitNet): s = 127 / max(max|x|, 1e-5), xq = clamp(round_half_even(x·s)).

    x: (T, K) float32 C-contiguous -> xq (T, padded_k) int8 zero-padded, x_scale (T,) float32 = s,
    act_sum (T,) int32 = Σ xq. All arithmetic in float32, bit-exact with the same numpy expression.
    """
    if x.ndim != 2 or x.dtype != np.float32 or not x.flags.c_contiguous:
        raise ValueError(f"quantize_activations: expected C-contiguous 2-D float32, got {x.ndim}-D {x.dtype}")
    if x.shape[1] > MAX_IN_FEATURES:
        raise ValueError(f"quantize_activations: in_features={x.shape[1]} exceeds {MAX_IN_FEATURES}")
    return _quantize_activations(x, padded_in_features(x.shape[1]))


def _check_matmul_inputs(name: str, xq: np.ndarray, codes: np.ndarray) -> None:
    if xq.ndim != 2 or xq.dtype != np.int8 or not xq.flags.c_contiguous:
        raise ValueError(f"{name}: xq must be C-contiguous 2-D int8, got {xq.ndim}-D {xq.dtype}")
    if codes.ndim != 2 or codes.dtype != np.uint8 or not codes.flags.c_contiguous:
        raise ValueError(f"{name}: codes must be C-contiguous 2-D uint8, got {codes.ndim}-D {codes.dtype}")
    if xq.shape[1] % BLOCK_WEIGHTS or xq.shape[1] > MAX_IN_FEATURES:
        raise ValueError(f"{name}: xq width {xq.shape[1]} must be a multiple of {BLOCK_WEIGHTS}, <= {MAX_IN_FEATURES}")
    if codes.shape[1] * 4 != xq.shape[1]:
        raise ValueError(f"{name}: codes width {codes.shape[1]} must be xq width {xq.shape[1]} / 4")


def matmul_ternary(xq: np.ndarray, act_sum: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Exact Σ_k T[n, k] · xq[t, k] as Σ c·q − Σ q.

    xq: (T, padded_k) int8, act_sum: (T,) int32 = Σ xq per token, codes: (N, padded_k // 4) uint8 -> (T, N) int32.
    """
    _check_matmul_inputs("matmul_ternary", xq, codes)
    if act_sum.shape != (xq.shape[0],) or act_sum.dtype != np.int32:
        raise ValueError(f"matmul_ternary: act_sum must be ({xq.shape[0]},) int32, got {act_sum.shape} {act_sum.dtype}")
    if AMX_AVAILABLE and xq.shape[0] >= AMX_MIN_TOKENS:
        return matmul_ternary_amx(xq, act_sum, codes)
    return _MATMUL_TERNARY(xq, act_sum, codes)


def matmul_ternary_blockscaled(xq: np.ndarray, codes: np.ndarray, block_scales: np.ndarray) -> np.ndarray:
    """out[t, n] = Σ_b block_scales[n, b] · (Σ_{k in block b} T[n, k] · xq[t, k]), b increasing, summed in float64.

    xq: (T, padded_k) int8, codes: (N, padded_k // 4) uint8, block_scales: (N, padded_k // 256) float32
    -> (T, N) float32. For GGUF TQ1_0 / TQ2_0 (one scale per 256 weights).
    """
    _check_matmul_inputs("matmul_ternary_blockscaled", xq, codes)
    expected = (codes.shape[0], xq.shape[1] // BLOCK_WEIGHTS)
    if block_scales.shape != expected or block_scales.dtype != np.float32 or not block_scales.flags.c_contiguous:
        raise ValueError(f"matmul_ternary_blockscaled: block_scales must be C-contiguous {expected} float32, "
                         f"got {block_scales.shape} {block_scales.dtype}")
    return _MATMUL_TERNARY_BLOCKSCALED(xq, codes, block_scales)


def tl2_num_groups(in_features: int) -> int:
    """Groups of three weights covering in_features, rounded up to whole quads (four groups share an index word)."""
    return -(-in_features // 12) * 4


def pack_ternary_tl2(ternary: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ternary: (N, K) int8 in {-1, 0, 1} -> indices (num_tiles, num_groups // 4, 32) uint16, signs (num_tiles,
    num_groups) uint32, with num_tiles = ceil(N / 32) and num_groups = tl2_num_groups(K): 1.67 bits per weight.

    Word r of a quad holds row r's indices of groups 4q..4q+3 in nibbles 0..3; bit r of a group's sign word is row r.
    Padding rows and weights are zero (index 13, sign 0).
    """
    if ternary.ndim != 2 or ternary.dtype != np.int8:
        raise ValueError(f"pack_ternary_tl2: expected a 2-D int8 array, got {ternary.ndim}-D {ternary.dtype}")
    if ternary.size and (ternary.min() < -1 or ternary.max() > 1):
        raise ValueError(f"pack_ternary_tl2: values must be in {{-1, 0, 1}}, found [{ternary.min()}, {ternary.max()}]")
    num_rows, in_features = ternary.shape
    num_groups = tl2_num_groups(in_features)
    num_tiles = -(-num_rows // TL2_TILE_ROWS)
    padded = np.zeros((num_tiles * TL2_TILE_ROWS, 3 * num_groups), dtype=np.int64)  # (rows, 3 · num_groups) int64
    padded[:num_rows, :in_features] = ternary
    patterns = (padded.reshape(-1, num_groups, 3) + 1) @ np.array([9, 3, 1])  # (rows, num_groups) int64 in 0..26
    by_tile = patterns.reshape(num_tiles, TL2_TILE_ROWS, num_groups).transpose(0, 2, 1)  # (tiles, groups, 32) int64
    negative = by_tile > 13
    index = np.where(negative, 26 - by_tile, by_tile).astype(np.uint16)  # (tiles, groups, 32) uint16 in 0..13
    by_quad = index.reshape(num_tiles, num_groups // 4, 4, TL2_TILE_ROWS)  # (tiles, quads, 4, 32) uint16
    indices = by_quad[:, :, 0] | (by_quad[:, :, 1] << 4) | (by_quad[:, :, 2] << 8) | (by_quad[:, :, 3] << 12)
    bits = negative.astype(np.uint32) << np.arange(TL2_TILE_ROWS, dtype=np.uint32)
    signs = np.bitwise_or.reduce(bits, axis=2)  # (tiles, groups) uint32
    return np.ascontiguousarray(indices), np.ascontiguousarray(signs)


def pack_tl2_from_codes(codes: np.ndarray, in_features: int) -> tuple[np.ndarray, np.ndarray]:
    """pack_ternary_tl2(unpack_ternary(codes, in_features)) without the int8 and int64 copies of the matrix:
    codes (N, padded_k // 4) uint8 from pack_ternary -> the same (indices, signs)."""
    if codes.ndim != 2 or codes.dtype != np.uint8 or codes.shape[1] % BLOCK_BYTES or not codes.flags.c_contiguous:
        raise ValueError(f"pack_tl2_from_codes: expected C-contiguous (N, multiple of 64) uint8, got {codes.shape} "
                         f"{codes.dtype}")
    if not 0 < in_features <= codes.shape[1] * 4:
        raise ValueError(f"pack_tl2_from_codes: in_features={in_features} does not fit {codes.shape[1] * 4} weights")
    return _pack_tl2_from_codes(codes, in_features, tl2_num_groups(in_features))


@njit(cache=True, nogil=True, parallel=True)
def _pack_tl2_from_codes(codes: np.ndarray, in_features: int, num_groups: int) -> tuple[np.ndarray, np.ndarray]:
    num_rows = codes.shape[0]
    num_tiles = (num_rows + TL2_TILE_ROWS - 1) // TL2_TILE_ROWS
    indices = np.empty((num_tiles, num_groups // 4, TL2_TILE_ROWS), dtype=np.uint16)  # see pack_ternary_tl2
    signs = np.zeros((num_tiles, num_groups), dtype=np.uint32)  # (num_tiles, num_groups) uint32
    for tile in prange(num_tiles):  # each tile writes only its own indices and sign words
        for r in range(TL2_TILE_ROWS):
            row = tile * TL2_TILE_ROWS + r
            for quad in range(num_groups // 4):
                word = np.uint16(0)
                for nibble in range(4):
                    group = 4 * quad + nibble
                    pattern = 0
                    for i in range(3):
                        k = 3 * group + i
                        weight = 0  # padding rows and columns are zero weights
                        if row < num_rows and k < in_features:
                            block, j = k // BLOCK_WEIGHTS, k % BLOCK_WEIGHTS
                            weight = ((codes[row, block * BLOCK_BYTES + j % BLOCK_BYTES] >> (2 * (j // BLOCK_BYTES)))
                                      & 3) - 1
                        pattern = 3 * pattern + weight + 1
                    if pattern > 13:
                        signs[tile, group] |= np.uint32(1) << np.uint32(r)
                        pattern = 26 - pattern
                    word |= np.uint16(pattern) << np.uint16(4 * nibble)
                indices[tile, quad, r] = word
    return indices, signs


def unpack_ternary_tl2(indices: np.ndarray, signs: np.ndarray, num_rows: int, in_features: int) -> np.ndarray:
    """Inverse of pack_ternary_tl2 -> (num_rows, in_features) int8 (reference and tests)."""
    shifts = np.array([0, 4, 8, 12], dtype=np.uint16).reshape(1, 1, 4, 1)
    index = ((indices[:, :, None, :] >> shifts) & 15).astype(np.int64).reshape(indices.shape[0], -1, TL2_TILE_ROWS)
    negative = (signs[:, :, None] >> np.arange(TL2_TILE_ROWS, dtype=np.uint32)) & 1  # (tiles, groups, 32) uint32
    patterns = np.where(negative == 1, 26 - index, index).transpose(0, 2, 1)  # (tiles, 32, groups) int64
    weights = np.stack([patterns // 9, (patterns // 3) % 3, patterns % 3], axis=-1) - 1  # (tiles, 32, groups, 3)
    return weights.reshape(-1, 3 * signs.shape[1])[:num_rows, :in_features].astype(np.int8)


def build_tl2_tables(xq: np.ndarray, in_features: int) -> np.ndarray:
    """xq: (T, >= in_features) int8, C-contiguous -> (T, tl2_num_groups(in_features), 16) int16 partial-sum tables,
    built once per call and shared by every output row."""
    if xq.ndim != 2 or xq.dtype != np.int8 or not xq.flags.c_contiguous or xq.shape[1] < in_features:
        raise ValueError(f"build_tl2_tables: xq must be C-contiguous (T, >= {in_features}) int8, got {xq.shape} "
                         f"{xq.dtype}")
    return _build_tl2_tables(xq, in_features, tl2_num_groups(in_features))


def matmul_ternary_tl2(tables: np.ndarray, indices: np.ndarray, signs: np.ndarray, num_rows: int) -> np.ndarray:
    """Exact Σ_k T[n, k] · xq[t, k] from TL2 tables and packed weights -> (T, num_rows) int32."""
    num_groups = signs.shape[1] if signs.ndim == 2 else -1
    if tables.ndim != 3 or tables.dtype != np.int16 or tables.shape[1:] != (num_groups, _TL2_TABLE_ENTRIES):
        raise ValueError(f"matmul_ternary_tl2: tables must be (T, {num_groups}, 16) int16, got {tables.shape} "
                         f"{tables.dtype}")
    if indices.dtype != np.uint16 or indices.shape != (signs.shape[0], num_groups // 4, TL2_TILE_ROWS) \
            or signs.dtype != np.uint32:
        raise ValueError(f"matmul_ternary_tl2: indices (tiles, groups / 4, 32) uint16 and signs (tiles, groups) uint32 "
                         f"expected, got {indices.shape} {indices.dtype} and {signs.shape} {signs.dtype}")
    if num_groups % 4 or not -TL2_TILE_ROWS < num_rows - TL2_TILE_ROWS * signs.shape[0] <= 0:
        raise ValueError(f"matmul_ternary_tl2: num_rows={num_rows} and {num_groups} groups do not fit the packing")
    if not (tables.flags.c_contiguous and indices.flags.c_contiguous and signs.flags.c_contiguous):
        raise ValueError("matmul_ternary_tl2: tables, indices and signs must be C-contiguous")
    return _MATMUL_TERNARY_TL2(tables, indices, signs, num_rows)


def matmul_ternary_tl2_xq(xq: np.ndarray, in_features: int, indices: np.ndarray, signs: np.ndarray,
                          num_rows: int) -> np.ndarray:
    """matmul_ternary_tl2(build_tl2_tables(xq, in_features), indices, signs, num_rows) in one call: xq (T, >=
    in_features) int8, C-contiguous; indices and signs from pack_ternary_tl2 -> (T, num_rows) int32, the same sums."""
    if xq.ndim != 2 or xq.dtype != np.int8 or not xq.flags.c_contiguous or xq.shape[1] < in_features:
        raise ValueError(f"matmul_ternary_tl2_xq: xq must be C-contiguous (T, >= {in_features}) int8, got "
                         f"{xq.shape} {xq.dtype}")
    _check_tl2_layout("matmul_ternary_tl2_xq", in_features, indices, signs, num_rows)
    return _MATMUL_TERNARY_TL2_XQ(xq, in_features, indices, signs, num_rows)


def _check_tl2_layout(name: str, in_features: int, indices: np.ndarray, signs: np.ndarray, num_rows: int) -> None:
    num_groups = tl2_num_groups(in_features)
    if indices.dtype != np.uint16 or indices.shape != (-(-num_rows // TL2_TILE_ROWS), num_groups // 4, TL2_TILE_ROWS) \
            or signs.dtype != np.uint32 or signs.shape != (indices.shape[0], num_groups) \
            or not (indices.flags.c_contiguous and signs.flags.c_contiguous):
        raise ValueError(f"{name}: indices and signs do not hold {num_rows} rows of {in_features} weights packed by "
                         f"pack_ternary_tl2: got {indices.shape} {indices.dtype}, {signs.shape} {signs.dtype}")


def linear_tl2(x: np.ndarray, indices: np.ndarray, signs: np.ndarray, num_rows: int, row_scales: np.ndarray | None,
               weight_scale: float) -> np.ndarray:
    """A BitNet layer's float output from TL2 weights in one call: quantize_activations, matmul_ternary_tl2_xq and
    scale_int_sums in a row, with the same bits. x: (T, K) float32, C-contiguous; indices and signs: num_rows rows
    of K weights from pack_ternary_tl2; row_scales or weight_scale as scale_int_sums takes them -> (T, num_rows)
    float32."""
    if x.ndim != 2 or x.dtype != np.float32 or not x.flags.c_contiguous or x.shape[1] > MAX_IN_FEATURES:
        raise ValueError(f"linear_tl2: expected C-contiguous (T, <= {MAX_IN_FEATURES}) float32, got {x.shape} "
                         f"{x.dtype}")
    in_features = x.shape[1]
    _check_tl2_layout("linear_tl2", in_features, indices, signs, num_rows)
    if row_scales is not None and (row_scales.shape != (num_rows,) or row_scales.dtype != np.float32):
        raise ValueError(f"linear_tl2: row_scales must be ({num_rows},) float32, got {row_scales.shape} "
                         f"{row_scales.dtype}")
    scales = np.empty(0, np.float32) if row_scales is None else row_scales
    return _LINEAR_TL2(x, padded_in_features(in_features), indices, signs, num_rows, scales,
                       np.float64(0.0 if row_scales is not None else weight_scale))


def _select_kernel_path() -> str:
    """'avx512_vnni' when the CPU and JIT target allow it, unless BITSERVE_KERNELS=portable forces the fallback.

    TL2 needs only AVX-512 F and BW (vpermw), which every VNNI CPU has; it follows the same choice.
    """
    requested = os.environ.get("BITSERVE_KERNELS", "auto")
    if requested not in ("auto", "portable"):
        raise ValueError(f"BITSERVE_KERNELS={requested!r}: expected 'auto' or 'portable'")
    if requested == "auto" and detect_cpu_features().has_avx512_vnni:
        return "avx512_vnni"
    return "portable"


KERNEL_PATH = _select_kernel_path()
_MATMUL_TERNARY_TL2 = _matmul_ternary_tl2_avx512 if KERNEL_PATH == "avx512_vnni" else _matmul_ternary_tl2_portable
_MATMUL_TERNARY_TL2_XQ = (
    _matmul_ternary_tl2_xq_avx512 if KERNEL_PATH == "avx512_vnni" else _matmul_ternary_tl2_xq_portable
)
_LINEAR_TL2 = _linear_tl2_avx512 if KERNEL_PATH == "avx512_vnni" else _linear_tl2_portable
_MATMUL_TERNARY = _matmul_ternary_vnni if KERNEL_PATH == "avx512_vnni" else _matmul_ternary_portable
_MATMUL_TERNARY_BLOCKSCALED = (
    _matmul_ternary_blockscaled_vnni if KERNEL_PATH == "avx512_vnni" else _matmul_ternary_blockscaled_portable
)
