"""Which x86 SIMD extensions the JIT target has, so kernels can pick a fast path once at import.

Detection only: no Numba code here, and nothing that changes after import.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import llvmlite.binding

# /proc/cpuinfo flag name -> LLVM feature name, for the few extensions the kernels care about.
_CPUINFO_TO_LLVM = {"avx2": "avx2", "avx512f": "avx512f", "avx512bw": "avx512bw", "avx512_vnni": "avx512vnni",
                    "amx_tile": "amx-tile", "amx_int8": "amx-int8"}


@dataclass(frozen=True)
class CpuFeatures:
    avx2: bool
    avx512f: bool
    avx512bw: bool
    avx512_vnni: bool
    amx_int8: bool = False  # AMX tiles with int8 dot products (tdpbusd)

    @property
    def has_avx512_vnni(self) -> bool:
        """True when 512-bit `vpdpbusd` kernels can run: VNNI needs the F and BW foundations too."""
        return self.avx512f and self.avx512bw and self.avx512_vnni

    @property
    def has_amx_int8(self) -> bool:
        return self.amx_int8


def _host_llvm_features() -> set[str]:
    """LLVM's names of the extensions the host CPU has (e.g. 'avx512vnni'); /proc/cpuinfo if LLVM cannot say."""
    try:
        flat = llvmlite.binding.get_host_cpu_features().flatten()
        return {item[1:] for item in flat.split(",") if item.startswith("+")}
    except RuntimeError:
        cpuinfo = Path("/proc/cpuinfo")
        if not cpuinfo.exists():
            return set()
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return {llvm_name for name, llvm_name in _CPUINFO_TO_LLVM.items() if name in flags}
        return set()


def _jit_target_features(host_features: set[str]) -> set[str]:
    """Restrict host features to what Numba compiles for.

    NUMBA_CPU_NAME / NUMBA_CPU_FEATURES (used to build portable caches, e.g. in a Docker image) retarget the JIT;
    an intrinsic the target lacks would fail to compile, so only features named there count.
    """
    cpu_name = os.environ.get("NUMBA_CPU_NAME", "host")
    if cpu_name == "host":
        return host_features
    named = os.environ.get("NUMBA_CPU_FEATURES", "")
    return {item[1:] for item in named.split(",") if item.startswith("+")} & host_features


def detect_cpu_features() -> CpuFeatures:
    """Features available both on this CPU and in Numba's compilation target."""
    features = _jit_target_features(_host_llvm_features())
    return CpuFeatures(
        avx2="avx2" in features,
        avx512f="avx512f" in features,
        avx512bw="avx512bw" in features,
        avx512_vnni="avx512vnni" in features,
        amx_int8={"amx-tile", "amx-int8"} <= features,
    )
