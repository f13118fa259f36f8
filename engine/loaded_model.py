"""The public model object: a Transformer plus its tokenizer, with single-sequence `logits` and greedy `generate`.

Serving goes through the scheduler instead; this is the simple API for scripts, tests and the CLI.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from engine.config import DEFAULT_KV_CACHE_DTYPE, KVCacheDType
from engine.kv_cache import KVCache
from engine.linear.a4_8 import ActivationMode, with_activation_mode
from engine.linear.fuse import fuse_projections
from engine.linear.ternary import with_tl2_decode
from engine.model import ForwardBatch, Transformer
from engine.tokenizer import Tokenizer
from engine.weights import ModelWeights


class LoadedModel:
    def __init__(self, weights: ModelWeights, tokenizer: Tokenizer | None, source: Path | None = None,
                 kv_cache_dtype: KVCacheDType = DEFAULT_KV_CACHE_DTYPE, activations: ActivationMode = "a8") -> None:
        # q|k|v and gate|up fused where their layouts allow; the separate matrices become views of the fused ones.
        # Ternary matrices also get the TL2 layout that decode reads. Then the activation mode's input handling
        # (engine/linear/a4_8.py) goes around them.
        self.weights = with_activation_mode(with_tl2_decode(fuse_projections(weights)), activations)
        self.activations = activations
        self.kv_cache_dtype = kv_cache_dtype  # what generate() stores keys and values as, like the served engine
        self.args = weights.args
        self.transformer = Transformer(self.weights)
        self.tokenizer = tokenizer
        self.source = source

    @property
    def id(self) -> str:
        """The served model id: the file or directory name without extension."""
        if self.source is None:
            return "in-memory"
        return self.source.stem if self.source.is_file() else self.source.name

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        ids = set(self.args.eos_token_ids)
        if self.tokenizer is not None:
            ids.update(self.tokenizer.eos_token_ids)
        return tuple(sorted(ids))

    def logits(self, token_ids: Sequence[int] | np.ndarray, kv_cache_dtype: KVCacheDType = "fp32") -> np.ndarray:
        """One forward pass over the whole sequence, no cache reuse -> (len, vocab_size) float32 logits.
        Keys and values are exact float32 unless `kv_cache_dtype` says otherwise (what a served request would see)."""
        ids = self._check_ids(token_ids)
        cache = KVCache.for_tokens(self.args, len(ids), kv_cache_dtype)
        cache.allocate(0, len(ids))
        return self.transformer.forward(self._batch(ids, 0, cache, all_logits=True), cache)

    def generate(self, token_ids: Sequence[int] | np.ndarray, max_new_tokens: int = 16,
                 stop_token_ids: Sequence[int] = ()) -> list[int]:
        """Greedy continuation using the KV cache; stops early only on one of `stop_token_ids` (kept in the output)."""
        return list(self.stream_greedy(token_ids, max_new_tokens, stop_token_ids))

    def stream_greedy(self, token_ids: Sequence[int] | np.ndarray, max_new_tokens: int,
                      stop_token_ids: Sequence[int] = ()) -> Iterator[int]:
        ids = self._check_ids(token_ids)
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        total = len(ids) + max_new_tokens
        if total > self.args.max_position_embeddings:
            raise ValueError(f"{len(ids)} prompt + {max_new_tokens} new tokens exceed the context length "
                             f"{self.args.max_position_embeddings}")
        cache = KVCache.for_tokens(self.args, total, self.kv_cache_dtype)
        cache.allocate(0, total)
        step_ids, start = ids, 0
        for _ in range(max_new_tokens):
            logits = self.transformer.forward(self._batch(step_ids, start, cache, all_logits=False), cache)
            next_id = int(np.argmax(logits[-1]))
            yield next_id
            if next_id in stop_token_ids:
                return
            start += len(step_ids)
            step_ids = np.array([next_id], dtype=np.int64)

    def _check_ids(self, token_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)  # (num_tokens,) int64
        if ids.size == 0:
            raise ValueError("token_ids is empty")
        if ids.min() < 0 or ids.max() >= self.args.vocab_size:
            raise ValueError(f"token ids must lie in [0, {self.args.vocab_size}), got [{ids.min()}, {ids.max()}]")
        if ids.size > self.args.max_position_embeddings:
            raise ValueError(f"{ids.size} tokens exceed the context length {self.args.max_position_embeddings}")
        return ids

    @staticmethod
    def _batch(ids: np.ndarray, start: int, cache: KVCache, all_logits: bool) -> ForwardBatch:
        num_tokens = len(ids)
        return ForwardBatch(
            token_ids=ids,
            positions=np.arange(start, start + num_tokens, dtype=np.int32),
            seq_index=np.zeros(num_tokens, dtype=np.int32),
            block_tables=cache.block_tables([0]),
            window_slots=cache.window_slots([0]),
            logits_rows=np.arange(num_tokens) if all_logits else np.array([num_tokens - 1]),
        )
