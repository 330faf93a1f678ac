"""The rank side of bench/network.py: run under the virtual cluster's launcher, one rank per node (3 nodes).

    <vc.mpirun([n2, n3, n4])> python -m mpi4py bench/network_case.py vector --floats N --repeats R
    <vc.mpirun([n2, n3, n4])> python -m mpi4py bench/network_case.py train --batch B --steps S --repeats R

vector: Downpour's real push and fetch (ParamServer + DownpourWorker.push/fetch, fashion_downpour's Adagrad config)
        of an N-float vector, rank 0 serving and rank 1 working (rank 2 waits), with a Put of the same vector
        beside them (the push of a server-side update); then an in-place Allreduce of N floats over all 3 ranks.
        Bytes on the wire come from the node's own eth0 counters, read around every operation.
train:  images/s of alexnet_small (network_train.py).
Rank 0 prints one line `RESULT {json}`. Ranks that have nothing to do wait in a sleeping Ibarrier, so they leave
the 2 shared cores to the ranks that work (an MPI Barrier spins).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
from mpi4py import MPI

NET = "/sys/class/net/eth0/statistics"  # inside a node's namespace: that node's end of its link


def node_bytes() -> tuple[int, int]:
    """(bytes this node has sent, bytes it has received) on its link."""
    with open(f"{NET}/tx_bytes") as tx, open(f"{NET}/rx_bytes") as rx:
        return int(tx.read()), int(rx.read())


def measured(fn) -> tuple[float, int, int]:
    """Run fn once: (seconds, bytes this node sent, bytes it received) meanwhile."""
    s0, r0 = node_bytes()
    t = time.perf_counter()
    fn()
    dt = time.perf_counter() - t
    s1, r1 = node_bytes()
    return dt, s1 - s0, r1 - r0


def idle_wait(comm) -> None:
    """A barrier that sleeps instead of spinning."""
    req = comm.Ibarrier()
    while not req.Test():
        time.sleep(0.005)


def load1() -> float:
    return round(os.getloadavg()[0], 2)


def warm_kernels() -> None:
    """Compile the push's Numba kernels on a few elements, so no timed push pays for the JIT."""
    from hpcdnn.kernels import update

    g, a, b = (np.ones(64, np.float32) for _ in range(3))
    update.square_kernel(g, a)
    update.adagrad_delta_kernel(g, b, np.float32(-1e-3), np.float32(1e-10))
    update.axpy(g, a, 5e-4)
    update.grad_is_finite(g)


def downpour_vector(comm, n: int, repeats: int) -> dict | None:
    """Rank 0 serves, rank 1 pushes and fetches n floats `repeats` times (interleaved with a Put); rank 1 returns them."""
    import torch

    from hpcdnn.config import load_config
    from hpcdnn.mpi import control as ctl
    from hpcdnn.mpi.downpour import DownpourWorker
    from hpcdnn.mpi.param_server import ParamServer
    from hpcdnn.mpi.roles import split_roles

    sub = comm.Split(0 if comm.Get_rank() < 2 else MPI.UNDEFINED, comm.Get_rank())
    if sub == MPI.COMM_NULL:
        return None
    cfg = load_config("fashion_downpour")  # Adagrad, weight decay 5e-4, atomic fetch, n_push = n_fetch = 1
    roles = split_roles(sub, 1)
    ps = ParamServer(roles, n, adagrad=cfg.optimizer == "adagrad", atomic_fetch=cfg.atomic_fetch)
    sub.Barrier()
    out = None
    if roles.is_server:
        ps.serve()
    else:
        warm_kernels()
        host = np.random.default_rng(0).standard_normal(n).astype(np.float32)
        grad0 = host * np.float32(1e-3)
        grad = np.empty_like(grad0)
        ps.load(host)

        class Flat:  # all a DownpourWorker reads of a model: its flat vectors
            numel, device = n, torch.device("cpu")

            def to_numpy(self, grad=False, _g=grad, _h=host):
                return _g if grad else _h

        worker = DownpourWorker(ps, Flat(), cfg, 0)
        worker.start(resumed=False)

        def push() -> None:  # what DownpourWorker.step does after backward with n_push = 1, minus the fetch
            worker.acc_view, worker.pending, worker.steps = grad, 1, worker.steps + 1
            worker.push(cfg.lr, 0, worker.steps)  # counts the push with the worker's row, as in training

        ops = {"push": push, "fetch": worker.fetch, "put": lambda: ps.params.put(grad, roles.servers[0])}
        runs: dict[str, list] = {k: [] for k in ops}
        for _ in range(repeats):
            for name, op in ops.items():
                grad[:] = grad0  # the push adds weight decay into its gradient in place
                runs[name].append(measured(op))
        worker.finish(cfg.lr, 0, worker.steps)
        assert ps.control.counter(ctl.APPLIED) == repeats, "a push was not applied: a bug, please report"
        out = {k: median_run(v) | {"load": load1()} for k, v in runs.items()}
    ps.free()
    roles.free()
    sub.Free()
    return out


def median_run(runs: list[tuple[float, int, int]]) -> dict:
    """Median seconds and median bytes sent/received of several (seconds, sent, received) runs, plus all seconds."""
    return {"s": statistics.median(r[0] for r in runs), "sent": statistics.median(r[1] for r in runs),
            "received": statistics.median(r[2] for r in runs), "all_s": [round(r[0], 4) for r in runs]}  # fmt: skip


def allreduce_vector(comm, n: int, repeats: int) -> dict:
    """In-place Allreduce of n floats over every rank: the slowest rank's seconds, the busiest node's bytes."""
    buf = np.full(n, 1e-3, np.float32)
    comm.Allreduce(MPI.IN_PLACE, buf, MPI.SUM)  # warm-up: connections, buffers
    runs = []
    for _ in range(repeats):
        buf[:] = 1e-3
        comm.Barrier()
        dt, sent, received = measured(lambda: comm.Allreduce(MPI.IN_PLACE, buf, MPI.SUM))
        runs.append((comm.allreduce(dt, op=MPI.MAX), comm.allreduce(sent, op=MPI.MAX), comm.allreduce(received, op=MPI.MAX)))
    assert np.allclose(buf, 1e-3 * comm.Get_size()), "the Allreduce summed wrongly: a bug, please report"
    return median_run(runs) | {"ranks": comm.Get_size(), "load": load1()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=("vector", "train"))
    ap.add_argument("--floats", type=int, default=1 << 20, help="vector: float32 elements pushed, fetched, reduced")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repetitions; the median is kept")
    ap.add_argument("--batch", type=int, default=32, help="train: images per rank per step")
    ap.add_argument("--steps", type=int, default=4, help="train: timed steps per repetition")
    ap.add_argument("--downpour-steps", type=int, default=3, help="train: timed Downpour steps per worker")
    args = ap.parse_args(argv)
    comm = MPI.COMM_WORLD
    if args.mode == "vector":
        result = {"downpour": downpour_vector(comm, args.floats, args.repeats)}
        idle_wait(comm)
        result["downpour"] = comm.bcast(result["downpour"], root=1)
        result["allreduce"] = allreduce_vector(comm, args.floats, args.repeats)
    else:
        from network_train import train_all  # bench/network_train.py, beside this file

        result = train_all(comm, args)
    if comm.Get_rank() == 0:
        result["mpi"] = MPI.Get_library_version().splitlines()[0].strip(" \x00")
        print("RESULT " + json.dumps(result), flush=True)
    idle_wait(comm)


if __name__ == "__main__":
    sys.exit(main())
