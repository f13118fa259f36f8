"""GGUF block kernels (Q4_0, Q4_1, Q8_0), the float32 matmul and their Linear layers, against gguf's own numpy
(de)quantizers and slow, obvious numpy references; every kernel path, int8 and A16 (16-bit) activations, odd shapes,
batch invariance."""

from __future__ import annotations

import gguf
import numba
import numpy as np
import pytest

from engine.formats.ggml import GGMLType
from engine.kernels import amx, cpu_features
from engine.kernels import blockq as bq
from engine.kernels.blockq_amx_rows import MIN_TOKENS, lay_out, matmul_amx_rows
from engine.kernels.dense import matmul_f32
from engine.linear.block import BlockQuantLinear
from engine.linear.dense import DenseLinear

HAS_VNNI = cpu_features.detect_cpu_features().has_avx512_vnni
PATHS = [
    "portable",
    "simd",
    pytest.param("avx512_vnni", marks=pytest.mark.skipif(not HAS_VNNI, reason="CPU or JIT target lacks AVX-512 VNNI")),
]
MATMUL_PATHS = [
    *PATHS,
    pytest.param("amx", marks=pytest.mark.skipif(not amx.AMX_AVAILABLE, reason="no AMX on this CPU or kernel")),
]


def _matmul_amx(xq: np.ndarray, xd: np.ndarray, xsum: np.ndarray, wq: np.ndarray, wd: np.ndarray, wm: np.ndarray,
                fmt: int) -> np.ndarray:
    """The AMX kernel behind the other paths' signature (fp16 scales): lays the matrix out, then multiplies."""
    return matmul_amx_rows(xq, xd, xsum, lay_out(wq, bq.halves_to_float32(wd), bq.halves_to_float32(wm), fmt), fmt)


MATMUL = {"portable": bq._matmul_portable, "simd": bq._matmul_simd, "avx512_vnni": bq._matmul_vnni,
          "amx": _matmul_amx}
QUANTIZE_MATMUL = {
    "portable": bq._quantize_matmul_portable, "simd": bq._quantize_matmul_simd, "avx512_vnni": bq._quantize_matmul_vnni
}
QUANTIZE_A16_MATMUL = {
    "portable": bq._quantize_a16_matmul_portable, "simd": bq._quantize_a16_matmul_simd,
    "avx512_vnni": bq._quantize_a16_matmul_vnni,
}
FORMATS = [GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q8_0]
ACTIVATION_BITS = [8, 16]
_FMT = {GGMLType.Q4_0: bq._FMT_Q4_0, GGMLType.Q4_1: bq._FMT_Q4_1, GGMLType.Q8_0: bq._FMT_Q8_0}

ROW_COUNTS = [1, 3, 33, 100]
# 1, 3, 15, 18 and 33 blocks: rows with only a tail, one or two interleaved 16-block groups plus a tail.
IN_FEATURES = [32, 96, 480, 576, 1056]
TOKEN_COUNTS = [1, 2, 5, 17]


