"""Block-quantized GEMM on AMX tiles for small batches (a few decoding sequences, short prefill chunks), on codes laid
out for the tiles once, at load.

Same bits as engine/kernels/blockq.py's VNNI and portable matmuls: each block's dot is an exact int32 from `tdpbusd`,
then scaled and added in blockq.py's fixed order (block b into float32 partial sum b % 16, the same fold tree).

Tokens are the tile rows and weight rows its columns, so the float work after each block runs on vectors of 16
weight rows whatever the number of tokens: 8 sequences pay for 8 rows, not for a padded 16-token tile. Activations
ride the unsigned operand as digit + 128 and the codes the signed one. Re-laying the codes for the tiles costs about
as much as an 8-token product, so `lay_out` does it once per matrix (one byte per weight, plus the block scales,
minimums and code sums as 16-row vectors) and the kernel only reads that layout. Callers check AMX_AVAILABLE
(engine/kernels/amx.py) first.
"""

from __future__ import annotations

from typing import NamedTuple

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from engine.kernels.amx import BYTE_PTR, configure_tiles, data_pointer, declare, release_tiles

BLOCK_SIZE = 32  # elements per GGUF block
TILE_ROWS = 16  # tokens per A tile; weight rows per B tile
_NUM_LANES = 16  # float32 partial sums per output, as in engine/kernels/blockq.py
_QUADS_PER_BLOCK = BLOCK_SIZE // 4  # B tile rows: four codes of each weight row per row

# Weight formats, as in engine/kernels/blockq.py
_FMT_Q4_0 = 0
_FMT_Q4_1 = 1
_FMT_Q8_0 = 2

_I8 = ir.IntType(8)
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
_TILE_BYTES = TILE_ROWS * BLOCK_SIZE  # 512: one A tile (16 tokens × 32 bytes) or one B tile (8 rows × 64 bytes)
_FLOATS = ir.VectorType(ir.FloatType(), TILE_ROWS)  # one row of a C tile: 16 weight rows
_INTS = ir.VectorType(_I32, TILE_ROWS)
_VECTOR_BYTES = TILE_ROWS * 4
# From this many tokens on, this kernel beats the VNNI one (SmolLM2-135M's shapes 576->960, 576->3072, 1536->576 and
# the 49152-row head, A16: 1.2-1.9x at 16 tokens, 1.5-2.4x at 32-128; at 8, 0.5-1.5x; at 4, 0.5-0.8x).
MIN_TOKENS = 16
# Matrices above this many weights are not laid out, because the copy costs 1.4 bytes per weight (nearly three times
# a Q4 matrix): the layers of small models (SmolLM2-135M's largest has 1.8 M, +134 MB in all) are, a 7B model's
# (17-45 M each, +9.8 GB) and large output heads are not, and keep the VNNI kernels.
MAX_LAYOUT_WEIGHTS = 4 << 20


class AmxLayout(NamedTuple):
    """A block-quantized matrix laid out for the tiles, 32 weight rows (two B tiles) per pair; rows past the matrix
    repeat its last row."""

    codes: np.ndarray  # (pairs, 2, num_blocks, 8, 64) int8: tile row q holds codes 4q .. 4q+3 of each of 16 rows
    scales: np.ndarray  # (pairs, 2, num_blocks, 16) float32: the block scales wd
    mins: np.ndarray  # (pairs, 2, num_blocks, 16) float32: the block minimums wm (Q4_1), else `scales` itself
    code_sums: np.ndarray  # (pairs, 2, num_blocks, 16) int32: Σ codes of the block, for the +128 offset
    num_rows: int


def _tile_config() -> np.ndarray:
    """Palette 1. Tiles 0-3 C sums (16 tokens × 16 int32): [row group 0 coarse, 0 fine, 1 coarse, 1 fine]; tiles 4-5
    A activations, coarse and fine digit + 128 (16 tokens × 32 bytes); tiles 6-7 B codes of the two row groups (8 rows
    × 64 bytes: four codes of each of 16 weight rows per tile row)."""
    config = np.zeros(64, dtype=np.uint8)
    config[0] = 1
    bytes_per_row = config[16:48].view(np.uint16)
    bytes_per_row[0:4], config[48:52] = 64, TILE_ROWS
    bytes_per_row[4:6], config[52:54] = BLOCK_SIZE, TILE_ROWS
    bytes_per_row[6:8], config[54:56] = 64, _QUADS_PER_BLOCK
    return config


