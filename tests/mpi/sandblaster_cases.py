"""Scenarios for tests/mpi/test_sandblaster.py, run under mpirun (`python -m mpi4py tests/mpi/sandblaster_cases.py ...`).

  convex OUTDIR SELF_NAMES WORLD_NAMES
      Sandblaster L-BFGS (Portions + Objective + ShardedLBFGS + line_search) on multinomial logistic regression in
      float64, for each scenario of SCENARIOS named in the comma-separated lists: first on COMM_SELF of rank 0, then on
      COMM_WORLD; the root writes iterates, losses and portion counts to OUTDIR/<ranks>/NAME.npz.
  train RUN_DIR DATA [--key=value ...]
      the training driver (hpcdnn.train.train, --topology=sandblaster) four times (see train_suite); the root prints
      each summary as a JSON line after "SUMMARY ".

The problem is defined without MPI (`logistic_problem`, `loss_and_grad`) so the test process can hand the same
problem to torch.optim.LBFGS.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

SAMPLES, FEATURES, CLASSES, WEIGHT_DECAY = 960, 20, 4, 1e-2


def logistic_problem(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(X, labels, x0): separable-ish Gaussian classes, and a random starting point for W (C x D) and b (C)."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((CLASSES, FEATURES)) * 1.5
    labels = rng.integers(0, CLASSES, SAMPLES)
    X = centers[labels] + rng.standard_normal((SAMPLES, FEATURES))
    x0 = rng.standard_normal(CLASSES * FEATURES + CLASSES) * 0.1
    return X, labels, x0


def loss_and_grad(x: np.ndarray, X: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """Summed softmax cross-entropy of samples X and its gradient with respect to x = [W.ravel(), b]."""
    W, b = x[: CLASSES * FEATURES].reshape(CLASSES, FEATURES), x[CLASSES * FEATURES :]
    z = X @ W.T + b
    z -= z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    p = np.exp(logp)
    p[np.arange(len(labels)), labels] -= 1.0
    return -float(logp[np.arange(len(labels)), labels].sum()), np.concatenate([(p.T @ X).ravel(), p.sum(axis=0)])


SCENARIOS = {  # name -> settings of one convex run
    "plain": dict(mode="none", iters=15),
    "armijo": dict(mode="armijo", iters=40),
    "wolfe": dict(mode="wolfe", iters=40),
    "straggler": dict(mode="none", iters=15, slow_rank=1, slow_factor=3.0, work_ms=2.0),
    "static": dict(mode="none", iters=15, static=True),
    "nan": dict(mode="armijo", iters=25, poison="nan"),  # one NaN gradient handed to propose at iteration POISON_AT
    "inf": dict(mode="armijo", iters=25, poison="inf"),  # one +-inf entry that makes that pair's s.y = +inf
    "full": dict(mode="wolfe", iters=40, gradient="full"),  # the gradient by one Allreduce, not a Reduce_scatter
}
POISON_AT = 4  # history 5: slots 0-3 hold pairs, the poisoned pair lands in slot 4 (not the slot reused after a reset)


def poisoned(g: np.ndarray, d: np.ndarray, lo: int, kind: str) -> np.ndarray:
    """A copy of g (this rank's shard starting at global index lo, or the full vector) with global entry 0 made
    non-finite: NaN, or inf of the sign of d[0] so that s.y = t d.y is +inf (a pair a plain `s.y > eps` test accepts)."""
    g = g.copy()
    if lo == 0 or g.size == d.size:
        g[0] = np.nan if kind == "nan" else np.copysign(np.inf, d[0])
    return g


def convex(comm, out: str, mode: str = "none", iters: int = 15, history: int = 5, portions: int = 12, slow_rank: int = -1,
           slow_factor: float = 1.0, work_ms: float = 0.0, static: bool = False, poison: str = "", gradient: str = "shard") -> None:  # fmt: skip
    """Sandblaster L-BFGS on the logistic regression; the root saves iterates, losses, summed portion counts, per
    iteration whether the direction was steepest descent (no history), and the last gradient gathered from the shards."""
    from mpi4py import MPI

    from hpcdnn.mpi.lbfgs import ShardedLBFGS, line_search
    from hpcdnn.mpi.portions import Objective, Portions

    X, labels, x0 = logistic_problem()
    x = x0.copy()
    bounds = [k * SAMPLES // portions for k in range(portions + 1)]

    def portion(k, keep_going):
        """Portion k in chunks of 16 samples; work_ms of sleep per chunk stands in for a model's compute time."""
        loss, grad = 0.0, np.zeros_like(x)
        for lo in range(bounds[k], bounds[k + 1], 16):
            hi = min(lo + 16, bounds[k + 1])
            f, g = loss_and_grad(x, X[lo:hi], labels[lo:hi])
            loss, grad = loss + f, grad + g
            time.sleep(work_ms / 1e3)
            if not keep_going():
                return None
        return loss, grad, bounds[k + 1] - bounds[k]

    parts = Portions(portions, comm=comm, dynamic=not static, slow_rank=slow_rank, slow_factor=slow_factor)
    objective = Objective(portion, parts, x, comm=comm, weight_decay=WEIGHT_DECAY, gradient=gradient)
    objective.expected = SAMPLES
    opt = ShardedLBFGS(x.size, history, comm=comm, dtype=np.float64)
    f, g = objective()
    iterates, losses, evals, steepest = [x.copy()], [f], [], []
    for i in range(iters):
        d, gtd = opt.direction(g)
        steepest.append(opt.fresh)
        step = line_search(objective, x, d, f, gtd, opt.first_step(1.0), mode=mode, max_evals=20, slope=lambda g, d=d: opt.dot(g, d))
        if not step.ok:
            raise RuntimeError("line search failed on a convex problem")
        opt.propose(step.t, d, poisoned(step.g, d, opt.lo, poison) if poison and i == POISON_AT else step.g)
        f, g = step.f, step.g
        iterates.append(x.copy())
        losses.append(f)
        evals.append(step.evals)
    stats = comm.reduce(parts.stats.as_array(), op=MPI.SUM, root=0)
    g_full = opt.gather(g)  # what a checkpoint stores
    parts.free()
    if comm.Get_rank() == 0:
        np.savez(out, iterates=np.array(iterates), losses=np.array(losses), evals=np.array(evals), stats=stats,
                 evaluations=objective.evaluations, samples=objective.samples, ranks=comm.Get_size(), steepest=np.array(steepest),
                 rejected=opt.pairs_rejected, g=g_full)  # fmt: skip


def train_suite(run_dir: str, data: str, rest: list[str]) -> None:
    """Four driver runs in one launch: a uninterrupted; b stopped after 3 iterations, then resumed; c with a straggler
    and a batch that doubles after the first epoch."""
    from mpi4py import MPI

    from hpcdnn.config import load_config
    from hpcdnn.train import train

    comm = MPI.COMM_WORLD
    straggler = ["--slow_rank=1", "--slow_factor=3", "--sb_batch_growth=2"]
    runs = [("a", [], False), ("b", ["--max_steps=3"], False), ("b", [], True), ("c", straggler, False)]
    for name, extra, resume in runs:
        cfg = load_config("fashion_sandblaster", [f"--run_dir={run_dir}/{name}", f"--data={data}", *rest, *extra])
        summary = train(cfg, resume, comm)
        if comm.Get_rank() == 0:
            print("SUMMARY " + json.dumps({"run": name, "resume": resume, **summary}), flush=True)


def main(argv: list[str]) -> None:
    if argv[0] == "convex":  # convex OUTDIR SELF_NAMES WORLD_NAMES (comma-separated scenario names)
        from mpi4py import MPI

        world = MPI.COMM_WORLD
        for comm, names in ((MPI.COMM_SELF, argv[2]), (world, argv[3])):  # written once, run on any communicator
            if comm == world or world.Get_rank() == 0:
                Path(argv[1], str(comm.Get_size())).mkdir(parents=True, exist_ok=True)
                for name in filter(None, names.split(",")):
                    convex(comm, f"{argv[1]}/{comm.Get_size()}/{name}.npz", **SCENARIOS[name])
            world.Barrier()
    elif argv[0] == "train":  # train RUN_DIR DATA [--key=value ...]
        train_suite(argv[1], argv[2], argv[3:])
    else:
        raise SystemExit(f"unknown case {argv[0]!r}: convex OUTDIR SELF_NAMES WORLD_NAMES | train RUN_DIR DATA [--key=value ...]")


if __name__ == "__main__":
    main(sys.argv[1:])
