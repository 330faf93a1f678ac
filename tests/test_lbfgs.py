"""L-BFGS kernels against numpy (compiled, uncompiled `.py_func`, torch twin), and the vector-free recursion on the
Gram matrix against the plain two-loop recursion on vectors (no MPI)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hpcdnn.kernels import lbfgs
from hpcdnn.kernels.lbfgs import gram, gram_reference, lincomb, two_loop_coefficients, two_loop_reference

VARIANTS = ["numba", "py_func", "torch"]


@pytest.fixture(params=VARIANTS)
def variant(request, monkeypatch) -> str:
    if request.param == "py_func":
        monkeypatch.setattr(lbfgs, "gram_kernel", lbfgs.gram_kernel.py_func)
        monkeypatch.setattr(lbfgs, "lincomb_kernel", lbfgs.lincomb_kernel.py_func)
    return request.param


def basis(rows: int, n: int, dtype=np.float32, seed: int = 0) -> np.ndarray:
    """Rows of mixed magnitudes; n odd and not a multiple of BLOCK (ragged last block, scalar tail)."""
    rng = np.random.default_rng(seed)
    scale = 10.0 ** rng.uniform(-3, 2, size=(rows, 1))
    return np.ascontiguousarray(rng.standard_normal((rows, n)) * scale, dtype=dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gram_matches_numpy(variant, dtype):
    n = 3 * lbfgs.BLOCK + 1037 if variant != "py_func" else lbfgs.BLOCK + 37  # py_func is plain Python: smaller
    V = basis(7, n, dtype)
    rows = [5, 0, 6]
    got = gram(V, rows, backend="torch" if variant == "torch" else "numba")
    assert got.shape == (3, 7) and got.dtype == np.float64
    np.testing.assert_allclose(got, gram_reference(V, rows), rtol=1e-12, atol=0)


def test_gram_independent_of_threads():
    import numba

    V = basis(5, 10 * lbfgs.BLOCK + 3)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = gram(V, [0, 1, 2, 3, 4])
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        many = gram(V, [0, 1, 2, 3, 4])
    finally:
        numba.set_num_threads(before)
    np.testing.assert_array_equal(one, many)  # bitwise: fixed blocks, summed in block order


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_lincomb_matches_numpy(variant, dtype):
    n = 2 * lbfgs.BLOCK + 555 if variant != "py_func" else lbfgs.BLOCK + 555
    V = basis(6, n, dtype, seed=1)
    coef = np.array([0.5, 0.0, -2.0, 1e-3, 3.0, 0.0])
    V[1] = np.nan  # a row with coefficient 0 is skipped, never multiplied (an unused history slot may hold anything)
    out = np.empty(n, dtype)
    lincomb(V, coef, out, backend="torch" if variant == "torch" else "numba")
    nz = coef != 0
    want = coef[nz] @ V[nz].astype(np.float64)
    scale = np.abs(coef[nz]) @ np.abs(V[nz].astype(np.float64))  # the error bound scales with the terms, not the sum
    eps = np.finfo(dtype).eps
    assert np.all(np.abs(out - want) <= nz.sum() * eps * scale), np.max(np.abs(out - want) / scale)
    assert np.isfinite(out).all()


def test_bad_inputs_say_what_to_pass():
    V = basis(3, 10)
    with pytest.raises(ValueError, match="one coefficient per row"):
        lincomb(V, np.zeros(2), np.empty(10, np.float32))
    with pytest.raises(ValueError, match="outside the 3 rows"):
        gram(V, [3])
    with pytest.raises(ValueError, match="C-contiguous"):
        gram(np.asfortranarray(V), [0])
    with pytest.raises(ValueError, match="backend="):
        gram(V, [0], backend="cuda")


def history(k: int, n: int, seed: int = 0):
    """k curvature pairs with s.y > 0 (y = A s for a random SPD A, plus noise) and a gradient."""
    rng = np.random.default_rng(seed)
    Q = rng.standard_normal((n, n))
    A = Q @ Q.T / n + np.eye(n)
    S = [rng.standard_normal(n) for _ in range(k)]
    Y = [A @ s + 0.01 * rng.standard_normal(n) for s in S]
    return S, Y, rng.standard_normal(n)


@pytest.mark.parametrize("k", [0, 1, 3, 10])
def test_gram_recursion_equals_plain_two_loop(k):
    """The vector-free path (Gram matrix -> coefficients -> lincomb) gives the two-loop direction."""
    n, m = 300, 10
    S, Y, g = history(k, n, seed=k)
    # V as the sharded code lays it out: s slots 0..m, y slots m+1..2m+1, g last; pairs in scrambled slots
    V = np.zeros((2 * m + 3, n))
    slots = list(np.random.default_rng(k).permutation(m + 1)[:k])
    for slot, s, y in zip(slots, S, Y):
        V[slot], V[m + 1 + slot] = s, y
    V[-1] = g
    G = gram_reference(V, range(2 * m + 3))
    coef = two_loop_coefficients(G, slots, [m + 1 + j for j in slots], 2 * m + 2, 2 * m + 3)
    d = np.empty(n)
    lincomb(V, coef, d)
    want = two_loop_reference(S, Y, g)
    np.testing.assert_allclose(d, want, rtol=1e-10, atol=1e-12 * np.abs(want).max())
    if k == 0:
        np.testing.assert_array_equal(d, -g)
    assert g @ d < 0  # a descent direction (H is positive definite when every s.y > 0)


def test_plain_two_loop_matches_torch_lbfgs_loop():
    """The reference recursion is torch.optim.LBFGS's: one torch iteration with a prepared history gives the same d."""
    n = 50
    S, Y, g = history(4, n, seed=7)
    d_ref = two_loop_reference(S, Y, g)
    q = torch.tensor(-g)
    ro = [1.0 / (torch.tensor(y) @ torch.tensor(s)) for s, y in zip(S, Y)]
    al = [None] * len(S)
    for i in range(len(S) - 1, -1, -1):  # copied from torch/optim/lbfgs.py
        al[i] = torch.tensor(S[i]).dot(q) * ro[i]
        q.add_(torch.tensor(Y[i]), alpha=-al[i])
    r = q * (torch.tensor(S[-1]) @ torch.tensor(Y[-1])) / (torch.tensor(Y[-1]) @ torch.tensor(Y[-1]))
    for i in range(len(S)):
        be_i = torch.tensor(Y[i]).dot(r) * ro[i]
        r.add_(torch.tensor(S[i]), alpha=al[i] - be_i)
    np.testing.assert_allclose(d_ref, r.numpy(), rtol=1e-12)