def quantize_activations(x: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(xq, xd, xsum): int8 codes (T, K) for 8 bits, A16 digits (T, 2, K) for 16."""
    return bq.quantize_q8_blocks(x) if bits == 8 else bq.quantize_a16_blocks(x)


def activation_codes(xq: np.ndarray) -> np.ndarray:
    """(T, K) int64: the integer each activation stands for before its block scale (A16: 256·coarse + fine)."""
    if xq.ndim == 2:
        return xq.astype(np.int64)
    return 256 * xq[:, 0].astype(np.int64) + xq[:, 1]


def run_matmul(path: str, ggml_type: GGMLType, xq, xd, xsum, layer: BlockQuantLinear) -> np.ndarray:
    """One kernel path called directly, whatever path the module chose at import; int8 or A16 by xq's shape."""
    wm = layer.wm if layer.wm is not None else layer.wd
    return MATMUL[path](xq, xd, xsum, layer.wq.view(np.uint8), layer.wd, wm, _FMT[ggml_type])


def random_weights(rng: np.random.Generator, num_rows: int, in_features: int) -> np.ndarray:
    """Gaussian rows with a per-row scale spread and some all-zero and constant blocks, like odd real tensors."""
    w = rng.standard_normal((num_rows, in_features)).astype(np.float32)
    w *= rng.uniform(0.01, 3.0, size=(num_rows, 1)).astype(np.float32)
    if in_features >= 64:
        w[0, 32:64] = 0.0
        w[-1, :32] = 0.75
    return w


def signed_values(layer: BlockQuantLinear) -> np.ndarray:
    """(N, K) int64: the integer each weight code stands for before its scale (GGUF element order)."""
    if layer.ggml_type == GGMLType.Q8_0:
        return layer.wq.astype(np.int64)  # Q8_0 codes stay in GGUF order
    codes = bq.to_gguf_order(layer.wq)
    blocks = codes.reshape(layer.out_features, -1, 16).astype(np.int64)
    nibbles = np.concatenate([blocks & 15, blocks >> 4], axis=2).reshape(layer.out_features, -1)
    return nibbles - 8 if layer.ggml_type == GGMLType.Q4_0 else nibbles


def block_dots(layer: BlockQuantLinear, xq: np.ndarray) -> np.ndarray:
    """(T, N, K // 32) int64 exact per-block dot products Σ value·code."""
    values = signed_values(layer).reshape(layer.out_features, -1, 32)
    acts = activation_codes(xq).reshape(xq.shape[0], -1, 32)
    return np.einsum("tbk,nbk->tnb", acts, values)


def block_products_f32(layer: BlockQuantLinear, xq, xd, xsum) -> np.ndarray:
    """(T, N, K // 32) float32 scaled block terms, each rounding in the order the kernels use."""
    scales = bq.halves_to_float32(layer.wd)[None, :, :] * xd[:, None, :]
    products = block_dots(layer, xq).astype(np.float32) * scales
    if layer.ggml_type == GGMLType.Q4_1:
        products = products + bq.halves_to_float32(layer.wm)[None, :, :] * (xd * xsum.astype(np.float32))[:, None, :]
    return products


def lane_ordered_sum(terms: np.ndarray) -> np.ndarray:
    """(..., num_terms) float32 -> (...) float32: term i into partial sum i % 16, then the fixed tree i + i+8, ..."""
    lanes = np.zeros((*terms.shape[:-1], 16), np.float32)
    for i in range(terms.shape[-1]):
        lanes[..., i % 16] += terms[..., i]
    width = 16
    while width > 1:
        width //= 2
        lanes = lanes[..., :width] + lanes[..., width : 2 * width]
    return lanes[..., 0]


def test_quantized_bytes_match_gguf_reference() -> None:
    rng = np.random.default_rng(0)
    w = random_weights(rng, 37, 576)
    # Ties at the Q8_0 rounding boundary: with max|block| = 127 the scale is 1 and x.5 must round away from zero.
    w[1, :32] = np.arange(32, dtype=np.float32) - 15.5
    w[1, 31] = 127.0
    # Q4_0 keeps the first value of largest magnitude, sign included.
    w[2, :32] = 0.5
    w[2, 3], w[2, 9] = -2.0, 2.0
    for ggml_type in FORMATS:
        ours = BlockQuantLinear.quantize(w, ggml_type).to_gguf_blocks()
        theirs = gguf.quants.quantize(w, gguf.GGMLQuantizationType(ggml_type.value))
        np.testing.assert_array_equal(ours, theirs, err_msg=ggml_type.name)


def test_kernel_order_interleaves_full_groups_only() -> None:
    block_bytes = 16
    num_blocks = 35  # two full groups of 16 and a tail of 3
    codes = np.arange(2 * num_blocks * block_bytes).reshape(2, -1).astype(np.uint8)
    ordered = bq.to_kernel_order(codes)
    group, block, byte = 1, 5, 9  # byte 9 of block 16 + 5 of row 1
    expected_at = group * 16 * block_bytes + byte // 4 * 64 + block * 4 + byte % 4
    assert ordered[1, expected_at] == codes[1, (16 * group + block) * block_bytes + byte]
    tail_start = 32 * block_bytes
    np.testing.assert_array_equal(ordered[:, tail_start:], codes[:, tail_start:])
    np.testing.assert_array_equal(bq.to_gguf_order(ordered), codes)
    assert not np.array_equal(ordered, codes)
    with pytest.raises(ValueError, match="uint8 Q4"):
        bq.to_kernel_order(codes.view(np.int8))


def test_activation_quantizer_matches_gguf_q8_0() -> None:
    rng = np.random.default_rng(1)
    x = random_weights(rng, 5, 96) * 40.0
    xq, xd, xsum = bq.quantize_q8_blocks(x)
    reference = gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0).reshape(5, 3, 34)
    np.testing.assert_array_equal(xq.view(np.uint8).reshape(5, 3, 32), reference[:, :, 2:])
    np.testing.assert_array_equal(xd.astype("<f2").view(np.uint8).reshape(5, 3, 2), reference[:, :, :2])
    np.testing.assert_array_equal(xd, (np.abs(x).reshape(5, 3, 32).max(axis=2) / np.float32(127)))
    np.testing.assert_array_equal(xsum, xq.reshape(5, 3, 32).sum(axis=2, dtype=np.int64))
    zeros_q, zeros_d, zeros_sum = bq.quantize_q8_blocks(np.zeros((2, 32), np.float32))
    assert not zeros_q.any() and not zeros_d.any() and not zeros_sum.any()


