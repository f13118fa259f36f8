"""Row-wise fusion of matrices that read the same input (q|k|v, gate|up) into one matrix, so a layer makes one
kernel call where it made three. The original matrices become views into the fused one: no weight is stored twice.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np

from engine.linear.base import Linear
from engine.linear.block import BlockQuantLinear
from engine.linear.dense import DenseLinear
from engine.linear.ternary import TernaryLinear
from engine.weights import ModelWeights


def fuse_projections(weights: ModelWeights) -> ModelWeights:
    """The same model with qkv_proj and gate_up_proj set on every layer whose matrices share a layout."""
    layers = []
    for layer in weights.layers:
        fused = dataclasses.replace(layer)
        qkv = _fuse_rows([layer.q_proj, layer.k_proj, layer.v_proj])
        if qkv is not None:
            fused.qkv_proj, (fused.q_proj, fused.k_proj, fused.v_proj) = qkv
        gate_up = _fuse_rows([layer.gate_proj, layer.up_proj])
        if gate_up is not None:
            fused.gate_up_proj, (fused.gate_proj, fused.up_proj) = gate_up
        layers.append(fused)
    return dataclasses.replace(weights, layers=layers)


def _fuse_rows(parts: list[Linear]) -> tuple[Linear, list[Linear]] | None:
    """(fused matrix, each part as a view of its rows), or None when the parts cannot share one kernel."""
    kinds = {type(part) for part in parts}
    if len(kinds) != 1 or len({part.in_features for part in parts}) != 1:
        return None
    bounds = np.cumsum([0] + [part.out_features for part in parts])  # row range of each part in the fused matrix
    first = parts[0]
    if isinstance(first, BlockQuantLinear):
        if len({(part.ggml_type, part.activation_bits) for part in parts}) != 1:
            return None
        wm = None if first.wm is None else np.concatenate([part.wm for part in parts])
        bits = first.activation_bits
        fused: Linear = BlockQuantLinear(first.ggml_type, np.concatenate([part.wq for part in parts]),
                                         np.concatenate([part.wd for part in parts]), wm, bits)
        views: list[Linear] = [
            BlockQuantLinear(first.ggml_type, fused.wq[a:b], fused.wd[a:b], None if wm is None else wm[a:b], bits)
            for a, b in itertools.pairwise(bounds)]
        return fused, views
    if isinstance(first, TernaryLinear):
        if any(part.block_scales is not None or part.row_scales is not None for part in parts):
            return None  # per-block scales would need a block-scaled fused kernel; keep these separate
        codes = np.concatenate([part.codes for part in parts])
        row_scales = np.concatenate([np.full(part.out_features, part.weight_scale, dtype=np.float32)
                                     for part in parts])
        fused = TernaryLinear(codes, first.in_features, row_scales=row_scales)
        views = [TernaryLinear(codes[a:b], first.in_features, weight_scale=float(part.weight_scale))
                 for part, a, b in zip(parts, bounds[:-1], bounds[1:], strict=True)]
        return fused, views
    if isinstance(first, DenseLinear):
        weight = np.concatenate([part.weight for part in parts])
        return DenseLinear(weight), [DenseLinear(weight[a:b]) for a, b in itertools.pairwise(bounds)]
    return None
