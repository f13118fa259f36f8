"""Process-wide kernel settings: how many threads the Numba kernels use, and the one thread that runs them.

Why one thread: Numba's OpenMP layer gives every thread that starts a parallel region its own pool of workers, and
once the pools' threads outnumber the cores, libgomp stops letting idle workers spin between regions and puts them to
sleep instead. A decode step is ~150 short parallel regions, so a second live pool (a loader thread, a second
model's engine thread) made every region wait for a wake-up: the default model's decode step went from 11 ms to
38 ms. Serving therefore runs every engine step, of every model, on `kernel_thread()`; threads that only load run
their kernels single-threaded (`use_single_thread`), which starts no pool at all.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numba

T = TypeVar("T")

_num_threads: int | None = None  # as configured; None: every core this process may run on
_executor: ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()
_on_kernel_thread = threading.local()  # .active is True on the kernel thread only


def configure_threads(num_threads: int | None) -> int:
    """Use `num_threads` kernel threads (None: every core this process may run on), on the calling thread and on the
    kernel thread; returns the number in effect."""
    global _num_threads
    wanted = _checked(num_threads)
    _num_threads = wanted
    numba.set_num_threads(wanted)  # Numba's thread count is per calling thread
    if _executor is not None:
        _executor.submit(numba.set_num_threads, wanted).result()
    return wanted


def run_on_kernel_thread(function: Callable[..., T], *args: object) -> T:
    """Call `function(*args)` on the kernel thread and return its result (or raise its exception). Called on the
    kernel thread itself, it just calls."""
    if getattr(_on_kernel_thread, "active", False):
        return function(*args)
    return kernel_thread().submit(function, *args).result()


def kernel_thread() -> ThreadPoolExecutor:
    """The single long-lived thread every served engine step runs on (started on first use)."""
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kernels",
                                           initializer=_start_kernel_thread)
        return _executor


def _start_kernel_thread() -> None:
    _on_kernel_thread.active = True
    numba.set_num_threads(_checked(_num_threads))


def use_single_thread() -> None:
    """Run this thread's kernels on itself alone, so it starts no worker pool beside the kernel thread's."""
    numba.set_num_threads(1)


def _checked(num_threads: int | None) -> int:
    available = len(os.sched_getaffinity(0))
    wanted = available if num_threads is None else num_threads
    if not 1 <= wanted <= numba.config.NUMBA_NUM_THREADS:
        raise ValueError(f"threads must be between 1 and {numba.config.NUMBA_NUM_THREADS}, got {wanted}")
    return wanted
