"""The rank side of bench/downpour.py: `mpirun -n R python -m mpi4py bench/downpour_case.py PART --out FILE`.

  vector      2 ranks (1 server, 1 worker): part 1, push + fetch of AlexNet's flat vector, and part 2, AlexNet steps,
              each in the server-side design (the library) and the worker-side one (`WorkerSide`, below)
  throughput  1 server + W workers: part 3, the pushes/s one server applies while every worker pushes flat out
The root worker writes its measurements as JSON to FILE. The server rank runs what the root worker asks, one variant
at a time (`serve_commands`): `ParamServer.serve()` with 1 or 2 Numba threads, or the old server's idle loop.

The worker-side design (git a0b95ac, deleted from the library by the server-side redesign) lives on here as the
baseline: the worker computes the update and applies it to the server's windows with element-wise accumulates.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from mpi4py import MPI
from numba import prange

from hpcdnn.kernels import update
from hpcdnn.kernels.jit import kernel, numba_threads
from hpcdnn.kernels.update import fma32
from hpcdnn.mpi.window import Window

PIECE = 1 << 20  # the worker-side push's piece: squares, old sum and update of one piece stay in cache (its best)
TAG = 7390  # commands from the root worker to the server rank, on a duplicate of COMM_WORLD
WD = 5e-4  # AlexNet's weight decay, in every variant


def load() -> float:
    return os.getloadavg()[0]


# ---- the worker-side design (a0b95ac): its kernels, push and fetch
@kernel(parallel=True)
def square_kernel(x, out):
    for i in prange(x.size):
        out[i] = x[i] * x[i]


@kernel(parallel=True)
def sgd_delta_kernel(param, grad, buf, out, nlr, momentum, weight_decay, first_step):
    """out = (param after one SGD-momentum step) - param; the worker keeps the momentum buffer."""
    for i in prange(param.size):
        g = fma32(param[i], weight_decay, grad[i])
        b = g if first_step else fma32(g, np.float32(1.0), buf[i] * momentum)
        buf[i] = b
        out[i] = fma32(b, nlr, param[i]) - param[i]


@kernel(parallel=True)
def adagrad_delta_kernel(grad, acc, nclr, eps):
    """acc (the server's sum of squares before this push) becomes the step nclr * g / (sqrt(acc + g^2) + eps)."""
    for i in prange(grad.size):
        g = grad[i]
        s = fma32(g, g, acc[i])
        acc[i] = nclr * g / (np.sqrt(s) + eps)


class WorkerSide:
    """The server's parameters and Adagrad sum of squares are windows the worker updates itself. Push: (Adagrad)
    square kernel, MPI_Get_accumulate(SUM) of g^2 returning the old sum, delta kernel, MPI_Accumulate(SUM) of the step;
    (SGD) delta kernel with worker-side momentum, MPI_Accumulate(SUM). Fetch: MPI_Get_accumulate(NO_OP)."""

    def __init__(self, comm, server: int, n: int) -> None:
        mine = n if comm.Get_rank() == server else 0
        self.server, self.n = server, n
        self.params, self.sum_sq = Window(mine, np.float32, comm=comm), Window(mine, np.float32, comm=comm)
        self.applied = Window(1 if mine else 0, np.int64, comm=comm)  # the control word every push incremented
        self.a, self.b = np.empty(min(n, PIECE), np.float32), np.empty(min(n, PIECE), np.float32)
        self.buf, self.first = None, True  # SGD momentum, on the worker

    def push(self, optimizer: str, g: np.ndarray, host: np.ndarray, lr: float) -> None:
        if not update.grad_is_finite(g):
            raise FloatingPointError("non-finite gradient in the benchmark: a bug, please report")
        nlr, a, b = np.float32(-lr), self.a, self.b
        if optimizer == "adagrad":
            update.axpy(g, host, WD)  # weight decay toward the parameters the gradient saw, on the worker
        elif self.buf is None:
            self.buf = np.zeros(self.n, np.float32)
        for lo in range(0, self.n, PIECE):
            hi = min(self.n, lo + PIECE)
            k = hi - lo
            if optimizer == "adagrad":
                square_kernel(g[lo:hi], a[:k])
                self.sum_sq.get_accumulate(a[:k], b[:k], self.server, lo)
                adagrad_delta_kernel(g[lo:hi], b[:k], nlr, np.float32(1e-10))
            else:
                sgd_delta_kernel(host[lo:hi], g[lo:hi], self.buf[lo:hi], b[:k], nlr, np.float32(0.9), np.float32(WD), self.first)
            self.params.accumulate(b[:k], self.server, lo)
        if optimizer == "sgd":
            self.first = False
        self.applied.fetch_and_op(1, self.server, 0)

    def fetch(self, host: np.ndarray) -> None:
        self.applied.read(self.server)
        self.params.get_atomic(host, self.server)

    def free(self) -> None:
        for w in (self.params, self.sum_sq, self.applied):
            w.free()


# ---- the server rank, remote-controlled by the root worker
def serve_commands(cmds, root: int, pss: dict, old: WorkerSide | None = None) -> None:
    """Server: between commands idle as the worker-side design's server did (MPICH's shared-memory RMA needs the
    target to enter MPI: spin while pushes arrive, else sleep 2 ms); ("serve", name, threads): run pss[name].serve()
    on `threads` Numba threads until the root's END; ("quit",): return."""
    me = cmds.Get_rank()
    while True:
        seen, active = -1, time.monotonic()
        while not cmds.Iprobe(source=root, tag=TAG):
            count = int(old.applied.read(me)[0]) if old else seen
            now = time.monotonic()
            if count != seen:
                seen, active = count, now
            os.sched_yield() if now - active < 0.005 else time.sleep(0.002)
        what = cmds.recv(source=root, tag=TAG)
        if what[0] == "quit":
            return
        numba_threads(what[2])
        pss[what[1]].serve()


class Remote:
    """The root worker's side of `serve_commands`."""

    def __init__(self, cmds, server: int, pss: dict) -> None:
        self.cmds, self.server, self.pss = cmds, server, pss

    @contextlib.contextmanager
    def serving(self, name: str, threads: int, settle: float = 0.02):
        """The server serves pss[name] inside the block; `settle` s first, so it waits in its idle backoff as it does
        while a worker computes."""
        self.cmds.send(("serve", name, threads), dest=self.server, tag=TAG)
        time.sleep(settle)
        try:
            yield self.pss[name]
        finally:
            self.pss[name].end()

    def quit(self) -> None:
        self.cmds.send(("quit",), dest=self.server, tag=TAG)


# ---- parts 1 and 2
def vector(args) -> None:
    import torch.nn.functional as F

    from hpcdnn.config import Config
    from hpcdnn.models import build_model
    from hpcdnn.models.flat import FlatParams
    from hpcdnn.mpi.downpour import DownpourWorker
    from hpcdnn.mpi.param_server import ParamServer
    from hpcdnn.mpi.roles import split_roles
    from hpcdnn.optim import FlatOptimizer
    from hpcdnn.placement import set_threads

    world = MPI.COMM_WORLD
    roles, cmds, flat, model = split_roles(world, 1), world.Dup(), None, None
    set_threads(1 if roles.is_server else args.threads)
    if roles.is_root:
        torch.manual_seed(0)
        model = build_model("alexnet", 1000, (256, 256, 3), 227)
        flat = FlatParams(model)
    n = world.bcast(flat.numel if flat else None, root=roles.root)
    initial = (flat.to_numpy(), None, None) if roles.is_root else None
    kinds = {"sgd": ("sgd", "fp32"), "adagrad": ("adagrad", "fp32"), "adagrad bf16": ("adagrad", "bf16")}
    pss = {name: ParamServer(roles, n, optimizer=opt, momentum=0.9 if opt == "sgd" else 0.0, weight_decay=WD, push_dtype=dt,
                             initial=initial) for name, (opt, dt) in kinds.items()}  # fmt: skip
    old = WorkerSide(world, roles.servers[0], n)
    if roles.is_root:
        old.params.put(flat.to_numpy(), roles.servers[0])
    world.Barrier()
    if roles.is_server:
        serve_commands(cmds, roles.root, pss, old)
    else:
        server = Remote(cmds, roles.servers[0], pss)
        x, y = torch.randn(32, 3, 227, 227), torch.randint(0, 1000, (32,))
        flat.zero_grad()
        F.cross_entropy(model(x), y).backward()  # part 1 pushes this real gradient
        workers = {}
        for name, (opt, dt) in kinds.items():
            cfg = Config(optimizer=opt, momentum=0.9 if opt == "sgd" else 0.0, weight_decay=WD, push_dtype=dt)
            workers[name] = DownpourWorker(pss[name], flat, cfg, 0)
            workers[name].start(resumed=False)
        result = {"numel": n, "param_count": flat.param_count, "mpi": MPI.Get_library_version().splitlines()[0].strip()}
        result["part1"] = part1(args.repeats, flat, workers, old, server)
        if args.alexnet_steps:
            opt = FlatOptimizer("adagrad", flat.data, flat.grad, momentum=0, weight_decay=WD, eps=1e-10)
            result["part2"] = part2(args.alexnet_steps, model, flat, x, y, opt, workers["adagrad"], old, server)
        result["finite"] = update.grad_is_finite(flat.to_numpy())
        server.quit()
        Path(args.out).write_text(json.dumps(result))
    for w in (*pss.values(), old):
        w.free()
    cmds.Free()


def part1(repeats: int, flat, workers: dict, old: WorkerSide, server: Remote) -> dict:
    """Push, apply wait and fetch of every variant, one of each per round (round 0 warms up); times in s."""
    g, host = flat.to_numpy(grad=True), flat.to_numpy()
    scratch, lr = np.empty_like(g), 1e-5
    variants = [(name, threads) for name in workers for threads in (1, 2)] + [("old sgd", 0), ("old adagrad", 0)]
    rows = {"memcpy": []} | {f"{v[0]} ({v[1]} thr)" if v[1] else v[0]: [] for v in variants}
    for r in range(repeats + 1):
        t = time.perf_counter()
        np.copyto(scratch, g)
        if r:
            rows["memcpy"].append((time.perf_counter() - t, 0.0, 0.0, load()))
        for name, threads in variants:
            if threads:
                w = workers[name]
                w.acc_view = g  # what step() pushes with n_push = 1 on the CPU: the gradient buffer itself
                with server.serving(name, threads) as ps:
                    t0 = time.perf_counter()
                    w.push(lr, 0, r)
                    t1 = time.perf_counter()
                    for s in w.order:
                        ps.wait_applied(s, w.worker, w.seq[s])
                    t2 = time.perf_counter()
                    w.fetch()
                    t3 = time.perf_counter()
                key = f"{name} ({threads} thr)"
            else:
                t0 = time.perf_counter()
                old.push(name.split()[1], g, host, lr)
                t1 = t2 = time.perf_counter()
                old.fetch(host)
                t3 = time.perf_counter()
                key = name
            if r:
                rows[key].append((t1 - t0, t2 - t1, t3 - t2, load()))
    return rows


def part2(steps: int, model, flat, x, y, opt, worker, old: WorkerSide, server: Remote) -> dict:
    """AlexNet steps, one per variant per round (round 0 warms up): (step s, update or push+fetch s, load)."""
    import torch.nn.functional as F

    lr, g, host = 1e-4, flat.to_numpy(grad=True), flat.to_numpy()
    variants = ["local", "downpour (server 1 thr)", "downpour (server 2 thr)", "worker-side"]
    rows = {v: [] for v in variants}
    for i in range(steps + 1):
        for v in variants:
            threads = int(v.split("server ")[1][0]) if v.startswith("downpour") else 0
            with server.serving("adagrad", threads) if threads else contextlib.nullcontext():
                t = time.perf_counter()
                flat.zero_grad()
                F.cross_entropy(model(x), y).backward()
                tc = time.perf_counter()
                if v == "local":
                    opt.step(lr)
                elif threads:
                    worker.step(lr, 0, i)
                else:
                    old.push("adagrad", g, host, lr)
                    old.fetch(host)
                te = time.perf_counter()
            if i:
                rows[v].append((te - t, te - tc, load()))
    return rows


# ---- part 3
def throughput(args) -> None:
    from hpcdnn.config import Config
    from hpcdnn.models.flat import FlatVector
    from hpcdnn.mpi.downpour import DownpourWorker
    from hpcdnn.mpi.param_server import ParamServer
    from hpcdnn.mpi.roles import split_roles
    from hpcdnn.placement import set_threads

    world = MPI.COMM_WORLD
    roles, cmds = split_roles(world, 1), world.Dup()
    set_threads(1)
    n, opts = args.n, ("sgd", "adagrad")
    initial = (np.zeros(n, np.float32), None, None) if roles.is_root else None
    pss = {o: ParamServer(roles, n, optimizer=o, momentum=0.9 if o == "sgd" else 0.0, weight_decay=WD, initial=initial) for o in opts}
    if roles.is_server:
        serve_commands(cmds, roles.root, pss)
    else:
        from hpcdnn.mpi import control as ctl

        vec = FlatVector(np.zeros(n, np.float32))
        vec.grad[:] = np.random.default_rng(roles.index).standard_normal(n).astype(np.float32) * np.float32(1e-3)
        workers = {}
        for o in opts:
            cfg = Config(optimizer=o, momentum=0.9 if o == "sgd" else 0.0, weight_decay=WD, n_fetch=10**9, max_staleness=0)
            workers[o] = DownpourWorker(pss[o], vec, cfg, roles.index)
            workers[o].start(resumed=False)
        server = Remote(cmds, roles.servers[0], pss)
        rows = {o: [] for o in opts}
        for r in range(args.repeats + 1):  # round 0 warms up (half a second)
            for o in opts:
                w, ps = workers[o], pss[o]
                with server.serving(o, 1) if roles.is_root else contextlib.nullcontext():
                    start = roles.group.bcast(time.time() + 0.2, root=0)  # one clock: every rank is on this host
                    time.sleep(max(0.0, start - time.time()))
                    v0, t0 = (int(ps.head(0)[ctl.VERSION]), time.time()) if roles.is_root else (0, 0.0)
                    k = 0
                    while time.time() < start + (args.seconds if r else 0.5):
                        w.step(1e-6, 0, k)
                        k += 1
                    v1, t1 = (int(ps.head(0)[ctl.VERSION]), time.time()) if roles.is_root else (0, 0.0)
                    for s in w.order:
                        ps.wait_applied(s, w.worker, w.seq[s])
                    per_worker = roles.group.gather(k, root=0)
                if roles.is_root and r:
                    rows[o].append({"pushes_per_s": (v1 - v0) / (t1 - t0), "per_worker": per_worker, "load": load()})
        if roles.is_root:
            server.quit()
            Path(args.out).write_text(json.dumps({"n": n, "workers": len(roles.workers), "rows": rows}))
    for ps in pss.values():
        ps.free()
    cmds.Free()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("part", choices=("vector", "throughput"))
    ap.add_argument("--out", required=True, help="JSON file the root worker writes")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2, help="the worker's torch and Numba threads (part 1 and 2)")
    ap.add_argument("--alexnet-steps", type=int, default=5)
    ap.add_argument("--n", type=int, default=100_000, help="floats of the tiny model (part 3)")
    ap.add_argument("--seconds", type=float, default=3.0, help="pushing time per round (part 3)")
    args = ap.parse_args()
    (vector if args.part == "vector" else throughput)(args)


if __name__ == "__main__":
    main()