def test_a16_quantizer_is_a_16_bit_rounding() -> None:
    rng = np.random.default_rng(8)
    x = random_weights(rng, 5, 96) * 40.0
    x[2, :32] = np.linspace(-3.0, 3.0, 32, dtype=np.float32)  # exact extremes and ties at several scales
    x[3, 32:64] = 1e-36  # below the smallest normal scale: coded as zero, never inf or NaN
    xq, xd, xsum = bq.quantize_a16_blocks(x)
    assert xq.shape == (5, 2, 96) and xq.dtype == np.int8 and xd.dtype == np.float32 and xsum.dtype == np.int32
    coarse, fine = xq[:, 0].astype(np.int64), xq[:, 1].astype(np.int64)
    assert coarse.min() >= -127 and coarse.max() <= 127 and fine.min() >= -128 and fine.max() <= 127
    blocks = x.reshape(5, 3, 32)
    amax = np.abs(blocks).max(axis=2)
    expected_scale = np.where(amax / np.float32(32512) < np.finfo(np.float32).tiny, 0, amax / np.float32(32512))
    np.testing.assert_array_equal(xd, expected_scale.astype(np.float32))
    # c = round(x / d) with float32 x · (1 / d), ties away from zero, written as 256·coarse + fine.
    inverse = np.divide(np.float32(1), xd, out=np.zeros_like(xd), where=xd != 0)
    scaled = blocks * inverse[:, :, None]
    codes = (np.sign(scaled) * np.floor(np.abs(scaled) + np.float32(0.5))).astype(np.int64).reshape(5, 96)
    np.testing.assert_array_equal(activation_codes(xq), codes)
    np.testing.assert_array_equal(xsum, codes.reshape(5, 3, 32).sum(axis=2))
    assert np.abs(codes).max() == 32512 and not codes[3, 32:64].any() and xd[3, 1] == 0
    # Half a 16-bit step per value; the coarse digit is the int8 mode's code give or take one at its ties.
    error = np.abs(x.astype(np.float64) - np.repeat(xd.astype(np.float64), 32, axis=1) * codes)
    assert np.all(error <= np.repeat(xd.astype(np.float64), 32, axis=1) * (0.5 + 1e-3) + 1e-33)
    q8, _, _ = bq.quantize_q8_blocks(x)
    coded = np.repeat(xd != 0, 32, axis=1)  # the int8 mode still codes the tiny block
    assert np.abs(coarse - q8)[coded].max() <= 1 and np.mean((coarse == q8)[coded]) > 0.95


