"""engine.sampling: parameter validation, each filter against a plain full-sort reference, seeds, logprobs."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import sampling
from engine.sampling import Sampler, SamplingParams

NUM_DRAWS = 4000


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max()
    return shifted - np.log(np.exp(shifted).sum())


def _draw_counts(params: SamplingParams, logits: np.ndarray, num_draws: int = NUM_DRAWS) -> np.ndarray:
    sampler = Sampler(params)
    counts = np.zeros(logits.size, dtype=np.int64)  # (vocab,) int64 times each id was drawn
    for _ in range(num_draws):
        counts[sampler.sample(logits, {})[0]] += 1
    return counts


def _reference_allowed(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """Full-sort reference of top-k (ties kept), top-p and min-p: the ids that may be drawn, as a bool mask."""
    probs = np.exp(_log_softmax(logits / params.temperature))
    allowed = np.ones(logits.size, dtype=bool)
    if 0 < params.top_k < logits.size:
        allowed &= logits >= np.sort(logits)[::-1][params.top_k - 1]
    probs = np.where(allowed, probs, 0.0) / np.where(allowed, probs, 0.0).sum()
    if params.top_p < 1.0:
        order = np.lexsort((np.arange(logits.size), -probs))
        count = int(np.searchsorted(np.cumsum(probs[order]), params.top_p)) + 1
        nucleus = np.zeros(logits.size, dtype=bool)
        nucleus[order[:count]] = True
        allowed &= nucleus
    if params.min_p > 0.0:
        allowed &= probs >= params.min_p * probs.max()
    return allowed


# ---- SamplingParams ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("field", "value", "message"), [
    ("temperature", -0.1, r"temperature=-0\.1 is out of range: allowed \[0\.0, 2\.0\]"),
    ("temperature", float("nan"), "temperature must be a number"),
    ("top_p", 0.0, r"top_p=0\.0 is out of range: allowed \(0\.0, 1\.0\]"),
    ("top_p", 1.5, r"top_p=1\.5 is out of range"),
    ("top_k", -1, r"top_k=-1 is out of range: allowed >= 0"),
    ("top_k", 2.5, "top_k must be an integer"),
    ("min_p", 1.1, r"min_p=1\.1 is out of range: allowed \[0\.0, 1\.0\]"),
    ("seed", "7", "seed must be an integer or None"),
    ("max_tokens", 0, r"max_tokens=0 is out of range: allowed >= 1"),
    ("stop", ("ok", ""), "stop must hold non-empty strings"),
    ("presence_penalty", 2.5, r"presence_penalty=2\.5 is out of range: allowed \[-2\.0, 2\.0\]"),
    ("frequency_penalty", -3, r"frequency_penalty=-3 is out of range"),
    ("repetition_penalty", 0.0, r"repetition_penalty=0\.0 is out of range: allowed \(0\.0, 10\.0\]"),
    ("logit_bias", ((5, 101.0),), r"logit_bias\[5\]=101\.0 is out of range: allowed \[-100\.0, 100\.0\]"),
    ("logit_bias", ((-1, 1.0),), "logit_bias token id must be >= 0, got -1"),
    ("top_logprobs", 21, r"top_logprobs=21 is out of range: allowed \[0, 20\]"),
    ("n", 0, r"n=0 is out of range: allowed \[1, 128\]"),
])
def test_invalid_params_name_value_and_range(field: str, value: object, message: str) -> None:
    kwargs = {"logprobs": True} if field == "top_logprobs" else {}
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs, **{field: value})


def test_params_normalize_containers() -> None:
    params = SamplingParams(stop=["a", "b"], logit_bias={3: -5})  # type: ignore[arg-type]
    assert params.stop == ("a", "b")
    assert params.logit_bias == ((3, -5.0),)
    assert hash(params) == hash(SamplingParams(stop=("a", "b"), logit_bias=((3, -5.0),)))
    with pytest.raises(ValueError, match="needs logprobs=True"):
        SamplingParams(top_logprobs=3)


# ---- greedy, penalties, bias ------------------------------------------------------------------------------------


def test_greedy_is_argmax_with_lowest_id_on_ties() -> None:
    logits = np.array([0.0, 3.0, 1.0, 3.0], dtype=np.float32)
    assert Sampler(SamplingParams(temperature=0.0)).sample(logits, {}) == (1, None, None)


def test_logit_bias_applies_before_greedy() -> None:
    logits = np.array([5.0, 0.0, 1.0], dtype=np.float32)
    assert Sampler(SamplingParams(temperature=0.0, logit_bias=((2, 10.0),))).sample(logits, {})[0] == 2
    with pytest.raises(ValueError, match="logit_bias token id 7 >= vocab size 3"):
        Sampler(SamplingParams(logit_bias=((7, 1.0),))).sample(logits, {})


def test_presence_and_frequency_penalties_follow_openai() -> None:
    logits = np.zeros(4, dtype=np.float32)
    params = SamplingParams(temperature=0.0, presence_penalty=0.5, frequency_penalty=0.25, logprobs=True,
                            top_logprobs=4)
    _, _, top = Sampler(params).sample(logits, Counter({1: 2, 2: 1}))
    adjusted = np.array([0.0, -(0.5 + 2 * 0.25), -(0.5 + 0.25), 0.0])
    assert [i for i, _ in top] == [0, 3, 2, 1]
    assert [lp for _, lp in top] == pytest.approx(_log_softmax(adjusted)[[0, 3, 2, 1]].tolist(), abs=1e-6)


def test_repetition_penalty_covers_prompt_and_output() -> None:
    logits = np.array([2.0, 2.0, -1.0, -1.0, 1.5], dtype=np.float32)
    params = SamplingParams(temperature=0.0, repetition_penalty=2.0, logprobs=True, top_logprobs=5)
    _, _, top = Sampler(params, prompt_ids=[0, 2]).sample(logits, {4: 1})
    adjusted = np.array([1.0, 2.0, -2.0, -1.0, 0.75])  # positive logits halved, negative ones doubled
    assert dict(top) == pytest.approx(dict(enumerate(_log_softmax(adjusted).tolist())), abs=1e-6)
    assert top[0][0] == 1


def test_caller_logits_are_not_modified() -> None:
    logits = np.array([1.0, 2.0, 3.0], dtype=np.float32)
    params = SamplingParams(temperature=0.7, presence_penalty=1.0, repetition_penalty=1.5, logit_bias=((0, 3.0),))
    Sampler(params, prompt_ids=[1]).sample(logits, {2: 3})
    assert logits.tolist() == [1.0, 2.0, 3.0]


# ---- logprobs ---------------------------------------------------------------------------------------------------


def test_logprobs_are_the_model_distribution_before_temperature() -> None:
    logits = np.random.default_rng(0).normal(size=1000).astype(np.float32)
    params = SamplingParams(temperature=1.7, top_k=20, logprobs=True, top_logprobs=5, seed=1)
    token_id, logprob, top = Sampler(params).sample(logits, {})
    reference = _log_softmax(logits)
    assert logprob == pytest.approx(reference[token_id], abs=1e-5)
    best = np.argsort(-logits, kind="stable")[:5]
    assert [i for i, _ in top] == best.tolist()
    assert [lp for _, lp in top] == pytest.approx(reference[best].tolist(), abs=1e-5)


def test_top_logprobs_break_ties_by_lowest_id() -> None:
    logits = np.array([1.0, 5.0, 5.0, 0.0, 5.0], dtype=np.float32)
    top = Sampler(SamplingParams(temperature=0.0, logprobs=True, top_logprobs=2)).sample(logits, {})[2]
    assert [i for i, _ in top] == [1, 2]
    assert Sampler(SamplingParams(temperature=0.0, logprobs=True)).sample(logits, {})[2] == []


# ---- truncation against the full-sort reference -----------------------------------------------------------------


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0, top_k=3, seed=0),
    SamplingParams(temperature=1.0, top_p=0.75, seed=0),
    SamplingParams(temperature=0.5, top_p=0.6, seed=0),
    SamplingParams(temperature=1.0, min_p=0.4, seed=0),
    SamplingParams(temperature=1.0, min_p=0.15, seed=0),
    SamplingParams(temperature=1.0, top_k=4, top_p=0.9, min_p=0.1, seed=0),
])
def test_draws_stay_inside_the_reference_set_with_the_right_frequencies(params: SamplingParams) -> None:
    logits = np.log(np.array([0.05, 0.3, 0.5, 0.01, 0.1, 0.04], dtype=np.float64)).astype(np.float32)
    allowed = _reference_allowed(logits, params)
    counts = _draw_counts(params, logits)
    assert np.all(counts[~allowed] == 0)
    expected = np.where(allowed, np.exp(_log_softmax(logits / params.temperature)), 0.0)
    expected /= expected.sum()
    # A fixed seed makes this deterministic; 4 sigma of a binomial keeps it meaningful for any seed.
    sigma = np.sqrt(NUM_DRAWS * expected * (1 - expected))
    assert np.all(np.abs(counts - NUM_DRAWS * expected) <= 4 * sigma + 1)


def test_large_vocab_draw_never_picks_masked_tokens() -> None:
    vocab = 128256
    logits = np.full(vocab, -np.inf, dtype=np.float32)
    live = np.array([0, 511, 512, 1023, 70000, vocab - 1])  # block edges of the blocked inverse CDF
    logits[live] = 0.0
    counts = _draw_counts(SamplingParams(temperature=1.0, seed=3), logits, num_draws=600)
    assert set(np.flatnonzero(counts)) == set(live.tolist())
    assert counts[live].min() > 600 / 6 / 2


def test_seed_reproduces_a_request_whatever_runs_beside_it() -> None:
    rng = np.random.default_rng(5)
    rows = rng.normal(size=(20, 5000)).astype(np.float32)  # (steps, vocab) float32
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=1234)
    alone = Sampler(params)
    alone_ids = [alone.sample(row, {})[0] for row in rows]
    batched, neighbour = Sampler(params), Sampler(SamplingParams(temperature=1.0, seed=None))
    batched_ids = []
    for row in rows:
        neighbour.sample(rows[0], {})
        batched_ids.append(batched.sample(row, {})[0])
    assert batched_ids == alone_ids
    other_choice = Sampler(params, choice_index=1)
    assert [other_choice.sample(row, {})[0] for row in rows] != alone_ids


# ---- private helpers against plain references -------------------------------------------------------------------


@st.composite
def _rows(draw: st.DrawFn) -> np.ndarray:
    """(n,) float32 rows with few distinct values, so ties are common; long enough to take the blocked paths."""
    size = draw(st.integers(min_value=1, max_value=6000))
    spread = draw(st.sampled_from([2, 8, 1000]))
    return np.random.default_rng(draw(st.integers(0, 2**32))).integers(-spread, spread, size).astype(np.float32)


@given(values=_rows(), count=st.one_of(st.integers(1, 12), st.integers(1, 6000)))
@settings(max_examples=200, deadline=None)
def test_at_least_kth_keeps_every_tie(values: np.ndarray, count: int) -> None:
    count = min(count, values.size)
    kth = np.sort(values)[::-1][count - 1]
    assert sampling._at_least_kth(values, count).tolist() == np.flatnonzero(values >= kth).tolist()


@given(values=_rows(), top_p=st.floats(min_value=0.01, max_value=0.99))
@settings(max_examples=200, deadline=None)
def test_nucleus_matches_full_sort(values: np.ndarray, top_p: float) -> None:
    values = values / np.float32(4.0)  # a spread of 1000 would put all mass on one token
    weights = np.exp(values - values.max())
    order = np.lexsort((np.arange(values.size), -values))
    cumulative = np.cumsum(weights[order], dtype=np.float64) / np.sum(weights, dtype=np.float64)
    expected = order[:int(np.searchsorted(cumulative, top_p)) + 1]
    assert sampling._nucleus(values, weights, top_p).tolist() == expected.tolist()


@pytest.mark.parametrize("uniform", [0.0, 0.25, 0.5, 0.999999999])
def test_draw_inverts_the_cdf_and_skips_zero_weights(uniform: float) -> None:
    weights = np.zeros(3000, dtype=np.float32)
    weights[[7, 511, 512, 2999]] = [1.0, 1.0, 1.0, 1.0]
    expected = [7, 511, 512, 2999][min(int(uniform * 4), 3)]
    assert sampling._draw(weights, uniform) == expected
