"""The engine on tiny random models: continuous batching, chunked prefill, preemption and aborts never change greedy
output, and never leak a KV block."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine.config import CacheConfig, ModelArgs, SchedulerConfig
from engine.detokenizer import IncrementalDetokenizer
from engine.engine import LLMEngine, RequestRejectedError
from engine.loaded_model import LoadedModel
from engine.random_model import random_model
from engine.request import FinishReason, Request, RequestOutput
from engine.sampling import SamplingParams
from engine.tokenizer import Tokenizer
from engine.warmup import WARMUP_PROMPT_TOKENS, warm_up

TINY = ModelArgs(architecture="bitnet", hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                 intermediate_size=320, vocab_size=49152, max_position_embeddings=512, hidden_act="relu2")
PROMPTS = [[1, 2, 3], list(range(10, 50)), [7] * 19, list(range(300, 333))]


@pytest.fixture(scope="module")
def model(fixtures_dir: Path) -> LoadedModel:
    tokenizer = Tokenizer.from_hf_dir(fixtures_dir / "smollm2" / "tokenizer")
    # Exact float32 keys and values, so cache sizes below are in fp32 blocks; tests/test_kv_cache.py runs every mode.
    return LoadedModel(random_model(TINY, seed=1), tokenizer, kv_cache_dtype="fp32")


def _request(model: LoadedModel, index: int, prompt: list[int], outputs: dict[str, list[RequestOutput]],
             max_tokens: int = 12) -> Request:
    request_id = f"r{index}"
    outputs[request_id] = []
    return Request(request_id, prompt, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True),
                   IncrementalDetokenizer(model.tokenizer, prompt), frozenset(), TINY.max_position_embeddings,
                   outputs[request_id].append)


def _run(engine: LLMEngine, requests: list[Request], max_steps: int = 1000) -> None:
    for request in requests:
        engine.add_request(request)
    for _ in range(max_steps):
        if not engine.has_work:
            return
        engine.step()
    raise AssertionError("engine did not finish")


def _tokens(outputs: list[RequestOutput]) -> list[int]:
    return [token for output in outputs for token in output.token_ids]


def _engine(model: LoadedModel, num_bytes: int = 64 << 20, max_num_seqs: int = 8, budget: int = 256) -> LLMEngine:
    return LLMEngine(model, SchedulerConfig(max_num_seqs, budget, 64), CacheConfig(num_bytes, "fp32", block_size=16))


def test_batched_greedy_equals_single_sequence_generate(model: LoadedModel) -> None:
    expected = [model.generate(prompt, max_new_tokens=12) for prompt in PROMPTS]
    outputs: dict[str, list[RequestOutput]] = {}
    engine = _engine(model)
    _run(engine, [_request(model, i, p, outputs) for i, p in enumerate(PROMPTS)])
    assert [_tokens(outputs[f"r{i}"]) for i in range(len(PROMPTS))] == expected
    assert all(outputs[f"r{i}"][-1].finish_reason is FinishReason.LENGTH for i in range(len(PROMPTS)))
    assert engine.cache.num_used_blocks == 0


def test_chunked_prefill_and_one_sequence_at_a_time_change_nothing(model: LoadedModel) -> None:
    expected = [model.generate(prompt, max_new_tokens=12) for prompt in PROMPTS]
    outputs: dict[str, list[RequestOutput]] = {}
    _run(_engine(model, max_num_seqs=1, budget=5), [_request(model, i, p, outputs) for i, p in enumerate(PROMPTS)])
    assert [_tokens(outputs[f"r{i}"]) for i in range(len(PROMPTS))] == expected


def test_preemption_by_recompute_changes_nothing(model: LoadedModel) -> None:
    expected = [model.generate(prompt, max_new_tokens=30) for prompt in PROMPTS]
    block_bytes = 2 * TINY.num_layers * 16 * TINY.num_kv_heads * TINY.head_dim * 4
    engine = _engine(model, num_bytes=6 * block_bytes)  # 96 tokens of cache for 4 sequences of up to 70
    outputs: dict[str, list[RequestOutput]] = {}
    preempted = 0
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(_request(model, i, prompt, outputs, max_tokens=30))
    while engine.has_work:
        preempted += engine.step().num_preempted
    assert preempted > 0
    assert [_tokens(outputs[f"r{i}"]) for i in range(len(PROMPTS))] == expected
    assert engine.cache.num_used_blocks == 0


def test_abort_frees_blocks_and_reports_abort(model: LoadedModel) -> None:
    engine = _engine(model)
    outputs: dict[str, list[RequestOutput]] = {}
    engine.add_request(_request(model, 0, PROMPTS[1], outputs, max_tokens=100))
    engine.add_request(_request(model, 1, PROMPTS[2], outputs, max_tokens=5))
    engine.step()
    assert engine.cache.num_used_blocks > 0
    engine.abort("r0")
    assert outputs["r0"][-1].finished and outputs["r0"][-1].finish_reason is FinishReason.ABORT
    while engine.has_work:
        engine.step()
    assert engine.cache.num_used_blocks == 0
    assert len(_tokens(outputs["r1"])) == 5


def test_request_longer_than_cache_or_context_is_rejected(model: LoadedModel) -> None:
    engine = _engine(model, num_bytes=1 << 16)
    outputs: dict[str, list[RequestOutput]] = {}
    with pytest.raises(RequestRejectedError, match="KV cache"):
        engine.add_request(_request(model, 0, list(range(200)), outputs, max_tokens=10))
    with pytest.raises(RequestRejectedError, match="maximum context length is 512"):
        _engine(model).add_request(_request(model, 1, list(range(500)), outputs, max_tokens=13))


def test_failing_step_fails_only_its_requests(model: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = _engine(model)
    outputs: dict[str, list[RequestOutput]] = {}
    original = model.transformer.forward
    calls = {"n": 0}

    def flaky(batch, cache):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("injected fault")
        return original(batch, cache)

    monkeypatch.setattr(model.transformer, "forward", flaky)
    _run(engine, [_request(model, 0, PROMPTS[0], outputs)])
    assert outputs["r0"][-1].finish_reason is FinishReason.ERROR and "injected fault" in outputs["r0"][-1].error
    monkeypatch.setattr(model.transformer, "forward", original)
    _run(engine, [_request(model, 1, PROMPTS[0], outputs)])
    assert len(_tokens(outputs["r1"])) == 12
    assert engine.cache.num_used_blocks == 0


def test_logits_rows_are_batch_invariant(model: LoadedModel) -> None:
    alone = [model.logits(prompt)[-1] for prompt in PROMPTS]
    engine = _engine(model)
    captured: list[np.ndarray] = []
    original = model.transformer.forward

    def capture(batch, cache):
        logits = original(batch, cache)
        captured.append(logits.copy())
        return logits

    model.transformer.forward = capture
    try:
        outputs: dict[str, list[RequestOutput]] = {}
        for i, prompt in enumerate(PROMPTS):
            engine.add_request(_request(model, i, prompt, outputs, max_tokens=1))
        engine.step()
    finally:
        model.transformer.forward = original
    for row, expected in zip(captured[0], alone, strict=True):
        np.testing.assert_array_equal(row, expected)


def test_failing_sampler_fails_only_its_request(model: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = _engine(model)
    outputs: dict[str, list[RequestOutput]] = {}
    broken = _request(model, 0, PROMPTS[0], outputs)
    healthy = _request(model, 1, PROMPTS[1], outputs)

    def explode(logits, counts):
        raise RuntimeError("injected sampler fault")

    monkeypatch.setattr(broken.sampler, "sample", explode)
    _run(engine, [broken, healthy])
    assert outputs["r0"][-1].finish_reason is FinishReason.ERROR and "injected sampler fault" in outputs["r0"][-1].error
    assert len(_tokens(outputs["r1"])) == 12 and outputs["r1"][-1].finish_reason is FinishReason.LENGTH
    assert engine.cache.num_used_blocks == 0


def test_warm_up_fits_any_model() -> None:
    """The served warm-up (a prefill long enough for the AMX kernels) must not refuse a legitimate model whose
    vocabulary or context is smaller than that prefill."""
    args = ModelArgs(architecture="llama", hidden_size=64, num_layers=1, num_heads=2, num_kv_heads=1,
                     intermediate_size=64, vocab_size=WARMUP_PROMPT_TOKENS // 4, max_position_embeddings=8)
    warm_up(LoadedModel(random_model(args), tokenizer=None))
