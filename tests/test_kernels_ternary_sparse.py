"""Zero-skipping ternary kernels (sign-mask layout) against an integer numpy reference, both paths, odd shapes; and
TernaryLinear giving the same bits whether it skips zero columns or not."""

from __future__ import annotations

import numpy as np
import pytest

from engine.kernels import cpu_features
from engine.kernels import ternary_sparse as ts
from engine.kernels.ternary import quantize_activations
from engine.linear import ternary as ts_linear
from engine.linear.calibrate import ZERO_FRACTIONS, calibrate_zero_skipping, skip_threshold
from engine.linear.ternary import SKIP_MIN_ZERO_FRACTION, TernaryLinear

HAS_AVX512BW = cpu_features.detect_cpu_features().avx512bw
SPARSE = {"portable": ts._matmul_sparse_portable, "avx512": ts._matmul_sparse_avx512}
PATHS = ["portable", pytest.param("avx512", marks=pytest.mark.skipif(not HAS_AVX512BW, reason="no AVX-512 BW"))]


def sparse_int8(rng: np.random.Generator, num_tokens: int, in_features: int, zero_fraction: float) -> np.ndarray:
    """(T, in_features) int8 over the full range, -128 included, with about `zero_fraction` exact zeros."""
    xq = rng.integers(-128, 128, size=(num_tokens, in_features), dtype=np.int8)
    xq[rng.random((num_tokens, in_features)) < zero_fraction] = 0
    return xq


