"""The one switch for compiling kernels: HPCDNN_JIT=0 runs every kernel as plain Python (for debugging).

Kernels are `numba.njit(nogil=True)` functions; each keeps its uncompiled twin as `.py_func`, which the
tests run too, so both modes are checked against a numpy reference.
"""

from __future__ import annotations

import os

import numba

ENABLED = os.environ.get("HPCDNN_JIT", "1") != "0"


def kernel(parallel: bool = False):
    """Decorator: compile with Numba (nogil, cached) unless HPCDNN_JIT=0."""

    def wrap(fn):
        if not ENABLED:
            fn.py_func = fn
            return fn
        return numba.njit(nogil=True, cache=True, parallel=parallel)(fn)

    return wrap


def numba_threads(threads: int) -> None:
    """Run Numba's parallel kernels on `threads` threads (capped at Numba's pool size)."""
    numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