@pytest.mark.parametrize("ggml_type", FORMATS)
def test_load_and_dequantize_match_gguf_reference(ggml_type: GGMLType) -> None:
    rng = np.random.default_rng(2)
    w = random_weights(rng, 33, 96)
    raw = gguf.quants.quantize(w, gguf.GGMLQuantizationType(ggml_type.value))  # (33, row_bytes) uint8
    layer = BlockQuantLinear.from_gguf_blocks(ggml_type, raw, 96)
    expected = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(ggml_type.value))
    np.testing.assert_array_equal(layer.dequantize_rows(np.arange(33)), expected)
    row_ids = np.array([32, 0, 7, 7], dtype=np.int64)
    np.testing.assert_array_equal(layer.dequantize_rows(row_ids), expected[row_ids])
    np.testing.assert_array_equal(layer.to_gguf_blocks(), raw)
    assert (layer.out_features, layer.in_features) == (33, 96)
    code_bytes = {GGMLType.Q4_0: 16, GGMLType.Q4_1: 16, GGMLType.Q8_0: 32}[ggml_type]
    num_scale_arrays = 2 if ggml_type == GGMLType.Q4_1 else 1
    assert layer.num_bytes == 33 * 3 * (code_bytes + 2 * num_scale_arrays)  # fp16 scales, as GGUF stores them


@pytest.mark.parametrize("path", PATHS)
def test_every_fp16_scale_is_widened_exactly(path: str) -> None:
    """Each kernel path widens the stored half scales itself (integer moves, no F16C): one Q8_0 row per half bit
    pattern, weight 1 against activation 1, gives back exactly that scale, subnormals, zeros and infinities included."""
    halves = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    halves = halves[~np.isnan(halves.view(np.float16))]  # (63490,) uint16: every half but the 2046 NaNs
    wq = np.zeros((halves.size, 32), np.int8)
    wq[:, 0] = 1
    xq = np.zeros((1, 32), np.int8)
    xq[0, 0] = 1
    xd = np.ones((1, 1), np.float32)
    y = MATMUL[path](xq, xd, np.ones((1, 1), np.int32), wq.view(np.uint8), halves.reshape(-1, 1),
                     halves.reshape(-1, 1), bq._FMT_Q8_0)[0]
    expected = halves.view(np.float16).astype(np.float32)
    np.testing.assert_array_equal(y, expected)  # -0.0 comes back as +0.0 through the lane sums: equal as floats
    rows = bq.dequantize_rows_q8_0(wq, halves.reshape(-1, 1), np.arange(halves.size))
    np.testing.assert_array_equal(rows[:, 0].view(np.int32), expected.view(np.int32))


