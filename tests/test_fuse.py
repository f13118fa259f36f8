"""Fused q|k|v and gate|up matrices give the same outputs as the separate matrices, and share their memory."""

from __future__ import annotations

import numpy as np
import pytest

from engine.config import ModelArgs
from engine.formats.ggml import GGMLType
from engine.linear.fuse import fuse_projections
from engine.random_model import random_model

ARGS = ModelArgs(architecture="bitnet", hidden_size=320, num_layers=1, num_heads=4, num_kv_heads=2,
                 intermediate_size=640, vocab_size=64, max_position_embeddings=32, hidden_act="relu2")


@pytest.mark.parametrize("linear_type", [None, GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q8_0, GGMLType.F32])
def test_fused_outputs_equal_separate_outputs(linear_type: GGMLType | None) -> None:
    weights = random_model(ARGS, seed=3, linear_type=linear_type)
    layer = fuse_projections(weights).layers[0]
    original = weights.layers[0]
    x = np.random.default_rng(0).standard_normal((5, ARGS.hidden_size), dtype=np.float32)
    qkv = layer.qkv_proj(x)
    separate = np.concatenate([original.q_proj(x), original.k_proj(x), original.v_proj(x)], axis=1)
    gate_up = layer.gate_up_proj(x)
    # Ternary rows scale by the same factor in float32 either way up to one rounding; block formats are identical.
    tolerance = 1e-6 if linear_type is None else 0.0
    np.testing.assert_allclose(qkv, separate, rtol=tolerance, atol=tolerance)
    np.testing.assert_allclose(gate_up, np.concatenate([original.gate_proj(x), original.up_proj(x)], axis=1),
                               rtol=tolerance, atol=tolerance)
    np.testing.assert_array_equal(layer.k_proj(x), original.k_proj(x))  # the views still work alone
    # The views share the fused matrix's memory instead of holding a copy.
    storage = {None: "codes", GGMLType.F32: "weight"}.get(linear_type, "wq")
    assert np.shares_memory(getattr(layer.v_proj, storage), getattr(layer.qkv_proj, storage))
