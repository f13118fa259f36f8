"""GGUF models from llama.cpp and bitnet.cpp: metadata -> ModelArgs, tensors -> the engine's Linear layouts.

Owns the one GGUF name-mapping table and undoes llama.cpp's q/k row permutation. Never builds the tokenizer: the
caller passes `GGUFFile.metadata` to engine.tokenizer.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from engine.config import Architecture, ModelArgs
from engine.formats.errors import ModelFormatError
from engine.formats.ggml import GGMLType
from engine.formats.gguf_file import GGUFFile, RawTensor, read_gguf
from engine.linear.base import Linear
from engine.linear.block import BlockQuantLinear
from engine.linear.dense import DenseLinear
from engine.linear.ternary import TernaryLinear
from engine.weights import Embedding, LayerWeights, ModelWeights

# GGUF general.architecture -> engine architecture. llama.cpp writes "bitnet" (1bitLLM and 2B4T conversions);
# bitnet.cpp names its 2B4T files "bitnet-b1.58" (earlier "bitnet-25"): LLM_ARCH_NAMES in its llama.cpp fork.
ARCHITECTURES: dict[str, Architecture] = {
    "llama": "llama", "bitnet": "bitnet", "bitnet-25": "bitnet", "bitnet-b1.58": "bitnet",
}

# The one GGUF name-mapping table: engine weight -> GGUF tensor name ({layer} is the block index).
GGUF_TENSOR_NAMES: dict[str, str] = {
    "embedding": "token_embd.weight",
    "final_norm": "output_norm.weight",
    "lm_head": "output.weight",  # absent: the head is tied to token_embd
    "attn_norm": "blk.{layer}.attn_norm.weight",
    "q_proj": "blk.{layer}.attn_q.weight",
    "k_proj": "blk.{layer}.attn_k.weight",
    "v_proj": "blk.{layer}.attn_v.weight",
    "o_proj": "blk.{layer}.attn_output.weight",
    "attn_sub_norm": "blk.{layer}.attn_sub_norm.weight",
    "ffn_norm": "blk.{layer}.ffn_norm.weight",
    "gate_proj": "blk.{layer}.ffn_gate.weight",
    "up_proj": "blk.{layer}.ffn_up.weight",
    "down_proj": "blk.{layer}.ffn_down.weight",
    "ffn_sub_norm": "blk.{layer}.ffn_sub_norm.weight",
}
_LAYER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# llama.cpp's bitnet loader accepts an optional per-tensor multiplier "blk.N.attn_q.scale" of shape {1}.
_SCALE_SUFFIX = ".scale"

# Architectures whose GGUF q/k rows are permuted. llama.cpp's convert_hf_to_gguf.py LlamaModel.permute reorders each
# head's rows from HF rotate-half order to the interleaved pairs of llama.cpp's LLAMA_ROPE_TYPE_NORM. BITNET (and
# bitnet.cpp's BITNET_25 / BITNET_B158) use LLAMA_ROPE_TYPE_NEOX, i.e. rotate-half: llama.cpp's BitnetModel and
# bitnet.cpp's convert-hf-to-gguf-bitnet.py / convert-ms-to-gguf-bitnet.py write q/k unpermuted.
_PERMUTED_QK_ARCHITECTURES = frozenset({"llama"})

_FLOAT_TYPES = (GGMLType.F32, GGMLType.F16, GGMLType.BF16)
_BLOCK_TYPES = (GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q8_0)
_TERNARY_BLOCK = 256  # TQ1_0 / TQ2_0 elements per block, each with an fp16 scale d
_I2_S_BLOCK = 128  # bitnet.cpp x86 I2_S: 128 weights in 32 bytes, byte j holds j, j+32, j+64, j+96 (shift 6,4,2,0)
_Q6_K_CHUNK_ROWS = 4096  # rows dequantized at once when requantizing a Q6_K head, to bound temporary memory

_Loaded = TypeVar("_Loaded", Linear, np.ndarray)


def load_gguf(path: str | Path, progress: Callable[[int, int], None] | None = None
              ) -> tuple[ModelArgs, ModelWeights, GGUFFile]:
    """Read a llama/bitnet GGUF into engine weights; progress(done, total) is called once per tensor loaded."""
    gguf = read_gguf(path)
    args = model_args_from_gguf(gguf)
    return args, _GGUFLoader(gguf, args).load(progress), gguf


def model_args_from_gguf(gguf: GGUFFile) -> ModelArgs:
    """ModelArgs from `{arch}.*` and `tokenizer.ggml.*` metadata (vocab size from the token list or the embedding)."""
    meta, arch = gguf.metadata, gguf.architecture
    if arch not in ARCHITECTURES:
        raise ModelFormatError(gguf.path, f"architecture {arch!r} is not supported; supported: "
                                          f"{', '.join(ARCHITECTURES)}")
    hidden = _meta_int(gguf, f"{arch}.embedding_length")
    num_heads = _meta_int(gguf, f"{arch}.attention.head_count")
    head_dim = _meta_int(gguf, f"{arch}.attention.key_length", hidden // max(num_heads, 1))
    if _meta_int(gguf, f"{arch}.attention.value_length", head_dim) != head_dim:
        raise ModelFormatError(gguf.path, f"{arch}.attention.value_length differs from key_length {head_dim}")
    rope_dims = _meta_int(gguf, f"{arch}.rope.dimension_count", head_dim)
    if rope_dims != head_dim:
        raise ModelFormatError(gguf.path, f"{arch}.rope.dimension_count {rope_dims}: partial RoPE is not supported "
                                          f"(expected head_dim {head_dim})")
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    factor = meta.get(f"{arch}.rope.scaling.factor", 1.0)
    if not (scaling == "none" or (scaling == "linear" and factor == 1.0)):
        raise ModelFormatError(gguf.path, f"RoPE scaling {scaling!r} (factor {factor}) is not supported")
    embedding = gguf.tensors.get(GGUF_TENSOR_NAMES["embedding"])
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = (meta.get(f"{arch}.vocab_size") or (len(tokens) if isinstance(tokens, list) else 0)
             or (embedding.shape[0] if embedding is not None else 0))
    # llama.cpp stops at every end-of-generation token: eos, eot (end of turn) and eom (end of message).
    eos_ids = [_meta_int(gguf, key) for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                                                "tokenizer.ggml.eom_token_id") if key in meta]
    has_bos = "tokenizer.ggml.bos_token_id" in meta
    try:
        return ModelArgs(
            architecture=ARCHITECTURES[arch],
            hidden_size=hidden,
            num_layers=_meta_int(gguf, f"{arch}.block_count"),
            num_heads=num_heads,
            num_kv_heads=_meta_int(gguf, f"{arch}.attention.head_count_kv", num_heads),
            intermediate_size=_meta_int(gguf, f"{arch}.feed_forward_length"),
            vocab_size=vocab,
            rms_norm_eps=_meta_float(gguf, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5),
            rope_theta=_meta_float(gguf, f"{arch}.rope.freq_base", 10000.0),
            max_position_embeddings=_meta_int(gguf, f"{arch}.context_length", 4096),
            # BitNet b1.58 (2B4T, the only BitNet this project targets) uses ReLU²; llama.cpp's own loader defaults
            # "bitnet" to SiLU for the 2024 1bitLLM checkpoints, which this engine does not serve.
            hidden_act="silu" if ARCHITECTURES[arch] == "llama" else "relu2",
            tie_word_embeddings=GGUF_TENSOR_NAMES["lm_head"] not in gguf.tensors,
            bos_token_id=_meta_int(gguf, "tokenizer.ggml.bos_token_id") if has_bos else None,
            eos_token_ids=tuple(dict.fromkeys(eos_ids)),
            head_dim=head_dim,
        )
    except ValueError as exc:
        raise ModelFormatError(gguf.path, f"invalid model shape in metadata: {exc}") from None


def _meta_int(gguf: GGUFFile, key: str, default: int | None = None) -> int:
    value = gguf.metadata.get(key, default)
    if isinstance(value, list) and value and len(set(value)) == 1:
        value = value[0]  # a per-layer array with one value everywhere
    if value is None:
        raise ModelFormatError(gguf.path, f"missing metadata key '{key}'")
    if not isinstance(value, int) or isinstance(value, bool):
        raise ModelFormatError(gguf.path, f"metadata '{key}' is {value!r}; expected one integer")
    return value


def _meta_float(gguf: GGUFFile, key: str, default: float) -> float:
    value = gguf.metadata.get(key, default)
    if not isinstance(value, int | float) or isinstance(value, bool) or not np.isfinite(value):
        raise ModelFormatError(gguf.path, f"metadata '{key}' is {value!r}; expected a finite number")
    return float(value)


class _GGUFLoader:
    def __init__(self, gguf: GGUFFile, args: ModelArgs) -> None:
        self.gguf = gguf
        self.args = args
        self.permute_qk = gguf.architecture in _PERMUTED_QK_ARCHITECTURES
        self.used: set[str] = set()  # names of the tensors read so far
        self.progress: Callable[[int, int], None] | None = None
        self.num_done = 0
        norms_per_layer = 4 if args.architecture == "bitnet" else 2
        self.num_total = 2 + args.num_layers * (len(_LAYER_LINEARS) + norms_per_layer) + (not args.tie_word_embeddings)

    def load(self, progress: Callable[[int, int], None] | None) -> ModelWeights:
        args = self.args
        self.progress = progress
        embedding = self._advance(self._linear(GGUF_TENSOR_NAMES["embedding"], (args.vocab_size, args.hidden_size)))
        layers = [self._layer(layer) for layer in range(args.num_layers)]
        final_norm = self._advance(self._norm(GGUF_TENSOR_NAMES["final_norm"], args.hidden_size))
        lm_head = embedding
        if not args.tie_word_embeddings:
            lm_head = self._advance(self._linear(GGUF_TENSOR_NAMES["lm_head"], (args.vocab_size, args.hidden_size)))
        unused = [name for name in self.gguf.tensors if name not in self.used]
        if unused:
            raise ModelFormatError(self.gguf.path, f"{len(unused)} tensor(s) not part of a {self.gguf.architecture} "
                                                   f"model, e.g. {unused[:3]}; refusing to ignore them", unused[0])
        return ModelWeights(args, Embedding(embedding), layers, final_norm, lm_head)

    def _advance(self, loaded: _Loaded) -> _Loaded:
        """Count one tensor as loaded and report progress; returns it unchanged."""
        self.num_done += 1
        if self.progress:
            self.progress(self.num_done, self.num_total)
        return loaded

    def _layer(self, layer: int) -> LayerWeights:
        args = self.args
        q_rows = args.num_heads * args.head_dim
        shapes = args.linear_shapes
        heads = {"q_proj": args.num_heads, "k_proj": args.num_kv_heads} if self.permute_qk else {}
        norm_sizes = {"attn_norm": args.hidden_size, "ffn_norm": args.hidden_size}
        if args.architecture == "bitnet":
            norm_sizes |= {"attn_sub_norm": q_rows, "ffn_sub_norm": args.intermediate_size}
        fields: dict[str, Any] = {}
        for field, shape in shapes.items():
            name = GGUF_TENSOR_NAMES[field].format(layer=layer)
            fields[field] = self._advance(self._linear(name, shape, heads.get(field)))
        for field, size in norm_sizes.items():
            fields[field] = self._advance(self._norm(GGUF_TENSOR_NAMES[field].format(layer=layer), size))
        return LayerWeights(**fields)

    def _tensor(self, name: str, shape: tuple[int, ...]) -> RawTensor:
        tensor = self.gguf.tensors.get(name)
        if tensor is None:
            raise ModelFormatError(self.gguf.path, f"missing tensor; expected shape {list(shape)}", name)
        if tensor.shape != shape:
            raise ModelFormatError(self.gguf.path, f"shape {list(tensor.shape)} (GGUF ne {list(reversed(tensor.shape))}"
                                                   f"), expected {list(shape)}", name)
        self.used.add(name)
        return tensor

    def _norm(self, name: str, size: int) -> np.ndarray:
        tensor = self._tensor(name, (size,))
        if tensor.ggml_type not in _FLOAT_TYPES:
            raise ModelFormatError(self.gguf.path, f"norm weight of type {tensor.ggml_type.name}; expected F32, F16 "
                                                   f"or BF16", name)
        return float_rows(tensor.data, tensor.ggml_type)[0]

    def _scale(self, name: str) -> float:
        """The optional per-tensor multiplier `<base>.scale` llama.cpp's bitnet loader accepts; 1.0 when absent."""
        scale_name = name.removesuffix(".weight") + _SCALE_SUFFIX
        if scale_name not in self.gguf.tensors:
            return 1.0
        tensor = self._tensor(scale_name, (1,))
        if tensor.ggml_type not in _FLOAT_TYPES:
            raise ModelFormatError(self.gguf.path, f"scale of type {tensor.ggml_type.name}; expected a float",
                                   scale_name)
        return float(float_rows(tensor.data, tensor.ggml_type)[0, 0])

    def _linear(self, name: str, shape: tuple[int, int], rope_heads: int | None = None) -> Linear:
        """A weight matrix in its engine layout; rope_heads set means undo llama.cpp's q/k row permutation."""
        tensor = self._tensor(name, shape)
        num_cols = shape[1]
        # (rows, row_bytes) uint8. Rows are independent in every GGUF type, so the q/k permutation is undone on
        # the packed rows, before decoding. Every branch below builds new arrays from `raw`, so no weight keeps a
        # view of the mapping (a model file truncated under a live mapping would kill the process with SIGBUS).
        raw = tensor.data[rope_unpermute_rows(shape[0], rope_heads)] if rope_heads else tensor.data
        kind, scale = tensor.ggml_type, self._scale(name)
        if scale != 1.0 and kind not in (GGMLType.TQ1_0, GGMLType.TQ2_0, GGMLType.I2_S):
            raise ModelFormatError(self.gguf.path, f"a per-tensor .scale is only supported for ternary weights, "
                                                   f"not {kind.name}", name)
        try:
            if kind in _BLOCK_TYPES:
                return BlockQuantLinear.from_gguf_blocks(kind, raw, num_cols)
            if kind in _FLOAT_TYPES:
                return DenseLinear(float_rows(raw, kind))
            if kind == GGMLType.Q6_K:
                return BlockQuantLinear.from_gguf_blocks(GGMLType.Q8_0, requantize_q6_k_to_q8_0(raw, num_cols),
                                                         num_cols)
            if kind == GGMLType.I2_S:
                ternary, weight_scale = decode_i2_s(raw, tensor.trailer, num_cols)
                return TernaryLinear.from_ternary(ternary, weight_scale=weight_scale * scale)
            ternary, block_scales = decode_tq1_0(raw) if kind == GGMLType.TQ1_0 else decode_tq2_0(raw)
            return TernaryLinear.from_ternary(ternary, block_scales=block_scales * np.float32(scale))
        except ValueError as exc:
            raise ModelFormatError(self.gguf.path, f"{kind.name} data: {exc}", name) from None


