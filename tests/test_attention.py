"""KV record formats and the paged attention kernels against plain numpy: records decode to within one quantization
step, the kernels match a float attention over exactly what each query should read, stay within the error bound
that the quantization steps imply, and give bit-identical results whatever kernel, chunking or batch serves a query."""

from __future__ import annotations

import math

import numpy as np
import pytest

from engine.config import ModelArgs
from engine.kernels.attention import AttentionPlan, paged_attention, plan_attention, window_start
from engine.kernels.kv_quant import (
    KVFormat,
    KVLayout,
    dequantize_records,
    hadamard_rows,
    quantize_records,
    store_window,
    write_kv,
)
from engine.kv_cache import KVCache

MODES = ("fp32", "fp16", "int8", "q4", "q3")
# Small blocks and an 8-token window, so a few dozen tokens cross sinks, block and window boundaries many times.
BLOCK_SIZE = 4
WINDOW_TOKENS = 8
ARGS = ModelArgs(architecture="llama", hidden_size=256, num_layers=1, num_heads=4, num_kv_heads=2,
                 intermediate_size=64, vocab_size=16, max_position_embeddings=512)
HEAD_DIM = ARGS.head_dim  # 64


def _rows(rng: np.random.Generator, num_rows: int, outlier: float = 12.0, head_dim: int = HEAD_DIM) -> np.ndarray:
    """(num_rows, head_dim) float32 with what real keys have: an outlier channel, tiny and zero rows."""
    x = rng.standard_normal((num_rows, head_dim), dtype=np.float32) * rng.uniform(0.05, 2.0, (num_rows, 1))
    x[:, 5] *= outlier
    x[0] = 0.0
    x[1] *= 1e-6
    return x.astype(np.float32)


@pytest.mark.parametrize("fmt", [KVFormat.INT8, KVFormat.Q4, KVFormat.Q3])
@pytest.mark.parametrize("rotate", [False, True])
def test_quantized_records_decode_within_one_step(fmt: KVFormat, rotate: bool) -> None:
    x = _rows(np.random.default_rng(int(fmt)), 300)
    values, step = dequantize_records(quantize_records(x, fmt, rotate), fmt, HEAD_DIM)
    target = hadamard_rows(x) if rotate else x
    error = np.abs(values - target)
    # One step |d| at most (the value opposite the group's extreme may be clipped by one code), and
    # half a step for almost all values (fp16 rounding of the scale can move a code by one).
    assert np.all(error <= step * 1.001 + 1e-30)
    assert np.mean(error <= step * 0.5005 + 1e-30) > 0.98
    assert np.all(values[0] == 0.0)


def test_float_records_are_exact_and_fp16_rounds_like_numpy() -> None:
    x = _rows(np.random.default_rng(7), 200)
    x[2, :4] = [65504.0, -70000.0, 3e-8, -6e-5]  # largest half, beyond it (clamped), subnormal halves
    fp32, _ = dequantize_records(quantize_records(x, KVFormat.FP32), KVFormat.FP32, HEAD_DIM)
    np.testing.assert_array_equal(fp32, x)
    fp16, _ = dequantize_records(quantize_records(x, KVFormat.FP16), KVFormat.FP16, HEAD_DIM)
    np.testing.assert_array_equal(fp16, np.clip(x, -65504, 65504).astype(np.float16).astype(np.float32))


def test_hadamard_rotation_is_orthonormal_and_its_own_inverse() -> None:
    x = _rows(np.random.default_rng(3), 50)
    rotated = hadamard_rows(x)
    np.testing.assert_allclose(np.linalg.norm(rotated, axis=1), np.linalg.norm(x, axis=1), rtol=1e-5)
    np.testing.assert_allclose(hadamard_rows(rotated), x, atol=1e-5 * np.abs(x).max())


