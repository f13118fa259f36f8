"""Process-wide kernel settings: how many threads the Numba kernels use."""

from __future__ import annotations

import os

import numba


def configure_threads(num_threads: int | None) -> int:
    """Use `num_threads` kernel threads (None: every core this process may run on); returns the number in effect."""
    available = len(os.sched_getaffinity(0))
    wanted = available if num_threads is None else num_threads
    if not 1 <= wanted <= numba.config.NUMBA_NUM_THREADS:
        raise ValueError(f"threads must be between 1 and {numba.config.NUMBA_NUM_THREADS}, got {wanted}")
    numba.set_num_threads(wanted)
    return wanted
