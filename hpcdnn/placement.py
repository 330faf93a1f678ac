"""Where a rank runs and with how many threads: the device, its index on the node, and the thread budget.

    device = pick_device(cfg.device, local_rank(comm))          # cuda:<local rank mod GPUs> when there is CUDA, else cpu
    set_threads(threads_per_rank(comm, computing=True))         # this node's CPUs divided among its computing ranks
    threads = default_threads(local_ranks)                      # data_prep's decoding threads per process

The one rule behind every thread count: ranks x threads <= the CPUs this process may use (its affinity, or Slurm's
--cpus-per-task), or throughput halves. torch and Numba share one OpenMP runtime; how a Numba kernel runs without
disturbing torch's count is `hpcdnn.kernels.jit.numba_threads`. MPI is imported only by the functions that take a
communicator, so importing this module never initialises MPI (nor imports torch: data-prep starts fast).
"""

from __future__ import annotations

import os

from hpcdnn.kernels.jit import numba_threads, restore_torch_threads


def usable_cpus() -> int:
    """CPUs this process may run on: Slurm's --cpus-per-task when set, else the affinity mask."""
    slurm = int(os.environ.get("SLURM_CPUS_PER_TASK", 0) or 0)
    if slurm:
        return slurm
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_threads(local_ranks: int = 1) -> int:
    """Threads for one of `local_ranks` busy processes on this node."""
    return max(1, usable_cpus() // max(1, local_ranks))


def pick_device(name: str, local: int = 0):
    """CUDA when present (or asked for), else CPU; never hard-coded. Ranks sharing a node take GPUs round-robin."""
    import torch

    if name == "auto":
        return torch.device(f"cuda:{local % torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device={name} but torch sees no CUDA device; use --device=auto or cpu")
    return torch.device(name)


def _node_comm(comm):
    from mpi4py import MPI

    return comm.Split_type(MPI.COMM_TYPE_SHARED)


def local_rank(comm) -> int:
    """This rank's index among the ranks of `comm` on the same node (collective over `comm`)."""
    node = _node_comm(comm)
    rank = node.Get_rank()
    node.Free()
    return rank


def threads_per_rank(comm, computing: bool = True) -> int:
    """This node's CPUs divided among its ranks of `comm` that compute (collective over `comm`).

    Passive ranks (parameter servers) pass computing=False: they get one thread and do not count against the others.
    """
    from mpi4py import MPI

    node = _node_comm(comm)
    busy = node.allreduce(int(computing), op=MPI.SUM)
    node.Free()
    return default_threads(busy) if computing else 1


def set_threads(threads: int) -> None:
    """Use `threads` in torch and in Numba's parallel kernels (one OpenMP runtime: Numba first, torch last)."""
    import torch

    numba_threads(threads)
    torch.set_num_threads(threads)


def keep_threads(threads: int) -> None:
    """After Numba kernels run outside `jit.run_parallel` (optimizer steps): torch's count back to `threads`."""
    restore_torch_threads(threads)


class Placement:
    """A rank's device and thread count, decided once by the driver."""

    def __init__(self, device, threads: int, node_rank: int = 0) -> None:
        self.device, self.threads, self.node_rank = device, threads, node_rank

    @classmethod
    def decide(cls, device: str, threads: int, comm=None, *, computing: bool = True) -> Placement:
        """Collective over `comm` when given: every rank of it calls this (parameter servers with computing=False)."""
        node_rank = local_rank(comm) if comm is not None else 0
        if not threads:
            threads = threads_per_rank(comm, computing) if comm is not None else usable_cpus()
        dev = pick_device(device if computing else "cpu", node_rank)
        set_threads(threads)
        return cls(dev, threads, node_rank)