TILE_CONFIG = _tile_config()


def _make_block_dots(num_digits: int):
    """An intrinsic (coarse, fine, codes, sums, block): sums[2g + d] = digit_d[block] · codes[g, block] for row groups
    g and activation digits d (one digit: sums[0] and sums[2] only). coarse, fine: (num_blocks, 16, 32) uint8 A
    tiles; codes: (2, num_blocks, 8, 64) int8 B tiles of one pair; sums: (4, 16, 16) int32. Needs configure_tiles."""

    def block_dots(typingctx, coarse, fine, codes, sums, block):
        sig = types.void(coarse, fine, codes, sums, block)

        def codegen(context, builder, signature, args):
            a0, a1, b, c = (data_pointer(context, builder, t, v)
                            for t, v in zip(signature.args[:4], args[:4], strict=True))
            codes_array = context.make_array(signature.args[2])(context, builder, args[2])
            group_bytes = builder.mul(builder.extract_value(codes_array.shape, 1), ir.Constant(_I64, _TILE_BYTES))
            offset = builder.mul(context.cast(builder, args[4], signature.args[4], types.int64),
                                 ir.Constant(_I64, _TILE_BYTES))
            tile_load = declare(builder, "llvm.x86.tileloadd64", [_I8, BYTE_PTR, _I64])
            dot = declare(builder, "llvm.x86.tdpbusd", [_I8, _I8, _I8])
            zero = declare(builder, "llvm.x86.tilezero", [_I8])
            store = declare(builder, "llvm.x86.tilestored64", [_I8, BYTE_PTR, _I64])
            outputs = [(0, 4, 6), (2, 4, 7)] + ([(1, 5, 6), (3, 5, 7)] if num_digits == 2 else [])
            loads = [(4, builder.gep(a0, [offset]), BLOCK_SIZE), (6, builder.gep(b, [offset]), 64),
                     (7, builder.gep(b, [builder.add(offset, group_bytes)]), 64)]
            if num_digits == 2:
                loads.append((5, builder.gep(a1, [offset]), BLOCK_SIZE))
            for out, _, _ in outputs:
                builder.call(zero, [ir.Constant(_I8, out)])
            for tile, pointer, stride in loads:
                builder.call(tile_load, [ir.Constant(_I8, tile), pointer, ir.Constant(_I64, stride)])
            for out, a_tile, b_tile in outputs:
                builder.call(dot, [ir.Constant(_I8, out), ir.Constant(_I8, a_tile), ir.Constant(_I8, b_tile)])
            for out, _, _ in outputs:
                target = builder.gep(c, [ir.Constant(_I64, out * TILE_ROWS * _VECTOR_BYTES)])
                builder.call(store, [ir.Constant(_I8, out), target, ir.Constant(_I64, 64)])
            return context.get_dummy_value()

        return sig, codegen

    block_dots.__name__ = f"_block_dots_{num_digits}"
    return intrinsic(block_dots)


_block_dots_int8 = _make_block_dots(1)
_block_dots_a16 = _make_block_dots(2)


def _vector_at(builder: ir.IRBuilder, base: ir.Value, byte_offset: ir.Value, vector_type) -> ir.Value:
    """Pointer to the 64-byte vector at base + byte_offset (numpy arrays are not 64-byte aligned)."""
    return builder.bitcast(builder.gep(base, [byte_offset]), vector_type.as_pointer())


def _splat(builder: ir.IRBuilder, scalar: ir.Value, vector_type) -> ir.Value:
    single = builder.insert_element(ir.Constant(vector_type, None), scalar, ir.Constant(_I32, 0))
    return builder.shuffle_vector(single, single, ir.Constant(_INTS, None))


def _load_scalar(builder: ir.IRBuilder, base: ir.Value, byte_offset: ir.Value, scalar_type) -> ir.Value:
    return builder.load(builder.bitcast(builder.gep(base, [byte_offset]), scalar_type.as_pointer()))


