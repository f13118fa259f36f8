"""The paged block pool and prefix sharing: block accounting never leaks under random allocate / append /
fork-prefix / abort / free sequences, a shared block always holds the tokens its adopter expects, and the engine's
greedy output is identical at batch 1 and batch N (chunked, preempted, prefix-shared) in every storage mode."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule

from engine.config import CacheConfig, ModelArgs, SchedulerConfig
from engine.detokenizer import IncrementalDetokenizer
from engine.engine import LLMEngine
from engine.kv_cache import CacheFullError, KVCache, bytes_per_token
from engine.loaded_model import LoadedModel
from engine.random_model import random_model
from engine.request import Request, RequestOutput
from engine.sampling import SamplingParams
from engine.tokenizer import Tokenizer

TINY = ModelArgs(architecture="llama", hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                 intermediate_size=256, vocab_size=49152, max_position_embeddings=512)
SMOLLM2 = ModelArgs(architecture="llama", hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3,
                    intermediate_size=1536, vocab_size=49152)
MODES = ("fp32", "fp16", "int8", "q4", "q3")


def test_bytes_per_token_shrink_with_the_bit_width() -> None:
    per_token = {mode: bytes_per_token(SMOLLM2, mode) for mode in MODES}
    # 3 KV heads x (K, V) x head_dim 64: fp16 2 bytes per value; int8 1 + 2 scales of 2 bytes per 64 values, etc.
    assert per_token == {"fp32": 1536, "fp16": 768, "int8": 408, "q4": 216, "q3": 168}
    assert per_token["q3"] <= 0.22 * per_token["fp16"]


def test_pool_is_sized_in_bytes_with_window_buffers_included() -> None:
    cache = KVCache.from_config(SMOLLM2, CacheConfig(64 << 20, "q3"), max_num_seqs=4)
    assert cache.num_bytes <= 64 << 20
    assert cache.num_bytes > (64 << 20) - cache.pool.shape[0] * cache.block_bytes  # less than a block left over
    assert cache.window.shape == (30, 4, 2, 256, 3, 64)
    assert cache.num_used_blocks == 0 and cache.num_used_bytes == 0
    cache.allocate(1, 100)
    assert cache.num_used_blocks == cache.blocks_for(100) == 1 + -(-(100 - cache.layout.sink_tokens) // 16)
    assert cache.num_used_bytes == cache.num_used_blocks * 30 * cache.block_bytes + cache.window[:, 0].nbytes
    with pytest.raises(ValueError, match="window_tokens"):
        CacheConfig(1 << 20, "q3", window_tokens=20)


class BlockAccounting(RuleBasedStateMachine):
    """Random sequences against a small pool; a shadow records which token prefix each computed block holds."""

    seqs = Bundle("seqs")

    def __init__(self) -> None:
        super().__init__()
        # q3 with 4-token blocks: a 1-token sink block, and 2-block exact windows that cut prefix matches.
        self.cache = KVCache(TINY, 20, block_size=4, dtype="q3", max_num_seqs=5, window_tokens=8)
        self.tokens: dict[int, list[int]] = {}
        self.computed: dict[int, int] = {}
        self.shadow: dict[int, tuple[int, ...]] = {}  # block -> the token prefix it holds, once computed
        self.next_id = 0

    def _compute(self, seq: int) -> None:
        """What a step's forward does: the tokens are computed and the blocks get their content."""
        tokens = self.tokens[seq]
        for index, block in enumerate(self.cache._seq_blocks[seq]):
            prefix = tuple(tokens[:min(self.cache.tokens_in(index + 1), len(tokens))])
            if self.cache._ref_counts[block] > 1:  # shared: computed by someone else, never rewritten
                assert self.shadow[block] == prefix
            self.shadow[block] = prefix
        self.computed[seq] = len(tokens)

    @rule()
    def next_step(self) -> None:
        """What the scheduler does first in a step: full blocks computed by the last one become shareable."""
        for seq, tokens in self.tokens.items():
            self.cache.register_computed(seq, self.computed[seq], tokens.__getitem__)

    def _start(self, tokens: list[int]) -> int | None:
        seq = self.next_id
        self.next_id += 1
        prefix = self.cache.match_prefix(tokens)
        for index, block in enumerate(prefix):
            assert self.shadow[block] == tuple(tokens[:self.cache.tokens_in(index + 1)])
        assert self.cache.tokens_in(len(prefix)) < len(tokens)
        if len(prefix) % 2:
            raise AssertionError("a match must end at an exact-window boundary (2 blocks)")
        fits = (self.cache.blocks_needed(seq, len(tokens), prefix) <= self.cache.num_free_blocks
                and len(self.tokens) < 5)
        if not fits:
            with pytest.raises(CacheFullError):
                self.cache.allocate(seq, len(tokens), prefix)
            return None
        self.cache.allocate(seq, len(tokens), prefix)
        self.tokens[seq] = list(tokens)
        self._compute(seq)
        return seq

    @rule(target=seqs, tokens=st.lists(st.integers(0, 2), min_size=1, max_size=24))
    def allocate(self, tokens: list[int]) -> int | None:
        return self._start(tokens)

    @rule(target=seqs, parent=seqs, cut=st.integers(0, 30), extra=st.lists(st.integers(0, 2), min_size=1,
                                                                              max_size=8))
    def fork_prefix(self, parent: int | None, cut: int, extra: list[int]) -> int | None:
        if parent not in self.tokens:
            return None
        return self._start(self.tokens[parent][:cut] + extra)

    @rule(seq=seqs, extra=st.lists(st.integers(0, 2), min_size=1, max_size=10))
    def append(self, seq: int | None, extra: list[int]) -> None:
        if seq not in self.tokens:
            return
        total = len(self.tokens[seq]) + len(extra)
        if self.cache.blocks_needed(seq, total) > self.cache.num_free_blocks:
            with pytest.raises(CacheFullError):
                self.cache.allocate(seq, total)
            return
        self.cache.allocate(seq, total)
        self.tokens[seq] += extra
        self._compute(seq)

    @rule(seq=consumes(seqs))
    def abort(self, seq: int | None) -> None:
        """Freed mid-step: the newest tokens were never computed, so nothing new becomes shareable."""
        if seq in self.tokens:
            self.cache.free(seq)
            del self.tokens[seq], self.computed[seq]

    @rule(seq=consumes(seqs))
    def free(self, seq: int | None) -> None:
        if seq in self.tokens:
            self.cache.register_computed(seq, self.computed[seq], self.tokens[seq].__getitem__)
            self.cache.free(seq)
            del self.tokens[seq], self.computed[seq]

    @invariant()
    def accounting_is_consistent(self) -> None:
        self.cache.check_invariants()
        for seq, tokens in self.tokens.items():
            assert len(self.cache._seq_blocks[seq]) == self.cache.blocks_for(len(tokens))
        held = {block for seq in self.tokens for block in self.cache._seq_blocks[seq]}
        assert self.cache.num_used_blocks == len(held)

    def teardown(self) -> None:
        for seq in list(self.tokens):
            self.cache.free(seq)
        self.cache.check_invariants()
        assert self.cache.num_used_blocks == 0 and self.cache.num_free_blocks == self.cache.num_blocks


