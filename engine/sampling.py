"""Choosing the next token from one request's logits: SamplingParams and the per-request Sampler.

Owns numpy work on a single (vocab,) row; it never runs the model, never decodes text and holds no state shared
between requests.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

# (chosen token id, its logprob, [(id, logprob)] most likely first); both logprob parts are None unless requested.
SampleResult = tuple[int, float | None, list[tuple[int, float]] | None]

MAX_TOP_LOGPROBS = 20  # OpenAI's limit
MAX_N = 128  # OpenAI's limit on choices per request
_NUM_NUCLEUS_START = 64  # first guess at how many tokens hold top_p of the mass; grown x8 when wrong
# Rows are scanned in blocks of this many logits: block maxima bound a top-k cheaply, block sums speed up the draw.
_BLOCK_SIZE = 512


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks tokens, converted once from the OpenAI request at the server edge."""

    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # 1 = off
    top_k: int = 0  # 0 = off
    min_p: float = 0.0  # 0 = off
    seed: int | None = None  # None = fresh entropy per request
    max_tokens: int | None = None  # None = until the context is full
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # 1 = off
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)
    logprobs: bool = False
    top_logprobs: int = 0
    n: int = 1
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        # Accept lists/dicts from callers but store tuples, so params stay hashable and immutable.
        object.__setattr__(self, "stop", tuple(self.stop))
        bias = self.logit_bias.items() if isinstance(self.logit_bias, Mapping) else self.logit_bias
        object.__setattr__(self, "logit_bias", tuple((int(i), float(b)) for i, b in bias))
        _check_range("temperature", self.temperature, 0.0, 2.0)
        _check_range("top_p", self.top_p, 0.0, 1.0, low_open=True)
        _check_int("top_k", self.top_k, 0)
        _check_range("min_p", self.min_p, 0.0, 1.0)
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens, 1)
        for text in self.stop:
            if not isinstance(text, str) or not text:
                raise ValueError(f"stop must hold non-empty strings, got {self.stop!r}")
        _check_range("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _check_range("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        _check_range("repetition_penalty", self.repetition_penalty, 0.0, 10.0, low_open=True)
        for token_id, value in self.logit_bias:
            if token_id < 0:
                raise ValueError(f"logit_bias token id must be >= 0, got {token_id}")
            _check_range(f"logit_bias[{token_id}]", value, -100.0, 100.0)
        _check_int("top_logprobs", self.top_logprobs, 0, MAX_TOP_LOGPROBS)
        if self.top_logprobs and not self.logprobs:
            raise ValueError(f"top_logprobs={self.top_logprobs} needs logprobs=True")
        _check_int("n", self.n, 1, MAX_N)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class Sampler:
    """Samples one request's tokens with its own random generator.

    The generator is seeded from params.seed (and the choice index, so the n choices of one request differ), so a
    seeded request gives the same tokens whatever else shares its batch. No step sorts the whole vocabulary: top-k,
    top-p and top_logprobs look only at the few best logits. Engine thread only.
    """

    def __init__(self, params: SamplingParams, prompt_ids: Sequence[int] = (), choice_index: int = 0) -> None:
        """prompt_ids only feed repetition_penalty, which (as in HF and vLLM) counts prompt and output tokens."""
        self.params = params
        seed_sequence = (np.random.SeedSequence() if params.seed is None
                         else np.random.SeedSequence(params.seed % 2**64, spawn_key=(choice_index,)))
        self._rng = np.random.default_rng(seed_sequence)
        self._prompt_ids = np.unique(np.asarray(prompt_ids, dtype=np.int64))  # (num_unique_prompt_tokens,) int64
        self._bias_ids = np.array([i for i, _ in params.logit_bias], dtype=np.int64)  # (num_biased,) int64
        self._bias_values = np.array([b for _, b in params.logit_bias], dtype=np.float32)  # (num_biased,) float32

    def sample(self, logits: np.ndarray, output_token_counts: Mapping[int, int]) -> SampleResult:
        """logits: (vocab,) float32 for the next position; output_token_counts: id -> times generated so far.

        Order: logit_bias, penalties, then greedy argmax, or temperature, top-k, top-p, min-p and a draw.
        Logprobs (only with params.logprobs) are the log-softmax of the logits after logit_bias and penalties but
        before temperature and truncation: the model's own distribution, as OpenAI reports it.
        """
        if logits.ndim != 1:
            raise ValueError(f"logits must be one (vocab,) row, got shape {logits.shape}")
        scores = self._adjusted_logits(logits, output_token_counts)  # (vocab,) float32
        # Greedy: numpy's argmax returns the first maximum, so the lowest id wins ties.
        token_id = int(np.argmax(scores)) if self.params.greedy else self._sample_truncated(scores)
        if not self.params.logprobs:
            return token_id, None, None
        log_norm = _log_sum_exp(scores)
        top = _top_logprobs(scores, log_norm, self.params.top_logprobs)
        return token_id, float(scores[token_id] - log_norm), top

    def _adjusted_logits(self, logits: np.ndarray, counts: Mapping[int, int]) -> np.ndarray:
        params = self.params
        scores = np.array(logits, dtype=np.float32)  # (vocab,) float32, a copy: the caller's row stays untouched
        if self._bias_ids.size:
            if self._bias_ids.max() >= scores.size:
                raise ValueError(f"logit_bias token id {int(self._bias_ids.max())} >= vocab size {scores.size}")
            scores[self._bias_ids] += self._bias_values
        if params.repetition_penalty != 1.0:
            seen = np.union1d(self._prompt_ids, np.fromiter(counts.keys(), dtype=np.int64, count=len(counts)))
            values = scores[seen]
            penalty = np.float32(params.repetition_penalty)
            # Dividing a positive logit and multiplying a negative one both make the token less likely (CTRL / HF).
            scores[seen] = np.where(values > 0, values / penalty, values * penalty)
        if counts and (params.presence_penalty or params.frequency_penalty):
            ids = np.fromiter(counts.keys(), dtype=np.int64, count=len(counts))  # (num_distinct_output,) int64
            times = np.fromiter(counts.values(), dtype=np.float32, count=len(counts))
            # OpenAI: presence subtracts once per token that occurred, frequency subtracts per occurrence.
            presence = np.float32(params.presence_penalty) * (times > 0)
            scores[ids] -= times * np.float32(params.frequency_penalty) + presence
        return scores

    def _sample_truncated(self, scores: np.ndarray) -> int:
        """Apply temperature, top-k, top-p and min-p to scores (vocab,) float32 and draw one token id.

        Temperature never changes the order of the scores, so top-k and the nucleus order use them unscaled and only
        the weights see it. Every (vocab,)-sized temporary costs page faults on a fresh allocation, hence in place.
        """
        params = self.params
        candidates: np.ndarray | None = None  # (num_candidates,) int64 ascending token ids; None = whole vocab
        if 0 < params.top_k < scores.size:
            candidates = _at_least_kth(scores, params.top_k)
            scores = scores[candidates]
        # Probabilities relative to the most likely candidate, so min-p needs no normalization.
        weights = np.subtract(scores, scores.max())  # (num_candidates,) float32, then exp(.. / T) in (0, 1]
        weights *= np.float32(1.0 / params.temperature)
        np.exp(weights, out=weights)
        kept: np.ndarray | None = None  # (num_kept,) int64 positions into weights; None = all
        if params.top_p < 1.0:
            kept = _nucleus(scores, weights, params.top_p)
        if params.min_p > 0.0:
            kept = np.flatnonzero(weights >= params.min_p) if kept is None else kept[weights[kept] >= params.min_p]
        index = _draw(weights if kept is None else weights[kept], self._rng.random())
        position = index if kept is None else int(kept[index])
        return position if candidates is None else int(candidates[position])


def _at_least_kth(values: np.ndarray, count: int) -> np.ndarray:
    """Ascending ids of every value >= the count-th largest of values (n,) (ties kept, as HF's top-k does).

    The count-th largest block maximum is a lower bound for the count-th largest value (count distinct values reach
    it), so only the few values above it need a partition.
    """
    if count >= values.size:
        return np.arange(values.size)
    ids: np.ndarray | None = None  # (num_above_floor,) int64
    subset = values
    if count * _BLOCK_SIZE <= values.size:
        block_max = np.maximum.reduceat(values, np.arange(0, values.size, _BLOCK_SIZE))
        floor = np.partition(block_max, block_max.size - count)[block_max.size - count]
        ids = np.flatnonzero(values >= floor)
        subset = values[ids]
    kth = np.partition(subset, subset.size - count)[subset.size - count]
    return np.flatnonzero(values >= kth) if ids is None else ids[subset >= kth]


def _nucleus(scores: np.ndarray, weights: np.ndarray, top_p: float) -> np.ndarray:
    """Positions of the smallest most-likely set whose probability mass reaches top_p, most likely first.

    scores (n,) float32 order the tokens, weights (n,) float32 are their unnormalized probabilities. Sorts only a
    growing top slice, not the whole row: a real model's nucleus is a few to a few hundred tokens.
    """
    total = float(np.sum(weights, dtype=np.float64))
    count = _NUM_NUCLEUS_START
    while True:
        top = _at_least_kth(scores, count)
        top = top[np.argsort(-scores[top], kind="stable")]  # stable on ascending ids: ties go to the lowest id
        cumulative = np.cumsum(weights[top], dtype=np.float64) / total
        if cumulative[-1] >= top_p or top.size >= scores.size:
            return top[:int(np.searchsorted(cumulative, top_p, side="left")) + 1]
        count *= 8


def _draw(weights: np.ndarray, uniform: float) -> int:
    """Index i of weights (n,) float32 >= 0 with probability weights[i] / sum, by inverse CDF at uniform in [0, 1).

    Cumulative sums run over block sums first, then inside one block, instead of over the whole row.
    """
    starts = np.arange(0, weights.size, _BLOCK_SIZE)
    block_cumulative = np.cumsum(np.add.reduceat(weights, starts), dtype=np.float64)
    target = uniform * block_cumulative[-1]
    # side="right" skips zero-mass entries: the first cumulative value strictly above the target owns it.
    block = min(int(np.searchsorted(block_cumulative, target, side="right")), starts.size - 1)
    target -= block_cumulative[block - 1] if block else 0.0
    inside = weights[starts[block]:starts[block] + _BLOCK_SIZE]
    index = int(np.searchsorted(np.cumsum(inside, dtype=np.float64), target, side="right"))
    if index >= inside.size:  # rounding between the two sums ran past the block: take its last non-zero weight
        index = int(np.flatnonzero(inside)[-1])
    return int(starts[block]) + index


def _log_sum_exp(scores: np.ndarray) -> float:
    peak = scores.max()
    shifted = np.subtract(scores, peak)  # (vocab,) float32, exponentiated in place
    np.exp(shifted, out=shifted)
    return float(peak) + math.log(float(shifted.sum()))  # numpy's pairwise float32 sum is accurate to ~1e-7 here


def _top_logprobs(scores: np.ndarray, log_norm: float, count: int) -> list[tuple[int, float]]:
    """The count most likely ids with their logprobs, most likely first, ties to the lowest id."""
    if count == 0:
        return []
    top = _at_least_kth(scores, count)
    top = top[np.argsort(-scores[top], kind="stable")][:count]
    return [(int(i), float(scores[i] - log_norm)) for i in top]


def _check_range(name: str, value: float, low: float, high: float, low_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if value > high or value < low or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise ValueError(f"{name}={value} is out of range: allowed {bracket}{low}, {high}]")


def _check_int(name: str, value: int, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        allowed = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name}={value} is out of range: allowed {allowed}")
