"""Start-up calibration of zero-column skipping (`--activations a8-sparse`): from which fraction of exactly-zero inputs
does the skipping kernel beat the dense decode kernel on this machine? Timed with the model's own down projections,
all layers in turn, so the weights come from memory as they do in a decode step; run on the thread that serves."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from engine.kernels.ternary import quantize_activations
from engine.linear.ternary import TernaryLinear
from engine.weights import ModelWeights

# Zero fractions timed, in increasing order; ReLU² down-projection inputs of BitNet models lie around 0.6-0.9.
ZERO_FRACTIONS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
_REPEATS = 3  # best of three passes over every layer, per kernel and fraction


def skip_threshold(fractions: tuple[float, ...], dense_s: list[float], skipping_s: list[float]) -> float | None:
    """The smallest fraction from which skipping was faster at it and at every larger fraction timed; None if it
    lost at the largest (skipping never pays)."""
    threshold = None
    for fraction, dense, skipping in reversed(list(zip(fractions, dense_s, skipping_s, strict=True))):
        if skipping >= dense:
            break
        threshold = fraction
    return threshold


class SkipCalibration(NamedTuple):
    threshold: float | None  # what every calibrated matrix's skip_min_zero_fraction was set to
    dense_s: list[float]  # best time of one pass over all the matrices, per ZERO_FRACTIONS entry
    skipping_s: list[float]


def skipping_down_projections(weights: ModelWeights) -> list[TernaryLinear]:
    """The down projections of `weights` that keep sign masks (`--activations a8-sparse` or a4.8): what
    calibrate_zero_skipping times."""
    return [layer.down_proj for layer in weights.layers
            if isinstance(layer.down_proj, TernaryLinear) and layer.down_proj.sign_masks is not None]


def calibrate_zero_skipping(linears: list[TernaryLinear], seed: int = 0) -> SkipCalibration:
    """Times both kernels over `linears` (matrices that keep sign masks, all of one input width) at each of
    ZERO_FRACTIONS and sets every one's skip_min_zero_fraction to skip_threshold of the timings."""
    if not linears or any(linear.sign_masks is None for linear in linears):
        raise ValueError("calibrate_zero_skipping: every matrix must keep its sign masks (keep_sign_masks)")
    in_features = linears[0].in_features
    rng = np.random.default_rng(seed)
    dense_s, skipping_s = [], []
    for fraction in ZERO_FRACTIONS:
        # (1, in_features) float32: ReLU²-like, nonnegative, with exactly round(fraction · K) zeros
        x = rng.uniform(0.1, 1.0, size=(1, in_features)).astype(np.float32)
        x[0, rng.permutation(in_features)[:round(fraction * in_features)]] = 0.0
        xq, _, act_sum = quantize_activations(x)
        dense_s.append(_best_pass_s(TernaryLinear.dense_int_sums, linears, xq, act_sum))
        skipping_s.append(_best_pass_s(TernaryLinear.skipping_int_sums, linears, xq))
    threshold = skip_threshold(ZERO_FRACTIONS, dense_s, skipping_s)
    for linear in linears:
        linear.skip_min_zero_fraction = threshold
    return SkipCalibration(threshold, dense_s, skipping_s)


def _best_pass_s(product: Callable[..., np.ndarray], linears: list[TernaryLinear], *inputs: np.ndarray) -> float:
    """Best time of calling product(linear, *inputs) for every linear in turn."""
    product(linears[0], *inputs)  # compiled or loaded from the cache before any pass is timed
    best = np.inf
    for _ in range(_REPEATS):
        start = time.perf_counter()
        for linear in linears:
            product(linear, *inputs)
        best = min(best, time.perf_counter() - start)
    return float(best)
