"""BitNet b1.58 (W1.58A8) kernels: 2-bit ternary packing, per-token int8 activation quantization and exact integer
matmuls, with an AVX-512 VNNI path (llvmlite IR) and a portable Numba path. Arrays in, arrays out: no model knowledge.
"""

from __future__ import annotations

import os

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from engine.kernels.cpu_features import detect_cpu_features

BLOCK_WEIGHTS = 256  # weights per packed block
BLOCK_BYTES = 64  # one 512-bit vector: 4 two-bit codes per byte
# Lane accumulators of the VNNI GEMV hold up to 2^16 per block (code 2 masked in place is 128, times |q| <= 128, four
# products per lane); 2^22 inputs keep them, and every int32 sum, clear of overflow.
MAX_IN_FEATURES = 1 << 22

_ROWS_PER_TILE = 4  # output rows computed together: each activation vector loaded once serves four rows
_TOKENS_PER_TILE = 4  # tokens computed together in a GEMM: each extracted code vector serves four tokens
_TILES_PER_GROUP = 16  # row tiles per parallel iteration (64 rows); see _matmul_ternary_vnni

_I8 = ir.IntType(8)
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
_F64 = ir.DoubleType()
_VEC = ir.VectorType(_I32, 16)  # 64 bytes seen as 16 int32 lanes: the operand type vpdpbusd is declared with


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


def _row_pointers(context, builder: ir.IRBuilder, array_type, array_value, index_type, index_tuple) -> list[ir.Value]:
    """Byte pointers (i8*) to the rows named by a UniTuple of integers, in a C-contiguous 2-D array."""
    array = context.make_array(array_type)(context, builder, array_value)
    row_stride_bytes = builder.extract_value(array.strides, 0)
    data = builder.bitcast(array.data, _I8.as_pointer())
    pointers = []
    for index in cgutils.unpack_tuple(builder, index_tuple, index_type.count):
        row = context.cast(builder, index, index_type.dtype, types.int64)
        pointers.append(builder.gep(data, [builder.mul(row, row_stride_bytes)]))
    return pointers


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


def _emit_block_products(builder: ir.IRBuilder, code_rows: list, act_rows: list, block: ir.Value) -> list:
    """Lane partial sums of Σ c·q over one block for every (row, token) pair, row-major, as fresh SSA vectors."""
    mask = _splat(0x03030303)
    code_offset = builder.mul(block, ir.Constant(_I64, BLOCK_BYTES))
    act_offset = builder.mul(block, ir.Constant(_I64, BLOCK_WEIGHTS))
    packed = [_load_vec(builder, code_row, code_offset) for code_row in code_rows]
    lanes = [ir.Constant(_VEC, None)] * (len(code_rows) * len(act_rows))
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
    """Σ c·q for every (row, token) pair, row-major; codes are extracted once per block and reused across tokens."""
    accs = [cgutils.alloca_once_value(builder, ir.Constant(_VEC, None)) for _ in range(len(code_rows) * len(act_rows))]
    with cgutils.for_range(builder, num_blocks) as loop:
        lanes = _emit_block_products(builder, code_rows, act_rows, loop.index)
        for acc, block_lanes in zip(accs, lanes, strict=True):
            builder.store(builder.add(builder.load(acc), block_lanes), acc)
    return [_reduce_add(builder, builder.load(acc)) for acc in accs]


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
        totals = [cgutils.alloca_once_value(builder, ir.Constant(_F64, 0.0)) for _ in range(num_sums)]
        with cgutils.for_range(builder, num_blocks_i64) as loop:
            lanes = _emit_block_products(builder, code_rows, act_rows, loop.index)
            for row, scale_row in enumerate(scale_rows):
                scale = builder.fpext(builder.load(builder.gep(scale_row, [loop.index])), _F64)
                for token, act_sum_row in enumerate(act_sum_rows):
                    slot = row * len(act_rows) + token
                    block_sum = builder.sub(_reduce_add(builder, lanes[slot]),
                                            builder.load(builder.gep(act_sum_row, [loop.index])))
                    product = builder.fmul(builder.sitofp(block_sum, _F64), scale)
                    builder.store(builder.fadd(builder.load(totals[slot]), product), totals[slot])
        return context.make_tuple(builder, signature.return_type, [builder.load(total) for total in totals])

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


def _select_kernel_path() -> str:
    """'avx512_vnni' when the CPU and JIT target allow it, unless BITSERVE_KERNELS=portable forces the fallback."""
    requested = os.environ.get("BITSERVE_KERNELS", "auto")
    if requested not in ("auto", "portable"):
        raise ValueError(f"BITSERVE_KERNELS={requested!r}: expected 'auto' or 'portable'")
    if requested == "auto" and detect_cpu_features().has_avx512_vnni:
        return "avx512_vnni"
    return "portable"


KERNEL_PATH = _select_kernel_path()
_MATMUL_TERNARY = _matmul_ternary_vnni if KERNEL_PATH == "avx512_vnni" else _matmul_ternary_portable
_MATMUL_TERNARY_BLOCKSCALED = (
    _matmul_ternary_blockscaled_vnni if KERNEL_PATH == "avx512_vnni" else _matmul_ternary_blockscaled_portable
)
