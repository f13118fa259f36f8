"""Ternary kernels and TernaryLinear against slow, obvious numpy references; both kernel paths, odd shapes."""

from __future__ import annotations

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from engine.kernels import amx, cpu_features, ternary_amx
from engine.kernels import ternary as tk
from engine.linear.ternary import TernaryLinear

HAS_VNNI = cpu_features.detect_cpu_features().has_avx512_vnni
PATHS = [
    "portable",
    pytest.param("avx512_vnni", marks=pytest.mark.skipif(not HAS_VNNI, reason="CPU or JIT target lacks AVX-512 VNNI")),
]
MATMUL_PATHS = [
    *PATHS,
    pytest.param("amx", marks=pytest.mark.skipif(not amx.AMX_AVAILABLE, reason="no AMX on this CPU or kernel")),
]
MATMUL = {"portable": tk._matmul_ternary_portable, "avx512_vnni": tk._matmul_ternary_vnni,
          "amx": ternary_amx.matmul_ternary_amx}
BLOCKSCALED = {"portable": tk._matmul_ternary_blockscaled_portable, "avx512_vnni": tk._matmul_ternary_blockscaled_vnni}

ROW_COUNTS = [1, 3, 65, 130]
IN_FEATURES = [5, 128, 192, 300, 512, 1000]
TOKEN_COUNTS = [1, 2, 3, 7, 17, 40]  # 40: three AMX token tiles, the last one partial


def random_ternary(rng: np.random.Generator, num_rows: int, in_features: int) -> np.ndarray:
    """(num_rows, in_features) int8 in {-1, 0, 1}, about 30% zeros like a real BitNet weight."""
    return rng.choice(np.array([-1, 0, 1], dtype=np.int8), size=(num_rows, in_features), p=[0.35, 0.3, 0.35])


def random_xq(rng: np.random.Generator, num_tokens: int, in_features: int) -> tuple[np.ndarray, np.ndarray]:
    """Full-range int8 activations, zero-padded to whole blocks -> (xq (T, padded_k) int8, act_sum (T,) int32)."""
    xq = np.zeros((num_tokens, tk.padded_in_features(in_features)), dtype=np.int8)
    xq[:, :in_features] = rng.integers(-128, 128, size=(num_tokens, in_features))
    return xq, xq.sum(axis=1, dtype=np.int64).astype(np.int32)


def reference_int_sums(xq: np.ndarray, ternary: np.ndarray) -> np.ndarray:
    """(T, N) int64: Σ_k T[n, k] · xq[t, k], the slow obvious way."""
    return xq[:, : ternary.shape[1]].astype(np.int64) @ ternary.T.astype(np.int64)


def reference_blockscaled(xq: np.ndarray, ternary: np.ndarray, block_scales: np.ndarray) -> np.ndarray:
    """(T, N) float32: per-block int64 sums, scaled and added in float64 in increasing block order."""
    num_rows, in_features = ternary.shape
    padded = np.zeros((num_rows, tk.padded_in_features(in_features)), dtype=np.int64)
    padded[:, :in_features] = ternary
    total = np.zeros((xq.shape[0], num_rows), dtype=np.float64)
    for block in range(block_scales.shape[1]):
        columns = slice(block * 256, (block + 1) * 256)
        block_sums = xq[:, columns].astype(np.int64) @ padded[:, columns].T
        total = total + block_sums.astype(np.float64) * block_scales[:, block].astype(np.float64)[None, :]
    return total.astype(np.float32)


def reference_quantize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """BitNet per-token absmax quantization in float32 numpy -> (xq (T, K) int8, s (T,) float32)."""
    scale = np.float32(127) / np.maximum(np.abs(x).max(axis=1), np.float32(1e-5))
    return np.clip(np.rint(x * scale[:, None]), -128, 127).astype(np.int8), scale


