"""Paged KV cache: one preallocated pool of fixed-size blocks per layer, and each sequence's list of blocks.

Owns block accounting only; the attention kernels in engine/kernels/attention.py read and write the pool.
Engine thread only: nothing here is locked.
"""

from __future__ import annotations

import numpy as np

from engine.config import ModelArgs

DEFAULT_BLOCK_SIZE = 16


class CacheFullError(RuntimeError):
    """No free blocks left for a sequence's next tokens."""


class KVCache:
    def __init__(self, args: ModelArgs, num_blocks: int, block_size: int = DEFAULT_BLOCK_SIZE) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks ({num_blocks}) and block_size ({block_size}) must be positive")
        self.block_size = block_size
        self.num_blocks = num_blocks
        shape = (args.num_layers, num_blocks, block_size, args.num_kv_heads, args.head_dim)
        # np.zeros maps lazily, so resident memory grows with the blocks actually written.
        self.k = np.zeros(shape, dtype=np.float32)  # (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        self.v = np.zeros(shape, dtype=np.float32)  # same as k
        self._free_blocks = list(range(num_blocks - 1, -1, -1))  # stack: pop() gives the lowest free block
        self._seq_blocks: dict[int, list[int]] = {}

    @classmethod
    def from_bytes(cls, args: ModelArgs, num_bytes: int, block_size: int = DEFAULT_BLOCK_SIZE) -> KVCache:
        bytes_per_block = 2 * args.num_layers * block_size * args.num_kv_heads * args.head_dim * 4
        return cls(args, max(1, num_bytes // bytes_per_block), block_size)

    @property
    def num_bytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_blocks)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free_blocks)

    def blocks_needed(self, seq_id: int, num_tokens: int) -> int:
        """Blocks still to allocate so that sequence `seq_id` can hold `num_tokens` tokens in all."""
        have = len(self._seq_blocks.get(seq_id, ()))
        return max(0, -(-num_tokens // self.block_size) - have)

    def allocate(self, seq_id: int, num_tokens: int) -> None:
        """Grow sequence `seq_id` to room for `num_tokens` tokens in all; all or nothing."""
        needed = self.blocks_needed(seq_id, num_tokens)
        if needed > len(self._free_blocks):
            raise CacheFullError(f"sequence {seq_id} needs {needed} more blocks, {len(self._free_blocks)} free")
        blocks = self._seq_blocks.setdefault(seq_id, [])
        blocks.extend(self._free_blocks.pop() for _ in range(needed))

    def free(self, seq_id: int) -> None:
        self._free_blocks.extend(reversed(self._seq_blocks.pop(seq_id, [])))

    def block_tables(self, seq_ids: list[int]) -> np.ndarray:
        """(len(seq_ids), max_blocks) int32 block ids per sequence, padded with 0 (never read past a position)."""
        width = max((len(self._seq_blocks.get(s, ())) for s in seq_ids), default=0)
        tables = np.zeros((len(seq_ids), max(width, 1)), dtype=np.int32)
        for row, seq_id in enumerate(seq_ids):
            blocks = self._seq_blocks.get(seq_id, [])
            tables[row, : len(blocks)] = blocks
        return tables
