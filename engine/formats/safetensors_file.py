"""Zero-copy reader for .safetensors files: header, dtypes, shapes and read-only memory maps of each tensor.

The `safetensors` package's numpy backend cannot return bfloat16, the dtype of every BitNet checkpoint, so the
(simple, documented) container is read here and bf16 is widened to float32 only where a caller asks for it.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.formats.errors import ModelFormatError

_MAX_HEADER_BYTES = 100 * 1024 * 1024

# safetensors dtype name -> numpy storage dtype; BF16 is stored as its raw 16 bits.
_DTYPES: dict[str, np.dtype] = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "I8": np.dtype("i1"),
    "I32": np.dtype("<i4"),
    "I64": np.dtype("<i8"),
}


@dataclass(frozen=True)
class SafeTensor:
    name: str
    dtype: str  # safetensors dtype name, e.g. "BF16"
    shape: tuple[int, ...]
    data: np.ndarray  # shape `shape`, storage dtype of _DTYPES[dtype], read-only memmap

    def to_float32(self) -> np.ndarray:
        """The tensor as a new float32 array; bf16 widened exactly (its bits are the top half of a float32)."""
        if self.dtype == "BF16":
            return (self.data.astype(np.uint32) << 16).view(np.float32)
        if self.dtype in ("F32", "F16"):
            return self.data.astype(np.float32)
        raise ModelFormatError("", f"dtype {self.dtype} is not a float type", self.name)


def read_safetensors(path: str | Path) -> dict[str, SafeTensor]:
    path = Path(path)
    file_bytes = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ModelFormatError(path, f"truncated: {file_bytes} bytes, expected an 8-byte header length")
        (header_bytes,) = struct.unpack("<Q", prefix)
        if header_bytes > min(_MAX_HEADER_BYTES, file_bytes - 8):
            raise ModelFormatError(path, f"header length {header_bytes} exceeds the file ({file_bytes} bytes)")
        try:
            header = json.loads(f.read(header_bytes))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelFormatError(path, f"header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise ModelFormatError(path, "header is not a JSON object")
    data_start = 8 + header_bytes
    data_bytes = file_bytes - data_start
    raw = np.memmap(path, dtype=np.uint8, mode="r", offset=data_start, shape=(data_bytes,)) if data_bytes else None
    tensors: dict[str, SafeTensor] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        tensors[name] = _tensor_view(path, name, info, raw, data_bytes)
    return tensors


def _tensor_view(path: Path, name: str, info: object, raw: np.ndarray | None, data_bytes: int) -> SafeTensor:
    try:
        dtype_name, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]  # type: ignore[index]
    except (TypeError, KeyError, ValueError):
        raise ModelFormatError(path, "header entry lacks dtype/shape/data_offsets", name) from None
    if dtype_name not in _DTYPES:
        raise ModelFormatError(path, f"unsupported dtype {dtype_name}; supported: {', '.join(_DTYPES)}", name)
    dtype = _DTYPES[dtype_name]
    expected_bytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if end - begin != expected_bytes:
        raise ModelFormatError(
            path, f"{end - begin} bytes stored, shape {list(shape)} {dtype_name} needs {expected_bytes}", name)
    if not 0 <= begin <= end <= data_bytes:
        raise ModelFormatError(path, f"data [{begin}, {end}) lies past the end of the file (truncated?)", name)
    data = raw[begin:end].view(dtype).reshape(shape) if raw is not None else np.zeros(shape, dtype)
    return SafeTensor(name, dtype_name, shape, data)


def write_safetensors(path: str | Path, tensors: dict[str, tuple[str, np.ndarray]]) -> None:
    """Write `name -> (safetensors dtype name, array in that dtype's storage type)`; bf16 arrays are uint16 bits."""
    header: dict[str, object] = {}
    offset = 0
    for name, (dtype_name, array) in tensors.items():
        if _DTYPES[dtype_name] != array.dtype:
            raise ValueError(f"{name}: {dtype_name} is stored as {_DTYPES[dtype_name]}, got {array.dtype}")
        header[name] = {"dtype": dtype_name, "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    header_bytes = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)) + header_bytes)
        for _, array in tensors.values():
            f.write(np.ascontiguousarray(array).tobytes())


def bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bit patterns (uint16), rounded to nearest even as torch does."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    return (rounded >> np.uint32(16)).astype(np.uint16)
