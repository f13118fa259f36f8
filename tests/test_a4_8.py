"""BitNet a4.8 activation modes: the int4 absmean quantizer, TopK inputs, and what each mode does to a whole model."""

from __future__ import annotations

import math

import numpy as np
import pytest

from engine.config import ModelArgs
from engine.formats.ggml import GGMLType
from engine.linear.a4_8 import Int4Input, TopKInput, quantize_int4_absmean, with_activation_mode
from engine.linear.block import BlockQuantLinear
from engine.linear.calibrate import ZERO_FRACTIONS
from engine.linear.ternary import SKIP_MIN_ZERO_FRACTION, TernaryLinear
from engine.loaded_model import LoadedModel
from engine.random_model import random_model
from engine.warmup import warm_up

BITNET = ModelArgs(architecture="bitnet", hidden_size=320, num_layers=2, num_heads=4, num_kv_heads=2,
                   intermediate_size=640, vocab_size=300, max_position_embeddings=64, hidden_act="relu2", head_dim=64)


def test_int4_absmean_codes() -> None:
    x = np.random.default_rng(0).standard_normal((3, 100)).astype(np.float32) * np.float32(3.0)
    codes, scale = quantize_int4_absmean(x, 256)
    assert codes.shape == (3, 256) and codes.dtype == np.int8 and not codes[:, 100:].any()
    np.testing.assert_allclose(scale, math.sqrt(7.0) / np.abs(x).mean(axis=1), rtol=1e-6)
    assert codes.min() == -8 and codes.max() == 7  # Gaussian tails reach the clip on both sides
    inside = np.abs(x * scale[:, None]) < 7
    np.testing.assert_array_equal(codes[:, :100][inside], np.rint(x * scale[:, None])[inside])


def test_int4_input_on_ternary_and_block_weights() -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 320)).astype(np.float32)
    codes, scale = quantize_int4_absmean(x, 320)
    x_int4 = codes.astype(np.float64) / scale[:, None]  # what the layer sees
    ternary = rng.integers(-1, 2, size=(40, 320), dtype=np.int8)
    got = Int4Input(TernaryLinear.from_ternary(ternary, weight_scale=0.5))(x)
    np.testing.assert_allclose(got, x_int4 @ (0.5 * ternary.T), rtol=1e-5, atol=1e-5)
    block = BlockQuantLinear.quantize(rng.standard_normal((40, 320)).astype(np.float32), GGMLType.Q4_0)
    expected = x_int4 @ block.dequantize_rows(np.arange(40)).T.astype(np.float64)
    np.testing.assert_allclose(Int4Input(block)(x), expected, rtol=1e-4, atol=1e-4)


def test_topk_input_keeps_the_largest_half() -> None:
    rng = np.random.default_rng(2)
    ternary = rng.integers(-1, 2, size=(30, 64), dtype=np.int8)
    inner = TernaryLinear.from_ternary(ternary, weight_scale=1.0)
    x = rng.standard_normal((3, 64)).astype(np.float32)
    kept = np.abs(x) >= np.sort(np.abs(x), axis=1)[:, 32:33]  # the 32 largest |x| of each token
    np.testing.assert_array_equal(TopKInput(inner)(x), inner(np.where(kept, x, np.float32(0.0))))


def test_a8_sparse_is_exact_and_a4_8_changes_the_output() -> None:
    weights = random_model(BITNET, seed=3, head_type=GGMLType.F32)
    prompt = list(range(1, 20))
    exact = LoadedModel(weights, None).logits(prompt)
    sparse = LoadedModel(weights, None, activations="a8-sparse")
    assert all(layer.down_proj.sign_masks is not None for layer in sparse.weights.layers)
    np.testing.assert_array_equal(sparse.logits(prompt), exact)
    a4_8 = LoadedModel(weights, None, activations="a4.8")
    assert isinstance(a4_8.weights.layers[0].qkv_proj, Int4Input)
    assert isinstance(a4_8.weights.layers[0].o_proj, TopKInput)
    logits = a4_8.logits(prompt)
    assert not np.array_equal(logits, exact) and np.isfinite(logits).all()
    # Every input is quantized per token, so a position's logits do not depend on how many tokens share the batch.
    np.testing.assert_array_equal(a4_8.logits(prompt[:7]), logits[:7])


def test_warm_up_calibrates_when_a8_sparse_skips() -> None:
    """Serving warms a model up on its kernel thread; with sign masks kept, that also times skipping against the
    dense kernel and sets every down projection's threshold (one of the timed fractions, or never)."""
    sparse = LoadedModel(random_model(BITNET, seed=5, head_type=GGMLType.F32), None, activations="a8-sparse")
    downs = [layer.down_proj for layer in sparse.weights.layers]
    assert all(down.skip_min_zero_fraction == SKIP_MIN_ZERO_FRACTION for down in downs)
    warm_up(sparse)
    thresholds = {down.skip_min_zero_fraction for down in downs}
    assert len(thresholds) == 1 and thresholds <= {None, *ZERO_FRACTIONS}


def test_a8_leaves_the_weights_alone_and_unknown_modes_are_rejected() -> None:
    weights = random_model(BITNET, seed=4, head_type=GGMLType.F32)
    assert with_activation_mode(weights, "a8") is weights
    with pytest.raises(ValueError, match="activation mode"):
        with_activation_mode(weights, "a2")  # type: ignore[arg-type]