def _make_scale_block(fmt: int, num_digits: int):
    """An intrinsic (sums, partials, scales, mins, code_sums, xd, xs, xc, block, token0, num_tokens): for each valid
    token t of the tile and both row groups g, partials[t, block % 16, 16g:16g + 16] += the block's scaled dots, in
    blockq.py's order: float(dot) · (wd · xd) + wm · (xd · Σq) for Q4_1, float(dot - correction) · (wd · xd)
    otherwise, with dot = coarse · 256 + fine less what the +128 offset added (128 · Σ codes, times 257 for A16).
    sums (4, 16, 16) int32 from the block's tdpbusd; partials (16, 16, 32) float32; scales, mins, code_sums: one
    pair's (2, num_blocks, 16) layout vectors; xd, xs (T, num_blocks) float32, xc (T, num_blocks) int32: per token."""

    def scale_block(typingctx, sums, partials, scales, mins, code_sums, xd, xs, xc, block, token0, num_tokens):
        sig = types.void(sums, partials, scales, mins, code_sums, xd, xs, xc, block, token0, num_tokens)

        def codegen(context, builder, signature, args):
            pointers = [data_pointer(context, builder, t, v)
                        for t, v in zip(signature.args[:8], args[:8], strict=True)]
            sums_ptr, partials_ptr, scales_ptr, mins_ptr, code_sums_ptr, xd_ptr, xs_ptr, xc_ptr = pointers
            block_index = context.cast(builder, args[8], signature.args[8], types.int64)
            first_token = context.cast(builder, args[9], signature.args[9], types.int64)
            count = context.cast(builder, args[10], signature.args[10], types.int64)
            xd_array = context.make_array(signature.args[5])(context, builder, args[5])
            num_blocks = builder.extract_value(xd_array.shape, 1)
            group_stride = builder.mul(num_blocks, ir.Constant(_I64, _VECTOR_BYTES))
            block_vector = builder.mul(block_index, ir.Constant(_I64, _VECTOR_BYTES))
            offset_factor = ir.Constant(_INTS, [ir.Constant(_I32, 128 * 257 if num_digits == 2 else 128)] * TILE_ROWS)
            per_group = []  # (scales, mins, offsets) vectors of each row group for this block
            for group in range(2):
                at = builder.add(builder.mul(group_stride, ir.Constant(_I64, group)), block_vector)
                row_scales = builder.load(_vector_at(builder, scales_ptr, at, _FLOATS), align=4)
                row_mins = builder.load(_vector_at(builder, mins_ptr, at, _FLOATS), align=4) \
                    if fmt == _FMT_Q4_1 else None
                offsets = builder.mul(builder.load(_vector_at(builder, code_sums_ptr, at, _INTS), align=4),
                                      offset_factor)
                per_group.append((row_scales, row_mins, offsets))
            lane_offset = builder.mul(builder.urem(block_index, ir.Constant(_I64, _NUM_LANES)),
                                      ir.Constant(_I64, 2 * _VECTOR_BYTES))
            eight = ir.Constant(_INTS, [ir.Constant(_I32, 8)] * TILE_ROWS)
            with cgutils.for_range(builder, count) as loop:
                t = loop.index
                scalar_at = builder.mul(builder.add(builder.mul(builder.add(first_token, t), num_blocks), block_index),
                                        ir.Constant(_I64, 4))
                token_scale = _splat(builder, _load_scalar(builder, xd_ptr, scalar_at, ir.FloatType()), _FLOATS)
                if fmt == _FMT_Q4_1:
                    token_sum = _splat(builder, _load_scalar(builder, xs_ptr, scalar_at, ir.FloatType()), _FLOATS)
                elif fmt == _FMT_Q4_0:
                    token_correction = _splat(builder, _load_scalar(builder, xc_ptr, scalar_at, _I32), _INTS)
                row_bytes = builder.mul(t, ir.Constant(_I64, _VECTOR_BYTES))
                for group, (row_scales, row_mins, offsets) in enumerate(per_group):
                    coarse_at = builder.add(row_bytes, ir.Constant(_I64, 2 * group * TILE_ROWS * _VECTOR_BYTES))
                    dot = builder.load(_vector_at(builder, sums_ptr, coarse_at, _INTS), align=4)
                    if num_digits == 2:
                        fine_at = builder.add(row_bytes, ir.Constant(_I64, (2 * group + 1) * TILE_ROWS * _VECTOR_BYTES))
                        fine = builder.load(_vector_at(builder, sums_ptr, fine_at, _INTS), align=4)
                        dot = builder.add(builder.shl(dot, eight), fine)
                    dot = builder.sub(dot, offsets)
                    if fmt == _FMT_Q4_0:
                        dot = builder.sub(dot, token_correction)
                    product = builder.fmul(builder.sitofp(dot, _FLOATS), builder.fmul(row_scales, token_scale))
                    if fmt == _FMT_Q4_1:
                        product = builder.fadd(product, builder.fmul(row_mins, token_sum))
                    token_at = builder.mul(t, ir.Constant(_I64, _NUM_LANES * 2 * _VECTOR_BYTES))
                    target_at = builder.add(builder.add(token_at, lane_offset),
                                            ir.Constant(_I64, group * _VECTOR_BYTES))
                    target = _vector_at(builder, partials_ptr, target_at, _FLOATS)
                    builder.store(builder.fadd(builder.load(target, align=4), product), target, align=4)
            return context.get_dummy_value()

        return sig, codegen

    scale_block.__name__ = f"_scale_block_{fmt}_{num_digits}"
    return intrinsic(scale_block)