@pytest.mark.parametrize("bits", ACTIVATION_BITS)
@pytest.mark.parametrize("path", MATMUL_PATHS)
@pytest.mark.parametrize("ggml_type", FORMATS)
@pytest.mark.parametrize("in_features", IN_FEATURES)
def test_matmul_matches_integer_reference(path: str, ggml_type: GGMLType, in_features: int, bits: int) -> None:
    rng = np.random.default_rng(in_features)
    for num_rows, num_tokens in zip(ROW_COUNTS, TOKEN_COUNTS[::-1], strict=True):
        layer = BlockQuantLinear.quantize(random_weights(rng, num_rows, in_features), ggml_type)
        x = rng.standard_normal((num_tokens, in_features)).astype(np.float32) * 3
        xq, xd, xsum = quantize_activations(x, bits)
        y = run_matmul(path, ggml_type, xq, xd, xsum, layer)
        assert y.shape == (num_tokens, num_rows) and y.dtype == np.float32
        # Same float32 roundings in the same order: equal bits.
        np.testing.assert_array_equal(y, lane_ordered_sum(block_products_f32(layer, xq, xd, xsum)))
        # Against exact integers and float64 scales: float32 rounding only.
        # The bound counts both Q4_1 terms, which cancel (negative minimums), by magnitude.
        scales = bq.halves_to_float32(layer.wd).astype(np.float64)
        products = block_dots(layer, xq) * (scales[None] * xd.astype(np.float64)[:, None])
        magnitudes = np.abs(products)
        if ggml_type == GGMLType.Q4_1:
            minimums = bq.halves_to_float32(layer.wm).astype(np.float64)
            min_terms = minimums[None] * (xd.astype(np.float64) * xsum)[:, None]
            products, magnitudes = products + min_terms, magnitudes + np.abs(min_terms)
        num_blocks = in_features // 32
        bound = (num_blocks + 8) * 2.0**-24 * magnitudes.sum(axis=2)
        assert np.all(np.abs(y - products.sum(axis=2)) <= bound)


@pytest.mark.parametrize("bits", ACTIVATION_BITS)
@pytest.mark.parametrize("ggml_type", FORMATS)
def test_matmul_close_to_float_product(ggml_type: GGMLType, bits: int) -> None:
    """Only activation rounding separates the layer from x @ dequantized(W).T: at most half a step per value."""
    rng = np.random.default_rng(3)
    layer = BlockQuantLinear.quantize(random_weights(rng, 100, 576), ggml_type, activation_bits=bits)
    x = rng.standard_normal((5, 576)).astype(np.float32)
    w = layer.dequantize_rows(np.arange(100)).astype(np.float64)
    y = layer(x)
    _, xd, _ = quantize_activations(x, bits)
    step_bound = 0.5 * np.einsum("tb,nb->tn", xd.astype(np.float64), np.abs(w).reshape(100, 18, 32).sum(axis=2))
    error = np.abs(y - x.astype(np.float64) @ w.T)
    assert np.all(error <= step_bound * 1.001 + 1e-4)
    assert error.max() > 0  # the bound is not vacuous: activations really were quantized


@pytest.mark.parametrize("ggml_type", FORMATS)
def test_a16_error_far_below_int8(ggml_type: GGMLType) -> None:
    """A16's 16-bit codes: the error against the float product of the same weights is ~256x below int8's."""
    rng = np.random.default_rng(9)
    layer = BlockQuantLinear.quantize(random_weights(rng, 100, 1536), ggml_type)
    assert layer.activation_bits == 16  # the default
    x = rng.standard_normal((5, 1536)).astype(np.float32) * np.float32(0.1)
    x[:, ::97] = 20.0  # outlier features, as in real hidden states
    exact = x.astype(np.float64) @ layer.dequantize_rows(np.arange(100)).astype(np.float64).T
    error_a16 = np.abs(layer(x) - exact)
    error_int8 = np.abs(layer.matmul_int8(x) - exact)
    assert error_a16.max() * 50 <= error_int8.max()
    assert np.sqrt(np.mean(error_a16**2)) * 50 <= np.sqrt(np.mean(error_int8**2))


@pytest.mark.parametrize("bits", ACTIVATION_BITS)
@pytest.mark.parametrize("path", MATMUL_PATHS)
@pytest.mark.parametrize("ggml_type", FORMATS)
def test_batch_invariance_and_paths_agree(path: str, ggml_type: GGMLType, bits: int) -> None:
    rng = np.random.default_rng(4)
    layer = BlockQuantLinear.quantize(random_weights(rng, 33, 576), ggml_type)
    xq, xd, xsum = quantize_activations(rng.standard_normal((17, 576)).astype(np.float32), bits)
    batch = run_matmul(path, ggml_type, xq, xd, xsum, layer)
    for token in range(17):
        one = slice(token, token + 1)
        single = run_matmul(path, ggml_type, xq[one], xd[one], xsum[one], layer)
        np.testing.assert_array_equal(batch[token : token + 1], single)
    np.testing.assert_array_equal(batch[5:10], run_matmul(path, ggml_type, xq[5:10], xd[5:10], xsum[5:10], layer))
    np.testing.assert_array_equal(batch, run_matmul("portable", ggml_type, xq, xd, xsum, layer))


