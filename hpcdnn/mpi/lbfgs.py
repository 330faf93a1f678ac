"""Distributed L-BFGS: the (s, y) history sharded across ranks, directions by the vector-free two-loop recursion.
Every rank holds the full parameter vector x and its own shard of the gradient (`Objective` Reduce_scatters the
gradient sum; a full vector is accepted too). The line search, re-exported here, lives in hpcdnn/kernels/lbfgs.py (it
needs no MPI of its own: the objective it calls does).

    opt = ShardedLBFGS(n, history=10, comm=comm)
    f, g = objective()                                    # collective: loss, this rank's gradient shard at x
    d, gtd = opt.direction(g)                             # collective: one small allreduce, one allgather
    step = line_search(objective, x, d, f, gtd, opt.first_step(1.0), mode="wolfe", slope=lambda g: opt.dot(g, d))
    opt.propose(step.t, d, step.g) if step.ok else opt.reset()

Sharding (DistBelief's parameter-server shards, here for the optimizer state): rank r keeps columns
`shard_ranges(n, size)[r]` of every history vector in one matrix V (rows: m+1 s slots, m+1 y slots, g), so the
history costs (2m+3) n / size floats per rank. A direction needs the dot products of the new vectors with the
basis: each rank computes them on its columns (`kernels.lbfgs.gram`), one Allreduce of a 3 x (2m+3) block sums
them, every rank runs the recursion on the Gram matrix (Chen et al. 2014), forms its columns of the direction
(`lincomb`) and one Allgatherv assembles d. The previous 2m-1 rows of the Gram matrix are kept, not recomputed.

Model-parallel replicas (--mp=K, `shard_comm=`): a rank's vectors are its partition's (n = the partition's length),
sharded over the R ranks holding that partition (shard_comm; rank r keeps shard r), and d is assembled among them.
The dot products still sum over `comm`, every rank of every partition, so they are those of the whole vectors and
every rank takes the same decisions.

The curvature pair of a step is committed by the next `direction` call (its s.y arrives in the same allreduce):
pairs with s.y <= 1e-10 are skipped, as in torch.optim.LBFGS, whose recursion and first step this follows, and so
are pairs with a non-finite s.s or y.y (one NaN or inf gradient). A slot not in use may hold anything (a rejected
pair's NaN): only the rows in use enter a sum (`lincomb` skips zero coefficients, g.d sums over used rows), so one bad
gradient costs one pair, not the history.
"""

from __future__ import annotations

import math

import numpy as np
from mpi4py import MPI

from hpcdnn import trace, watchdog
from hpcdnn.kernels.lbfgs import Step, gram, lincomb, line_search, two_loop_coefficients
from hpcdnn.models.flat import shard_ranges


