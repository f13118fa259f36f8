"""The transformer forward pass (BitNet b1.58 and Llama) over a flat batch of tokens from many sequences.

No I/O and no scheduling: weights come in as engine.weights.ModelWeights, the KV cache is passed in per call.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.config import ModelArgs
from engine.kernels.attention import AttentionPlan, paged_attention, plan_attention
from engine.kernels.elementwise import add_rms_norm, apply_rope, gated_activation, rms_norm
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


class RotaryEmbedding:
    """Rotate-half RoPE (pairs j, j + head_dim/2), with cos/sin tables precomputed for every position; applied in
    place by engine.kernels.elementwise.apply_rope."""

    def __init__(self, head_dim: int, theta: float, max_positions: int) -> None:
        inv_freq = (1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)).astype(np.float32)
        angles = np.arange(max_positions, dtype=np.float32)[:, None] * inv_freq[None, :]
        self.cos = np.cos(angles)  # (max_positions, head_dim // 2) float32
        self.sin = np.sin(angles)  # (max_positions, head_dim // 2) float32


class Transformer:
    def __init__(self, weights: ModelWeights) -> None:
        """`weights` with fused q|k|v and gate|up matrices where available (engine/linear/fuse.py)."""
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
        hidden = rms_norm(np.ascontiguousarray(hidden[batch.logits_rows]), self.weights.final_norm,
                          self.args.rms_norm_eps)
        return self.weights.lm_head(hidden)

    def _layer(self, layer: LayerWeights, layer_index: int, hidden: np.ndarray, batch: ForwardBatch,
               cache: KVCache, plan: AttentionPlan) -> np.ndarray:
        args = self.args
        num_tokens = hidden.shape[0]
        x = rms_norm(hidden, layer.attn_norm, args.rms_norm_eps)
        q, k, v = self._qkv(layer, x)
        apply_rope(q, batch.positions, self.rope.cos, self.rope.sin)
        apply_rope(k, batch.positions, self.rope.cos, self.rope.sin)
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
        x = add_rms_norm(hidden, layer.o_proj(attn), layer.ffn_norm, args.rms_norm_eps)  # hidden += o_proj(attn)
        if layer.gate_up_proj is not None:
            gate_up = layer.gate_up_proj(x)  # (num_tokens, 2 * intermediate_size) float32
        else:
            gate_up = np.concatenate((layer.gate_proj(x), layer.up_proj(x)), axis=1)
        act = gated_activation(gate_up, relu2=args.hidden_act == "relu2")
        if layer.ffn_sub_norm is not None:
            act = rms_norm(act, layer.ffn_sub_norm, args.rms_norm_eps)
        hidden += layer.down_proj(act)
        return hidden

    def _qkv(self, layer: LayerWeights, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """-> q (T, num_heads, head_dim), k and v (T, num_kv_heads, head_dim), contiguous float32."""
        args = self.args
        num_tokens = x.shape[0]
        if layer.qkv_proj is None:
            q, k, v = layer.q_proj(x), layer.k_proj(x), layer.v_proj(x)
        else:
            qkv = layer.qkv_proj(x)  # (T, (num_heads + 2 * num_kv_heads) * head_dim) float32
            q_end = args.num_heads * args.head_dim
            k_end = q_end + args.num_kv_heads * args.head_dim
            q, k, v = qkv[:, :q_end], qkv[:, q_end:k_end], qkv[:, k_end:]
        return (np.ascontiguousarray(q).reshape(num_tokens, args.num_heads, args.head_dim),
                np.ascontiguousarray(k).reshape(num_tokens, args.num_kv_heads, args.head_dim),
                np.ascontiguousarray(v).reshape(num_tokens, args.num_kv_heads, args.head_dim))
