"""AMX (Advanced Matrix Extensions) plumbing shared by the tile kernels: whether this process may use the tiles, and
the LLVM IR helpers and tile-configuration intrinsics the kernels are written with. No kernels here.

Linux hands out the tile data registers per process on request (arch_prctl ARCH_REQ_XCOMP_PERM); the request is made
once, at import, before any thread runs a tile instruction.
"""

from __future__ import annotations

import ctypes
import os

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from engine.kernels.cpu_features import detect_cpu_features

_SYS_ARCH_PRCTL = 158  # x86-64
_ARCH_REQ_XCOMP_PERM = 0x1023
_XFEATURE_XTILEDATA = 18

BYTE_PTR = ir.IntType(8).as_pointer()


def _request_permission() -> bool:
    """Ask Linux to let this process use the AMX tile data registers; False if it refuses or is not Linux."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA) == 0
    except (OSError, AttributeError):
        return False


def _available() -> bool:
    """AMX int8 on the CPU and in the JIT target, kernels not forced portable, and the kernel's permission."""
    if os.environ.get("BITSERVE_KERNELS", "auto") != "auto":
        return False
    return detect_cpu_features().has_amx_int8 and _request_permission()


AMX_AVAILABLE = _available()


def declare(builder: ir.IRBuilder, name: str, arg_types: list) -> ir.Function:
    """A void LLVM intrinsic (llvm.x86.ldtilecfg, tileloadd64, tdpbusd, tilestored64, ...)."""
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), arg_types), name)


def data_pointer(context, builder: ir.IRBuilder, array_type, array_value) -> ir.Value:
    """i8* to the first element of a Numba array argument."""
    return builder.bitcast(context.make_array(array_type)(context, builder, array_value).data, BYTE_PTR)


@intrinsic
def configure_tiles(typingctx, config):
    """Load a 64-byte tile configuration for this thread (it stays until release_tiles)."""

    def codegen(context, builder, signature, args):
        builder.call(declare(builder, "llvm.x86.ldtilecfg", [BYTE_PTR]),
                     [data_pointer(context, builder, signature.args[0], args[0])])
        return context.get_dummy_value()

    return types.void(config), codegen


@intrinsic
def release_tiles(typingctx):
    def codegen(context, builder, signature, args):
        builder.call(declare(builder, "llvm.x86.tilerelease", []), [])
        return context.get_dummy_value()

    return types.void(), codegen
