"""Frozen engine configuration: model shape (ModelArgs), scheduling and KV cache. Built once, never mutated."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

Architecture = Literal["bitnet", "llama"]
# KV cache storage (engine/kernels/kv_quant.py): fp32 is exact and serves logits(); the others are served.
KVCacheDType = Literal["fp32", "fp16", "int8", "q4", "q3"]
KV_CACHE_DTYPES: tuple[KVCacheDType, ...] = ("fp32", "fp16", "int8", "q4", "q3")
# The lowest bit width whose perplexity stays within 1% of fp16 (bench/kv_quality.py on the default model: q4 +0.4%
# on GPL-3's first 4096 tokens; q3 +2.3% misses).
DEFAULT_KV_CACHE_DTYPE: KVCacheDType = "q4"
Activation = Literal["relu2", "silu"]


@dataclass(frozen=True)
class ModelArgs:
    architecture: Architecture
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    hidden_act: Activation = "silu"
    tie_word_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    head_dim: int = 0  # 0 means hidden_size // num_heads

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // max(self.num_heads, 1))
        for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size", "vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelArgs.{name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")

    @property
    def num_queries_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(out_features, in_features) of each projection of a layer, by its LayerWeights field name."""
        q_out, kv_out = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return {
            "q_proj": (q_out, self.hidden_size),
            "k_proj": (kv_out, self.hidden_size),
            "v_proj": (kv_out, self.hidden_size),
            "o_proj": (self.hidden_size, q_out),
            "gate_proj": (self.intermediate_size, self.hidden_size),
            "up_proj": (self.intermediate_size, self.hidden_size),
            "down_proj": (self.hidden_size, self.intermediate_size),
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelArgs:
        """Build from a dict, ignoring keys that are not fields (HF configs carry many)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 16  # sequences running at once
    max_num_batched_tokens: int = 512  # tokens (decode + prefill chunks) computed in one engine step
    max_queue: int = 64  # requests waiting for admission; one more is refused

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_queue"):
            if getattr(self, name) < 1:
                raise ValueError(f"SchedulerConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be at least max_num_seqs "
                             f"({self.max_num_seqs}) so every running sequence can decode each step")


@dataclass(frozen=True)
class CacheConfig:
    num_bytes: int = 512 * 1024 * 1024  # size of the KV block pool
    dtype: KVCacheDType = DEFAULT_KV_CACHE_DTYPE  # how keys and values are stored
    block_size: int = 16  # tokens per block
    memory_fraction: float = 0.0  # > 0: size the pool as this fraction of the memory available at start instead
    enable_prefix_caching: bool = True  # requests starting with the same full blocks of tokens share them
    window_tokens: int | None = None  # exact (fp16) window per sequence; None: the mode's own (engine/kv_cache.py)

    def __post_init__(self) -> None:
        if self.num_bytes < 1 or self.block_size < 1:
            raise ValueError(f"CacheConfig needs positive num_bytes and block_size, got {self.num_bytes}, "
                             f"{self.block_size}")
        if self.dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"CacheConfig.dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {self.dtype!r}")
        if self.window_tokens is not None and (self.window_tokens < 0 or self.window_tokens % self.block_size):
            raise ValueError(f"CacheConfig.window_tokens must be a non-negative multiple of block_size "
                             f"({self.block_size}), got {self.window_tokens}")
        if not 0.0 <= self.memory_fraction < 1.0:
            raise ValueError(f"CacheConfig.memory_fraction must lie in [0, 1), got {self.memory_fraction}")
