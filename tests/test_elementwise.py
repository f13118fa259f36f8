"""Fused glue kernels against the plain numpy formulas they replace."""

from __future__ import annotations

import numpy as np
import pytest

from engine.kernels.elementwise import add_rms_norm, apply_rope, gated_activation, rms_norm


def _rms_reference(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    x64 = x.astype(np.float64)
    return x64 / np.sqrt((x64 * x64).mean(-1, keepdims=True) + eps) * weight


@pytest.mark.parametrize("num_tokens, dim", [(1, 7), (3, 128), (5, 577)])
def test_rms_norm_and_residual_add(num_tokens: int, dim: int) -> None:
    rng = np.random.default_rng(dim)
    x = rng.standard_normal((num_tokens, dim), dtype=np.float32)
    delta = rng.standard_normal((num_tokens, dim), dtype=np.float32)
    weight = rng.uniform(0.5, 1.5, dim).astype(np.float32)
    np.testing.assert_allclose(rms_norm(x, weight, 1e-5), _rms_reference(x, weight, 1e-5), rtol=2e-6, atol=2e-6)
    hidden = x.copy()
    normed = add_rms_norm(hidden, delta, weight, 1e-5)
    np.testing.assert_array_equal(hidden, x + delta)
    np.testing.assert_allclose(normed, _rms_reference(x + delta, weight, 1e-5), rtol=2e-6, atol=2e-6)
    assert np.all(rms_norm(np.zeros_like(x), weight, 1e-5) == 0)  # eps keeps an all-zero row finite


def test_rope_matches_rotate_half() -> None:
    rng = np.random.default_rng(0)
    num_tokens, num_heads, head_dim, max_positions = 4, 3, 8, 20
    inv_freq = 1.0 / 10000.0 ** (np.arange(0, head_dim, 2) / head_dim)
    angles = np.arange(max_positions)[:, None] * inv_freq[None, :]
    cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    x = rng.standard_normal((num_tokens, num_heads, head_dim), dtype=np.float32)
    positions = np.array([0, 5, 6, 19], dtype=np.int32)
    c = np.concatenate([cos, cos], -1)[positions][:, None, :]
    s = np.concatenate([sin, sin], -1)[positions][:, None, :]
    rotated_half = np.concatenate([-x[..., head_dim // 2:], x[..., :head_dim // 2]], -1)
    expected = x * c + rotated_half * s
    apply_rope(x, positions, cos, sin)
    np.testing.assert_allclose(x, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("relu2", [True, False])
def test_gated_activation(relu2: bool) -> None:
    rng = np.random.default_rng(1)
    gate_up = rng.standard_normal((3, 2 * 33), dtype=np.float32) * 4
    gate, up = gate_up[:, :33].astype(np.float64), gate_up[:, 33:].astype(np.float64)
    expected = np.maximum(gate, 0) ** 2 * up if relu2 else gate / (1 + np.exp(-gate)) * up
    np.testing.assert_allclose(gated_activation(gate_up, relu2), expected, rtol=1e-5, atol=1e-5)


def test_bad_shapes_raise() -> None:
    with pytest.raises(ValueError):
        rms_norm(np.zeros((2, 4), dtype=np.float64), np.ones(4, dtype=np.float32), 1e-5)
    with pytest.raises(ValueError):
        gated_activation(np.zeros((2, 5), dtype=np.float32), True)
