"""TernaryLinear: a BitNet b1.58 weight (2-bit ternary codes plus a per-tensor or per-256-block scale) behind the
Linear protocol. Owns the float arithmetic around the exact integer kernels; reads no files.
"""

from __future__ import annotations

import numpy as np

from engine.kernels.ternary import (
    BLOCK_WEIGHTS,
    linear_tl2,
    matmul_ternary,
    matmul_ternary_blockscaled,
    matmul_ternary_tl2_xq,
    pack_ternary,
    pack_tl2_from_codes,
    padded_in_features,
    quantize_activations,
    scale_int_sums,
    unpack_ternary,
)
from engine.kernels.ternary_sparse import matmul_ternary_sparse, pack_sign_masks
from engine.weights import ModelWeights

# A single token's product skips zero input columns (sign-mask layout, engine/kernels/ternary_sparse.py) when at least
# this fraction of its activations is zero, until engine/linear/calibrate.py measures the machine it runs on. Measured
# on 2560x6912 with weights in DRAM, 2 threads, on a Xeon with AMX: the skipping kernel took 1.56x the row kernel's
# time at 51% zeros, 1.08x at 72%, 0.73x at 85%; with several tokens it never wins. On a Zen 5 EPYC, against the TL2
# decode layout, it loses up to 90% zeros and wins at 95%.
SKIP_MIN_ZERO_FRACTION = 0.75


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
        # (ceil(out_features / 256), in_features, 64) uint8 sign masks, or None: a second copy of the weights laid out
        # so a zero activation skips its column's bytes (keep_sign_masks); the row layout above still serves batches.
        self.sign_masks: np.ndarray | None = None
        # Zero fraction of a single token's input from which its product skips zero columns; None: never
        self.skip_min_zero_fraction: float | None = SKIP_MIN_ZERO_FRACTION
        # (indices (ceil(out_features / 32), groups / 4, 32) uint16, signs (ceil(out_features / 32), groups) uint32),
        # or None: the weights also in TL2 lookup-table form at 1.67 bits each (keep_tl2), read by single tokens.
        self.tl2: tuple[np.ndarray, np.ndarray] | None = None

    def keep_sign_masks(self) -> None:
        """Also hold the weights as sign masks, so single tokens whose input is mostly zeros skip those columns."""
        if self.block_scales is not None:
            raise ValueError("TernaryLinear: zero-column skipping needs a per-tensor or per-row scale")
        self.sign_masks = pack_sign_masks(unpack_ternary(self.codes, self.in_features))

    def keep_tl2(self) -> None:
        """Also hold the weights in TL2 form, which single tokens (decode) read instead of the 2-bit rows: a sixth
        fewer bytes from memory. Batches keep the 2-bit row kernels, which are faster from two tokens on
        (bench/kernels.py). Both give exact integer sums, so the bits do not depend on which one ran."""
        if self.block_scales is not None:
            raise ValueError("TernaryLinear: the TL2 layout needs a per-tensor or per-row scale")
        self.tl2 = pack_tl2_from_codes(self.codes, self.in_features)

    @classmethod
    def from_ternary(cls, ternary: np.ndarray, weight_scale: float | None = None,
                     block_scales: np.ndarray | None = None) -> TernaryLinear:
        """ternary: (out_features, in_features) int8 in {-1, 0, 1}; block_scales: (out_features, ceil(K / 256))."""
        return cls(pack_ternary(ternary), ternary.shape[1], weight_scale=weight_scale, block_scales=block_scales)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """x: (num_tokens, in_features) float32, C-contiguous -> (num_tokens, out_features) float32."""
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"TernaryLinear: x must be (num_tokens, {self.in_features}), got {x.shape}")
        if self.tl2 is not None and self.sign_masks is None and len(x) == 1:  # decode: the fused TL2 call
            return linear_tl2(x, *self.tl2, self.out_features, self.row_scales, self._weight_scale_or_zero)
        return self.matmul_quantized(*quantize_activations(x))

    def matmul_quantized(self, xq: np.ndarray, x_scale: np.ndarray, act_sum: np.ndarray) -> np.ndarray:
        """The product from activations already quantized per token: xq (T, padded_k) int8 (zero padded), x_scale
        (T,) float32 with x ≈ xq / x_scale, act_sum (T,) int32 = Σ xq -> (T, out_features) float32."""
        if self.block_scales is not None:
            sums = matmul_ternary_blockscaled(xq, self.codes, self.block_scales)  # (T, N) float32
            sums /= x_scale[:, None]
            return sums
        # The reference is (xq / s) @ T.T · weight_scale = Σ T·q · (weight_scale / s). Forming the per-token factor in
        # float64 and rounding it once leaves two float32 roundings in all: within 1 ulp of the exact value, closer
        # than the reference's own float32 dot product. f32(Σ T·q) is exact while |Σ T·q| < 2^24.
        return scale_int_sums(self._int_sums(xq, act_sum), self.row_scales, x_scale, self._weight_scale_or_zero)

    def _int_sums(self, xq: np.ndarray, act_sum: np.ndarray) -> np.ndarray:
        """Σ T·q (T, N) int32 by the row kernels, or for a single token by skipping zero columns (when the sign masks
        are kept and enough inputs are zero) or by TL2 lookups (when kept): the same sums."""
        if self.sign_masks is not None and len(xq) == 1 and self.skip_min_zero_fraction is not None and \
                self.in_features - np.count_nonzero(xq[0, :self.in_features]) >= \
                self.skip_min_zero_fraction * self.in_features:
            return self.skipping_int_sums(xq)
        return self.dense_int_sums(xq, act_sum)

    def skipping_int_sums(self, xq: np.ndarray) -> np.ndarray:
        """Σ T·q (1, N) int32 for one token, reading the sign masks of its nonzero inputs only (keep_sign_masks)."""
        return matmul_ternary_sparse(xq, self.sign_masks, self.out_features)

    def dense_int_sums(self, xq: np.ndarray, act_sum: np.ndarray) -> np.ndarray:
        """Σ T·q (T, N) int32 reading every weight: TL2 lookups for one token when kept, else the row kernels."""
        if self.tl2 is not None and len(xq) == 1:
            return matmul_ternary_tl2_xq(xq, self.in_features, *self.tl2, self.out_features)
        return matmul_ternary(xq, act_sum, self.codes)

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
        """Bytes held: codes (2 bits per weight, padded to 256 per row), 4 bytes per scale, sign masks and the TL2
        layout if kept."""
        extra = [] if self.sign_masks is None else [self.sign_masks]
        extra += [] if self.tl2 is None else list(self.tl2)
        return self.codes.nbytes + self._scale_bytes + sum(array.nbytes for array in extra)

    @property
    def bytes_read_per_token(self) -> int:
        """Bytes one token reads: the TL2 layout if kept, else the codes; plus scales (fewer when zero columns are
        skipped)."""
        layout_bytes = self.codes.nbytes if self.tl2 is None else sum(array.nbytes for array in self.tl2)
        return layout_bytes + self._scale_bytes

    @property
    def _weight_scale_or_zero(self) -> float:
        """The per-tensor scale as scale_int_sums takes it (ignored there when row scales are held)."""
        return 0.0 if self.weight_scale is None else float(self.weight_scale)

    @property
    def _scale_bytes(self) -> int:
        scales = next(scale for scale in (self.row_scales, self.block_scales, self.weight_scale) if scale is not None)
        return np.asarray(scales).nbytes


def with_tl2_decode(weights: ModelWeights) -> ModelWeights:
    """Give every ternary matrix that a layer's forward pass calls (the fused q|k|v and gate|up where present) its
    TL2 layout, in place, so single-token decode reads 1.67 bits per weight; block-scaled (GGUF TQ) matrices keep
    only their rows. Returns the same weights."""
    for layer in weights.layers:
        projections = [layer.qkv_proj] if layer.qkv_proj is not None else [layer.q_proj, layer.k_proj, layer.v_proj]
        projections += [layer.gate_up_proj] if layer.gate_up_proj is not None else [layer.gate_proj, layer.up_proj]
        for linear in [*projections, layer.o_proj, layer.down_proj]:
            if isinstance(linear, TernaryLinear) and linear.block_scales is None and linear.tl2 is None:
                linear.keep_tl2()
    return weights
