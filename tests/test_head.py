"""The refined Q8_0 head: its best logits are exact float dot products, the rest within the int8 error."""

from __future__ import annotations

import numpy as np
import pytest

from engine.formats.ggml import GGMLType
from engine.linear.block import BlockQuantLinear
from engine.linear.head import PreciseQ8Head


@pytest.fixture(scope="module")
def head() -> PreciseQ8Head:
    rng = np.random.default_rng(0)
    return PreciseQ8Head(BlockQuantLinear.quantize(rng.standard_normal((3000, 96), dtype=np.float32), GGMLType.Q8_0),
                         num_refined=16)


def test_best_logits_are_exact_and_rest_close(head: PreciseQ8Head) -> None:
    x = np.random.default_rng(1).standard_normal((4, 96), dtype=np.float32)
    exact = x.astype(np.float64) @ head.dequantize_rows(np.arange(head.out_features)).T.astype(np.float64)
    logits = head(x)
    for t in range(len(x)):
        best = np.argsort(exact[t])[-8:]  # the true best 8 are among the 16 refined
        np.testing.assert_allclose(logits[t, best], exact[t, best], rtol=1e-6, atol=1e-5)
        assert int(np.argmax(logits[t])) == int(np.argmax(exact[t]))
    # Unrefined logits: int8 activation error only (a fraction of a logit here), never garbage.
    assert np.abs(logits - exact).max() < 0.5


def test_coarse_pass_uses_int8_activations(head: PreciseQ8Head) -> None:
    """The table's layers default to 16-bit activations; the head ranks the vocabulary with the faster int8 pass."""
    assert head.table.activation_bits == 16
    x = np.random.default_rng(3).standard_normal((3, 96), dtype=np.float32)
    logits, coarse = head(x), head.table.matmul_int8(x)
    assert np.all(np.sum(logits != coarse, axis=1) <= head.num_refined)  # all but the refined candidates
    assert np.any(coarse != head.table(x))  # and the int8 pass really differs from the table's own call


def test_batch_invariant(head: PreciseQ8Head) -> None:
    x = np.random.default_rng(2).standard_normal((5, 96), dtype=np.float32)
    batched = head(x)
    for t in range(len(x)):
        np.testing.assert_array_equal(batched[t], head(x[t:t + 1])[0])


def test_rejects_other_types() -> None:
    q4 = BlockQuantLinear.quantize(np.ones((4, 32), dtype=np.float32), GGMLType.Q4_0)
    with pytest.raises(ValueError, match="needs Q8_0"):
        PreciseQ8Head(q4)