@pytest.mark.parametrize("bits", ACTIVATION_BITS)
@pytest.mark.parametrize("ggml_type", FORMATS)
def test_served_batches_equal_single_tokens(ggml_type: GGMLType, bits: int) -> None:
    """Through the layer, as served: a batch long enough for the AMX kernel (where there is one) gives each token the
    bits of its own single-token GEMV."""
    rng = np.random.default_rng(12)
    layer = BlockQuantLinear.quantize(random_weights(rng, 45, 1056), ggml_type, activation_bits=bits)
    x = rng.standard_normal((MIN_TOKENS + 3, 1056)).astype(np.float32)
    batch, batch_int8 = layer(x), layer.matmul_int8(x)
    for token in range(x.shape[0]):
        np.testing.assert_array_equal(batch[token], layer(x[token:token + 1])[0])
        np.testing.assert_array_equal(batch_int8[token], layer.matmul_int8(x[token:token + 1])[0])
    with pytest.raises(ValueError, match="in_features"):
        layer(np.zeros((MIN_TOKENS, 1024), np.float32))


@pytest.mark.parametrize("path", PATHS)
def test_fused_quantize_matmul_equals_two_steps(path: str) -> None:
    rng = np.random.default_rng(5)
    x = rng.standard_normal((5, 96)).astype(np.float32)
    xq, xd, xsum = bq.quantize_q8_blocks(x)
    fused = QUANTIZE_MATMUL[path]
    for ggml_type in FORMATS:
        layer = BlockQuantLinear.quantize(random_weights(rng, 7, 96), ggml_type, activation_bits=8)
        wm = layer.wm if layer.wm is not None else layer.wd
        expected = run_matmul("portable", ggml_type, xq, xd, xsum, layer)
        np.testing.assert_array_equal(fused(x, layer.wq.view(np.uint8), layer.wd, wm, _FMT[ggml_type]), expected)
        np.testing.assert_array_equal(layer(x), expected)
        np.testing.assert_array_equal(layer.matmul_int8(x), expected)
        np.testing.assert_array_equal(layer.matmul_quantized(xq, xd, xsum), expected)
    assert np.all(BlockQuantLinear.quantize(np.zeros((2, 32), np.float32), GGMLType.Q4_1)(x[:, :32].copy()) == 0)


@pytest.mark.parametrize("path", PATHS)
def test_fused_a16_quantize_matmul_equals_two_steps(path: str) -> None:
    rng = np.random.default_rng(10)
    x = rng.standard_normal((5, 96)).astype(np.float32)
    xq, xd, xsum = bq.quantize_a16_blocks(x)
    fused = QUANTIZE_A16_MATMUL[path]
    public = {
        GGMLType.Q4_0: (bq.matmul_q4_0_a16, bq.quantize_matmul_q4_0_a16),
        GGMLType.Q4_1: (bq.matmul_q4_1_a16, bq.quantize_matmul_q4_1_a16),
        GGMLType.Q8_0: (bq.matmul_q8_0_a16, bq.quantize_matmul_q8_0_a16),
    }
    for ggml_type in FORMATS:
        layer = BlockQuantLinear.quantize(random_weights(rng, 7, 96), ggml_type)
        wm = layer.wm if layer.wm is not None else layer.wd
        expected = run_matmul("portable", ggml_type, xq, xd, xsum, layer)
        np.testing.assert_array_equal(fused(x, layer.wq.view(np.uint8), layer.wd, wm, _FMT[ggml_type]), expected)
        np.testing.assert_array_equal(layer(x), expected)
        two_step, one_step = public[ggml_type]
        weights = (layer.wq, layer.wd) if layer.wm is None else (layer.wq, layer.wd, layer.wm)
        activations = (xq, xd) if layer.wm is None else (xq, xd, xsum)
        np.testing.assert_array_equal(two_step(*activations, *weights), expected)
        np.testing.assert_array_equal(one_step(x, *weights), expected)


