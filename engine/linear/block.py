"""BlockQuantLinear: a GGUF Q4_0 / Q4_1 / Q8_0 weight matrix, split once at load into structure-of-arrays blocks and
multiplied by the engine.kernels.blockq kernels. Never expands the whole matrix to float; reads no files.
"""

from __future__ import annotations

import numpy as np

from engine.formats.ggml import BLOCK_GEOMETRY, GGMLType
from engine.kernels import blockq, blockq_amx_rows
from engine.kernels.amx import AMX_AVAILABLE

SUPPORTED_TYPES = (GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q8_0)
# Activation precision of __call__: 16 (blockq's A16: 16-bit codes as two int8 digits) or 8 (llama.cpp's Q8
# activations). 16 by default: a weight-only-quantized GGUF model ran in float, and int8 activations through every
# layer of SmolLM2-135M move its best logits by up to ~0.8 against the float run (enough to flip a greedy answer);
# with A16 they are within ~0.02. Decode, which reads each weight once per token, stays near the int8 speed (both
# digits meet each weight vector in one pass); compute-bound prefill does twice the byte dots.
ACTIVATION_BITS = (8, 16)
# blockq's format numbers, for the kernels that take the format as an argument
_FORMAT_CODES = {GGMLType.Q4_0: 0, GGMLType.Q4_1: 1, GGMLType.Q8_0: 2}
# Byte offset of the quantized values inside a GGUF block: after fp16 d (and fp16 m for Q4_1).
_CODES_OFFSET = {GGMLType.Q4_0: 2, GGMLType.Q4_1: 4, GGMLType.Q8_0: 2}