_scale_q4_0_int8, _scale_q4_0_a16 = _make_scale_block(_FMT_Q4_0, 1), _make_scale_block(_FMT_Q4_0, 2)
_scale_q4_1_int8, _scale_q4_1_a16 = _make_scale_block(_FMT_Q4_1, 1), _make_scale_block(_FMT_Q4_1, 2)
_scale_q8_0_int8, _scale_q8_0_a16 = _make_scale_block(_FMT_Q8_0, 1), _make_scale_block(_FMT_Q8_0, 2)


@intrinsic
def _fold_partials(typingctx, partials, token, out_row, row0, num_rows):
    """out_row[row0:row0 + num_rows] (num_rows <= 32) = the 16 partial sums of `token`'s outputs folded in blockq.py's
    fixed tree (lane i + lane i+8, then i + i+4, i + i+2, 0 + 1). partials (16, 16, 32) float32; out_row (N,)."""
    sig = types.void(partials, token, out_row, row0, num_rows)

    def codegen(context, builder, signature, args):
        base = data_pointer(context, builder, signature.args[0], args[0])
        out_base = data_pointer(context, builder, signature.args[2], args[2])
        token_at = builder.mul(context.cast(builder, args[1], signature.args[1], types.int64),
                               ir.Constant(_I64, _NUM_LANES * 2 * _VECTOR_BYTES))
        first_row = context.cast(builder, args[3], signature.args[3], types.int64)
        count = context.cast(builder, args[4], signature.args[4], types.int64)
        store_type = ir.FunctionType(ir.VoidType(), [_FLOATS, _FLOATS.as_pointer(), _I32,
                                                     ir.VectorType(ir.IntType(1), TILE_ROWS)])
        masked_store = cgutils.get_or_insert_function(builder.module, store_type, "llvm.masked.store.v16f32.p0")
        row_numbers = ir.Constant(ir.VectorType(_I64, TILE_ROWS), list(range(TILE_ROWS)))
        for group in range(2):
            lanes = [builder.load(_vector_at(builder, base, builder.add(token_at, ir.Constant(
                _I64, (lane * 2 + group) * _VECTOR_BYTES)), _FLOATS), align=4) for lane in range(_NUM_LANES)]
            width = _NUM_LANES // 2
            while width >= 1:
                lanes = [builder.fadd(lanes[lane], lanes[lane + width]) for lane in range(width)]
                width //= 2
            # Only the group's rows inside the matrix are written.
            valid = builder.sub(count, ir.Constant(_I64, group * TILE_ROWS))
            mask = builder.icmp_signed("<", row_numbers, _splat(builder, valid, ir.VectorType(_I64, TILE_ROWS)))
            target = _vector_at(builder, out_base, builder.mul(builder.add(first_row, ir.Constant(
                _I64, group * TILE_ROWS)), ir.Constant(_I64, 4)), _FLOATS)
            builder.call(masked_store, [lanes[0], target, ir.Constant(_I32, 4), mask])
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True, nogil=True, parallel=True)
def _lay_out(wq: np.ndarray, wd: np.ndarray, wm: np.ndarray, fmt: int
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    num_rows, num_blocks = wd.shape
    num_pairs = (num_rows + 2 * TILE_ROWS - 1) // (2 * TILE_ROWS)
    codes = np.empty((num_pairs, 2, num_blocks, _QUADS_PER_BLOCK, 64), np.int8)
    scales = np.empty((num_pairs, 2, num_blocks, TILE_ROWS), np.float32)
    # (pairs, 2, num_blocks, 16) float32 for Q4_1; other formats have no minimums (empty; lay_out passes scales)
    mins = np.empty((num_pairs if fmt == _FMT_Q4_1 else 0, 2, num_blocks, TILE_ROWS), np.float32)
    code_sums = np.empty((num_pairs, 2, num_blocks, TILE_ROWS), np.int32)
    words = codes.view(np.int32)  # (pairs, 2, num_blocks, 8, 16) int32: [pair, group, block, quad, row]
    num_grouped = 0 if fmt == _FMT_Q8_0 else num_blocks // 16 * 16  # blocks in interleaved groups of 16
    for pair in prange(num_pairs):
        block_codes = np.empty(BLOCK_SIZE, np.int8)  # one row's codes of one block
        block_words = block_codes.view(np.int32)
        for r in range(2 * TILE_ROWS):
            group, column = r // TILE_ROWS, r % TILE_ROWS
            row = min(pair * 2 * TILE_ROWS + r, num_rows - 1)
            for block in range(num_blocks):
                if fmt == _FMT_Q8_0:
                    for j in range(BLOCK_SIZE):  # the uint8 view of signed codes
                        value = np.int32(wq[row, block * BLOCK_SIZE + j])
                        block_codes[j] = value - 256 if value >= 128 else value
                else:
                    # Q4 byte j holds elements j (low nibble) and j + 16 (high); kernel order interleaves 4-byte
                    # quads of 16 blocks at a 64-byte stride, the row's tail blocks stay whole (blockq.py).
                    if block < num_grouped:
                        base, stride = block // 16 * 256 + block % 16 * 4, 64
                    else:
                        base, stride = block * 16, 4
                    for j in range(16):
                        code = wq[row, base + j // 4 * stride + j % 4]
                        block_codes[j] = code & 15
                        block_codes[j + 16] = code >> 4
                total = np.int32(0)
                for j in range(BLOCK_SIZE):
                    total += np.int32(block_codes[j])
                for quad in range(_QUADS_PER_BLOCK):
                    words[pair, group, block, quad, column] = block_words[quad]
                scales[pair, group, block, column] = wd[row, block]
                if fmt == _FMT_Q4_1:
                    mins[pair, group, block, column] = wm[row, block]
                code_sums[pair, group, block, column] = total
    return codes, scales, mins, code_sums


def lay_out(wq: np.ndarray, wd: np.ndarray, wm: np.ndarray, fmt: int) -> AmxLayout:
    """wq (N, K // 2) uint8 Q4 codes in kernel order, or (N, K) Q8_0 codes viewed as uint8; wd, wm (N, K // 32)
    float32 (wm = wd when the format has no minimums) -> the matrix laid out for matmul_amx_rows."""
    codes, scales, mins, code_sums = _lay_out(wq, wd, wm, fmt)
    return AmxLayout(codes, scales, mins if fmt == _FMT_Q4_1 else scales, code_sums, num_rows=wd.shape[0])


@njit(cache=True, nogil=True)
def _activation_tiles(digits: np.ndarray, xd: np.ndarray, xsum: np.ndarray, fmt: int
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """digits (T, num_digits, K) int8 -> A tiles (num_digits, token tiles, num_blocks, 16, 32) uint8, digit + 128
    (tokens past T are 128, a zero digit); per token and block xd · Σq float32 (Q4_1) and the Q4_0 correction
    8 · Σq int32, q the whole code (digits combined)."""
    num_tokens, num_digits, in_features = digits.shape
    num_blocks = in_features // BLOCK_SIZE
    num_tiles = (num_tokens + TILE_ROWS - 1) // TILE_ROWS
    tiles = np.full((num_digits, num_tiles, num_blocks, TILE_ROWS, BLOCK_SIZE), 128, np.uint8)
    scaled_sums = np.empty((num_tokens, num_blocks), np.float32)
    corrections = np.empty((num_tokens, num_blocks), np.int32)
    correction = 8 if fmt == _FMT_Q4_0 else 0
    for token in range(num_tokens):
        tile, t = token // TILE_ROWS, token % TILE_ROWS
        for block in range(num_blocks):
            total = np.int32(0)  # the block's Σ codes, digits combined most significant first, base 256
            for digit in range(num_digits):
                digit_sum = np.int32(0)
                for j in range(BLOCK_SIZE):
                    value = digits[token, digit, block * BLOCK_SIZE + j]
                    tiles[digit, tile, block, t, j] = np.uint8(value) ^ np.uint8(128)
                    digit_sum += np.int32(value)
                total = total * np.int32(256) + digit_sum
            scaled_sums[token, block] = xd[token, block] * np.float32(xsum[token, block])
            corrections[token, block] = correction * total
    return tiles, scaled_sums, corrections


@njit(cache=True, nogil=True)
def _scale_block(sums: np.ndarray, partials: np.ndarray, scales: np.ndarray, mins: np.ndarray,
                 code_sums: np.ndarray, xd: np.ndarray, xs: np.ndarray, xc: np.ndarray, block: int, token0: int,
                 num_tokens: int, fmt: int, num_digits: int) -> None:
    """The scale-and-add intrinsic for this format and activation kind (see _make_scale_block)."""
    args = (sums, partials, scales, mins, code_sums, xd, xs, xc, block, token0, num_tokens)
    if fmt == _FMT_Q4_0:
        if num_digits == 2:
            _scale_q4_0_a16(*args)
        else:
            _scale_q4_0_int8(*args)
    elif fmt == _FMT_Q4_1:
        if num_digits == 2:
            _scale_q4_1_a16(*args)
        else:
            _scale_q4_1_int8(*args)
    elif num_digits == 2:
        _scale_q8_0_a16(*args)
    else:
        _scale_q8_0_int8(*args)


@njit(cache=True, nogil=True, parallel=True)
def _matmul_amx_rows(
    xq: np.ndarray, xd: np.ndarray, xsum: np.ndarray, codes: np.ndarray, scales: np.ndarray, mins: np.ndarray,
    code_sums: np.ndarray, num_rows: int, fmt: int, config: np.ndarray, num_threads: int,
) -> np.ndarray:
    num_tokens = xq.shape[0]
    num_pairs, _, num_blocks = scales.shape[:3]
    digits = xq.reshape((num_tokens, -1, num_blocks * BLOCK_SIZE))  # (T, num_digits, K) int8
    num_digits = digits.shape[1]
    tiles, scaled_sums, corrections = _activation_tiles(digits, xd, xsum, fmt)
    num_tiles = tiles.shape[1]
    out = np.empty((num_tokens, num_rows), np.float32)  # (T, N) float32
    num_parts = min(num_pairs, num_threads)  # one contiguous range of row pairs per thread
    for part in prange(num_parts):
        sums = np.zeros((4, TILE_ROWS, TILE_ROWS), np.int32)  # one block's C tiles
        partials = np.empty((TILE_ROWS, _NUM_LANES, 2 * TILE_ROWS), np.float32)  # [token, partial sum, row]
        configure_tiles(config)
        for pair in range(part * num_pairs // num_parts, (part + 1) * num_pairs // num_parts):
            row0 = pair * 2 * TILE_ROWS
            for tile in range(num_tiles):
                token0 = tile * TILE_ROWS
                tile_tokens = min(TILE_ROWS, num_tokens - token0)
                partials[:tile_tokens] = 0
                for block in range(num_blocks):
                    if num_digits == 2:
                        _block_dots_a16(tiles[0, tile], tiles[1, tile], codes[pair], sums, block)
                    else:
                        _block_dots_int8(tiles[0, tile], tiles[0, tile], codes[pair], sums, block)
                    _scale_block(sums, partials, scales[pair], mins[pair], code_sums[pair], xd, scaled_sums,
                                 corrections, block, token0, tile_tokens, fmt, num_digits)
                for t in range(tile_tokens):
                    _fold_partials(partials, t, out[token0 + t], row0, min(2 * TILE_ROWS, num_rows - row0))
        release_tiles()
    return out


def matmul_amx_rows(xq: np.ndarray, xd: np.ndarray, xsum: np.ndarray, layout: AmxLayout, fmt: int) -> np.ndarray:
    """blockq.py's matmul on a laid-out matrix: xq (T, K) int8 codes or (T, 2, K) A16 digits, xd, xsum (T, K // 32)
    from blockq's quantizers (checked by the caller) -> (T, N) float32, the same bits."""
    return _matmul_amx_rows(xq, xd, xsum, layout.codes, layout.scales, layout.mins, layout.code_sums,
                            layout.num_rows, fmt, TILE_CONFIG, numba.get_num_threads())