def test_bad_inputs_raise_value_error() -> None:
    rng = np.random.default_rng(6)
    w = random_weights(rng, 4, 64)
    layer = BlockQuantLinear.quantize(w, GGMLType.Q4_1)
    xq, xd, xsum = bq.quantize_q8_blocks(rng.standard_normal((2, 64)).astype(np.float32))
    with pytest.raises(ValueError, match="multiple of 32"):
        bq.quantize_q8_blocks(np.zeros((2, 40), np.float32))
    with pytest.raises(ValueError, match="multiple of 32"):
        BlockQuantLinear.quantize(np.zeros((2, 48), np.float32), GGMLType.Q8_0)
    with pytest.raises(ValueError, match="float32"):
        bq.quantize_q8_blocks(np.zeros((2, 64), np.float64))
    with pytest.raises(ValueError, match="C-contiguous"):
        bq.quantize_q8_blocks(np.zeros((64, 2), np.float32).T)
    with pytest.raises(ValueError, match="in_features"):
        bq.matmul_q4_1(xq[:, :32].copy(), xd[:, :1].copy(), xsum[:, :1].copy(), layer.wq, layer.wd, layer.wm)
    with pytest.raises(ValueError, match="xsum"):
        bq.matmul_q4_1(xq, xd, xsum[:1].copy(), layer.wq, layer.wd, layer.wm)
    with pytest.raises(ValueError, match="wm"):
        bq.matmul_q4_1(xq, xd, xsum, layer.wq, layer.wd, layer.wm[:, :1].copy())
    with pytest.raises(ValueError, match="int8"):
        bq.matmul_q8_0(xq, xd, layer.wq, layer.wd)
    with pytest.raises(ValueError, match="uint8"):
        bq.matmul_q4_0(xq.view(np.uint8), xd, layer.wq, layer.wd)
    a16_q, a16_d, a16_sum = bq.quantize_a16_blocks(rng.standard_normal((2, 64)).astype(np.float32))
    with pytest.raises(ValueError, match="3 dimensions"):
        bq.matmul_q4_1_a16(xq, xd, xsum, layer.wq, layer.wd, layer.wm)  # int8 codes where digits are expected
    with pytest.raises(ValueError, match=r"shape \(T, 2, K\)"):
        bq.matmul_q4_1_a16(np.concatenate([a16_q, a16_q], axis=1), a16_d, a16_sum, layer.wq, layer.wd, layer.wm)
    with pytest.raises(ValueError, match="2 dimensions"):
        bq.matmul_q4_1(a16_q, a16_d, a16_sum, layer.wq, layer.wd, layer.wm)
    with pytest.raises(ValueError, match="in_features"):
        bq.quantize_matmul_q4_1_a16(np.zeros((2, 32), np.float32), layer.wq, layer.wd, layer.wm)
    with pytest.raises(ValueError, match="multiple of 32"):
        bq.quantize_a16_blocks(np.zeros((2, 40), np.float32))
    with pytest.raises(ValueError, match="activation_bits"):
        BlockQuantLinear.quantize(w, GGMLType.Q4_1, activation_bits=4)
    with pytest.raises(ValueError, match="row_ids"):
        layer.dequantize_rows(np.array([4]))
    raw = layer.to_gguf_blocks()
    with pytest.raises(ValueError, match="take 40 bytes"):
        BlockQuantLinear.from_gguf_blocks(GGMLType.Q4_1, raw[:, :-1].copy(), 64)
    with pytest.raises(ValueError, match="multiple of 32"):
        BlockQuantLinear.from_gguf_blocks(GGMLType.Q4_1, raw, 60)
    with pytest.raises(ValueError, match="supports"):
        BlockQuantLinear.from_gguf_blocks(GGMLType.Q6_K, raw, 64)
    raw[1, 2:4] = np.array([0x00, 0x7C], np.uint8)  # fp16 +inf as the min of row 1, block 0
    with pytest.raises(ValueError, match="non-finite fp16 block min in row 1"):
        BlockQuantLinear.from_gguf_blocks(GGMLType.Q4_1, raw, 64)
    with pytest.raises(ValueError, match="in_features"):
        matmul_f32(np.zeros((1, 5), np.float32), np.zeros((2, 6), np.float32))