class ShardedLBFGS:
    """L-BFGS state of one rank: its columns of the last `history` (s, y) pairs and the Gram matrix of the basis."""

    def __init__(self, n: int, history: int = 10, *, comm, dtype=np.float32, curvature_eps: float = 1e-10, shard_comm=None) -> None:
        if history < 1:
            raise ValueError(f"history={history}: L-BFGS needs at least one (s, y) pair (m >= 1; 10 is usual)")
        self.comm, self.n, self.m, self.eps = comm, n, history, curvature_eps
        self.shards = comm if shard_comm is None else shard_comm  # who holds the columns of these n-vectors
        self.dtype = np.dtype(dtype)
        self.ranges = shard_ranges(n, self.shards.Get_size())
        self.lo, self.hi = self.ranges[self.shards.Get_rank()]
        self.rows = 2 * history + 3  # s slots 0..m, y slots m+1..2m+1, g
        self.g_row = self.rows - 1
        self.V = np.zeros((self.rows, self.hi - self.lo), self.dtype)
        self.G = np.zeros((self.rows, self.rows))  # global dot products between rows of V (valid for used slots and g)
        self.order: list[int] = []  # committed slots, oldest first
        self.pending: int | None = None  # slot holding the last step's pair, committed by the next direction()
        self.g_norm1 = 0.0  # |g|_1 of the last direction's gradient
        self.pairs_rejected = 0
        self.d = np.empty(n, self.dtype)
        self._counts = [hi - lo for lo, hi in self.ranges]
        self._displs = [lo for lo, _ in self.ranges]
        self._mpi_type = MPI._typedict[self.dtype.char]

    def y_row(self, slot: int) -> int:
        return self.m + 1 + slot

    @property
    def fresh(self) -> bool:
        """True when the last direction was steepest descent (no history): the first step should be short."""
        return not self.order

    def first_step(self, step: float) -> float:
        """torch.optim.LBFGS's trial step: min(1, 1/|g|_1) * step without history, else step."""
        return min(1.0, 1.0 / self.g_norm1) * step if self.fresh and self.g_norm1 > 0 else step

    def shard(self, v: np.ndarray, what: str = "vector") -> np.ndarray:
        """This rank's columns of v: v itself when it is this rank's shard, its slice when it is a full vector."""
        if v.shape == (self.hi - self.lo,):
            return v
        if v.shape == (self.n,):
            return v[self.lo : self.hi]
        raise ValueError(f"{what} of shape {v.shape}: expected this rank's shard ({self.hi - self.lo},) of columns "
                         f"[{self.lo}, {self.hi}) or the full vector ({self.n},)")  # fmt: skip

    @trace.traced("lbfgs direction", "sandblaster", "comm")  # an Allreduce of the Gram block, an Allgatherv of d
    def direction(self, g: np.ndarray) -> tuple[np.ndarray, float]:
        """d = -H g (full vector, identical on every rank) and g.d; collective. Commits the pending pair first.

        g is this rank's gradient shard (or the full gradient)."""
        self.V[self.g_row] = self.shard(g, "gradient")
        p = self.pending
        rows = [p, self.y_row(p), self.g_row] if p is not None else [self.g_row]
        part = gram(self.V, rows)
        buf = np.empty(part.size + 1)
        buf[:-1] = part.ravel()
        buf[-1] = np.abs(self.V[self.g_row], dtype=np.float64).sum()
        with watchdog.Waiting("the L-BFGS Gram Allreduce"):
            self.comm.Allreduce(MPI.IN_PLACE, buf)
        dots, self.g_norm1 = buf[:-1].reshape(part.shape), float(buf[-1])
        if p is not None:
            self.pending = None
            ys, ss, yy = dots[0, self.y_row(p)], dots[0, p], dots[1, self.y_row(p)]
            if ys > self.eps and math.isfinite(ss) and math.isfinite(yy):  # s.y > eps is False for NaN, not for +inf
                if len(self.order) == self.m:
                    self.order.pop(0)
                self.order.append(p)
                for r, row in zip(rows[:2], dots[:2]):
                    self.G[r, :], self.G[:, r] = row, row
            else:
                self.pairs_rejected += 1
        self.G[self.g_row, :], self.G[:, self.g_row] = dots[-1], dots[-1]
        y_rows = [self.y_row(j) for j in self.order]
        coef = two_loop_coefficients(self.G, self.order, y_rows, self.g_row, self.rows)
        used = [*self.order, *y_rows, self.g_row]  # unused slots may hold NaN: 0 * NaN must not enter the sum
        gtd = math.fsum(coef[used] * self.G[self.g_row, used])  # correctly rounded: identical on every rank
        if not gtd < 0:  # not a descent direction (possible with stochastic batches) or NaN: steepest descent
            self.reset()
            coef = np.zeros(self.rows)
            coef[self.g_row] = -1.0
            gtd = -float(self.G[self.g_row, self.g_row])
        mine = np.empty(self.hi - self.lo, self.dtype)
        lincomb(self.V, coef, mine)
        with watchdog.Waiting("the L-BFGS direction Allgatherv"):
            self.shards.Allgatherv(mine, [self.d, self._counts, self._displs, self._mpi_type])
        return self.d, gtd

    def propose(self, t: float, d: np.ndarray, g_new: np.ndarray) -> None:
        """Record the step just taken (s = t d, y = g_new - g on the same batch); committed by the next direction().

        d is the full direction (or this rank's shard), g_new this rank's shard of the new gradient (or the full one)."""
        slot = next(j for j in range(self.m + 1) if j not in self.order)
        np.multiply(self.shard(d, "direction"), self.dtype.type(t), out=self.V[slot])
        np.subtract(self.shard(g_new, "gradient"), self.V[self.g_row], out=self.V[self.y_row(slot)])
        self.pending = slot

    @trace.traced("lbfgs dot", "sandblaster", "comm")
    def dot(self, u: np.ndarray, v: np.ndarray) -> float:
        """u . v from this rank's columns and one allreduce (each a shard or a full vector): the same value on every rank."""
        with watchdog.Waiting("the L-BFGS dot-product allreduce"):
            return self.comm.allreduce(float(np.dot(self.shard(u).astype(np.float64), self.shard(v))), op=MPI.SUM)

    def gather(self, v: np.ndarray, root: int = 0) -> np.ndarray | None:
        """The full vector of every rank's shard `v` (e.g. the gradient, for a checkpoint) on `root` (of shard_comm), else None."""
        full = np.empty(self.n, v.dtype) if self.shards.Get_rank() == root else None
        spec = [full, self._counts, self._displs, MPI._typedict[v.dtype.char]] if full is not None else None
        self.shards.Gatherv(np.ascontiguousarray(self.shard(v)), spec, root)
        return full

    def reset(self) -> None:
        """Forget every pair (after a failed line search or an ascent direction)."""
        self.order, self.pending = [], None

    # ---- checkpoints: the root holds the full history; each rank takes back its columns
    def state(self, root: int = 0) -> tuple[np.ndarray | None, dict]:
        """(V with all columns on `root` of shard_comm, else None; the scalars). Collective over shard_comm."""
        counts = [c * self.rows for c in self._counts]
        recv = np.empty(self.rows * self.n, self.dtype) if self.shards.Get_rank() == root else None
        spec = [recv, counts, np.cumsum([0, *counts[:-1]]).tolist(), self._mpi_type] if recv is not None else None
        self.shards.Gatherv(self.V, spec, root)
        full = None
        if recv is not None:
            full = np.empty((self.rows, self.n), self.dtype)
            for (lo, hi), start in zip(self.ranges, np.cumsum([0, *counts[:-1]])):
                full[:, lo:hi] = recv[start : start + self.rows * (hi - lo)].reshape(self.rows, hi - lo)
        meta = {"order": self.order, "pending": self.pending, "gram": self.G.tolist(), "pairs_rejected": self.pairs_rejected}
        return full, meta

    def load_state(self, V: np.ndarray, meta: dict) -> None:
        """Take this rank's columns of a checkpointed history (same n and history size)."""
        if V.shape != (self.rows, self.n):
            raise ValueError(
                f"checkpointed L-BFGS history has shape {V.shape}, this run needs {(self.rows, self.n)}: same model and --sb_history?"
            )
        self.V[:] = V[:, self.lo : self.hi]
        self.G[:] = np.asarray(meta["gram"], dtype=np.float64)
        self.order, self.pending = [int(j) for j in meta["order"]], meta["pending"]
        self.pairs_rejected = int(meta["pairs_rejected"])


__all__ = ["ShardedLBFGS", "Step", "line_search"]  # the line search lives with the numerics (hpcdnn.kernels.lbfgs)
