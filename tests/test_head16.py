"""The 16-bit-activation Q8_0 head kernel against a plain numpy reference of the same integer formula."""

from __future__ import annotations

import numpy as np
import pytest

from engine.formats.ggml import GGMLType
from engine.kernels.head16 import matmul_q8_0_x16, quantize_x16_blocks
from engine.linear.block import BlockQuantLinear
from engine.linear.head import PreciseQ8Head


def _reference(xq: np.ndarray, xd: np.ndarray, wq: np.ndarray, wd: np.ndarray) -> np.ndarray:
    num_blocks = wq.shape[1] // 32
    block_sums = np.einsum("tbj,nbj->tnb", xq.reshape(len(xq), num_blocks, 32).astype(np.int64),
                           wq.reshape(len(wq), num_blocks, 32).astype(np.int64))  # (T, N, blocks) exact
    return (block_sums * xd[:, None, :].astype(np.float64) * wd[None, :, :].astype(np.float64)).sum(-1)


@pytest.mark.parametrize("num_tokens, out_features, in_features", [(1, 1, 32), (3, 33, 96), (5, 100, 576)])
def test_matches_integer_reference(num_tokens: int, out_features: int, in_features: int) -> None:
    rng = np.random.default_rng(out_features)
    x = rng.standard_normal((num_tokens, in_features), dtype=np.float32)
    head = BlockQuantLinear.quantize(rng.standard_normal((out_features, in_features), dtype=np.float32),
                                     GGMLType.Q8_0)
    xq, xd = quantize_x16_blocks(x)
    assert np.abs(xq.astype(np.float32) * np.repeat(xd, 32, axis=1) - x).max() <= xd.max() / 2 + 1e-7
    got = matmul_q8_0_x16(xq, xd, head.wq, head.wd)
    np.testing.assert_allclose(got, _reference(xq, xd, head.wq, head.wd), rtol=1e-5, atol=1e-5)
    # Against float activations the only error left is the 16-bit rounding of x.
    exact = x.astype(np.float64) @ head.dequantize_rows(np.arange(out_features)).T.astype(np.float64)
    np.testing.assert_allclose(PreciseQ8Head(head)(x), exact, rtol=1e-3, atol=2e-3)


def test_batch_invariant_and_zero_rows() -> None:
    rng = np.random.default_rng(0)
    head = PreciseQ8Head(BlockQuantLinear.quantize(rng.standard_normal((40, 64), dtype=np.float32), GGMLType.Q8_0))
    x = rng.standard_normal((6, 64), dtype=np.float32)
    x[2] = 0.0  # an all-zero block must not divide by zero
    batched = head(x)
    for t in range(len(x)):
        np.testing.assert_array_equal(batched[t], head(x[t:t + 1])[0])
    assert not batched[2].any()


def test_rejects_other_types_and_bad_shapes() -> None:
    rng = np.random.default_rng(1)
    q4 = BlockQuantLinear.quantize(rng.standard_normal((4, 32), dtype=np.float32), GGMLType.Q4_0)
    with pytest.raises(ValueError, match="needs Q8_0"):
        PreciseQ8Head(q4)
    with pytest.raises(ValueError, match="K % 32 == 0"):
        quantize_x16_blocks(np.zeros((1, 33), dtype=np.float32))
