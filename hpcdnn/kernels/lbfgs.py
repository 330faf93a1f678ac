"""Vector-free L-BFGS (Chen et al. 2014, "Large-scale L-BFGS using MapReduce"): kernels on history slices, recursion on scalars.

The L-BFGS direction is a linear combination of the basis {s_i, y_i, g}, and the two-loop recursion only needs
the dot products between basis vectors. So a rank holding one slice of every basis vector computes partial dot
products (`gram`), the partial Gram rows of all ranks are summed (one allreduce), every rank runs the recursion on
those scalars (`two_loop_coefficients`) and forms its slice of the direction (`lincomb`).

The basis lives in one matrix V (rows: s slots, y slots, g); `gram(V, rows)` returns V[rows] . V^T in float64.
Numba kernels (CPU) sum each dot product in fixed blocks of BLOCK elements and add the block sums in block order, so
the result does not depend on the thread count; the torch twins (CUDA tensors, or backend="torch") are float64
matmuls. `two_loop_reference` is the textbook recursion on vectors (torch.optim.LBFGS's loop), for tests.
`line_search` (fixed step, Armijo, weak Wolfe) moves x along d; the objective it calls may be distributed.
Never imports mpi4py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from numba import prange

from hpcdnn.kernels import update
from hpcdnn.kernels.jit import kernel

BLOCK = 4096  # elements per partial dot product (fixed: results are independent of the thread count)
BACKENDS = ("auto", "numba", "torch")
Array = np.ndarray | torch.Tensor


# ---- Numba kernels: V is (rows, n) float32 or float64, C-contiguous; accumulation is float64 ----


@kernel(parallel=True)
def gram_kernel(V, rows, out):
    """out[a, b] = V[rows[a]] . V[b] in float64: block partial sums (4 accumulators each) added in block order."""
    n, ka, kb = V.shape[1], rows.size, V.shape[0]
    nblocks = (n + BLOCK - 1) // BLOCK
    part = np.zeros((nblocks, ka, kb))
    for blk in prange(nblocks):
        lo = blk * BLOCK
        hi = min(n, lo + BLOCK)
        m = hi - lo
        for a in range(ka):
            x = V[rows[a], lo:hi].astype(np.float64)
            for b in range(kb):
                y = V[b, lo:hi]
                s0 = s1 = s2 = s3 = 0.0
                i = 0
                while i + 4 <= m:
                    s0 += x[i] * y[i]
                    s1 += x[i + 1] * y[i + 1]
                    s2 += x[i + 2] * y[i + 2]
                    s3 += x[i + 3] * y[i + 3]
                    i += 4
                while i < m:
                    s0 += x[i] * y[i]
                    i += 1
                part[blk, a, b] = (s0 + s1) + (s2 + s3)
    for a in range(ka):
        for b in range(kb):
            total = 0.0
            for blk in range(nblocks):
                total += part[blk, a, b]
            out[a, b] = total


@kernel(parallel=True)
def lincomb_kernel(V, coef, out):
    """out[i] = sum_b coef[b] * V[b, i], accumulated in float64 and rounded once; rows with coef 0 are skipped."""
    n, kb = V.shape[1], V.shape[0]
    nblocks = (n + BLOCK - 1) // BLOCK
    for blk in prange(nblocks):
        lo = blk * BLOCK
        hi = min(n, lo + BLOCK)
        acc = np.zeros(hi - lo)
        for b in range(kb):
            c = coef[b]
            if c != 0.0:
                row = V[b, lo:hi]
                for i in range(hi - lo):
                    acc[i] += c * np.float64(row[i])
        for i in range(hi - lo):
            out[lo + i] = acc[i]


# ---- dispatch ----


def _use_torch(V: Array, backend: str) -> bool:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}; expected one of {BACKENDS}")
    if backend == "auto":
        return isinstance(V, torch.Tensor) and V.device.type != "cpu"
    return backend == "torch"


def _matrix(V: Array) -> np.ndarray:
    """V as a C-contiguous 2-D float32/float64 numpy array (no copy), or a ValueError saying what to pass instead."""
    if isinstance(V, torch.Tensor):
        if V.device.type != "cpu":
            raise ValueError(f"V is on {V.device}; the Numba kernels need CPU memory (use backend='auto' or 'torch')")
        V = V.detach().numpy()
    if V.ndim != 2 or V.dtype not in (np.float32, np.float64) or not V.flags.c_contiguous:
        raise ValueError(
            f"V must be a C-contiguous 2-D float32 or float64 array, got {V.dtype} {V.shape}, contiguous={V.flags.c_contiguous}"
        )
    return V


def gram(V: Array, rows, *, backend: str = "auto") -> np.ndarray:
    """Dot products of the rows `rows` of V with every row of V: a (len(rows), V.shape[0]) float64 numpy array."""
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    if rows.size and (rows.min() < 0 or rows.max() >= V.shape[0]):
        raise ValueError(f"rows {rows.tolist()} outside the {V.shape[0]} rows of V")
    if _use_torch(V, backend):
        V = torch.as_tensor(V)
        V64 = V.detach().double()
        return (V64[torch.from_numpy(rows).to(V.device)] @ V64.T).cpu().numpy()
    out = np.empty((rows.size, V.shape[0]))
    gram_kernel(_matrix(V), rows, out)
    return out


def lincomb(V: Array, coef: np.ndarray, out: Array, *, backend: str = "auto") -> None:
    """out = coef @ V (one slice of the L-BFGS direction), accumulated in float64, written in out's dtype."""
    coef = np.ascontiguousarray(coef, dtype=np.float64)
    if coef.shape != (V.shape[0],):
        raise ValueError(f"coef has shape {coef.shape}, expected ({V.shape[0]},): one coefficient per row of V")
    if _use_torch(V, backend):
        V, out = torch.as_tensor(V), torch.as_tensor(out)
        nz = np.flatnonzero(coef)
        c = torch.from_numpy(coef[nz]).to(V.device)
        out.copy_((c @ V[torch.from_numpy(nz).to(V.device)].double()).to(out.dtype))
        return
    V = _matrix(V)
    o = out.detach().numpy() if isinstance(out, torch.Tensor) else out
    if o.shape != (V.shape[1],) or o.dtype != V.dtype or not o.flags.c_contiguous:
        raise ValueError(f"out must be a contiguous {V.dtype} vector of {V.shape[1]} elements, got {o.dtype} {o.shape}")
    lincomb_kernel(V, coef, o)


