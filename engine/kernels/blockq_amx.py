"""Block-quantized GEMM (Q4_0, Q4_1, Q8_0 weights; int8 or A16 activations) on AMX tiles, for batches of tokens.

Same bits as engine/kernels/blockq.py's VNNI and portable matmuls: each block's dot is an exact int32 from `tdpbusd`
(16 weight rows × 16 tokens × 32 codes per instruction), then scaled and added in blockq.py's fixed order, block b
into float32 partial sum b % 16, the 16 partial sums folded as the same tree. So greedy output does not depend on
the batch, whichever kernel a batch size picks.

Per 32 weight rows the codes are unpacked once to one byte each (all of K), then every 16-token tile reuses them.
Callers check AMX_AVAILABLE (engine/kernels/amx.py) first.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from engine.kernels.amx import BYTE_PTR, data_pointer, declare

BLOCK_SIZE = 32  # elements per GGUF block
TILE_ROWS = 16  # weight rows per A tile; tokens per B tile
_NUM_LANES = 16  # float32 partial sums per output, as in engine/kernels/blockq.py
_QUADS_PER_BLOCK = BLOCK_SIZE // 4  # B tile rows: four activations of each token per row

# Weight formats, as in engine/kernels/blockq.py
_FMT_Q4_0 = 0
_FMT_Q4_1 = 1
_FMT_Q8_0 = 2

_I8 = ir.IntType(8)
_I64 = ir.IntType(64)
_TILE_BYTES = TILE_ROWS * BLOCK_SIZE  # 512: one A tile (16 rows × 32 codes) or one B tile (8 rows × 64 bytes)


def _tile_config() -> np.ndarray:
    """Palette 1. Tiles 0-3 C sums (16 rows × 16 int32): [row group 0 coarse, 0 fine, 1 coarse, 1 fine]; tiles 4-5 A
    codes of the two row groups (16 rows × 32 bytes); tiles 6-7 B activations, coarse and fine digit (8 × 64 bytes)."""
    config = np.zeros(64, dtype=np.uint8)
    config[0] = 1
    bytes_per_row = config[16:48].view(np.uint16)
    bytes_per_row[0:4], config[48:52] = 64, TILE_ROWS
    bytes_per_row[4:6], config[52:54] = BLOCK_SIZE, TILE_ROWS
    bytes_per_row[6:8], config[54:56] = 64, _QUADS_PER_BLOCK
    return config


TILE_CONFIG = _tile_config()


@intrinsic
def _configure_tiles(typingctx, config):
    """Load the tile configuration for this thread (it stays until _release_tiles)."""

    def codegen(context, builder, signature, args):
        builder.call(declare(builder, "llvm.x86.ldtilecfg", [BYTE_PTR]),
                     [data_pointer(context, builder, signature.args[0], args[0])])
        return context.get_dummy_value()

    return types.void(config), codegen


@intrinsic
def _release_tiles(typingctx):
    def codegen(context, builder, signature, args):
        builder.call(declare(builder, "llvm.x86.tilerelease", []), [])
        return context.get_dummy_value()

    return types.void(), codegen


def _make_block_dots(num_digits: int):
    """An intrinsic (codes0, codes1, coarse, fine, sums, block): sums[2g + d] = codes_g[block] · digit_d[block] for row
    groups g and activation digits d (one digit: sums[0] and sums[2] only). codes_g: (num_blocks, 16, 32) uint8;
    coarse, fine: (num_blocks, 8, 64) int8 B tiles; sums: (4, 16, 16) int32. Needs _configure_tiles first."""

    def block_dots(typingctx, codes0, codes1, coarse, fine, sums, block):
        sig = types.void(codes0, codes1, coarse, fine, sums, block)

        def codegen(context, builder, signature, args):
            a0, a1, b0, b1, c = (data_pointer(context, builder, t, v)
                                 for t, v in zip(signature.args[:5], args[:5], strict=True))
            offset = builder.mul(context.cast(builder, args[5], signature.args[5], types.int64),
                                 ir.Constant(_I64, _TILE_BYTES))
            tile_load = declare(builder, "llvm.x86.tileloadd64", [_I8, BYTE_PTR, _I64])
            dot = declare(builder, "llvm.x86.tdpbusd", [_I8, _I8, _I8])
            zero = declare(builder, "llvm.x86.tilezero", [_I8])
            store = declare(builder, "llvm.x86.tilestored64", [_I8, BYTE_PTR, _I64])
            outputs = [(0, 4, 6), (2, 5, 6)] + ([(1, 4, 7), (3, 5, 7)] if num_digits == 2 else [])
            for out, _, _ in outputs:
                builder.call(zero, [ir.Constant(_I8, out)])
            loads = [(4, a0, BLOCK_SIZE), (5, a1, BLOCK_SIZE), (6, b0, 64)]
            if num_digits == 2:
                loads.append((7, b1, 64))
            for tile, base, stride in loads:
                pointer = builder.gep(base, [offset])
                builder.call(tile_load, [ir.Constant(_I8, tile), pointer, ir.Constant(_I64, stride)])
            for out, a_tile, b_tile in outputs:
                builder.call(dot, [ir.Constant(_I8, out), ir.Constant(_I8, a_tile), ir.Constant(_I8, b_tile)])
            for out, _, _ in outputs:
                target = builder.gep(c, [ir.Constant(_I64, out * TILE_ROWS * TILE_ROWS * 4)])
                builder.call(store, [ir.Constant(_I8, out), target, ir.Constant(_I64, 64)])
            return context.get_dummy_value()

        return sig, codegen

    block_dots.__name__ = f"_block_dots_{num_digits}"
    return intrinsic(block_dots)


_block_dots_int8 = _make_block_dots(1)
_block_dots_a16 = _make_block_dots(2)


_FLOATS = ir.VectorType(ir.FloatType(), TILE_ROWS)  # one row of a tile: 16 tokens
_INTS = ir.VectorType(ir.IntType(32), TILE_ROWS)


def _vector_at(builder: ir.IRBuilder, base: ir.Value, byte_offset: ir.Value, vector_type) -> ir.Value:
    """Pointer to the 64-byte vector at base + byte_offset (numpy arrays are not 64-byte aligned)."""
    return builder.bitcast(builder.gep(base, [byte_offset]), vector_type.as_pointer())


def _make_scale_block(fmt: int, num_digits: int):
    """An intrinsic (sums, partials, wd, wm, row0, block, token_scales, token_sums, token_corrections): for each of the
    32 rows r of a pair, partials[r, block % 16, :] += the block's scaled dots of its 16 tokens, in blockq.py's order:
    float(dot) · (wd · xd) + wm · (xd · Σq) for Q4_1, float(dot - correction) · (wd · xd) otherwise; dot =
    coarse · 256 + fine with A16 digits. sums: (4, 16, 16) int32 from the block's tdpbusd; partials (32, 16, 16)
    float32; wd, wm (N, num_blocks) float32; token_*: (16,) for this token tile and block. Rows past N repeat N - 1."""

    def scale_block(typingctx, sums, partials, wd, wm, row0, block, token_scales, token_sums, token_corrections):
        sig = types.void(sums, partials, wd, wm, row0, block, token_scales, token_sums, token_corrections)

        def codegen(context, builder, signature, args):
            sums_ptr, partials_ptr, wd_ptr, wm_ptr = (data_pointer(context, builder, t, v)
                                                      for t, v in zip(signature.args[:4], args[:4], strict=True))
            scales_ptr, token_sums_ptr, corrections_ptr = (data_pointer(context, builder, t, v)
                                                          for t, v in zip(signature.args[6:], args[6:], strict=True))
            first_row = context.cast(builder, args[4], signature.args[4], types.int64)
            block_index = context.cast(builder, args[5], signature.args[5], types.int64)
            wd_array = context.make_array(signature.args[2])(context, builder, args[2])
            num_rows = builder.extract_value(wd_array.shape, 0)
            num_blocks = builder.extract_value(wd_array.shape, 1)
            zero = ir.Constant(_I64, 0)
            token_scales_vec = builder.load(_vector_at(builder, scales_ptr, zero, _FLOATS), align=4)
            if fmt == _FMT_Q4_1:
                token_sums_vec = builder.load(_vector_at(builder, token_sums_ptr, zero, _FLOATS), align=4)
            else:
                corrections_vec = builder.load(_vector_at(builder, corrections_ptr, zero, _INTS), align=4)
            lane_offset = builder.mul(builder.urem(block_index, ir.Constant(_I64, _NUM_LANES)), ir.Constant(_I64, 64))
            last_row = builder.sub(num_rows, ir.Constant(_I64, 1))
            for r in range(2 * TILE_ROWS):
                row = builder.add(first_row, ir.Constant(_I64, r))
                row = builder.select(builder.icmp_signed(">", row, last_row), last_row, row)
                scale_offset = builder.mul(builder.add(builder.mul(row, num_blocks), block_index), ir.Constant(_I64, 4))
                group, row_in_tile = divmod(r, TILE_ROWS)
                coarse_offset = ir.Constant(_I64, (2 * group * TILE_ROWS + row_in_tile) * 64)
                dot = builder.load(_vector_at(builder, sums_ptr, coarse_offset, _INTS), align=4)
                if num_digits == 2:
                    fine_offset = ir.Constant(_I64, ((2 * group + 1) * TILE_ROWS + row_in_tile) * 64)
                    fine = builder.load(_vector_at(builder, sums_ptr, fine_offset, _INTS), align=4)
                    dot = builder.add(builder.shl(dot, ir.Constant(_INTS, [ir.Constant(ir.IntType(32), 8)] * 16)),
                                      fine)
                if fmt != _FMT_Q4_1:
                    dot = builder.sub(dot, corrections_vec)
                weight_scale = builder.load(builder.bitcast(builder.gep(wd_ptr, [scale_offset]),
                                                            ir.FloatType().as_pointer()))
                splat = builder.insert_element(ir.Constant(_FLOATS, None), weight_scale, ir.Constant(ir.IntType(32), 0))
                splat = builder.shuffle_vector(splat, splat, ir.Constant(_INTS, None))
                product = builder.fmul(builder.sitofp(dot, _FLOATS), builder.fmul(splat, token_scales_vec))
                if fmt == _FMT_Q4_1:
                    weight_min = builder.load(builder.bitcast(builder.gep(wm_ptr, [scale_offset]),
                                                              ir.FloatType().as_pointer()))
                    min_splat = builder.insert_element(ir.Constant(_FLOATS, None), weight_min,
                                                       ir.Constant(ir.IntType(32), 0))
                    min_splat = builder.shuffle_vector(min_splat, min_splat, ir.Constant(_INTS, None))
                    product = builder.fadd(product, builder.fmul(min_splat, token_sums_vec))
                target = _vector_at(builder, partials_ptr, builder.add(ir.Constant(_I64, r * _NUM_LANES * 64),
                                                                        lane_offset), _FLOATS)
                builder.store(builder.fadd(builder.load(target, align=4), product), target, align=4)
            return context.get_dummy_value()

        return sig, codegen

    scale_block.__name__ = f"_scale_block_{fmt}_{num_digits}"
    return intrinsic(scale_block)


_SCALE_BLOCK = {(fmt, digits): _make_scale_block(fmt, digits) for fmt in (_FMT_Q4_0, _FMT_Q4_1, _FMT_Q8_0)
                for digits in (1, 2)}
_scale_q4_0_int8, _scale_q4_0_a16 = _SCALE_BLOCK[_FMT_Q4_0, 1], _SCALE_BLOCK[_FMT_Q4_0, 2]
_scale_q4_1_int8, _scale_q4_1_a16 = _SCALE_BLOCK[_FMT_Q4_1, 1], _SCALE_BLOCK[_FMT_Q4_1, 2]
_scale_q8_0_int8, _scale_q8_0_a16 = _SCALE_BLOCK[_FMT_Q8_0, 1], _SCALE_BLOCK[_FMT_Q8_0, 2]


@intrinsic
def _fold_partials(typingctx, partials, row):
    """partials[row, 0, :] = the 16 partial sums of each token folded in blockq.py's fixed tree: lane i + lane i+8,
    then i + i+4, i + i+2, 0 + 1. partials: (32, 16, 16) float32."""
    sig = types.void(partials, row)

    def codegen(context, builder, signature, args):
        base = data_pointer(context, builder, signature.args[0], args[0])
        row_offset = builder.mul(context.cast(builder, args[1], signature.args[1], types.int64),
                                 ir.Constant(_I64, _NUM_LANES * 64))
        pointers = [_vector_at(builder, base, builder.add(row_offset, ir.Constant(_I64, lane * 64)), _FLOATS)
                    for lane in range(_NUM_LANES)]
        lanes = [builder.load(pointer, align=4) for pointer in pointers]
        width = _NUM_LANES // 2
        while width >= 1:
            lanes = [builder.fadd(lanes[lane], lanes[lane + width]) for lane in range(width)]
            width //= 2
        builder.store(lanes[0], pointers[0], align=4)
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True, nogil=True)
def _unpack_codes(wq: np.ndarray, row0: int, fmt: int, out: np.ndarray) -> None:
    """Rows row0 .. row0 + 15 of wq (a row past the end repeats the last) -> out (num_blocks, 16, 32) uint8, element k
    of each block as an unsigned code: the nibble (Q4, kernel order as in blockq.py), or w + 128 (Q8_0, GGUF order)."""
    num_rows = wq.shape[0]
    num_blocks = out.shape[0]
    num_grouped = 0 if fmt == _FMT_Q8_0 else num_blocks // 16 * 16  # blocks in interleaved groups of 16
    for r in range(TILE_ROWS):
        row = min(row0 + r, num_rows - 1)
        for block in range(num_blocks):
            codes = out[block, r]
            if fmt == _FMT_Q8_0:
                for j in range(BLOCK_SIZE):
                    codes[j] = wq[row, block * BLOCK_SIZE + j] ^ 128
                continue
            # Q4 byte j holds elements j (low nibble) and j + 16 (high); kernel order interleaves 4-byte quads of 16
            # blocks at a 64-byte stride, the row's tail blocks stay whole (engine/kernels/blockq.py).
            if block < num_grouped:
                base, stride = block // 16 * 256 + block % 16 * 4, 64
            else:
                base, stride = block * 16, 4
            for j in range(16):
                code = wq[row, base + j // 4 * stride + j % 4]
                codes[j] = code & 15
                codes[j + 16] = code >> 4


@njit(cache=True, nogil=True)
def _activation_tiles(
    digits: np.ndarray, xd: np.ndarray, xsum: np.ndarray, fmt: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """digits (T, num_digits, K) int8 -> B tiles (num_digits, token tiles, num_blocks, 8, 64) int8 (row q of a block's
    tile: the activations 4q .. 4q + 3 of each of 16 tokens; tokens past T are zero), and per token tile and block
    (token tiles, num_blocks, 16): xd float32, xd · Σq float32 (Q4_1), and the offset correction int32 (8 · Σq for
    Q4_0, 128 · Σq for Q8_0, where q is the whole code, digits combined)."""
    num_tokens, num_digits, in_features = digits.shape
    num_blocks = in_features // BLOCK_SIZE
    num_tiles = (num_tokens + TILE_ROWS - 1) // TILE_ROWS
    tiles = np.zeros((num_digits, num_tiles, num_blocks, _QUADS_PER_BLOCK, 64), np.int8)
    tile_words = tiles.view(np.int32)  # (digits, tiles, blocks, 8, 16) int32: [.., quad row, token]
    scales = np.zeros((num_tiles, num_blocks, TILE_ROWS), np.float32)
    scaled_sums = np.zeros((num_tiles, num_blocks, TILE_ROWS), np.float32)
    corrections = np.zeros((num_tiles, num_blocks, TILE_ROWS), np.int32)
    correction = 128 if fmt == _FMT_Q8_0 else 8 if fmt == _FMT_Q4_0 else 0
    for token in range(num_tokens):
        tile, t = token // TILE_ROWS, token % TILE_ROWS
        for digit in range(num_digits):
            words = digits[token, digit].view(np.int32)  # (K / 4,) int32: quads stay together
            for quad in range(in_features // 4):
                tile_words[digit, tile, quad // _QUADS_PER_BLOCK, quad % _QUADS_PER_BLOCK, t] = words[quad]
        for block in range(num_blocks):
            total = np.int32(0)  # the block's Σ codes, digits combined most significant first, base 256
            for digit in range(num_digits):
                digit_sum = np.int32(0)
                for col in range(block * BLOCK_SIZE, (block + 1) * BLOCK_SIZE):
                    digit_sum += np.int32(digits[token, digit, col])
                total = total * np.int32(256) + digit_sum
            scales[tile, block, t] = xd[token, block]
            scaled_sums[tile, block, t] = xd[token, block] * np.float32(xsum[token, block])
            corrections[tile, block, t] = correction * total
    return tiles, scales, scaled_sums, corrections


@njit(cache=True, nogil=True)
def _scale_block(sums: np.ndarray, partials: np.ndarray, wd: np.ndarray, wm: np.ndarray, row0: int, block: int,
                 token_scales: np.ndarray, token_sums: np.ndarray, token_corrections: np.ndarray, fmt: int,
                 num_digits: int) -> None:
    """The scale-and-add intrinsic for this format and activation kind (see _make_scale_block)."""
    args = (sums, partials, wd, wm, row0, block, token_scales, token_sums, token_corrections)
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
def _matmul_amx(
    xq: np.ndarray, xd: np.ndarray, xsum: np.ndarray, wq: np.ndarray, wd: np.ndarray, wm: np.ndarray, fmt: int,
    config: np.ndarray, num_threads: int,
) -> np.ndarray:
    num_tokens = xq.shape[0]
    num_rows, num_blocks = wd.shape
    digits = xq.reshape((num_tokens, -1, num_blocks * BLOCK_SIZE))  # (T, num_digits, K) int8
    num_digits = digits.shape[1]
    tiles, scales, scaled_sums, corrections = _activation_tiles(digits, xd, xsum, fmt)
    num_tiles = tiles.shape[1]
    out = np.empty((num_tokens, num_rows), np.float32)  # (T, N) float32
    num_pairs = (num_rows + 2 * TILE_ROWS - 1) // (2 * TILE_ROWS)  # 32 weight rows: two A tiles
    num_parts = min(num_pairs, num_threads)  # one contiguous range of row pairs per thread
    for part in prange(num_parts):
        codes = np.empty((2, num_blocks, TILE_ROWS, BLOCK_SIZE), np.uint8)  # the pair's unpacked codes, all of K
        sums = np.zeros((4, TILE_ROWS, TILE_ROWS), np.int32)  # one block's C tiles
        lanes = np.empty((2 * TILE_ROWS, _NUM_LANES, TILE_ROWS), np.float32)  # [row, partial sum, token]
        _configure_tiles(config)
        for pair in range(part * num_pairs // num_parts, (part + 1) * num_pairs // num_parts):
            row0 = pair * 2 * TILE_ROWS
            _unpack_codes(wq, row0, fmt, codes[0])
            _unpack_codes(wq, row0 + TILE_ROWS, fmt, codes[1])
            for tile in range(num_tiles):
                lanes[:] = 0
                for block in range(num_blocks):
                    if num_digits == 2:
                        _block_dots_a16(codes[0], codes[1], tiles[0, tile], tiles[1, tile], sums, block)
                    else:
                        _block_dots_int8(codes[0], codes[1], tiles[0, tile], tiles[0, tile], sums, block)
                    _scale_block(sums, lanes, wd, wm, row0, block, scales[tile, block], scaled_sums[tile, block],
                                 corrections[tile, block], fmt, num_digits)
                for r in range(min(2 * TILE_ROWS, num_rows - row0)):
                    _fold_partials(lanes, r)
                    for t in range(min(TILE_ROWS, num_tokens - tile * TILE_ROWS)):
                        out[tile * TILE_ROWS + t, row0 + r] = lanes[r, 0, t]
        _release_tiles()
    return out


def matmul_amx(xq: np.ndarray, xd: np.ndarray, xsum: np.ndarray, wq: np.ndarray, wd: np.ndarray, wm: np.ndarray,
               fmt: int) -> np.ndarray:
    """blockq.py's matmul on AMX tiles, same arguments (checked by the caller) and the same bits."""
    return _matmul_amx(xq, xd, xsum, wq, wd, wm, fmt, TILE_CONFIG, numba.get_num_threads())
