"""Model weights in the engine's kernel layouts, as every loader returns them. Holds data only, no I/O."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.config import ModelArgs
from engine.linear.base import Linear


class Embedding:
    """Token embedding table; rows are looked up one token at a time, never expanded whole to float."""

    def __init__(self, table: Linear) -> None:
        # Any Linear whose weight rows are the embedding vectors: (vocab_size, hidden_size). Tied models
        # use the same object as the output head, so the table is stored once.
        self.table = table

    def __call__(self, token_ids: np.ndarray) -> np.ndarray:
        """token_ids: (num_tokens,) int64 -> (num_tokens, hidden_size) float32."""
        return self.table.dequantize_rows(token_ids)


@dataclass
class LayerWeights:
    attn_norm: np.ndarray  # (hidden_size,) float32
    q_proj: Linear  # (num_heads * head_dim, hidden_size); rows in rotate-half (HF) RoPE order
    k_proj: Linear  # (num_kv_heads * head_dim, hidden_size); rows in rotate-half (HF) RoPE order
    v_proj: Linear  # (num_kv_heads * head_dim, hidden_size)
    o_proj: Linear  # (hidden_size, num_heads * head_dim)
    ffn_norm: np.ndarray  # (hidden_size,) float32
    gate_proj: Linear  # (intermediate_size, hidden_size)
    up_proj: Linear  # (intermediate_size, hidden_size)
    down_proj: Linear  # (hidden_size, intermediate_size)
    attn_sub_norm: np.ndarray | None = None  # (hidden_size,) float32; BitNet only, before o_proj
    ffn_sub_norm: np.ndarray | None = None  # (intermediate_size,) float32; BitNet only, before down_proj
    # Fused forms sharing memory with the matrices above (engine/linear/fuse.py): one matmul instead of three / two.
    qkv_proj: Linear | None = None  # (q rows | k rows | v rows, hidden_size)
    gate_up_proj: Linear | None = None  # (gate rows | up rows, hidden_size)


@dataclass
class ModelWeights:
    args: ModelArgs
    embedding: Embedding
    layers: list[LayerWeights]
    final_norm: np.ndarray  # (hidden_size,) float32
    lm_head: Linear  # (vocab_size, hidden_size); the embedding table itself when tied

    @property
    def num_bytes(self) -> int:
        """Bytes of weights held, counting a tied table once."""
        linears = [self.lm_head]
        if self.embedding.table is not self.lm_head:
            linears.append(self.embedding.table)
        for layer in self.layers:
            linears += [layer.q_proj, layer.k_proj, layer.v_proj, layer.o_proj,
                        layer.gate_proj, layer.up_proj, layer.down_proj]
        norms = sum(layer.attn_norm.nbytes + layer.ffn_norm.nbytes for layer in self.layers)
        return sum(linear.num_bytes for linear in linears) + norms + self.final_norm.nbytes