# ---- the two-loop recursion on scalars ----


def two_loop_coefficients(G: np.ndarray, s_rows, y_rows, g_row: int, size: int) -> np.ndarray:
    """Coefficients c (length `size`) with c @ V = -H g, H the L-BFGS inverse Hessian of the pairs (s_rows[i], y_rows[i]).

    G[a, b] = V[a] . V[b] (global dot products); the pairs are ordered oldest to newest. The recursion is torch's
    (H0 = (s.y / y.y of the newest pair) I, or I without pairs), run on coefficients instead of vectors, with
    correctly rounded sums (math.fsum) so that every rank derives the same coefficients from the same G:
    p = -g; for i newest..oldest: alpha_i = rho_i s_i.p, p -= alpha_i y_i; p *= H0;
    for i oldest..newest: beta = rho_i y_i.p, p += (alpha_i - beta) s_i.
    """
    s_rows, y_rows = list(s_rows), list(y_rows)
    k = len(s_rows)
    idx = np.array(s_rows + y_rows + [g_row], dtype=np.int64)
    B = G[np.ix_(idx, idx)]  # Gram of the compact basis [s_0..s_k-1, y_0..y_k-1, g]

    def dot(row: np.ndarray, v: np.ndarray) -> float:
        return math.fsum(row * v)  # correctly rounded: the same bits on every rank and every CPU

    delta = np.zeros(2 * k + 1)
    delta[2 * k] = -1.0
    alpha = np.zeros(k)
    rho = [1.0 / B[i, k + i] for i in range(k)]
    for i in range(k - 1, -1, -1):
        alpha[i] = rho[i] * dot(B[i], delta)
        delta[k + i] -= alpha[i]
    if k:
        delta *= B[k - 1, 2 * k - 1] / B[2 * k - 1, 2 * k - 1]
    for i in range(k):
        beta = rho[i] * dot(B[k + i], delta)
        delta[i] += alpha[i] - beta
    coef = np.zeros(size)
    coef[idx] = delta  # the rows are distinct
    return coef


