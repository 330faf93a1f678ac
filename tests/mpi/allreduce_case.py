"""K steps of allreduce SGD on a tiny net, for tests/mpi/test_allreduce.py; rank 0 saves what every rank ended with.

    mpirun -n 3 python -m mpi4py tests/mpi/allreduce_case.py OUT.npz

Every step draws a fixed random batch of BATCH images; rank r trains on its r-th slice, so the mean of the ranks'
mean losses is the mean loss of the whole batch. Each configuration (overlap or not x bucket size) starts from
parameters initialised with a different seed on every rank and broadcast from `root`, so a broken broadcast shows.
Rank 0 also runs the reference: plain local SGD on the whole batch, in this process, without MPI.
"""

from __future__ import annotations

import sys

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hpcdnn.models.flat import FlatParams
from hpcdnn.optim import FlatOptimizer

STEPS, BATCH, CLASSES = 10, 12, 5
LR, MOMENTUM, WEIGHT_DECAY = 0.05, 0.9, 1e-3
# bucket_mb: below one parameter (every parameter its own bucket), a few parameters per bucket, above the whole vector
BUCKETS = {"tiny": 1e-6, "mid": 4096 / 2**20, "huge": 1e3}
CONFIGS = [(mode, size) for mode in ("blocking", "overlap") for size in BUCKETS]


class Tiny(nn.Module):
    """conv -> fc -> fc, no dropout; `unused` is first in the layout (so last to reduce) and never gets a gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Linear(3, 3)
        self.conv = nn.Conv2d(2, 4, 3)
        self.fc1 = nn.Linear(4 * 6 * 6, 40)
        self.fc2 = nn.Linear(40, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(F.relu(self.conv(x)).flatten(1))))


def batches() -> tuple[torch.Tensor, torch.Tensor]:
    """STEPS batches of BATCH 2x8x8 images and labels, the same in every process."""
    g = torch.Generator().manual_seed(7)
    return torch.randn(STEPS, BATCH, 2, 8, 8, generator=g), torch.randint(0, CLASSES, (STEPS, BATCH), generator=g)


def replica(seed: int) -> tuple[Tiny, FlatParams, FlatOptimizer]:
    torch.manual_seed(seed)
    model = Tiny()
    flat = FlatParams(model)
    return model, flat, FlatOptimizer("sgd", flat.data, flat.grad, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, eps=1e-10)


def local_sgd(seed: int) -> np.ndarray:
    """The reference: STEPS steps of SGD in one process on the whole batch (mean loss); the final flat parameters."""
    model, flat, opt = replica(seed)
    xs, ys = batches()
    for x, y in zip(xs, ys):
        flat.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step(LR)
    return flat.to_numpy().copy()


def main(out: str) -> None:
    from mpi4py import MPI

    from hpcdnn.mpi.allreduce import GradAllreduce
    from hpcdnn.placement import set_threads

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    set_threads(1)  # torch and Numba share one OpenMP runtime: torch.set_num_threads alone is undone by the first kernel
    xs, ys = batches()
    part = slice(rank * BATCH // size, (rank + 1) * BATCH // size)
    results: dict[str, np.ndarray] = {}
    for k, (mode, bucket) in enumerate(CONFIGS):
        root = k % size
        model, flat, opt = replica(100 + rank)
        ar = GradAllreduce(flat, comm, bucket_mb=BUCKETS[bucket], overlap=mode == "overlap")
        ar.broadcast_parameters(root=root)
        early = 0
        for x, y in zip(xs, ys):
            flat.zero_grad()
            F.cross_entropy(model(x[part]), y[part]).backward()
            comm.Barrier()  # the caller using `comm` between backward and synchronize must not disturb the buckets
            ar.synchronize()
            early += ar.last_early
            opt.step(LR)
        name = f"{mode}/{bucket}"
        everyone = comm.gather(flat.to_numpy().copy())
        if rank == 0:
            results |= {f"{name}/rank{r}": p for r, p in enumerate(everyone)}
            results |= {f"{name}/root": np.array(root), f"{name}/buckets": np.array(len(ar.buckets)), f"{name}/early": np.array(early)}
            results[f"{name}/slices"] = np.array([(start, stop) for start, stop, _ in ar.buckets])
        if mode == "overlap" and bucket == "tiny":  # a second backward before synchronize() must raise, on every rank
            flat.zero_grad()
            for _ in range(2):
                F.cross_entropy(model(xs[0][part]), ys[0][part]).backward()
            try:
                ar.synchronize()
                raised = False
            except RuntimeError as e:
                raised = "received a gradient after its bucket" in str(e)
            results["double_backward_raised"] = np.array(comm.allreduce(int(raised)))
        ar.close()
        ar.close()  # idempotent
        try:
            ar.synchronize()
            after_close = 0
        except RuntimeError:
            after_close = 1
        results["use_after_close_raised"] = np.array(comm.allreduce(after_close))
    if rank == 0:
        results |= {f"reference/root{r}": local_sgd(100 + r) for r in range(size)}
        results["params"], results["numel"] = np.array(len(FlatParams(Tiny()).layout)), np.array(FlatParams(Tiny()).numel)
        np.savez(out, **results)


if __name__ == "__main__":
    main(sys.argv[1])
