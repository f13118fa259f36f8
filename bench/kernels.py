"""Ternary matmul kernels on BitNet b1.58 2B4T shapes, against numpy float32 matmul and DRAM read bandwidth measured
in the same run. Prints a table; run from the repository root: `python -m bench.kernels --help`.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

# Before numba is imported: reuse compiled kernels across runs.
os.environ.setdefault("NUMBA_CACHE_DIR", os.path.join(os.path.dirname(os.path.dirname(__file__)), ".numba_cache"))

import numba
import numpy as np

from engine.kernels import amx, ternary, ternary_amx

# (out_features, in_features) of a 2B4T layer's projections and how many of each a layer holds.
LAYER_SHAPES = {(2560, 2560): 2, (640, 2560): 2, (6912, 2560): 2, (2560, 6912): 1}  # q,o / k,v / gate,up / down
# 2-bit kernels take (xq, act_sum, codes); TL2 kernels take (tables, indices, signs, num_rows).
KERNELS = {"avx512_vnni": ternary._matmul_ternary_vnni, "portable": ternary._matmul_ternary_portable,
           "amx": ternary_amx.matmul_ternary_amx}
TL2_KERNELS = {"tl2_avx512": ternary._matmul_ternary_tl2_avx512, "tl2_portable": ternary._matmul_ternary_tl2_portable}


@dataclass(frozen=True)
class Timing:
    median_s: float
    best_s: float


@numba.njit(nogil=True, parallel=True, cache=True)
def _sum_int64(values: np.ndarray) -> int:
    """Integer sum over all threads: integer adds vectorize, so the loop is limited by memory reads only. Each inner
    loop runs from 0 over a slice: an index that might be negative would make Numba wrap it, and LLVM would then
    gather element by element (a third of the bandwidth)."""
    num_chunks = 64
    chunk = values.size // num_chunks
    partial = np.zeros(num_chunks, dtype=np.int64)  # (num_chunks,) int64, one slot per iteration
    for index in numba.prange(num_chunks):
        part = values[index * chunk:(index + 1) * chunk]  # (chunk,) int64
        total = 0
        for k in range(part.size):
            total += part[k]
        partial[index] = total
    return partial.sum()


def measure_read_bandwidth_gbs(num_bytes: int = 1 << 30) -> float:
    """Best of three sums over a num_bytes array on Numba's threads (the array is far larger than any cache)."""
    values = np.ones(num_bytes // 8, dtype=np.int64)  # (num_bytes // 8,) int64
    _sum_int64(values[:64])
    best_s = math.inf
    for _ in range(3):
        start = time.perf_counter()
        _sum_int64(values)
        best_s = min(best_s, time.perf_counter() - start)
    return num_bytes / best_s / 1e9


def time_calls(function: Callable, argument_sets: list[tuple], budget_s: float, max_calls: int = 10_000) -> Timing:
    """Times function over argument_sets in rotation until budget_s has passed (at least 3 calls), after a warm-up."""
    function(*argument_sets[0])
    durations = []
    deadline = time.perf_counter() + budget_s
    while len(durations) < 3 or (time.perf_counter() < deadline and len(durations) < max_calls):
        arguments = argument_sets[(len(durations) + 1) % len(argument_sets)]
        start = time.perf_counter()
        function(*arguments)
        durations.append(time.perf_counter() - start)
    return Timing(float(np.median(durations)), min(durations))


def run_tl2(kernel: Callable, xq: np.ndarray, in_features: int, num_rows: int, indices: np.ndarray,
            signs: np.ndarray) -> np.ndarray:
    """A TL2 matmul as a layer runs it: the per-token tables are built inside every call."""
    return kernel(ternary.build_tl2_tables(xq, in_features), indices, signs, num_rows)


def packed_copies(matrix: np.ndarray, path: str, cold_bytes: int) -> list[tuple[np.ndarray, ...]]:
    """The matrix packed for path, repeated (as distinct copies) until the copies total cold_bytes."""
    packed = ternary.pack_ternary_tl2(matrix) if path in TL2_KERNELS else (ternary.pack_ternary(matrix),)
    num_bytes = sum(array.nbytes for array in packed)
    return [packed] + [tuple(array.copy() for array in packed) for _ in range(math.ceil(cold_bytes / num_bytes) - 1)]


def parse_shapes(text: str) -> list[tuple[int, int]]:
    shapes = []
    for item in text.split(","):
        out_features, in_features = item.lower().split("x")
        shapes.append((int(out_features), int(in_features)))
    return shapes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shapes", type=parse_shapes, default=list(LAYER_SHAPES),
                        help="comma-separated NxK (out x in), default: the four 2B4T projection shapes")
    parser.add_argument("--batches", type=lambda text: [int(b) for b in text.split(",")], default=[1, 4, 16, 64, 128])
    parser.add_argument("--paths", default="auto",
                        help="comma-separated: avx512_vnni, amx, portable, tl2_avx512, tl2_portable; auto = the "
                             "path selected at import, and amx where the CPU has it")
    parser.add_argument("--seconds", type=float, default=0.15, help="time budget per measurement")
    parser.add_argument("--cold-bytes", type=int, default=0,
                        help="rotate over copies of the codes totalling this many bytes, so weights come from DRAM")
    parser.add_argument("--skip-bandwidth", action="store_true", help="do not measure DRAM bandwidth (saves ~1 s)")
    parser.add_argument("--threads", type=int, default=numba.config.NUMBA_NUM_THREADS,
                        help="Numba threads for the kernels and the bandwidth sum (default: all cores)")
    args = parser.parse_args()
    numba.set_num_threads(args.threads)
    auto_paths = [ternary.KERNEL_PATH] + (["amx"] if amx.AMX_AVAILABLE else [])
    paths = auto_paths if args.paths == "auto" else args.paths.split(",")

    rng = np.random.default_rng(0)
    bandwidth_gbs = math.nan if args.skip_bandwidth else measure_read_bandwidth_gbs()
    blas_threads = os.environ.get("OPENBLAS_NUM_THREADS", "all cores (set OPENBLAS_NUM_THREADS to match --threads)")
    print(f"kernel path selected at import: {ternary.KERNEL_PATH}; Numba threads: {numba.get_num_threads()}; "
          f"numpy BLAS threads: {blas_threads}\n"
          f"DRAM read bandwidth (1 GiB int64 sum, Numba threads): {bandwidth_gbs:.1f} GB/s; weights are cache-resident "
          f"unless --cold-bytes rotates copies, so %DRAM may exceed 100")
    print(f"{'shape NxK':>11} {'batch':>5} {'path':>12} {'ms/call':>9} {'best ms':>9} {'G w/s':>7} {'GMAC/s':>7} "
          f"{'GB/s':>6} {'%DRAM':>6} {'numpy ms':>9} {'x numpy':>8}")
    batch1_ms: dict[tuple[str, tuple[int, int]], float] = {}
    for shape in args.shapes:
        num_rows, in_features = shape
        matrix = rng.integers(-1, 2, size=shape, dtype=np.int8)  # (N, K) int8 ternary
        copies = {path: packed_copies(matrix, path, args.cold_bytes) for path in paths}
        weight = rng.standard_normal(shape).astype(np.float32)  # (N, K) float32 baseline weight
        inputs = {batch: rng.standard_normal((batch, in_features)).astype(np.float32) for batch in args.batches}
        # Baselines first, then a pause: OpenBLAS worker threads spin after a call and would steal the kernels' cores.
        numpy_timings = {batch: time_calls(np.matmul, [(x, weight.T)], args.seconds) for batch, x in inputs.items()}
        time.sleep(0.2)
        for batch, x in inputs.items():
            xq, _, act_sum = ternary.quantize_activations(x)
            numpy_timing = numpy_timings[batch]
            for path in paths:
                if path in TL2_KERNELS:
                    argument_sets = [(TL2_KERNELS[path], xq, in_features, num_rows, *packed) for packed in copies[path]]
                    timing = time_calls(run_tl2, argument_sets, args.seconds)
                else:
                    argument_sets = [(xq, act_sum, *packed) for packed in copies[path]]
                    timing = time_calls(KERNELS[path], argument_sets, args.seconds)
                weights_per_s = num_rows * in_features / timing.median_s
                gbs = sum(array.nbytes for array in copies[path][0]) / timing.median_s / 1e9
                print(f"{num_rows:>5}x{in_features:<5} {batch:>5} {path:>12} {timing.median_s * 1e3:>9.4f} "
                      f"{timing.best_s * 1e3:>9.4f} {weights_per_s / 1e9:>7.1f} {weights_per_s * batch / 1e9:>7.1f} "
                      f"{gbs:>6.1f} {100 * gbs / bandwidth_gbs:>5.0f}% {numpy_timing.median_s * 1e3:>9.4f} "
                      f"{numpy_timing.median_s / timing.median_s:>8.1f}")
                if batch == 1:
                    batch1_ms[path, shape] = timing.median_s * 1e3
    for path in paths:
        if all((path, shape) in batch1_ms for shape in LAYER_SHAPES):
            layer_ms = sum(count * batch1_ms[path, shape] for shape, count in LAYER_SHAPES.items())
            print(f"{path}: one 2B4T layer's 7 matrices at batch 1 (sum of the medians above): {layer_ms:.3f} ms")


if __name__ == "__main__":
    main()