def test_matmul_f32_fixed_order_and_batch_invariance() -> None:
    rng = np.random.default_rng(7)
    for in_features in (1, 15, 16, 33, 576):
        w = rng.standard_normal((33, in_features)).astype(np.float32)
        x = rng.standard_normal((17, in_features)).astype(np.float32)
        y = matmul_f32(x, w)
        np.testing.assert_array_equal(y, lane_ordered_sum(x[:, None, :] * w[None, :, :]))
        exact = x.astype(np.float64) @ w.T.astype(np.float64)
        bound = (in_features + 8) * 2.0**-24 * (np.abs(x).astype(np.float64) @ np.abs(w).T.astype(np.float64))
        assert np.all(np.abs(y - exact) <= bound)
        for token in (0, 4, 16):
            np.testing.assert_array_equal(y[token : token + 1], matmul_f32(x[token : token + 1], w))
    layer = DenseLinear(w)
    np.testing.assert_array_equal(layer(x), y)
    np.testing.assert_array_equal(layer.dequantize_rows(np.array([3, 0])), w[[3, 0]])
    assert layer.num_bytes == w.nbytes and (layer.out_features, layer.in_features) == (33, 576)


def test_kernel_path_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BITSERVE_KERNELS", "portable")
    assert bq._select_kernel_path() == "portable"
    monkeypatch.setenv("BITSERVE_KERNELS", "auto")
    assert bq._select_kernel_path() == ("avx512_vnni" if HAS_VNNI else "simd")
    monkeypatch.setenv("BITSERVE_KERNELS", "fast")
    with pytest.raises(ValueError, match="BITSERVE_KERNELS"):
        bq._select_kernel_path()


def test_vnni_kernel_uses_vpdpbusd() -> None:
    if not HAS_VNNI:
        pytest.skip("CPU or JIT target lacks AVX-512 VNNI")

    # Code loaded from Numba's cache cannot be inspected: compile a small uncached caller of one tile intrinsic.
    # The row is a run-time value, so LLVM cannot merge the tile's two rows.
    @numba.njit(nogil=True)
    def one_tile(wq, scales, xp, xc, row):
        return bq._tile_dot_q4_1_vnni(wq, scales, scales, (row, row + 1), xp, scales, xc, scales, (0,))

    scales = np.ones((2, 16), np.float32)
    for xp in (np.zeros((1, 512), np.int8), np.zeros((1, 2, 512), np.int8)):  # int8 codes, A16 digits
        one_tile(np.zeros((2, 256), np.uint8), scales, xp, np.zeros((1, 16), np.int32), 0)
    int8_assembly, a16_assembly = (one_tile.inspect_asm(signature) for signature in one_tile.signatures)
    assert "vpdpbusd" in int8_assembly and "zmm" in int8_assembly
    # A16: every weight vector meets both digits, so twice the byte dots over the same weight loads. (Count
    # instructions, not mere mentions: this test's own name, in the symbols, contains "vpdpbusd".)
    assert a16_assembly.count("\tvpdpbusd\t") == 2 * int8_assembly.count("\tvpdpbusd\t") > 0