@pytest.mark.parametrize("num_rows, in_features", [(1, 5), (255, 300), (256, 256), (300, 1000), (513, 64)])
def test_sign_masks_round_trip(num_rows: int, in_features: int) -> None:
    ternary = np.random.default_rng(num_rows).integers(-1, 2, size=(num_rows, in_features), dtype=np.int8)
    masks = ts.pack_sign_masks(ternary)
    assert masks.shape == (-(-num_rows // 256), in_features, 64)
    np.testing.assert_array_equal(ts.unpack_sign_masks(masks, num_rows), ternary)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("num_rows, in_features, num_tokens, zero_fraction",
                         [(1, 5, 1, 0.0), (300, 700, 3, 0.6), (257, 1000, 2, 0.95), (64, 600, 1, 1.0)])
def test_sparse_matmul_is_exact(path: str, num_rows: int, in_features: int, num_tokens: int,
                                zero_fraction: float) -> None:
    rng = np.random.default_rng(in_features)
    ternary = rng.integers(-1, 2, size=(num_rows, in_features), dtype=np.int8)
    xq = sparse_int8(rng, num_tokens, in_features, zero_fraction)
    expected = xq.astype(np.int64) @ ternary.T.astype(np.int64)  # (T, N) exact
    got = SPARSE[path](xq, ts.pack_sign_masks(ternary))[:, :num_rows]
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("path", PATHS)
def test_int16_lanes_are_widened_before_they_overflow(path: str) -> None:
    """600 columns of -128 against all +1 rows: -76,800, far past int16, exact only if lanes are flushed in time."""
    xq = np.full((1, 600), -128, dtype=np.int8)
    got = SPARSE[path](xq, ts.pack_sign_masks(np.ones((40, 600), dtype=np.int8)))[:, :40]
    np.testing.assert_array_equal(got, np.full((1, 40), -76_800))


def test_sparse_matmul_checks_its_inputs() -> None:
    masks = ts.pack_sign_masks(np.ones((10, 64), dtype=np.int8))
    with pytest.raises(ValueError, match="xq must be"):
        ts.matmul_ternary_sparse(np.zeros((1, 32), dtype=np.int8), masks, 10)
    with pytest.raises(ValueError, match="does not fit"):
        ts.matmul_ternary_sparse(np.zeros((1, 64), dtype=np.int8), masks, 300)
    with pytest.raises(ValueError, match="masks must be"):
        ts.matmul_ternary_sparse(np.zeros((1, 64), dtype=np.int8), masks[:, :, :32], 10)


@pytest.mark.parametrize("zero_fraction", [0.2, 0.9])
def test_linear_with_sign_masks_gives_the_same_bits(zero_fraction: float) -> None:
    """Whichever kernel the layer picks (row kernel at 20% zeros, skipping at 90%), the output is identical."""
    rng = np.random.default_rng(7)
    ternary = rng.integers(-1, 2, size=(300, 700), dtype=np.int8)
    plain = TernaryLinear.from_ternary(ternary, weight_scale=0.02)
    skipping = TernaryLinear.from_ternary(ternary, weight_scale=0.02)
    skipping.keep_sign_masks()
    x = rng.standard_normal((1, 700)).astype(np.float32)
    x[rng.random(x.shape) < zero_fraction] = 0.0
    xq = quantize_activations(x)[0]
    assert (np.mean(xq[:, :700] == 0) >= SKIP_MIN_ZERO_FRACTION) == (zero_fraction > 0.5)  # both kernels are run
    np.testing.assert_array_equal(skipping(x), plain(x))
    assert skipping.num_bytes == plain.num_bytes + skipping.sign_masks.nbytes
    assert skipping.bytes_read_per_token == plain.num_bytes


def test_block_scaled_weights_cannot_keep_sign_masks() -> None:
    linear = TernaryLinear.from_ternary(np.ones((4, 256), dtype=np.int8), block_scales=np.ones((4, 1), np.float32))
    with pytest.raises(ValueError, match="per-tensor or per-row"):
        linear.keep_sign_masks()


def test_skip_threshold_is_where_skipping_wins_from_then_on() -> None:
    fractions = (0.5, 0.7, 0.9, 0.95)
    assert skip_threshold(fractions, [1.0] * 4, [1.5, 0.9, 0.8, 0.5]) == 0.7
    assert skip_threshold(fractions, [1.0] * 4, [0.9, 1.1, 0.8, 0.5]) == 0.9  # a loss at 70% rules out 50%
    assert skip_threshold(fractions, [1.0] * 4, [0.5, 0.5, 0.5, 1.0]) is None  # lost at the largest fraction
    assert skip_threshold(fractions, [1.0] * 4, [0.1] * 4) == 0.5


def test_calibration_sets_when_each_layer_skips_and_the_bits_never_change() -> None:
    rng = np.random.default_rng(9)
    ternary = rng.integers(-1, 2, size=(300, 700), dtype=np.int8)
    layers = [TernaryLinear.from_ternary(ternary, weight_scale=0.02) for _ in range(3)]
    for layer in layers:
        layer.keep_sign_masks()
        layer.keep_tl2()
    calibration = calibrate_zero_skipping(layers)
    assert calibration.threshold is None or calibration.threshold in ZERO_FRACTIONS
    assert len(calibration.dense_s) == len(calibration.skipping_s) == len(ZERO_FRACTIONS)
    assert all(layer.skip_min_zero_fraction == calibration.threshold for layer in layers)
    plain = TernaryLinear.from_ternary(ternary, weight_scale=0.02)
    x = rng.standard_normal((1, 700)).astype(np.float32)
    x[rng.random(x.shape) < 0.97] = 0.0
    xq, _, act_sum = quantize_activations(x)
    for threshold in (None, 0.5):  # never skips; skips this 97%-zero input
        layers[0].skip_min_zero_fraction = threshold
        np.testing.assert_array_equal(layers[0](x), plain(x))
    np.testing.assert_array_equal(layers[0].skipping_int_sums(xq), layers[0].dense_int_sums(xq, act_sum))
    with pytest.raises(ValueError, match="sign masks"):
        calibrate_zero_skipping([plain])


def test_a_layer_skips_zero_columns_only_from_its_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(10)
    layer = TernaryLinear.from_ternary(rng.integers(-1, 2, size=(64, 500), dtype=np.int8), weight_scale=0.1)
    layer.keep_sign_masks()
    skipped = []

    def counted(*args: object) -> np.ndarray:
        skipped.append(1)
        return ts.matmul_ternary_sparse(*args)

    monkeypatch.setattr(ts_linear, "matmul_ternary_sparse", counted)
    x = rng.uniform(0.5, 1.0, size=(1, 500)).astype(np.float32)
    x[0, :400] = 0.0  # 80% zeros
    for threshold, expected in ((None, 0), (0.9, 0), (0.8, 1), (0.5, 2)):
        layer.skip_min_zero_fraction = threshold
        layer(x)
        assert len(skipped) == expected