# ---- packing ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("in_features", [1, 5, 255, 256, 257, 1000])
def test_pack_unpack_round_trip(in_features: int) -> None:
    ternary = random_ternary(np.random.default_rng(in_features), 7, in_features)
    codes = tk.pack_ternary(ternary)
    assert codes.shape == (7, tk.padded_in_features(in_features) // 4) and codes.dtype == np.uint8
    np.testing.assert_array_equal(tk.unpack_ternary(codes, in_features), ternary)


def test_pack_layout_matches_the_documented_bit_positions() -> None:
    ternary = random_ternary(np.random.default_rng(1), 3, 600)
    codes = tk.pack_ternary(ternary)
    for row in range(3):
        for k in range(768):
            block, within = divmod(k, 256)
            pair, byte = divmod(within, 64)
            code = (int(codes[row, block * 64 + byte]) >> (2 * pair)) & 3
            expected = ternary[row, k] + 1 if k < 600 else 1  # padding is code 1, weight 0
            assert code == expected, (row, k)


def test_pack_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="-1, 0, 1"):
        tk.pack_ternary(np.array([[0, 2]], dtype=np.int8))
    with pytest.raises(ValueError, match="int8"):
        tk.pack_ternary(np.zeros((2, 3), dtype=np.int32))


# ---- activation quantization -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("num_tokens", "in_features"), [(1, 5), (3, 300), (17, 1000), (2, 2560)])
def test_quantize_activations_matches_numpy(num_tokens: int, in_features: int) -> None:
    rng = np.random.default_rng(num_tokens * in_features)
    x = (rng.standard_normal((num_tokens, in_features)) * rng.uniform(1e-3, 1e3, size=(num_tokens, 1)))
    x = x.astype(np.float32)
    x[0, :3] = 0.0
    xq, x_scale, act_sum = tk.quantize_activations(x)
    expected_xq, expected_scale = reference_quantize(x)
    assert xq.shape == (num_tokens, tk.padded_in_features(in_features))
    np.testing.assert_array_equal(xq[:, :in_features], expected_xq)
    assert not xq[:, in_features:].any()
    np.testing.assert_array_equal(x_scale, expected_scale)
    np.testing.assert_array_equal(act_sum, expected_xq.sum(axis=1, dtype=np.int64))


def test_quantize_activations_rounds_half_to_even_and_handles_zero_rows() -> None:
    x = np.array([[127.0, 2.5, -3.5, 0.5, -0.5, 1.5], [0.0] * 6], dtype=np.float32)  # row 0: s == 1 exactly
    xq, x_scale, act_sum = tk.quantize_activations(x)
    np.testing.assert_array_equal(xq[0, :6], [127, 2, -4, 0, 0, 2])
    assert x_scale[0] == 1.0 and x_scale[1] == np.float32(127) / np.float32(1e-5)
    assert not xq[1].any() and act_sum.tolist() == [127, 0]


@settings(max_examples=60, deadline=None)
@given(hnp.arrays(np.float32, hnp.array_shapes(min_dims=2, max_dims=2, max_side=40),
                  elements=st.floats(width=32, allow_nan=False, allow_infinity=False)))
def test_quantize_activations_matches_numpy_on_any_finite_input(x: np.ndarray) -> None:
    xq, x_scale, _ = tk.quantize_activations(np.ascontiguousarray(x))
    expected_xq, expected_scale = reference_quantize(x)
    np.testing.assert_array_equal(xq[:, : x.shape[1]], expected_xq)
    np.testing.assert_array_equal(x_scale, expected_scale)


# ---- integer matmuls -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", MATMUL_PATHS)
@pytest.mark.parametrize("in_features", IN_FEATURES)
@pytest.mark.parametrize("num_rows", ROW_COUNTS)
def test_matmul_ternary_is_exact(path: str, num_rows: int, in_features: int) -> None:
    rng = np.random.default_rng(num_rows * 1000 + in_features)
    ternary = random_ternary(rng, num_rows, in_features)
    codes = tk.pack_ternary(ternary)
    for num_tokens in TOKEN_COUNTS:
        xq, act_sum = random_xq(rng, num_tokens, in_features)
        out = MATMUL[path](xq, act_sum, codes)
        assert out.dtype == np.int32 and out.shape == (num_tokens, num_rows)
        np.testing.assert_array_equal(out, reference_int_sums(xq, ternary), err_msg=f"T={num_tokens}")


