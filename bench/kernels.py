"""Benchmark the optimizer-update kernels (GB/s) against a Numba prange triad measured in the same run.

    python bench/kernels.py [--n 61000000] [--repeats 5] [--threads 2]

One flat float32 vector of --n elements (61M: AlexNet-sized). Every variant runs once per round, rounds are
interleaved (so a noisy neighbour hurts all alike), --repeats rounds, the BEST time is kept. GB/s counts the
bytes an update must move, 4 per float32 read or written:

  triad            Numba prange `a[i] = b[i] + s * c[i]`: read b, c, write a = 12 B/element (STREAM's count).
                   Its write to a fresh array also costs a hidden read (write-allocate) that the in-place
                   updates below do not pay, so they can exceed 100% of it. Hence a second ceiling:
  triad in place   Numba prange `a[i] = a[i] + s * c[i]`: read a, c, write a = 12 B/element, no hidden traffic.
  ours sgd-mom     hpcdnn.kernels.update.sgd, momentum 0.9, weight decay 5e-4 (AlexNet's): read param, grad, buf,
                   write param, buf = 20 B/element.
  ours adagrad     hpcdnn.kernels.update.adagrad: read param, grad, sum_sq, write param, sum_sq = 20 B/element.
  ours finite      grad_is_finite: read grad = 4 B/element (the server's check before every push).
  numpy ...        the same update as the numpy expression one would write (temporaries included), same byte count.
  torch ...        the same update as torch in-place ops (the torch.optim single-tensor path; update(backend="torch")),
                   torch.set_num_threads(--threads).

Goal: ours >= 70% of the triad's GB/s (column "vs triad"; "vs in-place" is the stricter comparison). Numba uses its default thread count (NUMBA_NUM_THREADS).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import time
from collections.abc import Callable

import numba
import numpy as np
import torch
from numba import prange

from hpcdnn.kernels.update import adagrad, grad_is_finite, sgd

LR, MOMENTUM, WD, EPS = 0.01, 0.9, 5e-4, 1e-10
GOAL = 0.70


@numba.njit(parallel=True, nogil=True)
def triad(a: np.ndarray, b: np.ndarray, c: np.ndarray, s: np.float32) -> None:
    """STREAM triad, the memory-bandwidth ceiling for a streaming kernel."""
    for i in prange(a.size):
        a[i] = b[i] + s * c[i]


@numba.njit(parallel=True, nogil=True)
def triad_inplace(a: np.ndarray, c: np.ndarray, s: np.float32) -> None:
    """The triad updating its first operand, the access pattern of an in-place optimizer step."""
    for i in prange(a.size):
        a[i] = a[i] + s * c[i]


def numpy_sgd(p: np.ndarray, g: np.ndarray, buf: np.ndarray) -> None:
    """SGD with momentum and weight decay as a plain numpy expression."""
    d = g + np.float32(WD) * p
    buf *= np.float32(MOMENTUM)
    buf += d
    p -= np.float32(LR) * buf


def numpy_adagrad(p: np.ndarray, g: np.ndarray, s: np.ndarray) -> None:
    """Adagrad as a plain numpy expression."""
    s += g * g
    p -= np.float32(LR) * g / (np.sqrt(s) + np.float32(EPS))


def machine() -> str:
    """One line: CPUs, model, thread counts, versions."""
    model = "unknown CPU"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    return (
        f"nproc {len(os.sched_getaffinity(0))}, {model}; numba {numba.__version__} ({numba.get_num_threads()} threads), "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), numpy {np.__version__}, Python {platform.python_version()}"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=61_000_000, help="float32 elements per vector (default: AlexNet's ~61M)")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved rounds; the best time of each variant is kept")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    n = args.n
    print(f"machine: {machine()}")
    print(f"vector: {n:,} float32 ({n * 4 / 1e6:.0f} MB per array), best of {args.repeats} interleaved rounds\n")

    rng = np.random.default_rng(0)
    param = rng.standard_normal(n, dtype=np.float32)
    grad = rng.standard_normal(n, dtype=np.float32) * np.float32(1e-3)
    buf, sum_sq, out = np.zeros(n, np.float32), np.full(n, 0.1, np.float32), np.empty(n, np.float32)
    tp, tg, tb, ts = (torch.from_numpy(x) for x in (param, grad, buf, sum_sq))  # zero-copy views

    variants: list[tuple[str, int, Callable[[], object]]] = [
        ("triad (numba prange)", 12, lambda: triad(out, param, grad, np.float32(0.5))),
        ("triad in place", 12, lambda: triad_inplace(out, grad, np.float32(0.5))),
        ("ours sgd-mom", 20, lambda: sgd(param, grad, buf, LR, MOMENTUM, WD)),
        ("ours adagrad", 20, lambda: adagrad(param, grad, sum_sq, LR, EPS)),
        ("ours finite", 4, lambda: grad_is_finite(grad)),
        ("numpy sgd-mom", 20, lambda: numpy_sgd(param, grad, buf)),
        ("numpy adagrad", 20, lambda: numpy_adagrad(param, grad, sum_sq)),
        ("torch sgd-mom", 20, lambda: sgd(tp, tg, tb, LR, MOMENTUM, WD, backend="torch")),
        ("torch adagrad", 20, lambda: adagrad(tp, tg, ts, LR, EPS, backend="torch")),
    ]
    best = {name: float("inf") for name, _, _ in variants}
    t0 = time.perf_counter()
    for _, _, fn in variants:  # warm-up: Numba compile (or cache load), page faults
        fn()
    warm = time.perf_counter() - t0
    for _ in range(args.repeats):
        for name, _, fn in variants:
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    if not grad_is_finite(param):
        raise RuntimeError("param became non-finite during the benchmark")

    triad_gbs = 12 * n / best["triad (numba prange)"] / 1e9
    inplace_gbs = 12 * n / best["triad in place"] / 1e9
    print(f"{'variant':<22}{'B/elem':>7}{'ms':>9}{'GB/s':>8}{'vs triad':>10}{'vs in-place':>13}")
    for name, nbytes, _ in variants:
        gbs = nbytes * n / best[name] / 1e9
        mark = f"  {'PASS' if gbs / triad_gbs >= GOAL else 'MISS'} (goal >= {GOAL:.0%} of triad)" if name.startswith("ours") else ""
        print(f"{name:<22}{nbytes:>7}{best[name] * 1e3:>9.1f}{gbs:>8.1f}{gbs / triad_gbs:>9.0%}{gbs / inplace_gbs:>12.0%}{mark}")
    ratio = {k: best[f"numpy {k}"] / best[f"ours {k}"] for k in ("sgd-mom", "adagrad")}
    vs_torch = {k: best[f"torch {k}"] / best[f"ours {k}"] for k in ("sgd-mom", "adagrad")}
    print(f"\nours vs numpy expression: sgd-mom {ratio['sgd-mom']:.1f}x, adagrad {ratio['adagrad']:.1f}x faster")
    print(f"ours vs torch ({args.threads} threads): sgd-mom {vs_torch['sgd-mom']:.1f}x, adagrad {vs_torch['adagrad']:.1f}x faster")
    print(f"(warm-up incl. Numba compile/cache load {warm:.1f} s; total {time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
