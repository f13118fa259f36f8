"""TernaryLinear: a BitNet b1.58 weight (2-bit ternary codes plus a per-tensor or per-256-block scale) behind the
Linear protocol. Owns the float arithmetic around the exact integer kernels; reads no files.
"""

from __future__ import annotations

import numpy as np

from engine.kernels.ternary import (
    BLOCK_WEIGHTS,
    matmul_ternary,
    matmul_ternary_blockscaled,
    pack_ternary,
    padded_in_features,
    quantize_activations,
    unpack_ternary,
)


class TernaryLinear:
    """y = x @ (scale · T).T with activations quantized per token to int8, as BitNet b1.58 defines the layer.

    Exactly one scale form is held: weight_scale (one float for the tensor, the HF "autobitlinear" convention, which
    multiplies) or block_scales (one float32 per 256 weights of a row, GGUF TQ1_0 / TQ2_0).
    Batch invariant by construction: the integer sums are exact and the float steps are per token.
    """

    def __init__(self, codes: np.ndarray, in_features: int, weight_scale: float | None = None,
                 block_scales: np.ndarray | None = None, row_scales: np.ndarray | None = None) -> None:
        if sum(scale is not None for scale in (weight_scale, block_scales, row_scales)) != 1:
            raise ValueError("TernaryLinear: give exactly one of weight_scale (per tensor), block_scales (per block) "
                             "or row_scales (per row, for matrices fused from several tensors)")
        if row_scales is not None and row_scales.shape != (codes.shape[0],):
            raise ValueError(f"TernaryLinear: row_scales must be ({codes.shape[0]},), got {row_scales.shape}")
        padded_k = padded_in_features(in_features)
        if codes.ndim != 2 or codes.dtype != np.uint8 or codes.shape[1] != padded_k // 4:
            raise ValueError(f"TernaryLinear: codes must be (out_features, {padded_k // 4}) uint8 for "
                             f"in_features={in_features}, got {codes.shape} {codes.dtype}")
        if block_scales is not None and block_scales.shape != (codes.shape[0], padded_k // BLOCK_WEIGHTS):
            raise ValueError(f"TernaryLinear: block_scales must be ({codes.shape[0]}, {padded_k // BLOCK_WEIGHTS}), "
                             f"got {block_scales.shape}")
        self.in_features = in_features
        self.out_features = codes.shape[0]
        self.codes = np.ascontiguousarray(codes)  # (out_features, padded_k // 4) uint8, layout of pack_ternary
        # The scale is kept as float32, its storage type on disk, but the output factor is formed in float64.
        self.weight_scale = None if weight_scale is None else np.float32(weight_scale)
        # (out_features, padded_k // 256) float32, or None for a per-tensor scale
        self.block_scales = None if block_scales is None else np.ascontiguousarray(block_scales, dtype=np.float32)
        # (out_features,) float32 or None: the per-tensor scales of fused matrices (q|k|v, gate|up), row by row
        self.row_scales = None if row_scales is None else np.ascontiguousarray(row_scales, dtype=np.float32)

    @classmethod
    def from_ternary(cls, ternary: np.ndarray, weight_scale: float | None = None,
                     block_scales: np.ndarray | None = None) -> TernaryLinear:
        """ternary: (out_features, in_features) int8 in {-1, 0, 1}; block_scales: (out_features, ceil(K / 256))."""
        return cls(pack_ternary(ternary), ternary.shape[1], weight_scale=weight_scale, block_scales=block_scales)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """x: (num_tokens, in_features) float32, C-contiguous -> (num_tokens, out_features) float32."""
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"TernaryLinear: x must be (num_tokens, {self.in_features}), got {x.shape}")
        xq, x_scale, act_sum = quantize_activations(x)  # (T, padded_k) int8, (T,) float32, (T,) int32
        if self.block_scales is not None:
            sums = matmul_ternary_blockscaled(xq, self.codes, self.block_scales)  # (T, N) float32
            sums /= x_scale[:, None]
            return sums
        int_sums = matmul_ternary(xq, act_sum, self.codes)  # (T, N) int32, exact Σ T·q
        if self.row_scales is not None:
            y = int_sums.astype(np.float32)  # (T, N) float32, exact while |Σ T·q| < 2^24
            y *= self.row_scales[None, :]
            y *= (np.float32(1.0) / x_scale)[:, None]
            return y
        # The reference is (xq / s) @ T.T · weight_scale = Σ T·q · (weight_scale / s). Forming the per-token factor in
        # float64 and rounding it once leaves two float32 roundings in all: within 1 ulp of the exact value, closer
        # than the reference's own float32 dot product.
        out_scale = (np.float64(self.weight_scale) / x_scale.astype(np.float64)).astype(np.float32)  # (T,) float32
        y = int_sums.astype(np.float32)  # (T, N) float32, exact while |Σ T·q| < 2^24
        y *= out_scale[:, None]
        return y

    def dequantize_rows(self, row_ids: np.ndarray) -> np.ndarray:
        """row_ids: (num_rows,) int64 -> (num_rows, in_features) float32 rows of scale · T."""
        row_ids = np.asarray(row_ids)
        if row_ids.ndim != 1 or row_ids.dtype.kind not in "iu":
            raise ValueError(f"TernaryLinear.dequantize_rows: row_ids must be 1-D integers, got {row_ids.shape} "
                             f"{row_ids.dtype}")
        if row_ids.size and (row_ids.min() < 0 or row_ids.max() >= self.out_features):
            raise IndexError(f"TernaryLinear.dequantize_rows: row ids must lie in [0, {self.out_features}), "
                             f"got [{row_ids.min()}, {row_ids.max()}]")
        ternary = unpack_ternary(self.codes[row_ids], self.in_features)  # (num_rows, in_features) int8
        if self.row_scales is not None:
            return ternary.astype(np.float32) * self.row_scales[row_ids, None]
        if self.block_scales is None:
            return ternary.astype(np.float32) * self.weight_scale
        # (num_rows, in_features) float32: each block's scale repeated over its 256 weights
        scales = np.repeat(self.block_scales[row_ids], BLOCK_WEIGHTS, axis=1)[:, :self.in_features]
        return ternary * scales

    @property
    def num_bytes(self) -> int:
        """Codes plus scales: 2 bits per weight (padded to 256 per row) and 4 bytes per scale."""
        scales = next(scale for scale in (self.row_scales, self.block_scales, self.weight_scale) if scale is not None)
        scale_bytes = scales.nbytes
        return self.codes.nbytes + scale_bytes
