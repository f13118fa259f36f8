"""GGML tensor type ids and their block geometry (elements per block, bytes per block)."""

from __future__ import annotations

from enum import IntEnum


class GGMLType(IntEnum):
    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q8_0 = 8
    Q6_K = 14
    BF16 = 30
    TQ1_0 = 34
    TQ2_0 = 35
    I2_S = 36  # bitnet.cpp's 2-bit ternary type; not in ggml's own enum


# (elements per block, bytes per block). I2_S has no blocks: 4 codes per byte plus a trailing per-tensor scale.
BLOCK_GEOMETRY: dict[GGMLType, tuple[int, int]] = {
    GGMLType.F32: (1, 4),
    GGMLType.F16: (1, 2),
    GGMLType.BF16: (1, 2),
    GGMLType.Q4_0: (32, 18),
    GGMLType.Q4_1: (32, 20),
    GGMLType.Q8_0: (32, 34),
    GGMLType.Q6_K: (256, 210),
    GGMLType.TQ1_0: (256, 54),
    GGMLType.TQ2_0: (256, 66),
    GGMLType.I2_S: (4, 1),
}