class Quadratic:
    """f(x) = 0.5 x.A x - b.x with counted evaluations at the shared vector x (what the line search moves)."""

    def __init__(self, n: int = 20, seed: int = 0, dtype=np.float64):
        rng = np.random.default_rng(seed)
        Q = rng.standard_normal((n, n))
        self.A, self.b = Q @ Q.T / n + np.eye(n), rng.standard_normal(n)
        self.x = np.zeros(n, dtype)
        self.evals = 0

    def __call__(self):
        self.evals += 1
        x = self.x.astype(np.float64)
        return 0.5 * x @ self.A @ x - self.b @ x, (self.A @ x - self.b).astype(self.x.dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_line_search_modes(dtype):
    from hpcdnn.kernels.lbfgs import line_search

    q = Quadratic(dtype=dtype)
    f0, g0 = q()
    d = (-g0).astype(dtype)
    gtd = float(g0.astype(np.float64) @ d)
    exact = -gtd / float(d.astype(np.float64) @ q.A @ d)  # the minimiser along d

    q.evals = 0
    step = line_search(q, q.x, d, f0, gtd, 1e-3 * exact, mode="none")
    assert step.ok and step.t == 1e-3 * exact and q.evals == step.evals == 1
    np.testing.assert_allclose(q.x, 1e-3 * exact * d, rtol=1e-6)

    for t0, mode in ((1e-3 * exact, "wolfe"), (50 * exact, "wolfe"), (50 * exact, "armijo")):
        q.x[:] = 0
        q.evals = 0
        step = line_search(q, q.x, d, f0, gtd, t0, mode=mode, slope=lambda g: float(g.astype(np.float64) @ d))
        assert step.ok and q.evals == step.evals
        np.testing.assert_allclose(q.x, step.t * d, rtol=1e-6)
        assert step.f <= f0 + 1e-4 * step.t * gtd  # sufficient decrease
        if mode == "wolfe":
            assert float(step.g.astype(np.float64) @ d) >= 0.9 * gtd  # curvature condition
            assert step.t > 1e-2 * exact  # a timid first step was lengthened, not accepted
        else:
            assert step.t < 50 * exact and step.evals > 1  # a too long first step was shortened


def test_line_search_failure_restores_x_and_wolfe_needs_a_slope():
    from hpcdnn.kernels.lbfgs import line_search

    x = np.ones(5)
    calls = []

    def nan_everywhere():
        calls.append(x.copy())
        return float("nan"), np.full(5, np.nan)

    step = line_search(nan_everywhere, x, -np.ones(5), 1.0, -5.0, 1.0, mode="armijo", max_evals=4)
    assert not step.ok and step.t == 0.0 and step.g is None and len(calls) == 4
    np.testing.assert_array_equal(x, np.ones(5))  # back where it started
    assert calls[0][0] < calls[1][0] < calls[2][0] < 1  # it backtracked: x moved less each time
    with pytest.raises(ValueError, match="slope="):
        line_search(nan_everywhere, x, -np.ones(5), 1.0, -5.0, 1.0, mode="wolfe")
    with pytest.raises(ValueError, match="armijo, wolfe or none"):
        line_search(nan_everywhere, x, -np.ones(5), 1.0, -5.0, 1.0, mode="strong")