@pytest.mark.parametrize("path", MATMUL_PATHS)
def test_matmul_ternary_extreme_values(path: str) -> None:
    """Largest magnitudes: every weight ±1 against -128 everywhere, where a saturating instruction would fail."""
    ternary = np.ones((9, 4000), dtype=np.int8)
    ternary[1::2] = -1
    xq = np.zeros((5, tk.padded_in_features(4000)), dtype=np.int8)
    xq[:, :4000] = -128
    xq[1, :4000] = 127
    act_sum = xq.sum(axis=1, dtype=np.int64).astype(np.int32)
    out = MATMUL[path](xq, act_sum, tk.pack_ternary(ternary))
    np.testing.assert_array_equal(out, reference_int_sums(xq, ternary))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(("num_rows", "in_features"), [(1, 5), (3, 300), (65, 1000), (130, 512)])
def test_matmul_ternary_blockscaled_matches_reference(path: str, num_rows: int, in_features: int) -> None:
    rng = np.random.default_rng(num_rows + in_features)
    ternary = random_ternary(rng, num_rows, in_features)
    codes = tk.pack_ternary(ternary)
    block_scales = rng.uniform(1e-3, 0.1, size=(num_rows, -(-in_features // 256))).astype(np.float32)
    for num_tokens in TOKEN_COUNTS:
        xq, _ = random_xq(rng, num_tokens, in_features)
        out = BLOCKSCALED[path](xq, codes, block_scales)
        assert out.dtype == np.float32 and out.shape == (num_tokens, num_rows)
        np.testing.assert_array_equal(out, reference_blockscaled(xq, ternary, block_scales), err_msg=f"T={num_tokens}")


@pytest.mark.parametrize("path", PATHS)
def test_kernels_are_batch_invariant(path: str) -> None:
    rng = np.random.default_rng(7)
    ternary = random_ternary(rng, 67, 700)
    codes = tk.pack_ternary(ternary)
    block_scales = rng.uniform(0.01, 1.0, size=(67, 3)).astype(np.float32)
    xq, act_sum = random_xq(rng, 17, 700)
    batched = MATMUL[path](xq, act_sum, codes)
    batched_scaled = BLOCKSCALED[path](xq, codes, block_scales)
    np.testing.assert_array_equal(tk.matmul_ternary(xq, act_sum, codes), batched)  # whichever kernel it picks
    for token in range(17):
        single = MATMUL[path](xq[token : token + 1], act_sum[token : token + 1], codes)
        np.testing.assert_array_equal(batched[token], single[0])
        single_scaled = BLOCKSCALED[path](xq[token : token + 1], codes, block_scales)
        np.testing.assert_array_equal(batched_scaled[token], single_scaled[0])


def test_public_wrappers_check_inputs() -> None:
    codes = np.zeros((4, 64), dtype=np.uint8)
    xq = np.zeros((2, 256), dtype=np.int8)
    act_sum = np.zeros(2, dtype=np.int32)
    with pytest.raises(ValueError, match="xq must be"):
        tk.matmul_ternary(xq.astype(np.int16), act_sum, codes)
    with pytest.raises(ValueError, match="codes must be"):
        tk.matmul_ternary(xq, act_sum, np.zeros((64, 4), dtype=np.uint8).T)
    with pytest.raises(ValueError, match="codes width"):
        tk.matmul_ternary(xq, act_sum, np.zeros((4, 128), dtype=np.uint8))
    with pytest.raises(ValueError, match="multiple of 256"):
        tk.matmul_ternary(np.zeros((2, 100), dtype=np.int8), act_sum, np.zeros((4, 25), dtype=np.uint8))
    with pytest.raises(ValueError, match="act_sum"):
        tk.matmul_ternary(xq, np.zeros(3, dtype=np.int32), codes)
    with pytest.raises(ValueError, match="block_scales"):
        tk.matmul_ternary_blockscaled(xq, codes, np.zeros((4, 2), dtype=np.float32))
    with pytest.raises(ValueError, match="float32"):
        tk.quantize_activations(np.zeros((2, 3), dtype=np.float64))
    np.testing.assert_array_equal(tk.matmul_ternary(xq, act_sum, codes), np.zeros((2, 4), dtype=np.int32))


def test_vnni_kernel_uses_vpdpbusd() -> None:
    if not HAS_VNNI:
        pytest.skip("CPU or JIT target lacks AVX-512 VNNI")
    # Code loaded from Numba's cache cannot be inspected, so compile an uncached twin of the same Python function.
    for kernel in (tk._matmul_ternary_vnni, tk._matmul_ternary_blockscaled_vnni):
        twin = numba.njit(nogil=True, parallel=True)(kernel.py_func)
        if kernel is tk._matmul_ternary_vnni:
            twin(np.zeros((1, 256), np.int8), np.zeros(1, np.int32), np.zeros((1, 64), np.uint8))
        else:
            twin(np.zeros((1, 256), np.int8), np.zeros((1, 64), np.uint8), np.zeros((1, 1), np.float32))
        assembly = twin.inspect_asm(twin.signatures[0])
        assert "vpdpbusd" in assembly and "zmm" in assembly


def test_amx_kernel_is_batch_invariant_against_the_gemv() -> None:
    """The served path: a prefill chunk long enough for AMX equals each token's own single-token GEMV."""
    if not amx.AMX_AVAILABLE:
        pytest.skip("no AMX on this CPU or kernel")
    rng = np.random.default_rng(11)
    ternary = random_ternary(rng, 70, 900)
    codes = tk.pack_ternary(ternary)
    xq, act_sum = random_xq(rng, tk.AMX_MIN_TOKENS + 5, 900)
    batched = tk.matmul_ternary(xq, act_sum, codes)
    for token in range(xq.shape[0]):
        np.testing.assert_array_equal(batched[token], tk.matmul_ternary(xq[token:token + 1], act_sum[token:token + 1],
                                                                        codes)[0])


def test_amx_kernel_uses_tile_instructions() -> None:
    if not amx.AMX_AVAILABLE:
        pytest.skip("no AMX on this CPU or kernel")
    twin = numba.njit(nogil=True, parallel=True)(ternary_amx._matmul_ternary_amx.py_func)
    twin(np.zeros((1, 256), np.int8), np.zeros(1, np.int32), np.zeros((1, 64), np.uint8), ternary_amx._TILE_CONFIG, 1)
    assembly = twin.inspect_asm(twin.signatures[0])
    assert "tdpbusd" in assembly and "ldtilecfg" in assembly


def test_kernel_path_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BITSERVE_KERNELS", "portable")
    assert tk._select_kernel_path() == "portable"
    monkeypatch.setenv("BITSERVE_KERNELS", "auto")
    assert tk._select_kernel_path() == ("avx512_vnni" if HAS_VNNI else "portable")
    monkeypatch.setenv("BITSERVE_KERNELS", "fast")
    with pytest.raises(ValueError, match="BITSERVE_KERNELS"):
        tk._select_kernel_path()


def test_cpu_features_follow_the_jit_target(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NUMBA_CPU_NAME", "generic")
    monkeypatch.delenv("NUMBA_CPU_FEATURES", raising=False)
    assert cpu_features._jit_target_features({"avx2", "avx512vnni"}) == set()
    monkeypatch.setenv("NUMBA_CPU_FEATURES", "+avx2,-avx512vnni")
    assert cpu_features._jit_target_features({"avx2", "avx512vnni"}) == {"avx2"}


# ---- TernaryLinear ---------------------------------------------------------------------------------------------------


def float64_reference(x: np.ndarray, ternary: np.ndarray, scale_of_weight: np.ndarray) -> np.ndarray:
    """(xq / s) @ (scale · T).T in float64; scale_of_weight: (N, K) float64, the scale of each weight."""
    xq, x_scale = reference_quantize(x)
    return (xq.astype(np.float64) / x_scale.astype(np.float64)[:, None]) @ (ternary * scale_of_weight).T


def assert_close_to_reference(y: np.ndarray, reference: np.ndarray) -> None:
    # Our result is within ~1 float32 ulp of the exact value; the float64 reference is within 1e-12 of it.
    tolerance = 1e-6 * np.abs(reference) + 1e-12 * np.abs(reference).max()
    assert y.dtype == np.float32
    assert np.all(np.abs(y.astype(np.float64) - reference) <= tolerance)


@pytest.mark.parametrize(("num_rows", "in_features"), [(3, 5), (65, 300), (130, 1000)])
def test_ternary_linear_per_tensor_matches_float_reference(num_rows: int, in_features: int) -> None:
    rng = np.random.default_rng(num_rows)
    ternary = random_ternary(rng, num_rows, in_features)
    layer = TernaryLinear.from_ternary(ternary, weight_scale=0.0377)
    x = rng.standard_normal((7, in_features)).astype(np.float32)
    y = layer(x)
    assert y.shape == (7, num_rows)
    assert_close_to_reference(y, float64_reference(x, ternary, np.full(ternary.shape, np.float32(0.0377), np.float64)))


@pytest.mark.parametrize(("num_rows", "in_features"), [(3, 5), (65, 300), (130, 1000)])
def test_ternary_linear_block_scaled_matches_float_reference(num_rows: int, in_features: int) -> None:
    rng = np.random.default_rng(num_rows + 1)
    ternary = random_ternary(rng, num_rows, in_features)
    block_scales = rng.uniform(0.01, 0.1, size=(num_rows, -(-in_features // 256))).astype(np.float32)
    layer = TernaryLinear.from_ternary(ternary, block_scales=block_scales)
    x = rng.standard_normal((7, in_features)).astype(np.float32)
    scale_of_weight = np.repeat(block_scales.astype(np.float64), 256, axis=1)[:, :in_features]
    assert_close_to_reference(layer(x), float64_reference(x, ternary, scale_of_weight))


def test_ternary_linear_is_batch_invariant() -> None:
    rng = np.random.default_rng(3)
    ternary = random_ternary(rng, 70, 333)
    x = rng.standard_normal((17, 333)).astype(np.float32)
    block_scales = rng.uniform(0.01, 0.1, size=(70, 2)).astype(np.float32)
    for layer in (TernaryLinear.from_ternary(ternary, 0.05), TernaryLinear.from_ternary(ternary, None, block_scales)):
        batched = layer(x)
        for token in range(17):
            np.testing.assert_array_equal(batched[token], layer(x[token : token + 1])[0])


def test_ternary_linear_dequantize_rows_and_num_bytes() -> None:
    rng = np.random.default_rng(4)
    ternary = random_ternary(rng, 10, 300)
    block_scales = rng.uniform(0.01, 0.1, size=(10, 2)).astype(np.float32)
    per_tensor = TernaryLinear.from_ternary(ternary, weight_scale=0.25)
    per_block = TernaryLinear.from_ternary(ternary, block_scales=block_scales)
    row_ids = np.array([9, 0, 4, 4], dtype=np.int64)
    np.testing.assert_array_equal(per_tensor.dequantize_rows(row_ids), ternary[row_ids] * np.float32(0.25))
    expected = ternary[row_ids] * np.repeat(block_scales[row_ids], 256, axis=1)[:, :300]
    np.testing.assert_array_equal(per_block.dequantize_rows(row_ids), expected)
    assert per_tensor.dequantize_rows(row_ids).dtype == np.float32
    with pytest.raises(IndexError):
        per_tensor.dequantize_rows(np.array([10]))
    with pytest.raises(IndexError):
        per_tensor.dequantize_rows(np.array([-1]))
    assert per_tensor.num_bytes == 10 * 512 // 4 + 4
    assert per_block.num_bytes == 10 * 512 // 4 + 10 * 2 * 4
    assert (per_tensor.in_features, per_tensor.out_features) == (300, 10)


def test_ternary_linear_needs_exactly_one_scale() -> None:
    ternary = np.zeros((2, 3), dtype=np.int8)
    with pytest.raises(ValueError, match="exactly one"):
        TernaryLinear.from_ternary(ternary)
    with pytest.raises(ValueError, match="exactly one"):
        TernaryLinear.from_ternary(ternary, 1.0, np.ones((2, 1), np.float32))
    with pytest.raises(ValueError, match="num_tokens"):
        TernaryLinear.from_ternary(ternary, 1.0)(np.zeros((1, 4), np.float32))


# ---- TL2 lookup-table kernels ----------------------------------------------------------------------------------------

TL2_MATMUL = {"portable": tk._matmul_ternary_tl2_portable, "avx512_vnni": tk._matmul_ternary_tl2_avx512}


@pytest.mark.parametrize(("num_rows", "in_features"), [(1, 1), (1, 5), (33, 12), (65, 300), (31, 1000)])
def test_tl2_pack_unpack_round_trip(num_rows: int, in_features: int) -> None:
    ternary = random_ternary(np.random.default_rng(in_features), num_rows, in_features)
    indices, signs = tk.pack_ternary_tl2(ternary)
    num_groups = tk.tl2_num_groups(in_features)
    assert num_groups % 4 == 0 and 3 * num_groups >= in_features
    assert indices.shape == (-(-num_rows // 32), num_groups // 4, 32) and indices.dtype == np.uint16
    assert signs.shape == (-(-num_rows // 32), num_groups) and signs.dtype == np.uint32
    np.testing.assert_array_equal(tk.unpack_ternary_tl2(indices, signs, num_rows, in_features), ternary)


def test_tl2_pack_layout_matches_the_documented_bits() -> None:
    ternary = random_ternary(np.random.default_rng(5), 40, 50)
    indices, signs = tk.pack_ternary_tl2(ternary)
    padded = np.zeros((64, 3 * tk.tl2_num_groups(50)), dtype=np.int64)
    padded[:40, :50] = ternary
    for row in range(64):
        tile, r = divmod(row, 32)
        for group in range(padded.shape[1] // 3):
            w0, w1, w2 = padded[row, 3 * group : 3 * group + 3]
            pattern = 9 * (w0 + 1) + 3 * (w1 + 1) + (w2 + 1)
            index = (int(indices[tile, group // 4, r]) >> (4 * (group % 4))) & 15
            negative = (int(signs[tile, group]) >> r) & 1
            assert (index, negative) == (min(pattern, 26 - pattern), int(pattern > 13)), (row, group)


def test_tl2_tables_match_reference() -> None:
    rng = np.random.default_rng(6)
    xq, _ = random_xq(rng, 3, 100)
    tables = tk.build_tl2_tables(xq, 100)
    num_groups = tk.tl2_num_groups(100)
    assert tables.shape == (3, num_groups, 16) and tables.dtype == np.int16
    acts = np.zeros((3, 3 * num_groups), dtype=np.int64)
    acts[:, :100] = xq[:, :100]
    for pattern in range(14):
        weights = np.array([pattern // 9, (pattern // 3) % 3, pattern % 3]) - 1
        expected = acts.reshape(3, num_groups, 3) @ weights
        np.testing.assert_array_equal(tables[:, :, pattern], expected)
    assert not tables[:, :, 14:].any()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("in_features", IN_FEATURES)
@pytest.mark.parametrize("num_rows", ROW_COUNTS)
def test_matmul_ternary_tl2_is_exact(path: str, num_rows: int, in_features: int) -> None:
    rng = np.random.default_rng(num_rows * 1000 + in_features + 1)
    ternary = random_ternary(rng, num_rows, in_features)
    indices, signs = tk.pack_ternary_tl2(ternary)
    for num_tokens in TOKEN_COUNTS:
        xq, _ = random_xq(rng, num_tokens, in_features)
        out = TL2_MATMUL[path](tk.build_tl2_tables(xq, in_features), indices, signs, num_rows)
        assert out.dtype == np.int32 and out.shape == (num_tokens, num_rows)
        np.testing.assert_array_equal(out, reference_int_sums(xq, ternary), err_msg=f"T={num_tokens}")


@pytest.mark.parametrize("path", PATHS)
def test_matmul_ternary_tl2_extreme_values(path: str) -> None:
    """Every table entry at its largest magnitude (384) over 4000 groups: int16 lane sums must be widened in time."""
    ternary = -np.ones((35, 12000), dtype=np.int8)
    ternary[1::2] = 1
    xq = np.full((5, 12000), -128, dtype=np.int8)
    xq[2] = 127
    out = TL2_MATMUL[path](tk.build_tl2_tables(xq, 12000), *tk.pack_ternary_tl2(ternary), 35)
    np.testing.assert_array_equal(out, reference_int_sums(xq, ternary))


@pytest.mark.parametrize("path", PATHS)
def test_matmul_ternary_tl2_is_batch_invariant(path: str) -> None:
    rng = np.random.default_rng(8)
    ternary = random_ternary(rng, 70, 500)
    indices, signs = tk.pack_ternary_tl2(ternary)
    xq, _ = random_xq(rng, 17, 500)
    batched = TL2_MATMUL[path](tk.build_tl2_tables(xq, 500), indices, signs, 70)
    for token in range(17):
        single = TL2_MATMUL[path](tk.build_tl2_tables(xq[token : token + 1], 500), indices, signs, 70)
        np.testing.assert_array_equal(batched[token], single[0])


def test_tl2_public_wrappers() -> None:
    rng = np.random.default_rng(9)
    ternary = random_ternary(rng, 40, 77)
    indices, signs = tk.pack_ternary_tl2(ternary)
    xq, _ = random_xq(rng, 2, 77)
    tables = tk.build_tl2_tables(xq, 77)
    np.testing.assert_array_equal(tk.matmul_ternary_tl2(tables, indices, signs, 40), reference_int_sums(xq, ternary))
    with pytest.raises(ValueError, match="num_rows"):
        tk.matmul_ternary_tl2(tables, indices, signs, 70)
    with pytest.raises(ValueError, match="tables"):
        tk.matmul_ternary_tl2(tables[:, :4], indices, signs, 40)
    with pytest.raises(ValueError, match="indices"):
        tk.matmul_ternary_tl2(tables, indices.astype(np.uint8), signs, 40)
    with pytest.raises(ValueError, match="xq"):
        tk.build_tl2_tables(xq, 5000)


def test_tl2_kernel_uses_vpermw() -> None:
    if not HAS_VNNI:
        pytest.skip("CPU or JIT target lacks AVX-512")
    twin = numba.njit(nogil=True, parallel=True)(tk._matmul_ternary_tl2_avx512.py_func)
    indices, signs = tk.pack_ternary_tl2(np.zeros((1, 3), np.int8))
    twin(tk.build_tl2_tables(np.zeros((1, 3), np.int8), 3), indices, signs, 1)
    assert "vpermw" in twin.inspect_asm(twin.signatures[0])


@pytest.mark.parametrize(("num_rows", "in_features"), [(1, 1), (1, 5), (33, 12), (65, 300), (31, 1000)])
def test_tl2_pack_from_codes_equals_pack_from_int8(num_rows: int, in_features: int) -> None:
    ternary = random_ternary(np.random.default_rng(in_features + 7), num_rows, in_features)
    from_codes = tk.pack_tl2_from_codes(tk.pack_ternary(ternary), in_features)
    for got, expected in zip(from_codes, tk.pack_ternary_tl2(ternary), strict=True):
        np.testing.assert_array_equal(got, expected)
        assert got.dtype == expected.dtype


def test_ternary_linear_decodes_through_tl2_with_the_same_bits() -> None:
    """A layer that keeps the TL2 layout reads it for single tokens and its rows for batches; both are exact, so
    every token's output is the same as without it, alone or in a batch."""
    rng = np.random.default_rng(10)
    ternary = random_ternary(rng, 70, 333)
    x = rng.standard_normal((9, 333)).astype(np.float32)
    for scales in ({"weight_scale": 0.05}, {"row_scales": rng.uniform(0.01, 0.1, 70).astype(np.float32)}):
        plain = TernaryLinear(tk.pack_ternary(ternary), 333, **scales)
        with_tl2 = TernaryLinear(tk.pack_ternary(ternary), 333, **scales)
        with_tl2.keep_tl2()
        np.testing.assert_array_equal(with_tl2(x), plain(x))
        for token in range(9):
            np.testing.assert_array_equal(with_tl2(x[token : token + 1]), plain(x[token : token + 1]))
        tl2_bytes = sum(array.nbytes for array in with_tl2.tl2)
        assert with_tl2.num_bytes == plain.num_bytes + tl2_bytes
        assert with_tl2.bytes_read_per_token == plain.bytes_read_per_token - plain.codes.nbytes + tl2_bytes
    block_scaled = TernaryLinear.from_ternary(ternary, block_scales=np.ones((70, 2), np.float32))
    with pytest.raises(ValueError, match="TL2"):
        block_scaled.keep_tl2()


@pytest.mark.parametrize("path", PATHS)
def test_matmul_ternary_tl2_xq_builds_tables_in_the_same_call(path: str) -> None:
    rng = np.random.default_rng(11)
    ternary = random_ternary(rng, 45, 301)
    indices, signs = tk.pack_ternary_tl2(ternary)
    xq, _ = random_xq(rng, 3, 301)
    kernel = {"portable": tk._matmul_ternary_tl2_xq_portable, "avx512_vnni": tk._matmul_ternary_tl2_xq_avx512}[path]
    np.testing.assert_array_equal(kernel(xq, 301, indices, signs, 45), reference_int_sums(xq, ternary))
    np.testing.assert_array_equal(tk.matmul_ternary_tl2_xq(xq, 301, indices, signs, 45),
                                  reference_int_sums(xq, ternary))
    with pytest.raises(ValueError, match="pack_ternary_tl2"):
        tk.matmul_ternary_tl2_xq(xq, 301, indices, signs, 70)


@pytest.mark.parametrize("path", PATHS)
def test_linear_tl2_equals_quantize_lookup_and_scale_in_turn(path: str) -> None:
    rng = np.random.default_rng(13)
    ternary = random_ternary(rng, 45, 301)
    indices, signs = tk.pack_ternary_tl2(ternary)
    x = rng.standard_normal((2, 301)).astype(np.float32)
    xq, x_scale, _ = tk.quantize_activations(x)
    int_sums = tk.matmul_ternary_tl2_xq(xq, 301, indices, signs, 45)
    kernel = {"portable": tk._linear_tl2_portable, "avx512_vnni": tk._linear_tl2_avx512}[path]
    row_scales = rng.uniform(0.01, 0.1, 45).astype(np.float32)
    np.testing.assert_array_equal(kernel(x, 512, indices, signs, 45, row_scales, np.float64(0.0)),
                                  tk.scale_int_sums(int_sums, row_scales, x_scale, 0.0))
    np.testing.assert_array_equal(kernel(x, 512, indices, signs, 45, np.empty(0, np.float32), np.float64(0.03)),
                                  tk.scale_int_sums(int_sums, None, x_scale, 0.03))
    np.testing.assert_array_equal(tk.linear_tl2(x, indices, signs, 45, None, 0.03),
                                  tk.scale_int_sums(int_sums, None, x_scale, 0.03))
    with pytest.raises(ValueError, match="pack_ternary_tl2"):
        tk.linear_tl2(x, indices, signs, 70, None, 0.03)
    with pytest.raises(ValueError, match="row_scales"):
        tk.linear_tl2(x, indices, signs, 45, row_scales[:40], 0.0)
    with pytest.raises(ValueError, match="float32"):
        tk.linear_tl2(x.astype(np.float64), indices, signs, 45, None, 0.03)


def test_scale_int_sums_matches_the_numpy_expressions_bit_for_bit() -> None:
    rng = np.random.default_rng(12)
    int_sums = rng.integers(-(1 << 20), 1 << 20, size=(5, 37), dtype=np.int32)
    x_scale = rng.uniform(0.5, 300.0, size=5).astype(np.float32)
    row_scales = rng.uniform(0.001, 0.1, size=37).astype(np.float32)
    expected = int_sums.astype(np.float32)
    expected *= row_scales[None, :]
    expected *= (np.float32(1.0) / x_scale)[:, None]
    np.testing.assert_array_equal(tk.scale_int_sums(int_sums, row_scales, x_scale, 0.0), expected)
    weight_scale = np.float32(0.0371)
    factor = (np.float64(weight_scale) / x_scale.astype(np.float64)).astype(np.float32)
    np.testing.assert_array_equal(tk.scale_int_sums(int_sums, None, x_scale, float(weight_scale)),
                                  int_sums.astype(np.float32) * factor[:, None])
    np.testing.assert_array_equal(tk.scale_int_sums(int_sums[:, :20], None, x_scale, float(weight_scale)),
                                  int_sums[:, :20].astype(np.float32) * factor[:, None])