def rope_unpermute_rows(num_rows: int, num_heads: int) -> np.ndarray:
    """(num_rows,) int64 row order that undoes llama.cpp's LlamaModel.permute: hf_weight = gguf_weight[order].

    permute() reshapes each head's D rows to (2, D/2) and swaps the axes, so GGUF row 2j+h of a head holds HF row
    h*D/2 + j: the rotate-half pair (j, j + D/2) becomes llama.cpp's adjacent pair (2j, 2j+1).
    """
    head_dim = num_rows // num_heads
    return np.arange(num_rows).reshape(num_heads, head_dim // 2, 2).transpose(0, 2, 1).reshape(-1)


def float_rows(raw: np.ndarray, ggml_type: GGMLType) -> np.ndarray:
    """raw: (rows, row_bytes) uint8 of F32, F16 or BF16 -> (rows, row_bytes // itemsize) float32, a new array."""
    rows = np.ascontiguousarray(raw)
    if ggml_type == GGMLType.BF16:
        # bf16 is the top half of a float32: widening is exact.
        return (rows.view("<u2").astype(np.uint32) << 16).view(np.float32)
    return rows.view("<f4" if ggml_type == GGMLType.F32 else "<f2").astype(np.float32)


def decode_tq2_0(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """raw: (rows, cols/256*66) uint8 TQ2_0 -> ternary (rows, cols) int8, block scales (rows, cols/256) float32.

    A block is 64 bytes of 2-bit codes then fp16 d: element 128*c + 32*s + j sits in bits 2s..2s+1 of byte 32*c + j,
    and its value is (code - 1) * d (ggml-quants.c dequantize_row_tq2_0; gguf.quants.TQ2_0).
    """
    blocks = _ternary_blocks(raw, 66)  # (rows, num_blocks, 66) uint8
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(4, 1)
    codes = (blocks[:, :, :64].reshape(*blocks.shape[:2], 2, 1, 32) >> shifts) & 3  # (rows, blocks, 2, 4, 32)
    if (codes == 3).any():
        raise ValueError("2-bit code 3 found; ternary codes must be 0, 1 or 2")
    ternary = codes.reshape(raw.shape[0], -1).astype(np.int8) - 1
    return ternary, _block_scales(blocks[:, :, 64:66])


def decode_tq1_0(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """raw: (rows, cols/256*54) uint8 TQ1_0 -> ternary (rows, cols) int8, block scales (rows, cols/256) float32.

    A block is qs[48] (5 trits per byte), qh[4] (4 trits per byte), fp16 d. Byte b stores trits as a fixed-point
    fraction: trit k is ((b * 3^k mod 256) * 3) >> 8. Elements: qs[0:32] give 160 (trit k of byte j -> 32k + j),
    qs[32:48] give 80 (-> 160 + 16k + j), qh gives 16 (-> 240 + 4k + j) (ggml-quants.c dequantize_row_tq1_0).
    """
    blocks = _ternary_blocks(raw, 54)  # (rows, num_blocks, 54) uint8
    powers = np.array([1, 3, 9, 27, 81], dtype=np.uint8).reshape(5, 1)
    parts = []
    for start, stop, num_trits in ((0, 32, 5), (32, 48, 5), (48, 52, 4)):
        packed = blocks[:, :, None, start:stop]  # (rows, blocks, 1, bytes) uint8
        shifted = packed * powers[:num_trits]  # uint8 product wraps mod 256 by design
        parts.append(((shifted.astype(np.uint16) * 3) >> 8).reshape(*blocks.shape[:2], -1))
    ternary = np.concatenate(parts, axis=2).reshape(raw.shape[0], -1).astype(np.int8) - 1
    return ternary, _block_scales(blocks[:, :, 52:54])


def _ternary_blocks(raw: np.ndarray, block_bytes: int) -> np.ndarray:
    if raw.shape[1] % block_bytes:
        raise ValueError(f"row of {raw.shape[1]} bytes is not a whole number of {block_bytes}-byte blocks")
    return raw.reshape(raw.shape[0], -1, block_bytes)


def _block_scales(d_bytes: np.ndarray) -> np.ndarray:
    """d_bytes: (rows, num_blocks, 2) uint8 little-endian fp16 -> (rows, num_blocks) float32."""
    scales = np.ascontiguousarray(d_bytes).view("<f2")[..., 0].astype(np.float32)
    if not np.isfinite(scales).all():
        raise ValueError("a block scale d is not finite")
    return scales


def decode_i2_s(raw: np.ndarray, trailer: np.ndarray, num_cols: int) -> tuple[np.ndarray, float]:
    """raw: (rows, cols/4) uint8 bitnet.cpp I2_S codes, trailer: its 32 bytes -> ternary (rows, cols) int8, scale.

    bitnet.cpp's x86 quantize_i2_s (src/ggml-bitnet-mad.cpp, default ACT_PARALLEL build, QK_I2_S = 128) packs each
    128 weights into 32 bytes, byte j holding weights j, j+32, j+64, j+96 at shifts 6, 4, 2, 0 as code T + 1, and
    stores one float32 scale right after the n/4 code bytes; a weight is (code - 1) * scale.
    """
    if num_cols % _I2_S_BLOCK:
        raise ValueError(f"row length {num_cols} is not a multiple of the I2_S block of {_I2_S_BLOCK}")
    shifts = np.array([6, 4, 2, 0], dtype=np.uint8).reshape(4, 1)
    codes = (raw.reshape(raw.shape[0], -1, 1, 32) >> shifts) & 3  # (rows, blocks, 4, 32) uint8
    if (codes == 3).any():
        raise ValueError("2-bit code 3 found; ternary codes must be 0, 1 or 2")
    scale = float(np.ascontiguousarray(trailer[:4]).view("<f4")[0])
    if not np.isfinite(scale):
        raise ValueError(f"per-tensor scale {scale} is not finite")
    return codes.reshape(raw.shape[0], -1).astype(np.int8) - 1, scale


def requantize_q6_k_to_q8_0(raw: np.ndarray, num_cols: int) -> np.ndarray:
    """raw: (rows, cols/256*210) uint8 Q6_K -> (rows, cols/32*34) uint8 Q8_0 blocks.

    Q6_K appears only as the tied embedding / output head of llama-quantize's TQ1_0, TQ2_0 and Q4_0 files; it is
    decoded with gguf's reference dequantizer and requantized with its reference Q8_0 quantizer, in row chunks.
    """
    chunks = []
    for start in range(0, raw.shape[0], _Q6_K_CHUNK_ROWS):
        weights = gguf_dequantize(raw[start:start + _Q6_K_CHUNK_ROWS], GGMLQuantizationType.Q6_K)  # (chunk, cols)
        if not np.isfinite(weights).all():
            raise ValueError(f"non-finite weights in rows {start}..{start + len(weights) - 1}")
        chunks.append(gguf_quantize(weights.reshape(-1, num_cols), GGMLQuantizationType.Q8_0))
    return np.concatenate(chunks) if chunks else np.zeros((0, num_cols // 32 * 34), np.uint8)
