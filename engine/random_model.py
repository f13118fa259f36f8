"""Randomly initialised models built in memory: tiny ones for engine tests, full-size shapes for benchmarks.

No file is read or written; the weights have the statistics of a trained BitNet closely enough to exercise the
kernels (about a third of the ternary values zero), not to produce meaningful text.
"""

from __future__ import annotations

import numpy as np

from engine.config import ModelArgs
from engine.formats.ggml import GGMLType
from engine.linear.base import Linear
from engine.linear.block import BlockQuantLinear
from engine.linear.dense import DenseLinear
from engine.linear.ternary import TernaryLinear
from engine.weights import Embedding, LayerWeights, ModelWeights

# BitNet b1.58 2B4T's shape (DESIGN §8), the one the peers in PEERS.md were measured on.
BITNET_2B4T_ARGS = ModelArgs(
    architecture="bitnet", hidden_size=2560, num_layers=30, num_heads=20, num_kv_heads=5, intermediate_size=6912,
    vocab_size=128256, rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=4096, hidden_act="relu2",
    tie_word_embeddings=True, bos_token_id=128000, eos_token_ids=(128001,),
)


def random_model(args: ModelArgs, seed: int = 0, head_type: GGMLType = GGMLType.F32,
                 linear_type: GGMLType | None = None) -> ModelWeights:
    """Random weights of shape `args`: ternary projections for BitNet (linear_type None), else `linear_type` blocks;
    the tied embedding/output head as float32 or quantized to `head_type`."""
    rng = np.random.default_rng(seed)

    def linear(out_features: int, in_features: int) -> Linear:
        if linear_type is None:
            # P(0) = 1/3 like a trained BitNet's weights; scale like mean|W| of its projections.
            ternary = rng.integers(-1, 2, size=(out_features, in_features), dtype=np.int8)
            return TernaryLinear.from_ternary(ternary, weight_scale=float(rng.uniform(0.02, 0.06)))
        weight = rng.standard_normal((out_features, in_features), dtype=np.float32) * np.float32(in_features ** -0.5)
        return BlockQuantLinear.quantize(weight, linear_type) if linear_type != GGMLType.F32 else DenseLinear(weight)

    def norm(size: int) -> np.ndarray:
        return rng.uniform(0.6, 1.4, size).astype(np.float32)  # (size,) float32

    q_out = args.num_heads * args.head_dim
    bitnet = args.architecture == "bitnet"
    layers = [
        LayerWeights(
            attn_norm=norm(args.hidden_size),
            ffn_norm=norm(args.hidden_size),
            **{name: linear(*shape) for name, shape in args.linear_shapes.items()},
            attn_sub_norm=norm(q_out) if bitnet else None,
            ffn_sub_norm=norm(args.intermediate_size) if bitnet else None,
        )
        for _ in range(args.num_layers)
    ]
    table = rng.standard_normal((args.vocab_size, args.hidden_size), dtype=np.float32) * np.float32(0.1)
    head: Linear = DenseLinear(table) if head_type == GGMLType.F32 else BlockQuantLinear.quantize(table, head_type)
    return ModelWeights(args, Embedding(head), layers, norm(args.hidden_size), head)
