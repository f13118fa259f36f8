"""Tiny GGUF files for the loader tests: llama.cpp-style files through gguf.GGUFWriter, and a minimal writer of our
own for what GGUFWriter cannot write (bitnet.cpp's I2_S, damaged files). Test helpers only; no engine imports.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType
from gguf.quants import quantize

I2_S_TYPE_ID = 36  # bitnet.cpp's GGML_TYPE_I2_S; not in gguf's enum


@dataclass(frozen=True)
class TinyShape:
    architecture: str  # GGUF general.architecture
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def is_bitnet(self) -> bool:
        return self.architecture.startswith("bitnet")


LLAMA = TinyShape("llama", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=96,
                  vocab_size=40)
# Rows of TQ1_0/TQ2_0/Q6_K hold whole 256-element blocks, so every input width is a multiple of 256.
BITNET = TinyShape("bitnet", hidden_size=256, num_layers=1, num_heads=4, num_kv_heads=2, intermediate_size=512,
                   vocab_size=24)

PROJECTIONS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def hf_weights(shape: TinyShape, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """GGUF tensor name -> float32 weight in Hugging Face layout (q/k rows in rotate-half order, not permuted)."""
    h, q_rows, kv_rows, ffn = (shape.hidden_size, shape.num_heads * shape.head_dim,
                               shape.num_kv_heads * shape.head_dim, shape.intermediate_size)
    matrices = {"attn_q": (q_rows, h), "attn_k": (kv_rows, h), "attn_v": (kv_rows, h), "attn_output": (h, q_rows),
                "ffn_gate": (ffn, h), "ffn_up": (ffn, h), "ffn_down": (h, ffn)}
    norms = {"attn_norm": h, "ffn_norm": h}
    if shape.is_bitnet:
        norms |= {"attn_sub_norm": q_rows, "ffn_sub_norm": ffn}
    weights = {"token_embd.weight": rng.standard_normal((shape.vocab_size, h)).astype(np.float32),
               "output_norm.weight": rng.uniform(0.5, 1.5, h).astype(np.float32)}
    for layer in range(shape.num_layers):
        for name, matrix_shape in matrices.items():
            weights[f"blk.{layer}.{name}.weight"] = rng.standard_normal(matrix_shape).astype(np.float32) * 0.1
        for name, size in norms.items():
            weights[f"blk.{layer}.{name}.weight"] = rng.uniform(0.5, 1.5, size).astype(np.float32)
    return weights


def llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute: HF rotate-half rows -> interleaved pairs, per head."""
    return (weight.reshape(num_heads, 2, weight.shape[0] // num_heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def encode(weight: np.ndarray, ggml_type: GGMLQuantizationType) -> np.ndarray:
    """The array GGUFWriter.add_tensor stores for `ggml_type`: float arrays for F32/F16, block bytes otherwise."""
    if ggml_type == GGMLQuantizationType.F32:
        return weight
    if ggml_type == GGMLQuantizationType.F16:
        return weight.astype(np.float16)
    return quantize(weight, ggml_type)


def write_gguf(path: Path, shape: TinyShape, weights: dict[str, np.ndarray],
               types: dict[str, GGMLQuantizationType] | None = None, *, permute_qk: bool | None = None,
               metadata: dict[str, Any] | None = None, raw_tensors: dict[str, tuple[GGMLQuantizationType, np.ndarray]]
               | None = None) -> dict[str, np.ndarray]:
    """Write a tiny model the way llama.cpp's converter does; returns the arrays stored per tensor name.

    types: per tensor (default F32); permute_qk: apply llama.cpp's q/k permutation (default: for arch llama);
    metadata: extra or replacement keys (value None drops a key); raw_tensors: block bytes written as given.
    """
    types = types or {}
    permute_qk = shape.architecture == "llama" if permute_qk is None else permute_qk
    writer = gguf.GGUFWriter(path, shape.architecture)
    keys: dict[str, Any] = {
        f"{shape.architecture}.block_count": shape.num_layers,
        f"{shape.architecture}.context_length": 256,
        f"{shape.architecture}.embedding_length": shape.hidden_size,
        f"{shape.architecture}.feed_forward_length": shape.intermediate_size,
        f"{shape.architecture}.attention.head_count": shape.num_heads,
        f"{shape.architecture}.attention.head_count_kv": shape.num_kv_heads,
        f"{shape.architecture}.rope.freq_base": 50000.0,
        f"{shape.architecture}.attention.layer_norm_rms_epsilon": 1e-6,
        "tokenizer.ggml.tokens": [f"t{i}" for i in range(shape.vocab_size)],
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
    } | (metadata or {})
    for key, value in keys.items():
        if value is None:
            continue
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, value)
    stored = {}
    for name, weight in weights.items():
        if permute_qk and (".attn_q." in name or ".attn_k." in name):
            weight = llama_cpp_permute(weight, shape.num_heads if ".attn_q." in name else shape.num_kv_heads)
        ggml_type = types.get(name, GGMLQuantizationType.F32)
        stored[name] = encode(weight, ggml_type)
        raw_dtype = ggml_type if stored[name].dtype == np.uint8 else None
        writer.add_tensor(name, stored[name], raw_dtype=raw_dtype)
    for name, (ggml_type, data) in (raw_tensors or {}).items():
        stored[name] = data
        writer.add_tensor(name, data, raw_dtype=ggml_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored


@dataclass(frozen=True)
class RawTensorSpec:
    name: str
    shape: tuple[int, ...]  # numpy order; written reversed, as GGUF's ne
    type_id: int
    data: bytes
    offset: int | None = None  # None: the next aligned offset after the previous tensor


def write_raw_gguf(path: Path, metadata: dict[str, tuple[GGUFValueType, Any]], tensors: list[RawTensorSpec], *,
                   version: int = 3, alignment: int = 32, magic: bytes = b"GGUF") -> None:
    """Our own minimal GGUF writer (little-endian): header, metadata, tensor infos, aligned data.

    metadata values are (type, value); an array is (ARRAY, (item_type, items)), nesting allowed.
    """
    out = bytearray(magic + struct.pack("<IQQ", version, len(tensors), len(metadata)))
    for key, (value_type, value) in metadata.items():
        out += _string(key) + struct.pack("<I", value_type) + _value(value_type, value)
    offsets, next_offset = [], 0
    for tensor in tensors:
        offset = next_offset if tensor.offset is None else tensor.offset
        offsets.append(offset)
        next_offset = -(-(offset + len(tensor.data)) // alignment) * alignment
        out += _string(tensor.name) + struct.pack("<I", len(tensor.shape))
        out += b"".join(struct.pack("<Q", dim) for dim in reversed(tensor.shape))
        out += struct.pack("<IQ", tensor.type_id, offset)
    out += bytes(-len(out) % alignment)
    data = bytearray()
    for tensor, offset in zip(tensors, offsets, strict=True):
        end = offset + len(tensor.data)
        data += bytes(max(0, end - len(data)))
        data[offset:end] = tensor.data
    path.write_bytes(bytes(out + data))


def _string(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


_SCALAR_FORMATS = {GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
                   GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
                   GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q",
                   GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d"}


def _value(value_type: GGUFValueType, value: Any) -> bytes:
    if value_type == GGUFValueType.STRING:
        return _string(value)
    if value_type == GGUFValueType.ARRAY:
        item_type, items = value
        return struct.pack("<IQ", item_type, len(items)) + b"".join(_value(item_type, item) for item in items)
    if value_type not in _SCALAR_FORMATS:  # an invalid type id: its value is given as the raw bytes to write
        return value
    return struct.pack(_SCALAR_FORMATS[value_type], value)


def model_metadata(shape: TinyShape, architecture: str | None = None) -> dict[str, tuple[GGUFValueType, Any]]:
    """The metadata write_gguf writes, as write_raw_gguf input."""
    arch = architecture or shape.architecture
    u32, f32 = GGUFValueType.UINT32, GGUFValueType.FLOAT32
    return {
        "general.architecture": (GGUFValueType.STRING, arch),
        f"{arch}.block_count": (u32, shape.num_layers),
        f"{arch}.context_length": (u32, 256),
        f"{arch}.embedding_length": (u32, shape.hidden_size),
        f"{arch}.feed_forward_length": (u32, shape.intermediate_size),
        f"{arch}.attention.head_count": (u32, shape.num_heads),
        f"{arch}.attention.head_count_kv": (u32, shape.num_kv_heads),
        f"{arch}.rope.freq_base": (f32, 500000.0),
        f"{arch}.attention.layer_norm_rms_epsilon": (f32, 1e-5),
        "tokenizer.ggml.bos_token_id": (u32, 1),
        "tokenizer.ggml.eos_token_id": (u32, 2),
    }


def pack_i2_s(ternary: np.ndarray, scale: float) -> bytes:
    """Slow, literal transcription of bitnet.cpp's x86 quantize_i2_s (QK_I2_S = 128) for ternary (rows, cols) int8:
    code T+1 of flat element i*128 + j goes to byte i*32 + j%32 at shift 6 - 2*(j//32); then the float32 scale,
    padded to 32 bytes (ggml_nbytes = n/4 + 32)."""
    codes = (ternary.reshape(-1) + 1).astype(np.uint8)
    packed = np.zeros(codes.size // 4, dtype=np.uint8)
    for i in range(codes.size // 128):
        for j in range(128):
            packed[i * 32 + j % 32] |= codes[i * 128 + j] << (6 - 2 * (j // 32))
    return packed.tobytes() + struct.pack("<f", scale) + bytes(28)


def random_q6_k(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """(rows, cols/256*210) uint8 of random valid Q6_K blocks: any ql/qh/scale bytes, then a small finite fp16 d."""
    blocks = rng.integers(0, 256, size=(rows, cols // 256, 210), dtype=np.uint8)
    d = rng.uniform(1e-3, 1e-2, size=(rows, cols // 256, 1)).astype("<f2")
    blocks[..., 208:] = d.view(np.uint8)
    return blocks.reshape(rows, -1)


def i2_s_model(path: Path, rng: np.random.Generator, architecture: str = "bitnet-b1.58"
               ) -> dict[str, tuple[np.ndarray, float]]:
    """Write a bitnet.cpp-style I2_S model (F16 embedding, F32 norms); returns each projection's ternary and scale."""
    ternaries: dict[str, tuple[np.ndarray, float]] = {}
    specs = []
    for name, weight in hf_weights(BITNET, rng).items():
        if name.split(".")[-2] in PROJECTIONS:
            ternary = rng.integers(-1, 2, weight.shape).astype(np.int8)
            ternaries[name] = (ternary, float(np.float32(rng.uniform(0.5, 2.0))))
            specs.append(RawTensorSpec(name, weight.shape, I2_S_TYPE_ID, pack_i2_s(*ternaries[name])))
        else:
            dtype = "<f2" if name == "token_embd.weight" else "<f4"
            type_id = GGMLQuantizationType.F16 if dtype == "<f2" else GGMLQuantizationType.F32
            specs.append(RawTensorSpec(name, weight.shape, type_id, weight.astype(dtype).tobytes()))
    tokens = [f"t{i}" for i in range(BITNET.vocab_size)]
    metadata = model_metadata(BITNET, architecture)
    metadata["tokenizer.ggml.tokens"] = (GGUFValueType.ARRAY, (GGUFValueType.STRING, tokens))
    write_raw_gguf(path, metadata, specs)
    return ternaries


def small_file(path: Path, **overrides: Any) -> None:
    """Two tensors and a little metadata, small enough to cut at every byte; overrides go to write_raw_gguf."""
    tensors = [RawTensorSpec("a.weight", (2, 32), GGMLQuantizationType.Q8_0, bytes(68)),
               RawTensorSpec("b.weight", (4,), GGMLQuantizationType.F32, bytes(16))]
    metadata = {"general.architecture": (GGUFValueType.STRING, "llama"),
                "x.list": (GGUFValueType.ARRAY, (GGUFValueType.STRING, ["p", "q"]))}
    write_raw_gguf(path, overrides.pop("metadata", metadata), overrides.pop("tensors", tensors), **overrides)
