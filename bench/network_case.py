"""The rank side of bench/network.py: run under the virtual cluster's launcher, one rank per node (3 nodes) or as the
host list says.

    <vc.mpirun([n2, n3, n4])> python -m mpi4py bench/network_case.py vector --floats N --repeats R
    <vc.mpirun([n2, n3, n4])> python -m mpi4py bench/network_case.py train --batch B --steps S --repeats R
    <vc.mpirun([n2, n3, n3])> python -m mpi4py bench/network_case.py downpour --design server|worker [--overlap] ...

vector:   the push and fetch of an N-float vector, rank 0 serving and rank 1 working (rank 2 waits), fashion_downpour's
          Adagrad (weight decay 5e-4), for three designs one after the other: the server-side update (ParamServer +
          DownpourWorker.push/fetch) with an fp32 and a bf16 push, and the deleted worker-side update (WorkerSide
          below: Get_accumulate(SUM) of g^2, Accumulate of the step, Get_accumulate(NO_OP) fetch), with a Put of the
          same vector beside it; then an in-place Allreduce of N floats over all 3 ranks. Bytes on the wire come from
          the node's own eth0 counters, read around every operation.
train:    images/s of alexnet_small, local and allreduce vs DDP (network_train.py).
downpour: images/s of alexnet_small, rank 0 serving and the others training, either design (network_train.py).
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
APPLIED, DONE = 0, 1  # WorkerSide's words on the server


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


class WorkerSide:
    """The worker-side Downpour of commit a0b95ac, compact, as the baseline: `server` holds the parameters and
    Adagrad's sum of squares in Win.Allocate windows and two counters; a worker computes the update and applies it.

    push: g += wd * params; sum_sq += g^2 (MPI_Get_accumulate SUM, returning the old sum); params += -lr g /
    (sqrt(old + g^2) + eps) (MPI_Accumulate SUM); APPLIED += 1. fetch: MPI_Get_accumulate(NO_OP) of the parameters.
    The server only keeps MPI progressing (spinning while pushes arrive, then sleeping) until every worker is done.
    """

    CHUNK = 1 << 22  # elements per piece of a push (the old DownpourWorker's)

    def __init__(self, comm, server: int, n: int, weight_decay: float, eps: float) -> None:
        from hpcdnn.mpi.window import Window

        self.comm, self.server, self.n, self.wd, self.eps = comm, server, n, np.float32(weight_decay), np.float32(eps)
        here = n if comm.Get_rank() == server else 0
        self.params, self.sum_sq = Window(here, np.float32, comm=comm), Window(here, np.float32, comm=comm)
        self.words = Window(2 if comm.Get_rank() == server else 0, np.int64, comm=comm)
        self.a, self.b = np.empty(min(n, self.CHUNK), np.float32), np.empty(min(n, self.CHUNK), np.float32)

    def load(self, params: np.ndarray) -> None:
        self.params.put(np.ascontiguousarray(params, np.float32), self.server)

    def push(self, g: np.ndarray, host: np.ndarray, lr: float) -> None:
        """Weight decay toward the fetched parameters, then the Adagrad step applied with accumulates, piece by piece."""
        g += self.wd * host
        for lo in range(0, self.n, self.CHUNK):
            hi = min(self.n, lo + self.CHUNK)
            a, b, gs = self.a[: hi - lo], self.b[: hi - lo], g[lo:hi]
            np.multiply(gs, gs, out=a)
            self.sum_sq.get_accumulate(a, b, self.server, lo)  # b = the sum before this push
            b += a
            np.sqrt(b, out=b)
            b += self.eps
            np.divide(gs, b, out=b)
            b *= np.float32(-lr)
            self.params.accumulate(b, self.server, lo)
        self.words.fetch_and_op(1, self.server, APPLIED)

    def fetch(self, out: np.ndarray) -> int:
        version = self.words.read(self.server, APPLIED, 1)[0]
        self.params.get_atomic(out, self.server)
        return int(version)

    def done(self) -> None:
        self.words.fetch_and_op(1, self.server, DONE)

    def serve(self, workers: int, poll: float = 0.002, busy: float = 0.005) -> None:
        """Until `workers` have said done: spin (yielding) while pushes arrive, else sleep `poll` between checks."""
        me, seen, active = self.comm.Get_rank(), -1, time.monotonic()
        while True:
            words = self.words.read(me, 0, 2)
            if words[DONE] >= workers:
                return
            self.comm.Iprobe(MPI.ANY_SOURCE, MPI.ANY_TAG)
            if words[APPLIED] != seen:
                seen, active = words[APPLIED], time.monotonic()
            if time.monotonic() - active < busy:
                os.sched_yield()
            else:
                time.sleep(poll)

    def free(self) -> None:
        for w in (self.params, self.sum_sq, self.words):
            w.free()


def timed_pairs(push, fetch, grad, grad0, repeats: int) -> dict:
    """One untimed push + fetch (JIT, connections), then `repeats` timed pairs; medians per operation."""
    runs: dict[str, list] = {"push": [], "fetch": []}
    for k in range(repeats + 1):
        grad[:] = grad0  # the worker-side push adds weight decay into its gradient in place
        p, f = measured(push), measured(fetch)
        if k:
            runs["push"].append(p)
            runs["fetch"].append(f)
    return {k: median_run(v) | {"load": load1()} for k, v in runs.items()}


def server_side(sub, n: int, repeats: int, push_dtype: str) -> dict | None:
    """The library's Downpour: rank 0 of `sub` serves and applies Adagrad, rank 1 pushes (Put into its inbox slot)
    and fetches (seqlocked Get of the published buffer); the fetch waits until the push is applied."""
    from hpcdnn.config import load_config
    from hpcdnn.models.flat import FlatVector
    from hpcdnn.mpi.downpour import DownpourWorker
    from hpcdnn.mpi.param_server import ParamServer
    from hpcdnn.mpi.roles import split_roles

    cfg = load_config("fashion_downpour")
    roles = split_roles(sub, 1)
    host = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    ps = ParamServer(roles, n, optimizer=cfg.optimizer, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                     eps=cfg.adagrad_eps, push_dtype=push_dtype, initial=(host, None, None) if roles.is_root else None)  # fmt: skip
    out = None
    if roles.is_server:
        ps.serve()
    else:
        grad0 = host * np.float32(1e-3)
        grad = grad0.copy()
        worker = DownpourWorker(ps, FlatVector(host, grad), cfg, 0)
        worker.start(resumed=False)

        def push() -> None:  # what DownpourWorker.step does after backward with n_push = 1, minus the fetch
            worker.acc_view, worker.pending, worker.steps = grad, 1, worker.steps + 1
            worker.push(cfg.lr, 0, worker.steps)

        out = timed_pairs(push, worker.fetch, grad, grad0, repeats)
        worker.finish(cfg.lr, 0, worker.steps)
        ps.wait_done()
        summary = ps.summary()
        assert summary["pushes_applied"] == repeats + 1, f"a push was not applied: {summary}; a bug, please report"
        ps.end()
    ps.free()
    roles.free()
    return out


def worker_side(sub, n: int, repeats: int) -> dict | None:
    """The deleted design (WorkerSide) on the same vector, and a plain Put of it (a server-side push's payload)."""
    from hpcdnn.config import load_config

    cfg = load_config("fashion_downpour")
    ws = WorkerSide(sub, 0, n, cfg.weight_decay, cfg.adagrad_eps)
    out = None
    if sub.Get_rank() == 0:
        ws.serve(1)
    else:
        host = np.random.default_rng(0).standard_normal(n).astype(np.float32)
        ws.load(host)
        grad0 = host * np.float32(1e-3)
        grad = grad0.copy()
        out = timed_pairs(lambda: ws.push(grad, host, cfg.lr), lambda: ws.fetch(host), grad, grad0, repeats)
        out["put"] = timed_pairs(lambda: ws.params.put(grad, 0), lambda: None, grad, grad0, repeats)["push"]
        ws.done()
    ws.free()
    return out


def downpour_vector(comm, n: int, repeats: int) -> dict | None:
    """Ranks 0 (server) and 1 (worker): the three designs in turn; rank 1 returns {design: {push, fetch[, put]}}."""
    from hpcdnn.placement import set_threads

    set_threads(1)  # the server's update kernels: one thread, as the worker's
    sub = comm.Split(0 if comm.Get_rank() < 2 else MPI.UNDEFINED, comm.Get_rank())
    if sub == MPI.COMM_NULL:
        return None
    out = {"server fp32": server_side(sub, n, repeats, "fp32"), "server bf16": server_side(sub, n, repeats, "bf16"),
           "worker-side": worker_side(sub, n, repeats)}  # fmt: skip
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
    ap.add_argument("mode", choices=("vector", "train", "downpour"))
    ap.add_argument("--floats", type=int, default=1 << 20, help="vector: float32 elements pushed, fetched, reduced")
    ap.add_argument("--repeats", type=int, default=3, help="repetitions; the median is kept")
    ap.add_argument("--batch", type=int, default=32, help="train, downpour: images per rank per step")
    ap.add_argument("--steps", type=int, default=4, help="train: timed steps per repetition; downpour: per worker")
    ap.add_argument("--design", choices=("server", "worker"), default="server", help="downpour: who applies the update")
    ap.add_argument("--overlap", action="store_true", help="downpour: the worker's communication thread (--overlap)")
    args = ap.parse_args(argv)
    comm = MPI.COMM_WORLD
    if args.mode == "vector":
        result = {"downpour": downpour_vector(comm, args.floats, args.repeats)}
        idle_wait(comm)
        result["downpour"] = comm.bcast(result["downpour"], root=1)
        result["allreduce"] = allreduce_vector(comm, args.floats, args.repeats)
    elif args.mode == "train":
        from network_train import train_all  # bench/network_train.py, beside this file

        result = train_all(comm, args)
    else:
        from network_train import downpour_rate

        result = downpour_rate(comm, args)
    if comm.Get_rank() == 0:
        result["mpi"] = MPI.Get_library_version().splitlines()[0].strip(" \x00")
        result["hosts"] = comm.allgather(MPI.Get_processor_name())
        print("RESULT " + json.dumps(result), flush=True)
    else:
        comm.allgather(MPI.Get_processor_name())
    idle_wait(comm)


if __name__ == "__main__":
    sys.exit(main())
