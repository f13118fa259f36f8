"""The transformer forward pass (BitNet b1.58 and Llama) over a flat batch of tokens from many sequences.

No I/O and no scheduling: weights come in as engine.weights.ModelWeights, the KV cache is passed in per call.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.config import ModelArgs
from engine.kernels.attention import AttentionPlan, paged_attention, plan_attention
from engine.kernels.kv_quant import store_window, write_kv
from engine.kv_cache import KVCache
from engine.weights import LayerWeights, ModelWeights


@dataclass
class ForwardBatch:
    token_ids: np.ndarray  # (num_tokens,) int64, tokens of all sequences, each sequence's tokens contiguous
    positions: np.ndarray  # (num_tokens,) int32, position of each token within its sequence
    seq_index: np.ndarray  # (num_tokens,) int32, row of block_tables that each token belongs to
    block_tables: np.ndarray  # (num_seqs, max_blocks) int32, from KVCache.block_tables
    logits_rows: np.ndarray  # (num_logits,) int64, token rows whose next-token logits are wanted
    window_slots: np.ndarray  # (num_seqs,) int32, from KVCache.window_slots (same sequences, same order)


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x: (num_tokens, dim) float32 -> x / sqrt(mean(x^2) + eps) * weight, in float32."""
    variance = np.mean(np.square(x), axis=-1, keepdims=True, dtype=np.float32)
    return (x * (np.float32(1.0) / np.sqrt(variance + np.float32(eps)))) * weight


class RotaryEmbedding:
    """Rotate-half RoPE (pairs j, j + head_dim/2), with cos/sin tables precomputed for every position."""

    def __init__(self, head_dim: int, theta: float, max_positions: int) -> None:
        inv_freq = (1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)).astype(np.float32)
        angles = np.arange(max_positions, dtype=np.float32)[:, None] * inv_freq[None, :]
        self.cos = np.cos(angles)  # (max_positions, head_dim // 2) float32
        self.sin = np.sin(angles)  # (max_positions, head_dim // 2) float32

    def __call__(self, x: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """x: (num_tokens, num_heads, head_dim) float32 -> rotated copy, same shape."""
        half = x.shape[-1] // 2
        cos = self.cos[positions][:, None, :]  # (num_tokens, 1, head_dim // 2)
        sin = self.sin[positions][:, None, :]
        x1, x2 = x[..., :half], x[..., half:]
        return np.concatenate((x1 * cos - x2 * sin, x2 * cos + x1 * sin), axis=-1)


class Transformer:
    def __init__(self, weights: ModelWeights) -> None:
        self.weights = weights
        self.args: ModelArgs = weights.args
        self.rope = RotaryEmbedding(self.args.head_dim, self.args.rope_theta, self.args.max_position_embeddings)

    def forward(self, batch: ForwardBatch, cache: KVCache) -> np.ndarray:
        """-> (num_logits, vocab_size) float32 logits for batch.logits_rows. Writes the batch's K/V into `cache`."""
        if batch.positions.size and int(batch.positions.max()) >= self.args.max_position_embeddings:
            raise ValueError(f"position {int(batch.positions.max())} exceeds the model's context length "
                             f"{self.args.max_position_embeddings}")
        hidden = self.weights.embedding(batch.token_ids)  # (num_tokens, hidden_size) float32
        plan = plan_attention(batch.seq_index, batch.positions, cache.layout)
        for layer_index, layer in enumerate(self.weights.layers):
            hidden = self._layer(layer, layer_index, hidden, batch, cache, plan)
        if batch.logits_rows.size == 0:  # a step of prefill chunks only: nothing to sample yet
            return np.empty((0, self.args.vocab_size), dtype=np.float32)
        hidden = rms_norm(hidden[batch.logits_rows], self.weights.final_norm, self.args.rms_norm_eps)
        return self.weights.lm_head(np.ascontiguousarray(hidden))

    def _layer(self, layer: LayerWeights, layer_index: int, hidden: np.ndarray, batch: ForwardBatch,
               cache: KVCache, plan: AttentionPlan) -> np.ndarray:
        args = self.args
        num_tokens = hidden.shape[0]
        x = rms_norm(hidden, layer.attn_norm, args.rms_norm_eps)
        q = layer.q_proj(x).reshape(num_tokens, args.num_heads, args.head_dim)
        k = layer.k_proj(x).reshape(num_tokens, args.num_kv_heads, args.head_dim)
        v = layer.v_proj(x).reshape(num_tokens, args.num_kv_heads, args.head_dim)
        q = self.rope(q, batch.positions)
        k = self.rope(k, batch.positions)
        pool, window = cache.pool[layer_index], cache.window[layer_index]  # this layer's blocks and window buffers
        exact = write_kv(k, np.ascontiguousarray(v), pool, cache.layout, batch.block_tables, batch.seq_index,
                         batch.positions)
        attn = paged_attention(q, exact, pool, window, cache.layout, batch.block_tables, batch.seq_index,
                               batch.positions, batch.window_slots, plan)
        store_window(exact, window, cache.layout, batch.seq_index, batch.positions, batch.window_slots,
                     plan.window_starts)
        attn = attn.reshape(num_tokens, args.num_heads * args.head_dim)
        if layer.attn_sub_norm is not None:
            attn = rms_norm(attn, layer.attn_sub_norm, args.rms_norm_eps)
        hidden = hidden + layer.o_proj(attn)

        x = rms_norm(hidden, layer.ffn_norm, args.rms_norm_eps)
        gate = layer.gate_proj(x)
        up = layer.up_proj(x)
        if args.hidden_act == "relu2":
            act = np.square(np.maximum(gate, np.float32(0.0))) * up
        else:
            act = gate / (np.float32(1.0) + np.exp(-gate)) * up
        if layer.ffn_sub_norm is not None:
            act = rms_norm(act, layer.ffn_sub_norm, args.rms_norm_eps)
        return hidden + layer.down_proj(np.ascontiguousarray(act))
