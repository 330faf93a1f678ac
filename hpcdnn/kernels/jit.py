"""The one switch for compiling kernels (HPCDNN_JIT=0 runs every kernel as plain Python, for debugging), and the one
rule for running a parallel kernel next to torch.

Kernels are `numba.njit(nogil=True)` functions; each keeps its uncompiled twin as `.py_func`, which the tests run
too, so both modes are checked against a numpy reference.

Threads: torch and Numba's OpenMP layer share one libgomp, and the first parallel Numba kernel starts Numba's pool
and resets the thread count torch reads back (torch.set_num_threads(1) silently becomes the core count), which
breaks "ranks x threads <= cores". `run_parallel` runs a kernel on torch's thread count and puts torch's count back;
`numba_threads` sets Numba's count alone (hpcdnn.placement uses it when a rank decides its thread budget).
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


def run_parallel(kernel_fn, *args):
    """kernel_fn(*args) on as many threads as torch uses, leaving torch's thread count as it was; returns its result.

    For kernels called from torch code (an autograd Function, a loader feeding torch): the caller's thread budget is
    torch's, so the kernel follows it, and starting Numba's pool must not change it.
    """
    import torch  # here, not at the top: the kernels that never meet torch (data_prep's statistics) do not load it

    threads = torch.get_num_threads()
    numba_threads(threads)
    try:
        return kernel_fn(*args)
    finally:
        restore_torch_threads(threads)


def restore_torch_threads(threads: int) -> None:
    """Starting Numba's OpenMP pool resets the count torch reads back (they share libgomp): put `threads` back."""
    import torch

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
