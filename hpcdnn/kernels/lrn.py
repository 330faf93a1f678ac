"""Local response normalisation (AlexNet, paper section 3.3) as pure functions on (N, C, P) arrays.

    b_c = a_c * s_c ** -beta,   s_c = k + alpha * sum_{c' in [c - lo, c + hi]} a_c'^2   (zero-padded at the ends)

`lrn_forward` writes b and keeps s for `lrn_backward`, which writes the gradient with respect to a. Both are
`prange` over the batch, one fused pass each (torch's formula needs an avg_pool3d and several temporaries). The
torch autograd Function that calls them lives with the model (hpcdnn/models/alexnet.py); run them through
`hpcdnn.kernels.jit.run_parallel` so torch's thread count survives Numba's pool start-up.
"""

from __future__ import annotations

import math

import numpy as np
from numba import prange

from hpcdnn.kernels.jit import kernel


def window(size: int) -> tuple[int, int]:
    """(lo, hi): channel c's window is [c - lo, c + hi], as in the paper and torch's nn.LocalResponseNorm."""
    if size < 1:
        raise ValueError(f"LRN size {size}: the window must hold at least 1 channel (the paper uses 5)")
    return size // 2, (size - 1) // 2


@kernel(parallel=True)
def lrn_forward(a, out, scale, lo, hi, alpha, beta, k):
    """LRN over channels of a (N, C, P): out = a * scale**-beta, scale = k + alpha * window sum of a^2 (kept for backward)."""
    n_, c_, p_ = a.shape
    for n in prange(n_):
        acc = np.empty(p_, a.dtype)
        for c in range(c_):
            acc[:] = 0
            for j in range(max(0, c - lo), min(c_, c + hi + 1)):
                for p in range(p_):
                    acc[p] += a[n, j, p] * a[n, j, p]
            for p in range(p_):
                scale[n, c, p] = k + alpha * acc[p]
            if beta == 0.75:  # s**-0.75 as rsqrt(s) * sqrt(rsqrt(s)): vectorises, unlike pow
                for p in range(p_):
                    r = 1 / math.sqrt(scale[n, c, p])
                    out[n, c, p] = a[n, c, p] * (r * math.sqrt(r))
            else:
                for p in range(p_):
                    out[n, c, p] = a[n, c, p] * scale[n, c, p] ** -beta


@kernel(parallel=True)
def lrn_backward(a, scale, g, grad, lo, hi, alpha, beta):
    """Gradient of lrn_forward: grad_c = g_c d_c - 2 alpha beta a_c sum_{j: c in window(j)} g_j a_j d_j / s_j, d = s**-beta."""
    n_, c_, p_ = a.shape
    f = 2 * alpha * beta
    for n in prange(n_):
        d = np.empty((c_, p_), a.dtype)
        t = np.empty((c_, p_), a.dtype)
        for c in range(c_):
            if beta == 0.75:
                for p in range(p_):
                    r = 1 / math.sqrt(scale[n, c, p])
                    d[c, p] = r * math.sqrt(r)
            else:
                for p in range(p_):
                    d[c, p] = scale[n, c, p] ** -beta
            for p in range(p_):
                t[c, p] = g[n, c, p] * a[n, c, p] * d[c, p] / scale[n, c, p]
        acc = np.empty(p_, a.dtype)
        for c in range(c_):
            acc[:] = 0
            for j in range(max(0, c - hi), min(c_, c + lo + 1)):  # the j whose window holds c
                for p in range(p_):
                    acc[p] += t[j, p]
            for p in range(p_):
                grad[n, c, p] = g[n, c, p] * d[c, p] - f * a[n, c, p] * acc[p]