@pytest.mark.parametrize("width", [1, 8, 16, 64, 128, 256])
def test_hadamard_rotation_matches_butterflies_bit_for_bit(width: int) -> None:
    """The kernel (in-register stages for widths up to 8, vector loops above) against numpy butterflies in the same
    order: stage widths 1, 2, 4, ..., a + b below and a - b above, then one multiply by 1/sqrt(n)."""
    rng = np.random.default_rng(width)
    x = (rng.standard_normal((40, width)) * 10.0 ** rng.uniform(-4, 4, (40, 1))).astype(np.float32)
    expected = x.copy()
    stage = 1
    while stage < width:
        pairs = expected.reshape(40, width // (2 * stage), 2, stage)
        low, high = pairs[:, :, 0].copy(), pairs[:, :, 1].copy()
        pairs[:, :, 0], pairs[:, :, 1] = low + high, low - high
        stage *= 2
    expected *= np.float32(1.0 / math.sqrt(width))
    np.testing.assert_array_equal(hadamard_rows(x).view(np.int32), expected.view(np.int32))


class Scenario:
    """One layer's cache with several sequences whose keys and values are known, written step by step."""

    def __init__(self, dtype: str, lengths: list[int], seed: int, args: ModelArgs = ARGS) -> None:
        window_tokens = WINDOW_TOKENS if dtype in ("int8", "q4", "q3") else 0
        self.cache = KVCache(args, 64, BLOCK_SIZE, dtype, max_num_seqs=len(lengths), window_tokens=window_tokens)
        self.head_dim = head_dim = args.head_dim
        rng = np.random.default_rng(seed)
        # Per sequence (n, num_kv_heads, head_dim) float keys, values and (n, num_heads, head_dim) queries.
        self.k = [_rows(rng, n, 3.0, head_dim)[:, None, :] * rng.uniform(0.5, 1.5, (1, 2, 1)) for n in lengths]
        self.v = [rng.standard_normal((n, 2, head_dim)) for n in lengths]
        self.q = [rng.standard_normal((n, 4, head_dim)) * 0.4 for n in lengths]
        for seq, n in enumerate(lengths):
            self.cache.allocate(seq, n)

    def step(self, chunks: list[tuple[int, int, int]], plan: AttentionPlan | None = None) -> np.ndarray:
        """Write and attend chunks (seq, first position, number of tokens) as one batch -> (num_tokens, 4, 64)."""
        seqs = [seq for seq, _, _ in chunks]
        seq_index = np.concatenate([np.full(n, row, np.int32) for row, (_, _, n) in enumerate(chunks)])
        positions = np.concatenate([np.arange(first, first + n, dtype=np.int32) for _, first, n in chunks])
        k, v, q = (np.ascontiguousarray(np.concatenate([x[seq][first:first + n] for seq, first, n in chunks]),
                                        dtype=np.float32) for x in (self.k, self.v, self.q))
        tables, slots = self.cache.block_tables(seqs), self.cache.window_slots(seqs)
        plan = plan or plan_attention(seq_index, positions, self.cache.layout)
        exact = write_kv(k, v, self.cache.pool[0], self.cache.layout, tables, seq_index, positions)
        out = paged_attention(q, exact, self.cache.pool[0], self.cache.window[0], self.cache.layout, tables,
                              seq_index, positions, slots, plan)
        store_window(exact, self.cache.window[0], self.cache.layout, seq_index, positions, slots, plan.window_starts)
        return out

    def read(self, seq: int, position: int, which: int) -> tuple[np.ndarray, np.ndarray]:
        """What a query at `position` reads for keys (which=0) or values (1) 0..position of `seq`, in the cache's
        (rotated) space, and each element's error bound -> two (position + 1, num_kv_heads, head_dim) arrays."""
        layout: KVLayout = self.cache.layout
        rows = (self.k if which == 0 else self.v)[seq][:position + 1].astype(np.float32)
        target = hadamard_rows(rows) if layout.rotate else rows
        values = np.empty_like(target)
        bound = np.empty_like(target)
        exact_from = int(window_start(np.array([position], np.int32), layout)[0]) if layout.window_blocks else 1 << 30
        for j in range(position + 1):
            if j >= exact_from or layout.format == KVFormat.FP16:  # the window, or fp16 records
                values[j] = np.clip(target[j], -65504, 65504).astype(np.float16)
                bound[j] = np.abs(target[j]) * 2.0 ** -11 + 2.0 ** -25
            elif layout.format == KVFormat.FP32:
                values[j], bound[j] = target[j], 0.0
            else:
                fmt = KVFormat.INT8 if j < layout.sink_tokens else KVFormat(layout.format)
                values[j], bound[j] = dequantize_records(quantize_records(rows[j], fmt, bool(layout.rotate)), fmt,
                                                         self.head_dim)
        return values, bound


def _attention(q: np.ndarray, keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """q: (4, 64) scaled; keys, values: (n, 2, 64) -> outputs (4, 64) float64 and scores (4, n)."""
    group = q.shape[0] // keys.shape[1]
    scores = np.einsum("hd,nhd->hn", q, np.repeat(keys, group, axis=1).astype(np.float64))
    weights = np.exp(scores - scores.max(axis=1, keepdims=True))
    weights /= weights.sum(axis=1, keepdims=True)
    return np.einsum("hn,nhd->hd", weights, np.repeat(values, group, axis=1).astype(np.float64)), scores


# (seq, first position, tokens): prompts in uneven chunks, then decodes and a mixed step of both.
STEPS = [[(0, 0, 13), (1, 0, 3), (2, 0, 30)], [(0, 13, 1), (1, 3, 11), (2, 30, 1)],
         [(2, 31, 1), (0, 14, 9), (1, 14, 1)]]


@pytest.mark.parametrize("dtype", MODES)
def test_kernels_match_numpy_attention_over_what_each_query_reads(dtype: str) -> None:
    _check_against_numpy(Scenario(dtype, [23, 15, 32], seed=11))


@pytest.mark.parametrize("dtype", ["int8", "q3"])
@pytest.mark.parametrize("head_dim", [32, 256])
def test_other_head_widths_decode_like_64(dtype: str, head_dim: int) -> None:
    """The 3-bit decoder's two paths: vectors for quarters of 16k values (head_dim 256, like 64), a byte loop for
    others (head_dim 32: quarters of 8)."""
    args = ModelArgs(architecture="llama", hidden_size=4 * head_dim, num_layers=1, num_heads=4, num_kv_heads=2,
                     intermediate_size=64, vocab_size=16, max_position_embeddings=512)
    _check_against_numpy(Scenario(dtype, [23, 15, 32], seed=12, args=args))


def _check_against_numpy(scenario: Scenario) -> None:
    layout = scenario.cache.layout
    scale = 1.0 / math.sqrt(scenario.head_dim)
    checked = 0
    for chunks in STEPS:
        out = scenario.step(chunks)
        row = 0
        for seq, first, num_new in chunks:
            for position in range(first, first + num_new):
                q = scenario.q[seq][position].astype(np.float32)
                q_read = (hadamard_rows(q) if layout.rotate else q) * np.float32(scale)
                keys, key_bound = scenario.read(seq, position, 0)
                values, value_bound = scenario.read(seq, position, 1)
                expected, _ = _attention(q_read.astype(np.float64), keys, values)
                got = hadamard_rows(out[row]) if layout.rotate else out[row]
                # Float32 rounding only: both sides read the same quantized numbers.
                np.testing.assert_allclose(got, expected, rtol=1e-4, atol=2e-5 * np.abs(values).max())
                # Against unquantized float keys and values, within what the steps allow (DESIGN: scores move by
                # at most eps = max_j sum_d |q_d| step_jd, so weights by a factor exp(+-2 eps)).
                exact_k = hadamard_rows(scenario.k[seq][:position + 1].astype(np.float32)) if layout.rotate else \
                    scenario.k[seq][:position + 1]
                exact_v = hadamard_rows(scenario.v[seq][:position + 1].astype(np.float32)) if layout.rotate else \
                    scenario.v[seq][:position + 1]
                ideal, _ = _attention(q_read.astype(np.float64), exact_k, exact_v)
                group = 2
                eps = np.einsum("hd,nhd->hn", np.abs(q_read), np.repeat(key_bound, group, axis=1)).max(axis=1)
                bound = (np.expm1(2 * eps)[:, None] * np.repeat(np.abs(values).max(axis=0), group, axis=0)
                         + np.repeat(value_bound.max(axis=0), group, axis=0) + 1e-4)
                assert np.all(np.abs(got - ideal) <= bound)
                row += 1
                checked += 1
    assert checked == sum(n for chunks in STEPS for _, _, n in chunks)


def test_error_bound_is_tight_enough_to_fail_for_int8() -> None:
    """The bound test above means something: for 8-bit codes it lets the attention weights move by under 30%."""
    scenario = Scenario("int8", [40], seed=5)
    _, key_bound = scenario.read(0, 39, 0)
    q = scenario.q[0][39].astype(np.float32) / 8
    eps = np.einsum("hd,nhd->hn", np.abs(q), np.repeat(key_bound, 2, axis=1)).max()
    assert np.expm1(2 * eps) < 0.3


@pytest.mark.parametrize("dtype", MODES)
def test_decode_and_prefill_kernels_and_any_chunking_give_identical_bits(dtype: str) -> None:
    lengths = [37, 26]
    whole = Scenario(dtype, lengths, seed=2)
    reference = whole.step([(0, 0, 37), (1, 0, 26)])  # one prefill chunk each
    # The same tokens one at a time, then in odd chunks beside a different neighbour.
    one_by_one = Scenario(dtype, lengths, seed=2)
    rows = [one_by_one.step([(0, p, 1), (1, p, 1)]) for p in range(26)]
    rows += [one_by_one.step([(0, p, 1)]) for p in range(26, 37)]
    stepped = np.concatenate([np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows[:26]])])
    np.testing.assert_array_equal(stepped, reference)
    chunked = Scenario(dtype, lengths, seed=2)
    parts = [chunked.step([(1, 0, 5), (0, 0, 9)]), chunked.step([(0, 9, 20), (1, 5, 1)]),
             chunked.step([(1, 6, 20), (0, 29, 8)])]
    np.testing.assert_array_equal(np.concatenate([parts[0][5:], parts[1][:20], parts[2][20:]]), reference[:37])
    np.testing.assert_array_equal(np.concatenate([parts[0][:5], parts[1][20:], parts[2][:20]]), reference[37:])
    # A decode row forced through the prefill kernel gets the same bits as through the decode kernel.
    forced = Scenario(dtype, [38], seed=2)
    forced.step([(0, 0, 37)])
    decode_plan = plan_attention(np.zeros(1, np.int32), np.array([37], np.int32), forced.cache.layout)
    assert decode_plan.decode_rows.size == 1
    prefill_plan = decode_plan._replace(decode_rows=np.empty(0, np.int32),
                                        prefill_tiles=np.array([[0, 1]], dtype=np.int32))
    np.testing.assert_array_equal(forced.step([(0, 37, 1)], decode_plan), forced.step([(0, 37, 1)], prefill_plan))


def test_plan_splits_rows_between_kernels_and_at_window_boundaries() -> None:
    layout = KVCache(ARGS, 8, BLOCK_SIZE, "q3", window_tokens=WINDOW_TOKENS).layout
    assert layout.sink_tokens == 1  # 4 tokens of 28-byte records hold one 68-byte INT8 record
    seq_index = np.array([0] * 20 + [1] + [2] * 3, dtype=np.int32)
    positions = np.r_[np.arange(20), 50, np.arange(7, 10)].astype(np.int32)
    plan = plan_attention(seq_index, positions, layout)
    assert plan.decode_rows.tolist() == [20]
    # Windows: [0, 5) (the sink block and one block), then every 8 tokens from position 5.
    assert window_start(np.array([0, 4, 5, 12, 13, 20], np.int32), layout).tolist() == [0, 0, 5, 5, 13, 13]
    assert plan.prefill_tiles.tolist() == [[0, 5], [5, 13], [13, 20], [21, 24]]
    assert plan.seq_first_row.tolist() == [0, 20, 21]
    assert plan.window_starts.tolist() == [13, 45, 5]