def two_loop_reference(S: list[np.ndarray], Y: list[np.ndarray], g: np.ndarray) -> np.ndarray:
    """-H g by the plain two-loop recursion on vectors (torch.optim.LBFGS's loop), in float64: the test reference."""
    q = -np.asarray(g, dtype=np.float64)
    S = [np.asarray(s, dtype=np.float64) for s in S]
    Y = [np.asarray(y, dtype=np.float64) for y in Y]
    rho = [1.0 / (y @ s) for s, y in zip(S, Y)]
    alpha = [0.0] * len(S)
    for i in range(len(S) - 1, -1, -1):
        alpha[i] = (S[i] @ q) * rho[i]
        q -= alpha[i] * Y[i]
    if S:
        q *= (S[-1] @ Y[-1]) / (Y[-1] @ Y[-1])
    for i in range(len(S)):
        beta = (Y[i] @ q) * rho[i]
        q += (alpha[i] - beta) * S[i]
    return q


def gram_reference(V: np.ndarray, rows) -> np.ndarray:
    """`gram` as one numpy float64 matmul (the test reference)."""
    V64 = np.asarray(V, dtype=np.float64)
    return V64[np.asarray(rows, dtype=np.int64)] @ V64.T


# ---- the line search (no MPI: evaluate() and slope() are the collective parts)


@dataclass
class Step:
    """Outcome of a line search: step length, loss and gradient at the new point, evaluations used, success."""

    t: float
    f: float
    g: np.ndarray | None
    evals: int
    ok: bool


def _move(x: np.ndarray, x0: np.ndarray, d: np.ndarray, t: float) -> None:
    """x = x0 + t d (fused multiply-add in float32, as torch's p.add_(d, alpha=t))."""
    np.copyto(x, x0)
    if x.dtype == np.float32:
        update.axpy(x, d, t)
    else:
        x += t * d


def line_search(evaluate, x: np.ndarray, d: np.ndarray, f0: float, gtd: float, t: float, *, mode: str = "armijo", slope=None,
                c1: float = 1e-4, c2: float = 0.9, max_evals: int = 10) -> Step:  # fmt: skip
    """Move x (in place) along d. `evaluate()` returns (f, g) at the current x (every rank gets the same values).

    mode "none": one step of length t (torch.optim.LBFGS with line_search_fn=None).
    mode "armijo": accept the first t with f(x + t d) <= f0 + c1 t g.d, else shrink t by a safeguarded quadratic fit
    (within [0.1 t, 0.5 t]).
    mode "wolfe": weak Wolfe conditions, Armijo and slope(g_new) = g_new.d >= c2 g.d, by doubling t while the slope is
    still steep and bisecting once a step was too long (Lewis & Overton); longer steps than 1 when the quasi-Newton step
    is timid, and every accepted pair has s.y > 0.
    After `max_evals` evaluations: the longest step with sufficient decrease found (wolfe), or x restored and ok False.
    """
    if mode not in ("armijo", "wolfe", "none"):
        raise ValueError(f"line search mode {mode!r}; expected armijo, wolfe or none")
    if mode == "wolfe" and slope is None:
        raise ValueError("the wolfe line search needs slope=, a function giving g.d for a gradient g (collective)")
    x0 = x.copy()
    lo, hi, best = 0.0, math.inf, None
    for k in range(1, max_evals + 1):
        _move(x, x0, d, t)
        f, g = evaluate()
        if mode == "none":
            return Step(t, f, g, k, True)
        if not f <= f0 + c1 * t * gtd:  # too long (NaN too)
            if mode == "armijo":
                fit = -gtd * t * t / (2.0 * (f - f0 - gtd * t)) if np.isfinite(f) else 0.0
                t = min(max(fit, 0.1 * t), 0.5 * t)
                continue
            hi = t
        elif mode == "armijo" or slope(g) >= c2 * gtd:
            return Step(t, f, g, k, True)
        else:  # enough decrease, but the slope is still steep: the minimum lies further out
            lo, best = t, Step(t, f, g, k, True)
        t = 0.5 * (lo + hi) if hi < math.inf else 2.0 * t
    if best is not None:
        _move(x, x0, d, best.t)  # the same arithmetic as when it was evaluated: the same x
        return Step(best.t, best.f, best.g, max_evals, True)
    np.copyto(x, x0)
    return Step(0.0, f0, None, max_evals, False)
