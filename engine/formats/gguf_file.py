"""GGUF container reader (v2/v3): metadata as plain Python values, each tensor's bytes as a read-only memmap view.

Decodes no weights and runs nothing from the file; every malformed input raises ModelFormatError naming the file,
the tensor and what was expected.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType

from engine.formats.errors import ModelFormatError
from engine.formats.ggml import BLOCK_GEOMETRY, GGMLType

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)  # v1 had 32-bit counts; v2 and v3 share one little-endian layout
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
# bitnet.cpp's ggml_nbytes for I2_S is n/4 + 32: the codes, then a float32 per-tensor scale padded to 32 bytes.
I2_S_TRAILER_BYTES = 32
_MAX_ARRAY_NESTING = 4


class GGUFValueType(IntEnum):
    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


# Fixed-size GGUF value types -> little-endian numpy dtype; a GGUF bool is one byte.
_SCALAR_DTYPES: dict[GGUFValueType, np.dtype] = {
    GGUFValueType.UINT8: np.dtype("u1"),
    GGUFValueType.INT8: np.dtype("i1"),
    GGUFValueType.UINT16: np.dtype("<u2"),
    GGUFValueType.INT16: np.dtype("<i2"),
    GGUFValueType.UINT32: np.dtype("<u4"),
    GGUFValueType.INT32: np.dtype("<i4"),
    GGUFValueType.FLOAT32: np.dtype("<f4"),
    GGUFValueType.BOOL: np.dtype("u1"),
    GGUFValueType.UINT64: np.dtype("<u8"),
    GGUFValueType.INT64: np.dtype("<i8"),
    GGUFValueType.FLOAT64: np.dtype("<f8"),
}
# Smallest encoding of one array item, so a corrupt item count fails at once instead of looping through the file.
_MIN_ITEM_BYTES = {GGUFValueType.STRING: 8, GGUFValueType.ARRAY: 12}


@dataclass(frozen=True)
class RawTensor:
    name: str
    ggml_type: GGMLType
    shape: tuple[int, ...]  # numpy order: (..., rows, cols); cols is GGUF's ne[0]
    data: np.ndarray  # (num_rows, row_bytes) uint8, read-only view on the file's memmap; rows are independent
    trailer: np.ndarray  # (I2_S_TRAILER_BYTES,) uint8 for I2_S (float32 scale in bytes 0..3), else (0,) uint8

    @property
    def num_rows(self) -> int:
        return self.data.shape[0]

    @property
    def num_cols(self) -> int:
        return self.shape[-1]


@dataclass(frozen=True)
class GGUFFile:
    path: Path
    version: int
    metadata: dict[str, Any]  # key -> str | int | float | bool | list; also GGUF.version/tensor_count/kv_count
    tensors: dict[str, RawTensor]  # in file order
    alignment: int
    data_offset: int  # byte offset of the tensor data section

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))


@dataclass(frozen=True)
class _TensorInfo:
    name: str
    dims: tuple[int, ...]  # GGUF order: ne[0] (the row length) first
    type_id: int
    offset: int  # relative to the data section


def read_gguf(path: str | Path) -> GGUFFile:
    """Parse the header and tensor table of a GGUF v2/v3 file and map its tensor data read-only.

    This parser, not gguf.GGUFReader, is the one path: GGUFReader rejects bitnet.cpp's I2_S (type 36), reports
    damage as raw numpy errors without the tensor's name, and can spin on a corrupt array length (a read past the
    end returns zero bytes, so its loop never advances). The tests check this parser against GGUFReader.
    """
    path = Path(path)
    try:
        # (file_size,) uint8, read-only; numpy cannot map an empty file, which fails below as a bad magic.
        file_bytes = np.memmap(path, dtype=np.uint8, mode="r") if path.stat().st_size else np.zeros(0, np.uint8)
    except OSError as exc:
        raise ModelFormatError(path, f"cannot read the file ({exc.strerror or exc})") from None
    cursor = _Cursor(path, memoryview(file_bytes))
    version = _read_preamble(cursor)
    tensor_count = cursor.unpack("<Q", "tensor count")
    kv_count = cursor.unpack("<Q", "metadata count")
    metadata: dict[str, Any] = {"GGUF.version": version, "GGUF.tensor_count": tensor_count, "GGUF.kv_count": kv_count}
    value_types: dict[str, GGUFValueType] = {}
    for _ in range(cursor.check_count(kv_count, 12, "metadata entries")):
        key = cursor.string("metadata key")
        if key in value_types:
            raise ModelFormatError(path, f"metadata key '{key}' appears twice")
        value_types[key] = cursor.value_type(f"metadata '{key}'")
        metadata[key] = _read_value(cursor, value_types[key], f"metadata '{key}'", 0)
    infos = [_read_tensor_info(cursor) for _ in range(cursor.check_count(tensor_count, 32, "tensor infos"))]
    alignment = _alignment(path, metadata, value_types)
    data_offset = -(-cursor.offset // alignment) * alignment
    tensors: dict[str, RawTensor] = {}
    for info in infos:
        if info.name in tensors:
            raise ModelFormatError(path, "tensor name appears twice in the tensor table", info.name)
        tensors[info.name] = _raw_tensor(path, file_bytes, info, data_offset, alignment)
    return GGUFFile(path, version, metadata, tensors, alignment, data_offset)


class _Cursor:
    """Reads little-endian values from the whole file, turning every overrun into a ModelFormatError."""

    def __init__(self, path: Path, view: memoryview) -> None:
        self.path = path
        self.view = view  # the whole file, read-only
        self.offset = 0

    def claim(self, num_bytes: int, what: str) -> int:
        """Advance past num_bytes and return where they start."""
        start = self.offset
        if start + num_bytes > len(self.view):
            raise ModelFormatError(self.path, f"truncated file: {what} needs {num_bytes} bytes at offset {start}, "
                                              f"but the file ends at {len(self.view)}")
        self.offset = start + num_bytes
        return start

    def unpack(self, fmt: str, what: str) -> Any:
        return struct.unpack_from(fmt, self.view, self.claim(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        length = self.unpack("<Q", f"{what} length")
        start = self.claim(length, what)
        try:
            return str(self.view[start:start + length], "utf-8")
        except UnicodeDecodeError as exc:
            raise ModelFormatError(self.path, f"{what} at offset {start} is not valid UTF-8 ({exc.reason})") from None

    def value_type(self, what: str) -> GGUFValueType:
        type_id = self.unpack("<I", f"{what} type")
        if type_id not in GGUFValueType._value2member_map_:
            raise ModelFormatError(self.path, f"{what} has unknown value type {type_id} (valid: 0..12)")
        return GGUFValueType(type_id)

    def check_count(self, count: int, min_item_bytes: int, what: str) -> int:
        """A count read from the file, rejected when even the smallest items could not fit in what remains."""
        remaining = len(self.view) - self.offset
        if count * min_item_bytes > remaining:
            raise ModelFormatError(self.path, f"truncated or corrupt file: {count} {what} at offset {self.offset} "
                                              f"need at least {count * min_item_bytes} bytes, {remaining} remain")
        return count


def _read_preamble(cursor: _Cursor) -> int:
    found = bytes(cursor.view[:4])
    if found != GGUF_MAGIC:
        raise ModelFormatError(cursor.path, f"not a GGUF file: starts with {found!r}, expected magic {GGUF_MAGIC!r}")
    cursor.claim(4, "the GGUF magic")
    version = cursor.unpack("<I", "the GGUF version")
    if version & 0xFFFF == 0 and version:
        raise ModelFormatError(cursor.path, "big-endian GGUF files are not supported")
    if version not in SUPPORTED_VERSIONS:
        raise ModelFormatError(cursor.path, f"GGUF version {version} is not supported; supported: "
                                            f"{', '.join(map(str, SUPPORTED_VERSIONS))}")
    return version


def _read_value(cursor: _Cursor, value_type: GGUFValueType, what: str, depth: int) -> Any:
    if value_type == GGUFValueType.STRING:
        return cursor.string(what)
    if value_type == GGUFValueType.ARRAY:
        if depth >= _MAX_ARRAY_NESTING:
            raise ModelFormatError(cursor.path, f"{what}: arrays nested deeper than {_MAX_ARRAY_NESTING} levels")
        item_type = cursor.value_type(f"{what} item")
        count = cursor.unpack("<Q", f"{what} item count")
        if item_type in _SCALAR_DTYPES:
            dtype = _SCALAR_DTYPES[item_type]
            start = cursor.claim(cursor.check_count(count, dtype.itemsize, f"items of {what}") * dtype.itemsize, what)
            items = np.frombuffer(cursor.view, dtype=dtype, count=count, offset=start)  # (count,) dtype
            return items.astype(bool).tolist() if item_type == GGUFValueType.BOOL else items.tolist()
        cursor.check_count(count, _MIN_ITEM_BYTES[item_type], f"items of {what}")
        return [_read_value(cursor, item_type, f"{what}[{i}]", depth + 1) for i in range(count)]
    dtype = _SCALAR_DTYPES[value_type]
    value = np.frombuffer(cursor.view, dtype=dtype, count=1, offset=cursor.claim(dtype.itemsize, what))[0].item()
    return bool(value) if value_type == GGUFValueType.BOOL else value


def _read_tensor_info(cursor: _Cursor) -> _TensorInfo:
    name = cursor.string("tensor name")
    num_dims = cursor.unpack("<I", f"dimension count of tensor '{name}'")
    if not 1 <= num_dims <= MAX_DIMS:
        raise ModelFormatError(cursor.path, f"{num_dims} dimensions; expected 1 to {MAX_DIMS}", name)
    dims = tuple(cursor.unpack("<Q", f"dimensions of tensor '{name}'") for _ in range(num_dims))
    type_id = cursor.unpack("<I", f"type of tensor '{name}'")
    offset = cursor.unpack("<Q", f"data offset of tensor '{name}'")
    return _TensorInfo(name, dims, type_id, offset)


def _alignment(path: Path, metadata: dict[str, Any], value_types: dict[str, GGUFValueType]) -> int:
    if "general.alignment" not in metadata:
        return DEFAULT_ALIGNMENT
    alignment = metadata["general.alignment"]
    if value_types["general.alignment"] != GGUFValueType.UINT32 or alignment <= 0 or alignment & (alignment - 1):
        raise ModelFormatError(path, f"general.alignment must be a uint32 power of two, got {alignment!r}")
    return alignment


def _type_name(type_id: int) -> str:
    """'13 (Q5_K)' for ids ggml knows, '99' otherwise."""
    try:
        return f"{type_id} ({GGMLQuantizationType(type_id).name})"
    except ValueError:
        return str(type_id)


def _raw_tensor(path: Path, file_bytes: np.ndarray, info: _TensorInfo, data_offset: int, alignment: int) -> RawTensor:
    if info.type_id not in GGMLType._value2member_map_:
        supported = ", ".join(t.name for t in GGMLType)
        raise ModelFormatError(path, f"tensor type {_type_name(info.type_id)} is not supported; "
                                     f"supported types: {supported}", info.name)
    ggml_type = GGMLType(info.type_id)
    block_elements, block_bytes = BLOCK_GEOMETRY[ggml_type]
    num_cols, num_rows = info.dims[0], math.prod(info.dims[1:])
    if num_cols % block_elements:
        raise ModelFormatError(path, f"row length {num_cols} is not a multiple of the {ggml_type.name} block size "
                                     f"{block_elements}", info.name)
    row_bytes = num_cols // block_elements * block_bytes
    body_bytes = num_rows * row_bytes
    trailer_bytes = I2_S_TRAILER_BYTES if ggml_type == GGMLType.I2_S else 0
    if info.offset % alignment:
        raise ModelFormatError(path, f"data offset {info.offset} is not a multiple of the alignment {alignment}",
                               info.name)
    start = data_offset + info.offset
    end = start + body_bytes + trailer_bytes
    if end > file_bytes.size:
        raise ModelFormatError(path, f"{ggml_type.name} data of shape {list(reversed(info.dims))} needs bytes "
                                     f"[{start}, {end}) but the file ends at {file_bytes.size}: truncated file or "
                                     f"corrupt tensor table", info.name)
    data = file_bytes[start:start + body_bytes].reshape(num_rows, row_bytes)
    trailer = file_bytes[start + body_bytes:end]
    return RawTensor(info.name, ggml_type, tuple(reversed(info.dims)), data, trailer)
