"""PreciseQ8Head: a Q8_0 output head whose most likely logits are exact to float32.

Next-token choice is decided in the head, and int8 activations there move logits by up to ~0.3 on the default model:
enough to flip a greedy choice whose margin is 0.08. So the whole vocabulary is scored with the fast int8 kernel, and
the `num_refined` best candidates of each token are rescored against float activations (a few dozen rows of the
table). Sampling, greedy choice and reported logprobs all rest on those refined values; the tail keeps int8 precision.
"""

from __future__ import annotations

import numpy as np

from engine.formats.ggml import GGMLType
from engine.linear.block import BlockQuantLinear
from engine.linear.dense import DenseLinear
from engine.weights import Embedding, ModelWeights

# Candidates rescored per token. The int8 error (~0.3 logit) is far below the spread of the top 64 logits of any
# real distribution, so the true best tokens are always among them.
NUM_REFINED = 64


class PreciseQ8Head:
    """The Linear protocol over a Q8_0 BlockQuantLinear (shared, not copied), with the best logits refined."""

    def __init__(self, table: BlockQuantLinear, num_refined: int = NUM_REFINED) -> None:
        if table.ggml_type != GGMLType.Q8_0:
            raise ValueError(f"PreciseQ8Head needs Q8_0 weights, got {table.ggml_type.name}")
        self.table = table
        self.in_features = table.in_features
        self.out_features = table.out_features
        self.num_refined = min(num_refined, table.out_features)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """x: (num_tokens, in_features) float32 -> (num_tokens, out_features) float32 logits."""
        logits = self.table.matmul_int8(x)  # (T, vocab) float32: int8 activations suffice to pick the candidates
        k = self.num_refined
        candidates = np.argpartition(logits, -k, axis=1)[:, -k:]  # (T, k) int64, each token's best k
        for t in range(len(x)):  # per token, so a token's logits never depend on the rest of the batch
            rows = self.table.dequantize_rows(candidates[t]).astype(np.float64)  # (k, in_features), exact weights
            logits[t, candidates[t]] = rows @ x[t].astype(np.float64)
        return logits

    def dequantize_rows(self, row_ids: np.ndarray) -> np.ndarray:
        return self.table.dequantize_rows(row_ids)

    @property
    def num_bytes(self) -> int:
        return self.table.num_bytes


def with_precise_head(weights: ModelWeights, quantize_float_head: bool = False) -> ModelWeights:
    """Give a Q8_0 output head refined top logits; with `quantize_float_head`, first turn a float head into Q8_0
    (a quarter of the bytes read per token). A tied table stays one object, shared with the embedding."""
    head = weights.lm_head
    tied = weights.embedding.table is head
    if quantize_float_head and isinstance(head, DenseLinear):
        head = BlockQuantLinear.quantize(head.weight, GGMLType.Q8_0)
    if not isinstance(head, BlockQuantLinear) or head.ggml_type != GGMLType.Q8_0:
        return weights
    precise = PreciseQ8Head(head)
    embedding = Embedding(precise) if tied else weights.embedding
    return ModelWeights(weights.args, embedding, weights.layers, weights.final_norm, precise)