TestBlockAccounting = BlockAccounting.TestCase
TestBlockAccounting.settings = settings(max_examples=60, stateful_step_count=30, deadline=None,
                                        suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def model(fixtures_dir: Path) -> LoadedModel:
    tokenizer = Tokenizer.from_hf_dir(fixtures_dir / "smollm2" / "tokenizer")
    return LoadedModel(random_model(TINY, seed=3), tokenizer)


SHARED = list(range(100, 140))  # a 40-token "system prompt"
PROMPTS = [[*SHARED, 7, 8, 9], list(range(10, 47)), SHARED + [5] * 11, [3, 1, 4]]


def _request(model: LoadedModel, index: int, prompt: list[int], outputs: dict[str, list[RequestOutput]],
             max_tokens: int) -> Request:
    outputs[f"r{index}"] = []
    return Request(f"r{index}", prompt, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True),
                   IncrementalDetokenizer(model.tokenizer, prompt), frozenset(), TINY.max_position_embeddings,
                   outputs[f"r{index}"].append)


def _engine(model: LoadedModel, dtype: str, num_blocks: int = 64, max_num_seqs: int = 4, budget: int = 256,
            prefix_caching: bool = True) -> LLMEngine:
    # Exact windows of 16 tokens (not the modes' 128 or 256), so these short prompts mostly read quantized blocks.
    window_tokens = 16 if dtype in ("int8", "q4", "q3") else 0
    probe = KVCache(TINY, 1, 16, dtype, max_num_seqs=max_num_seqs, window_tokens=window_tokens)
    num_bytes = num_blocks * probe.pool.shape[0] * probe.block_bytes + \
        (probe.window.nbytes if window_tokens else 0)
    config = CacheConfig(num_bytes, dtype, 16, enable_prefix_caching=prefix_caching, window_tokens=window_tokens)
    return LLMEngine(model, SchedulerConfig(max_num_seqs, budget, 64), config)


