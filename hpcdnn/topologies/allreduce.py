"""Synchronous data-parallel SGD (`--topology=allreduce`): gradients averaged over every rank, then the same update.

    mpirun -n 2 python -m mpi4py -m hpcdnn train --config fashion_small --topology=allreduce

The baseline of Horovod and PyTorch DDP: bucketed in-place Allreduce of the flat gradient (hpcdnn/mpi/allreduce.py).
Every rank holds an identical replica; a checkpoint keeps every rank's RNG (dropout), so a resume is bitwise.
With --mp=K a replica is K ranks (hpcdnn/mpi/partition.py, towers.py): the gradient allreduce runs among the R ranks
that hold the same partition, and a checkpoint holds the K partitions concatenated.
"""

from __future__ import annotations

from hpcdnn import trace, watchdog
from hpcdnn.topologies.base import Run, gather_parts, gathered_rng, part_sizes
from hpcdnn.topologies.sgd import Local


class Allreduce(Local):
    name = "allreduce"
    same_world = True  # a position counts batches of every replica
    per_rank_rng = True

    @classmethod
    def n_servers(cls, cfg) -> int | None:
        return 0

    def __init__(self, run: Run) -> None:
        from hpcdnn.mpi.allreduce import GradAllreduce

        super().__init__(run)
        self.comm = run.roles.comm
        # the gradient is averaged among the ranks that hold the same partition (all ranks without --mp)
        across = run.replica.across if run.replica is not None else self.comm
        self.sync = GradAllreduce(run.flat, across, bucket_mb=self.cfg.bucket_mb)
        self.sync.broadcast_parameters(0)  # identical replicas whatever each rank loaded or initialised
        self.sizes = part_sizes(run) if run.replica is not None else None

    def apply(self, lr: float, epoch: int, next_batch: int) -> None:
        self.sync.synchronize()
        self.opt.step(lr)

    @trace.traced("stop agreement", "comm", "comm")  # the collective that decides to stop
    def stop_requested(self, signalled: bool) -> bool:
        from mpi4py import MPI

        with watchdog.Waiting("the stop agreement (an allreduce of every rank's stop flag)"):
            return bool(self.comm.allreduce(int(signalled), op=MPI.MAX))

    def share(self, value):
        return self.comm.bcast(value, root=0)

    def state(self):
        rng = gathered_rng(self.comm, root=0)  # collective: every rank checkpoints at the same step
        if rng is None and (self.run.replica is None or self.run.replica.index != 0):
            return None
        params, optim, extra, _ = super().state()
        parts = gather_parts(self.run, params, optim)  # collective over the root replica (--mp)
        if rng is None:
            return None
        params, optim = parts
        if self.sizes is not None:
            extra["mp_sizes"] = self.sizes
        return params, optim, extra, rng

    def images(self, step: int) -> int:
        return step * self.cfg.batch_size * self.run.world

    def summary(self) -> dict:
        return {"workers": self.run.world, "servers": 0}

    def close(self) -> None:
        super().close()
        self.sync.close()