class BlockQuantLinear:
    """y = x @ W.T for W stored in 32-element blocks with an fp16 scale (and min): the Linear protocol.

    Activations are quantized per block of 32, to 16-bit codes (default) or int8 (activation_bits=8), each block's
    dot is exact in int32, and blocks are summed in one fixed order whatever the batch, so the layer is batch invariant.
    """

    def __init__(self, ggml_type: GGMLType, wq: np.ndarray, wd: np.ndarray, wm: np.ndarray | None = None,
                 activation_bits: int = 16) -> None:
        """wq, wd, wm: the structure-of-arrays blocks described below (Q4 codes already in kernel order);
        activation_bits: 16 or 8, the precision of __call__ (see ACTIVATION_BITS)."""
        ggml_type = GGMLType(ggml_type)
        if ggml_type not in SUPPORTED_TYPES:
            raise ValueError(f"BlockQuantLinear supports {[t.name for t in SUPPORTED_TYPES]}, got {ggml_type!r}")
        if (wm is not None) != (ggml_type == GGMLType.Q4_1):
            raise ValueError(f"{ggml_type.name}: block minimums (wm) are given exactly for Q4_1")
        if activation_bits not in ACTIVATION_BITS:
            raise ValueError(f"activation_bits must be one of {ACTIVATION_BITS}, got {activation_bits!r}")
        code_dtype = np.int8 if ggml_type == GGMLType.Q8_0 else np.uint8
        self.in_features = blockq.check_weights(wq, wd, wm, code_dtype)
        self.out_features = wq.shape[0]
        self.ggml_type = ggml_type
        # (out_features, in_features // 2) uint8 for Q4 (element j of a block in the low nibble of code byte j,
        # element j + 16 in the high one), in the kernels' order (blockq.to_kernel_order: 16-block groups interleaved
        # 4 bytes at a time), not the file's. (out_features, in_features) int8 for Q8_0, in GGUF order: the
        # 16-bit-activation head (engine.linear.head) reads these codes directly.
        self.wq = wq
        # Block scales and Q4_1 minimums as GGUF stores them, IEEE half bit patterns: half the bytes of float32, read
        # on every pass over the matrix (blockq widens them in registers).
        self.wd = wd  # (out_features, in_features // 32) uint16: fp16 block scales
        self.wm = wm  # (out_features, in_features // 32) uint16: Q4_1 fp16 block minimums; else None
        self.activation_bits = activation_bits
        # The codes laid out for the AMX kernel, made on the first batch that uses it (never for a matrix that only
        # decodes single tokens); engine thread only, like every call.
        self._amx_layout: blockq_amx_rows.AmxLayout | None = None

    @classmethod
    def from_gguf_blocks(cls, ggml_type: GGMLType, raw: np.ndarray, in_features: int,
                         activation_bits: int = 16) -> BlockQuantLinear:
        """raw: (out_features, row_bytes) uint8, each row in_features // 32 blocks exactly as stored in a GGUF file."""
        ggml_type = GGMLType(ggml_type)
        if ggml_type not in SUPPORTED_TYPES:
            raise ValueError(f"BlockQuantLinear supports {[t.name for t in SUPPORTED_TYPES]}, got {ggml_type.name}")
        if in_features <= 0 or in_features % blockq.BLOCK_SIZE:
            raise ValueError(f"in_features must be a positive multiple of {blockq.BLOCK_SIZE}, got {in_features}")
        block_size, block_bytes = BLOCK_GEOMETRY[ggml_type]
        num_blocks = in_features // block_size
        if not isinstance(raw, np.ndarray) or raw.dtype != np.uint8 or raw.ndim != 2:
            raise ValueError(f"raw {ggml_type.name} data must be a 2-D uint8 array, got {getattr(raw, 'dtype', raw)}")
        if raw.shape[1] != num_blocks * block_bytes:
            raise ValueError(f"{ggml_type.name} rows of {in_features} values take {num_blocks * block_bytes} bytes "
                             f"({num_blocks} blocks of {block_bytes}), got {raw.shape[1]}")
        blocks = np.ascontiguousarray(raw).reshape(raw.shape[0], num_blocks, block_bytes)  # (N, K // 32, bytes) uint8
        wd = _fp16_field(blocks, 0)
        wm = _fp16_field(blocks, 2) if ggml_type == GGMLType.Q4_1 else None
        codes_offset = _CODES_OFFSET[ggml_type]
        codes = np.ascontiguousarray(blocks[:, :, codes_offset:])  # (N, K // 32, code bytes) uint8
        codes = codes.reshape(raw.shape[0], num_blocks * (block_bytes - codes_offset))
        wq = codes.view(np.int8) if ggml_type == GGMLType.Q8_0 else blockq.to_kernel_order(codes)
        for name, scales in (("scale", wd), ("min", wm)):
            if scales is not None and not np.isfinite(scales.view(np.float16)).all():
                row = int(np.nonzero(~np.isfinite(scales.view(np.float16)).all(axis=1))[0][0])
                raise ValueError(f"non-finite fp16 block {name} in row {row}")
        return cls(ggml_type, wq, wd, wm, activation_bits)

    @classmethod
    def quantize(cls, w: np.ndarray, ggml_type: GGMLType, activation_bits: int = 16) -> BlockQuantLinear:
        """w: (out_features, in_features) float32 -> blocks with ggml's reference rounding (same bytes as gguf's)."""
        ggml_type = GGMLType(ggml_type)
        w = np.ascontiguousarray(w, dtype=np.float32)
        if ggml_type == GGMLType.Q4_0:
            wq, wd = blockq.quantize_q4_0(w)
            return cls(ggml_type, blockq.to_kernel_order(wq), wd, None, activation_bits)
        if ggml_type == GGMLType.Q4_1:
            wq, wd, wm = blockq.quantize_q4_1(w)
            return cls(ggml_type, blockq.to_kernel_order(wq), wd, wm, activation_bits)
        if ggml_type == GGMLType.Q8_0:
            wq, wd = blockq.quantize_q8_0(w)
            return cls(ggml_type, wq, wd, None, activation_bits)
        raise ValueError(f"BlockQuantLinear supports {[t.name for t in SUPPORTED_TYPES]}, got {ggml_type.name}")

    def to_gguf_blocks(self) -> np.ndarray:
        """(out_features, row_bytes) uint8 in the GGUF block layout: the inverse of from_gguf_blocks."""
        num_rows, num_blocks = self.wd.shape
        fields = [self.wd.astype("<u2").view(np.uint8).reshape(num_rows, num_blocks, 2)]
        if self.wm is not None:
            fields.append(self.wm.astype("<u2").view(np.uint8).reshape(num_rows, num_blocks, 2))
        codes = self.wq.view(np.uint8) if self.ggml_type == GGMLType.Q8_0 else blockq.to_gguf_order(self.wq)
        fields.append(codes.reshape(num_rows, num_blocks, self.wq.shape[1] // num_blocks))
        return np.concatenate(fields, axis=2).reshape(num_rows, num_blocks * BLOCK_GEOMETRY[self.ggml_type][1])

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """x: (num_tokens, in_features) float32, C-contiguous -> (num_tokens, out_features) float32, with
        activations quantized to self.activation_bits."""
        if self.activation_bits == 8:
            return self.matmul_int8(x)
        if self._uses_amx(x):
            return self._matmul_amx(*blockq.quantize_a16_blocks(x))
        if self.ggml_type == GGMLType.Q4_0:
            return blockq.quantize_matmul_q4_0_a16(x, self.wq, self.wd)
        if self.ggml_type == GGMLType.Q4_1:
            return blockq.quantize_matmul_q4_1_a16(x, self.wq, self.wd, self.wm)
        return blockq.quantize_matmul_q8_0_a16(x, self.wq, self.wd)

    def matmul_int8(self, x: np.ndarray) -> np.ndarray:
        """The product with int8 activations whatever activation_bits is: for a coarse pass where speed matters more
        than the last bits (the output head's ranking). x: (num_tokens, in_features) float32 -> (num_tokens,
        out_features) float32."""
        if self._uses_amx(x):
            return self._matmul_amx(*blockq.quantize_q8_blocks(x))
        if self.ggml_type == GGMLType.Q4_0:
            return blockq.quantize_matmul_q4_0(x, self.wq, self.wd)
        if self.ggml_type == GGMLType.Q4_1:
            return blockq.quantize_matmul_q4_1(x, self.wq, self.wd, self.wm)
        return blockq.quantize_matmul_q8_0(x, self.wq, self.wd)

    def matmul_quantized(self, xq: np.ndarray, xd: np.ndarray, xsum: np.ndarray) -> np.ndarray:
        """matmul_int8 from activations already quantized by blockq.quantize_q8_blocks (int8, whatever
        activation_bits is), so layers reading the same input can share one quantization. -> (num_tokens,
        out_features) float32."""
        if self.ggml_type == GGMLType.Q4_0:
            return blockq.matmul_q4_0(xq, xd, self.wq, self.wd)
        if self.ggml_type == GGMLType.Q4_1:
            return blockq.matmul_q4_1(xq, xd, xsum, self.wq, self.wd, self.wm)
        return blockq.matmul_q8_0(xq, xd, self.wq, self.wd)

    def _uses_amx(self, x: np.ndarray) -> bool:
        """Whether x goes to the AMX kernel: a batch of at least blockq_amx_rows.MIN_TOKENS tokens, on a CPU with AMX,
        for a matrix small enough to lay out. Raises ValueError when x does not fit the matrix."""
        if not (AMX_AVAILABLE and getattr(x, "ndim", 0) == 2 and x.shape[0] >= blockq_amx_rows.MIN_TOKENS
                and self.out_features * self.in_features <= blockq_amx_rows.MAX_LAYOUT_WEIGHTS):
            return False
        if x.shape[1] != self.in_features:
            raise ValueError(f"x has {x.shape[1]} columns but the weight has in_features={self.in_features}")
        return True

    def _matmul_amx(self, xq: np.ndarray, xd: np.ndarray, xsum: np.ndarray) -> np.ndarray:
        """The product on AMX tiles from quantized activations (int8 codes or A16 digits): the same bits as blockq's."""
        fmt = _FORMAT_CODES[self.ggml_type]
        if self._amx_layout is None:
            scales = blockq.halves_to_float32(self.wd)  # (N, K // 32) float32: the AMX layout keeps float32
            mins = blockq.halves_to_float32(self.wm) if self.wm is not None else scales
            self._amx_layout = blockq_amx_rows.lay_out(self.wq.view(np.uint8), scales, mins, fmt)
        return blockq_amx_rows.matmul_amx_rows(xq, xd, xsum, self._amx_layout, fmt)

    def dequantize_rows(self, row_ids: np.ndarray) -> np.ndarray:
        """row_ids: (num_rows,) int64 -> (num_rows, in_features) float32; only those rows are expanded."""
        if self.ggml_type == GGMLType.Q4_0:
            return blockq.dequantize_rows_q4_0(self.wq, self.wd, row_ids)
        if self.ggml_type == GGMLType.Q4_1:
            return blockq.dequantize_rows_q4_1(self.wq, self.wd, self.wm, row_ids)
        return blockq.dequantize_rows_q8_0(self.wq, self.wd, row_ids)

    @property
    def num_bytes(self) -> int:
        """Codes plus fp16 scales (and mins)."""
        return self.wq.nbytes + self.wd.nbytes + (self.wm.nbytes if self.wm is not None else 0)

    @property
    def bytes_read_per_token(self) -> int:
        """What one full pass over the matrix reads: all of it."""
        return self.num_bytes

    def __repr__(self) -> str:
        shape = f"out_features={self.out_features}, in_features={self.in_features}"
        return f"BlockQuantLinear({self.ggml_type.name}, {shape}, activation_bits={self.activation_bits})"


def _fp16_field(blocks: np.ndarray, offset: int) -> np.ndarray:
    """blocks (N, num_blocks, block_bytes) uint8 -> (N, num_blocks) uint16: the fp16 bit patterns at that offset."""
    return np.ascontiguousarray(np.ascontiguousarray(blocks[:, :, offset:offset + 2]).view("<u2")[:, :, 0],
                                dtype=np.uint16)
