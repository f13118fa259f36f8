"""Paged KV cache: one preallocated byte pool of fixed-size blocks, per-sequence block lists and exact-window buffers,
and reference-counted sharing of full blocks between sequences with the same first tokens (prefix caching). Block
accounting only: engine/kernels/ write and read the records. Engine thread only: nothing here is locked."""

from __future__ import annotations

import mmap
import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from engine.config import CacheConfig, KVCacheDType, ModelArgs
from engine.kernels.kv_quant import KVFormat, KVLayout, make_layout

DEFAULT_BLOCK_SIZE = 16
_FORMATS: dict[str, KVFormat] = {"fp32": KVFormat.FP32, "fp16": KVFormat.FP16, "int8": KVFormat.INT8,
                                 "q4": KVFormat.Q4, "q3": KVFormat.Q3}
# Measured by bench/kv_quality.py on the default model. A Hadamard rotation cuts the error of 4- and 3-bit keys by
# a third (8-bit codes do not need it); what 4 and 3 bits really need is an exact (fp16) window: keys of a query's
# own window of recent tokens carry most of its attention, and their quantization error costs most perplexity.
_ROTATED = frozenset({"q4", "q3"})
_WINDOW_TOKENS: dict[str, int] = {"fp32": 0, "fp16": 0, "int8": 0, "q4": 128, "q3": 256}
_ROOT = -1  # content id of the empty prefix, the parent of every sequence's first block


class CacheFullError(RuntimeError):
    """No free blocks left for a sequence's next tokens."""


def layout_for(args: ModelArgs, dtype: KVCacheDType, block_size: int = DEFAULT_BLOCK_SIZE,
               window_tokens: int | None = None) -> KVLayout:
    """The storage layout of a mode; window_tokens None takes the mode's exact window (rounded to whole blocks)."""
    if window_tokens is None:
        window_tokens = _WINDOW_TOKENS[dtype] // block_size * block_size
    return make_layout(_FORMATS[dtype], args.num_kv_heads, args.head_dim, block_size, dtype in _ROTATED,
                       window_tokens)


def window_bytes_per_seq(args: ModelArgs, layout: KVLayout) -> int:
    """Bytes of one sequence's exact-window buffer, all layers (keys and values as halves)."""
    return 2 * 2 * args.num_layers * layout.window_blocks * layout.block_size * args.num_kv_heads * args.head_dim


def bytes_per_token(args: ModelArgs, dtype: KVCacheDType) -> int:
    """Bytes one token's keys and values take in one layer, scales included (sink tokens aside)."""
    layout = layout_for(args, dtype)
    return 2 * layout.num_kv_heads * layout.record_bytes


def tokens_in(layout: KVLayout, num_blocks: int) -> int:
    """Tokens held by a sequence's first `num_blocks` blocks (the first holds sink_tokens when there are sinks)."""
    if layout.sink_tokens == 0 or num_blocks == 0:
        return num_blocks * layout.block_size
    return layout.sink_tokens + (num_blocks - 1) * layout.block_size