def _run(engine: LLMEngine, requests: list[Request]) -> int:
    """Step until done -> tokens computed (cached prefixes are not)."""
    for request in requests:
        engine.add_request(request)
    computed = 0
    for _ in range(2000):
        if not engine.has_work:
            engine.cache.check_invariants()
            assert engine.cache.num_used_blocks == 0
            return computed
        computed += engine.step().num_batched_tokens
    raise AssertionError("engine did not finish")


def _tokens(outputs: list[RequestOutput]) -> list[int]:
    return [token for output in outputs for token in output.token_ids]


@pytest.mark.parametrize("dtype", MODES)
def test_greedy_output_is_identical_at_batch_1_and_batch_n(model: LoadedModel, dtype: str) -> None:
    # Batch 1: each request alone in its own engine, without prefix caching.
    alone = []
    for index, prompt in enumerate(PROMPTS):
        outputs: dict[str, list[RequestOutput]] = {}
        _run(_engine(model, dtype, prefix_caching=False), [_request(model, index, prompt, outputs, 20)])
        alone.append(_tokens(outputs[f"r{index}"]))
    # Batch N, whole prompts; then 5-token chunks; then a pool so small that requests get preempted.
    for engine in (_engine(model, dtype), _engine(model, dtype, budget=5), _engine(model, dtype, num_blocks=7)):
        outputs = {}
        _run(engine, [_request(model, index, prompt, outputs, 20) for index, prompt in enumerate(PROMPTS)])
        assert [_tokens(outputs[f"r{index}"]) for index in range(len(PROMPTS))] == alone


@pytest.mark.parametrize("dtype", ["fp16", "q3"])
def test_second_request_reuses_a_shared_prefix_and_gets_the_same_output(model: LoadedModel, dtype: str) -> None:
    engine = _engine(model, dtype)
    outputs: dict[str, list[RequestOutput]] = {}
    _run(engine, [_request(model, 0, PROMPTS[0], outputs, 8)])
    computed = _run(engine, [_request(model, 1, PROMPTS[2], outputs, 8)])
    # The 40 shared tokens fill 2 blocks in fp16 (32 tokens) and 3 in q3 (its 6-token sink block, then 16 each);
    # the rest of the prompt is computed, then 7 decode steps.
    assert computed == len(PROMPTS[2]) - (32 if dtype == "fp16" else 38) + 7
    fresh: dict[str, list[RequestOutput]] = {}
    _run(_engine(model, dtype, prefix_caching=False), [_request(model, 1, PROMPTS[2], fresh, 8)])
    assert _tokens(outputs["r1"]) == _tokens(fresh["r1"])


def test_abort_and_preemption_release_shared_blocks(model: LoadedModel) -> None:
    engine = _engine(model, "q4", num_blocks=9)
    outputs: dict[str, list[RequestOutput]] = {}
    requests = [_request(model, index, SHARED + [index] * 5, outputs, 30) for index in range(4)]
    engine.add_request(requests[0])
    for _ in range(3):
        engine.step()
    for request in requests[1:]:
        engine.add_request(request)
    preempted = 0
    for step in range(400):
        if not engine.has_work:
            break
        stats = engine.step()
        preempted += stats.num_preempted
        engine.cache.check_invariants()
        if step == 6:
            engine.abort("r2")
    assert preempted > 0
    assert engine.cache.num_used_blocks == 0
    assert outputs["r2"][-1].finish_reason.value == "abort"
    assert all(len(_tokens(outputs[f"r{index}"])) == 30 for index in (0, 1, 3))
