"""Ternary GEMM on AMX tiles (Intel Advanced Matrix Extensions, `tdpbusd`): the exact integer sums Σ c·q − Σ q of
engine/kernels/ternary.py's matmul_ternary, for batches of tokens (prefill, batched decode).

One `tdpbusd` multiplies a 16×64 tile of unsigned bytes by a 64×16 tile of signed bytes into 16×16 int32 sums:
16,384 multiply-adds, against 64 for a 512-bit `vpdpbusd`. The packed 2-bit codes are unpacked to one byte each
(16 weight rows × all of K, kept in L2) once per GEMM, and every token tile reuses them. Integer sums are exact, so
the result is bit-identical to the VNNI and portable kernels: greedy output does not depend on which one ran.

Callers check AMX_AVAILABLE (engine/kernels/amx.py) first.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from engine.kernels.amx import BYTE_PTR, data_pointer, declare

BLOCK_WEIGHTS = 256  # weights per packed block (engine/kernels/ternary.py)
BLOCK_BYTES = 64  # packed bytes per block: byte j holds weights j, j+64, j+128, j+192 in bit pairs 0-1 .. 6-7
CHUNK = 64  # K values per tile: 64 bytes per tile row
TILE_ROWS = 16  # weight rows per A tile, and tokens per B tile

_I8 = ir.IntType(8)
_I64 = ir.IntType(64)


def _tile_config() -> np.ndarray:
    """The 64-byte tile configuration (palette 1): tiles 0-3 hold C sums, 4-5 A codes, 6-7 B activations, each
    16 rows of 64 bytes."""
    config = np.zeros(64, dtype=np.uint8)
    config[0] = 1  # palette
    config[16:32].view(np.uint16)[:8] = CHUNK  # bytes per row of tiles 0..7
    config[48:56] = TILE_ROWS  # rows of tiles 0..7
    return config


_TILE_CONFIG = _tile_config()


@intrinsic
def _tile_block(typingctx, config, codes0, codes1, acts0, acts1, sums):
    """sums[2i + j] = codes_i (16 × K u8) · acts_j (K × 16 s8, VNNI order) as 16×16 int32, for i, j in {0, 1}.

    codes_i: (K / 64, 16, 64) uint8, chunk c holding rows' codes c·64 .. c·64 + 63; acts_j: (K / 64, 16, 64) int8,
    chunk c row r holding, for each of 16 tokens, its activations c·64 + 4r .. c·64 + 4r + 3; sums: (4, 16, 16) int32.
    """
    sig = types.void(config, codes0, codes1, acts0, acts1, sums)

    def codegen(context, builder, signature, args):
        config_ptr, a0, a1, b0, b1, c = (data_pointer(context, builder, t, v)
                                         for t, v in zip(signature.args, args, strict=True))
        num_chunks = builder.extract_value(context.make_array(signature.args[1])(context, builder, args[1]).shape, 0)
        tile_load = declare(builder, "llvm.x86.tileloadd64", [_I8, BYTE_PTR, _I64])
        dot = declare(builder, "llvm.x86.tdpbusd", [_I8, _I8, _I8])
        stride = ir.Constant(_I64, CHUNK)
        builder.call(declare(builder, "llvm.x86.ldtilecfg", [BYTE_PTR]), [config_ptr])
        for tile in range(4):
            builder.call(declare(builder, "llvm.x86.tilezero", [_I8]), [ir.Constant(_I8, tile)])
        with cgutils.for_range(builder, num_chunks) as loop:
            offset = builder.mul(loop.index, ir.Constant(_I64, TILE_ROWS * CHUNK))
            for tile, base in ((4, a0), (5, a1), (6, b0), (7, b1)):
                builder.call(tile_load, [ir.Constant(_I8, tile), builder.gep(base, [offset]), stride])
            for out, (a_tile, b_tile) in enumerate(((4, 6), (4, 7), (5, 6), (5, 7))):
                builder.call(dot, [ir.Constant(_I8, out), ir.Constant(_I8, a_tile), ir.Constant(_I8, b_tile)])
        tile_store = declare(builder, "llvm.x86.tilestored64", [_I8, BYTE_PTR, _I64])
        for tile in range(4):
            target = builder.gep(c, [ir.Constant(_I64, tile * TILE_ROWS * TILE_ROWS * 4)])
            builder.call(tile_store, [ir.Constant(_I8, tile), target, stride])
        builder.call(declare(builder, "llvm.x86.tilerelease", []), [])
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True, nogil=True, parallel=True)
def _activation_tiles(xq: np.ndarray, num_token_tiles: int) -> np.ndarray:
    """xq: (T, K) int8 -> (token tiles, K / 64, 16, 64) int8 B tiles; tokens past T are zero."""
    num_tokens, in_features = xq.shape
    words = xq.view(np.int32)  # (T, K / 4) int32: four consecutive activations stay together
    tiles = np.zeros((num_token_tiles, in_features // CHUNK, TILE_ROWS, CHUNK), np.int8)
    tile_words = tiles.view(np.int32)  # (token tiles, K / 64, 16, 16) int32: [tile, chunk, quad row, token]
    for tile in prange(num_token_tiles):
        for token in range(TILE_ROWS):
            source = tile * TILE_ROWS + token
            if source >= num_tokens:
                break
            for quad in range(in_features // 4):
                tile_words[tile, quad // TILE_ROWS, quad % TILE_ROWS, token] = words[source, quad]
    return tiles


@njit(cache=True, nogil=True)
def _unpack_rows(codes: np.ndarray, row0: int, out: np.ndarray) -> None:
    """Codes of rows row0 .. row0 + 15 (a row past the end repeats the last) -> out (K / 64, 16, 64) uint8, 0..2."""
    num_rows = codes.shape[0]
    for r in range(TILE_ROWS):
        row = min(row0 + r, num_rows - 1)
        for block in range(codes.shape[1] // BLOCK_BYTES):
            for pair in range(4):
                shift = 2 * pair
                chunk = out[block * 4 + pair, r]
                for j in range(BLOCK_BYTES):
                    chunk[j] = (codes[row, block * BLOCK_BYTES + j] >> shift) & 3


@njit(cache=True, nogil=True, parallel=True)
def _matmul_ternary_amx(xq: np.ndarray, act_sum: np.ndarray, codes: np.ndarray, config: np.ndarray,
                        num_threads: int) -> np.ndarray:
    num_tokens, in_features = xq.shape
    num_rows = codes.shape[0]
    num_chunks = in_features // CHUNK
    num_token_tiles = (num_tokens + TILE_ROWS - 1) // TILE_ROWS
    num_token_tiles += num_token_tiles % 2  # tiles go in pairs; the extra one is zero tokens
    acts = _activation_tiles(xq, num_token_tiles)  # (token tiles, K / 64, 16, 64) int8
    out = np.empty((num_tokens, num_rows), dtype=np.int32)  # (T, N) int32
    num_group_pairs = (num_rows + 2 * TILE_ROWS - 1) // (2 * TILE_ROWS)  # 32 weight rows: two A tiles
    num_parts = min(num_group_pairs, num_threads)  # one contiguous range of row pairs per thread
    for part in prange(num_parts):
        unpacked = np.empty((2, num_chunks, TILE_ROWS, CHUNK), np.uint8)  # two A tiles' rows, all of K
        sums = np.empty((4, TILE_ROWS, TILE_ROWS), np.int32)  # C tiles [A tile · 2 + B tile, row, token]
        for pair in range(part * num_group_pairs // num_parts, (part + 1) * num_group_pairs // num_parts):
            row0 = pair * 2 * TILE_ROWS
            _unpack_rows(codes, row0, unpacked[0])
            _unpack_rows(codes, row0 + TILE_ROWS, unpacked[1])
            for token_tile in range(0, num_token_tiles, 2):
                _tile_block(config, unpacked[0], unpacked[1], acts[token_tile], acts[token_tile + 1], sums)
                for a in range(2):
                    for b in range(2):
                        token0 = (token_tile + b) * TILE_ROWS
                        for r in range(TILE_ROWS):
                            row = row0 + a * TILE_ROWS + r
                            if row >= num_rows:
                                break
                            for t in range(min(TILE_ROWS, num_tokens - token0)):
                                out[token0 + t, row] = sums[2 * a + b, r, t] - act_sum[token0 + t]
    return out


def matmul_ternary_amx(xq: np.ndarray, act_sum: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """matmul_ternary on AMX tiles: xq (T, padded_k) int8, act_sum (T,) int32, codes (N, padded_k // 4) uint8
    -> (T, N) int32. Callers check shapes (engine/kernels/ternary.py) and AMX_AVAILABLE."""
    return _matmul_ternary_amx(xq, act_sum, codes, _TILE_CONFIG, numba.get_num_threads())