def blocks_for(layout: KVLayout, num_tokens: int) -> int:
    """Blocks a sequence of `num_tokens` tokens occupies."""
    if layout.sink_tokens == 0 or num_tokens == 0:
        return -(-num_tokens // layout.block_size)
    return 1 + -(-max(num_tokens - layout.sink_tokens, 0) // layout.block_size)


def _lazy_zeros(shape: tuple[int, ...], dtype: type) -> np.ndarray:
    """A zero-filled array on its own anonymous mapping, reserved once: pages become resident when first written,
    4 KiB at a time. (numpy asks for 2 MiB huge pages for arrays this big; one written byte would cost 2 MiB.)"""
    num_bytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    buffer = mmap.mmap(-1, max(num_bytes, 1))
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        buffer.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(buffer, dtype=dtype, count=num_bytes // np.dtype(dtype).itemsize).reshape(shape)


def _available_memory_bytes() -> int:
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class KVCache:
    """Blocks of all layers in one pool (the same block id in every layer), handed out to sequences by id."""

    def __init__(self, args: ModelArgs, num_blocks: int, block_size: int = DEFAULT_BLOCK_SIZE,
                 dtype: KVCacheDType = "fp32", enable_prefix_caching: bool = True, max_num_seqs: int = 1,
                 window_tokens: int | None = None) -> None:
        if num_blocks <= 0 or block_size <= 0 or max_num_seqs <= 0:
            raise ValueError(f"num_blocks ({num_blocks}), block_size ({block_size}) and max_num_seqs ({max_num_seqs}) "
                             "must be positive")
        self.dtype = dtype
        self.layout = layout_for(args, dtype, block_size, window_tokens)
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.block_bytes = 2 * block_size * args.num_kv_heads * self.layout.record_bytes  # one layer's block
        # Reserved once; resident memory grows with the blocks written.
        self.pool = _lazy_zeros((args.num_layers, num_blocks, self.block_bytes), np.uint8)
        # (num_layers, num_blocks, block_bytes) uint8; block layout in engine/kernels/kv_quant.py (KVLayout)
        window_tokens = self.layout.window_blocks * block_size
        self.window = _lazy_zeros((args.num_layers, max_num_seqs if window_tokens else 1, 2, max(window_tokens, 1),
                                   args.num_kv_heads, args.head_dim), np.uint16)
        # (num_layers, num_slots, 2, window_tokens, num_kv_heads, head_dim) uint16 IEEE halves: each allocated
        # sequence's current exact window, keys then values (a 1-token dummy when the mode has no window)
        self._free_slots = list(range(max_num_seqs - 1, -1, -1))  # window slots; one per allocated sequence
        self._seq_slot: dict[int, int] = {}
        self._ref_counts = np.zeros(num_blocks, dtype=np.int32)  # (num_blocks,) int32, sequences holding a block
        self._free_plain = list(range(num_blocks - 1, -1, -1))  # free, content unknown; pop() gives the lowest
        self._free_cached: OrderedDict[int, None] = OrderedDict()  # free, still a prefix's; oldest evicted first
        self._seq_blocks: dict[int, list[int]] = {}
        # Prefix caching. A full, computed block is known by (content id of the blocks before it, its token ids);
        # content ids are never reused, so a key names exactly one token prefix and a lookup is never a collision.
        self._cached: dict[tuple[int, tuple[int, ...]], tuple[int, int]] = {}  # key -> (block, content id)
        self._block_key: dict[int, tuple[int, tuple[int, ...]]] = {}  # block -> its key, for blocks in _cached
        self._seq_registered: dict[int, tuple[int, int]] = {}  # seq -> (blocks registered, content id of the last)
        self._next_content_id = 0

    @classmethod
    def for_tokens(cls, args: ModelArgs, num_tokens: int, dtype: KVCacheDType) -> KVCache:
        """A cache just big enough for one sequence of `num_tokens` tokens."""
        return cls(args, blocks_for(layout_for(args, dtype), num_tokens), dtype=dtype)

    @classmethod
    def from_config(cls, args: ModelArgs, config: CacheConfig, max_num_seqs: int) -> KVCache:
        """Blocks and `max_num_seqs` window buffers in config.num_bytes, or config.memory_fraction of the memory
        available now."""
        num_bytes = config.num_bytes
        if config.memory_fraction:
            num_bytes = int(_available_memory_bytes() * config.memory_fraction)
        layout = layout_for(args, config.dtype, config.block_size, config.window_tokens)
        num_bytes -= max_num_seqs * window_bytes_per_seq(args, layout)
        if num_bytes <= 0:
            raise ValueError(f"{config.dtype} needs {window_bytes_per_seq(args, layout)} bytes of exact window per "
                             f"sequence, {max_num_seqs} sequences: raise --kv-cache-bytes or lower --max-num-seqs")
        bytes_per_block = 2 * args.num_layers * config.block_size * args.num_kv_heads * layout.record_bytes
        return cls(args, max(1, num_bytes // bytes_per_block), config.block_size, config.dtype,
                   config.enable_prefix_caching, max_num_seqs, config.window_tokens)

    @property
    def num_bytes(self) -> int:
        return self.pool.nbytes + (self.window.nbytes if self.layout.window_blocks else 0)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_plain) + len(self._free_cached)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def num_used_bytes(self) -> int:
        window_bytes = self.window[:, 0].nbytes if self.layout.window_blocks else 0
        return self.num_used_blocks * self.pool.shape[0] * self.block_bytes + len(self._seq_slot) * window_bytes

    @property
    def capacity_tokens(self) -> int:
        """Tokens one sequence could hold if it had every block."""
        return self.tokens_in(self.num_blocks)

    def tokens_in(self, num_blocks: int) -> int:
        """Tokens held by a sequence's first `num_blocks` blocks."""
        return tokens_in(self.layout, num_blocks)

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks a sequence of `num_tokens` tokens occupies."""
        return blocks_for(self.layout, num_tokens)

    def blocks_needed(self, seq_id: int, num_tokens: int, prefix: Sequence[int] = ()) -> int:
        """Free blocks that allocate(seq_id, num_tokens, prefix) would take, counting free prefix blocks it revives."""
        have = len(self._seq_blocks.get(seq_id, ())) or len(prefix)
        revived = sum(1 for block in prefix if self._ref_counts[block] == 0)
        return max(0, self.blocks_for(num_tokens) - have) + revived

    def allocate(self, seq_id: int, num_tokens: int, prefix: Sequence[int] = ()) -> None:
        """Grow sequence `seq_id` to room for `num_tokens` tokens in all; all or nothing. A new sequence may start
        with `prefix`, blocks from match_prefix, which it then shares."""
        needed = self.blocks_needed(seq_id, num_tokens, prefix)
        if needed > self.num_free_blocks:
            raise CacheFullError(f"sequence {seq_id} needs {needed} more blocks, {self.num_free_blocks} free")
        if prefix and seq_id in self._seq_blocks:
            raise ValueError(f"sequence {seq_id} already has blocks; only a new sequence can adopt a prefix")
        if seq_id not in self._seq_blocks:
            if not self._free_slots:
                raise CacheFullError(f"all {len(self._seq_slot)} window buffers are taken; raise max_num_seqs")
            self._seq_slot[seq_id] = self._free_slots.pop()
        blocks = self._seq_blocks.setdefault(seq_id, [])
        if prefix:
            for block in prefix:
                if self._ref_counts[block] == 0:
                    del self._free_cached[block]
                self._ref_counts[block] += 1
            blocks.extend(prefix)
            self._seq_registered[seq_id] = (len(prefix), self._cached[self._block_key[prefix[-1]]][1])
        for _ in range(self.blocks_for(num_tokens) - len(blocks)):
            blocks.append(self._take_free_block())

    def _take_free_block(self) -> int:
        if self._free_plain:
            block = self._free_plain.pop()
        else:  # evict the least recently freed cached block: its prefix can no longer be matched
            block, _ = self._free_cached.popitem(last=False)
            del self._cached[self._block_key.pop(block)]
        self._ref_counts[block] = 1
        return block

    def free(self, seq_id: int) -> None:
        """Release a sequence's blocks; blocks no other sequence holds become free (cached ones stay matchable until
        evicted, the sequence's last blocks first)."""
        self._seq_registered.pop(seq_id, None)
        if seq_id in self._seq_slot:
            self._free_slots.append(self._seq_slot.pop(seq_id))
        for block in reversed(self._seq_blocks.pop(seq_id, [])):
            self._ref_counts[block] -= 1
            if self._ref_counts[block] == 0:
                if block in self._block_key:
                    self._free_cached[block] = None
                else:
                    self._free_plain.append(block)
        # Keep at most a quarter of the pool as free-but-cached prefixes. Beyond that the oldest become plain free
        # blocks, reused first (LIFO), so resident memory plateaus instead of creeping over untouched pool pages.
        while len(self._free_cached) > self.num_blocks // 4:
            block, _ = self._free_cached.popitem(last=False)
            del self._cached[self._block_key.pop(block)]
            self._free_plain.append(block)

    def match_prefix(self, token_ids: Sequence[int]) -> list[int]:
        """Cached blocks holding the longest run of full blocks that starts `token_ids`, cut to whole exact windows
        (the window a sequence resumes in must be computed, so that it holds the exact keys). The last token is
        never covered: its logits are needed, so it is always computed."""
        if not self.enable_prefix_caching:
            return []
        blocks: list[int] = []
        parent = _ROOT
        while (end := self.tokens_in(len(blocks) + 1)) < len(token_ids):
            entry = self._cached.get((parent, tuple(token_ids[self.tokens_in(len(blocks)):end])))
            if entry is None:
                break
            blocks.append(entry[0])
            parent = entry[1]
        if self.layout.window_blocks:
            del blocks[len(blocks) // self.layout.window_blocks * self.layout.window_blocks:]
        return blocks

    def register_computed(self, seq_id: int, num_computed_tokens: int, token_at: Callable[[int], int]) -> None:
        """Make the sequence's blocks that are full of computed tokens matchable by later sequences.
        token_at(i) gives the sequence's i-th token id."""
        blocks = self._seq_blocks.get(seq_id)
        if not self.enable_prefix_caching or not blocks:
            return
        num_registered, parent = self._seq_registered.get(seq_id, (0, _ROOT))
        while num_registered < len(blocks) and (end := self.tokens_in(num_registered + 1)) <= num_computed_tokens:
            key = (parent, tuple(token_at(i) for i in range(self.tokens_in(num_registered), end)))
            entry = self._cached.get(key)
            if entry is None:
                block = blocks[num_registered]
                entry = (block, self._next_content_id)
                self._next_content_id += 1
                self._cached[key] = entry
                self._block_key[block] = key
            # else another block already holds this content (computed at the same time); this one stays private.
            parent = entry[1]
            num_registered += 1
        self._seq_registered[seq_id] = (num_registered, parent)

    def window_slots(self, seq_ids: list[int]) -> np.ndarray:
        """(len(seq_ids),) int32 window buffer of each sequence (0 for one without blocks: it is never read)."""
        return np.array([self._seq_slot.get(s, 0) for s in seq_ids], dtype=np.int32)  # (len(seq_ids),) int32

    def block_tables(self, seq_ids: list[int]) -> np.ndarray:
        """(len(seq_ids), max_blocks) int32 block ids per sequence, padded with 0 (never read past a position)."""
        width = max((len(self._seq_blocks.get(s, ())) for s in seq_ids), default=0)
        tables = np.zeros((len(seq_ids), max(width, 1)), dtype=np.int32)  # see docstring
        for row, seq_id in enumerate(seq_ids):
            blocks = self._seq_blocks.get(seq_id, [])
            tables[row, : len(blocks)] = blocks
        return tables

    def check_invariants(self) -> None:
        """Raise AssertionError if the block accounting is inconsistent (tests call this after every operation)."""
        held = np.zeros(self.num_blocks, dtype=np.int32)  # (num_blocks,) int32, references counted from the lists
        for blocks in self._seq_blocks.values():
            assert len(set(blocks)) == len(blocks), "a sequence holds a block twice"
            np.add.at(held, blocks, 1)
        assert np.array_equal(held, self._ref_counts), "reference counts differ from the sequences' block lists"
        free = self._free_plain + list(self._free_cached)
        assert len(set(free)) == len(free), "a block is free twice"
        assert set(free) == set(np.flatnonzero(held == 0).tolist()), "free blocks are not exactly the unheld ones"
        assert set(self._free_cached) <= set(self._block_key), "a free cached block has no key"
        assert not set(self._free_plain) & set(self._block_key), "a free plain block still has a key"
        assert all(self._cached[key][0] == block for block, key in self._block_key.items()), "stale block keys"
        assert len(self._cached) == len(self._block_key), "cached keys without their blocks"
        slots = list(self._seq_slot.values())
        assert set(self._seq_slot) == set(self._seq_blocks), "window slots and block lists name different sequences"
        assert len(set(slots + self._free_slots)) == len(slots) + len(self._free_slots), "a window slot is shared"
