"""Downpour cases run under mpirun by test_downpour.py: `python -m mpi4py downpour_cases.py CASE OUT_DIR`.

Each case uses the library with real windows on COMM_WORLD and writes its findings as JSON to OUT_DIR on the root.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from mpi4py import MPI

from hpcdnn.config import Config
from hpcdnn.models.flat import FlatParams, FlatVector
from hpcdnn.mpi import control as ctl
from hpcdnn.mpi.downpour import DownpourWorker
from hpcdnn.mpi.param_server import ParamServer
from hpcdnn.mpi.roles import split_roles

comm = MPI.COMM_WORLD


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(20, 16), torch.nn.Tanh(), torch.nn.Linear(16, 5))


def batch(step: int, worker: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * worker + step)
    return torch.randn(8, 20, generator=g), torch.randint(0, 5, (8,), generator=g)


def setup(servers: int, cfg: Config):
    roles = split_roles(comm, servers)
    model = tiny_model()
    flat = FlatParams(model)
    initial = (flat.to_numpy(), None, None) if roles.is_root else None
    ps = ParamServer(roles, flat.numel, optimizer=cfg.optimizer, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                     eps=cfg.adagrad_eps, push_dtype=cfg.push_dtype, initial=initial)  # fmt: skip
    return roles, model, flat, ps


def grad_step(model, flat, x, y) -> None:
    flat.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()


def one_worker_vs_torch(out: Path, cfg: Config, opt, steps: int) -> None:
    """Servers on all but the last rank; one worker, n_fetch = n_push = 1: `steps` pushes == the torch optimizer."""
    roles, model, flat, ps = setup(comm.Get_size() - 1, cfg)
    if roles.is_server:
        ps.serve()
    else:
        worker = DownpourWorker(ps, flat, cfg, 0)
        worker.start(resumed=False)
        ref = tiny_model()
        opt = opt(ref.parameters())
        for k in range(steps):
            x, y = batch(k, 0)
            grad_step(model, flat, x, y)
            worker.step(0.05, 0, k + 1)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(ref(x), y).backward()
            opt.step()
        worker.finish(0.05, 0, steps)
        ps.wait_done()
        served, _, _ = ps.snapshot()
        ps.end()
        ref_flat = FlatParams(ref).to_numpy()
        diff = float(np.abs(served - ref_flat).max())
        (out / "result.json").write_text(json.dumps({"max_abs_diff": diff, **ps.summary()}))
    ps.free()


def adagrad_vs_torch(out: Path) -> None:
    cfg = Config(optimizer="adagrad", weight_decay=1e-3, adagrad_eps=1e-10)
    one_worker_vs_torch(out, cfg, lambda ps: torch.optim.Adagrad(ps, lr=0.05, eps=1e-10, weight_decay=1e-3), 50)


def sgd_vs_torch(out: Path) -> None:
    cfg = Config(optimizer="sgd", momentum=0.9, weight_decay=1e-3)
    one_worker_vs_torch(out, cfg, lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-3), 50)


def overlap_vs_delayed_sgd(out: Path) -> None:
    """1 server + 1 worker with --overlap: the push and fetch of step k run while step k+1 computes on the parameters
    installed before it, so p_k = p_(k-1) - lr * grad(p_(k-2)): SGD with a one-step-old gradient, computed serially."""
    cfg = Config(optimizer="sgd", momentum=0.0, weight_decay=0.0, overlap=True)
    roles, model, flat, ps = setup(1, cfg)
    if roles.is_server:
        ps.serve()
    else:
        worker = DownpourWorker(ps, flat, cfg, 0)
        worker.start(resumed=False)
        ref, probe = tiny_model(), tiny_model()
        ref_flat, probe_flat = FlatParams(ref), FlatParams(probe)
        history = [ref_flat.to_numpy().copy()] * 2  # p_(k-2), p_(k-1)
        for k in range(40):
            x, y = batch(k, 0)
            grad_step(model, flat, x, y)
            worker.step(0.05, 0, k + 1)
            probe_flat.load_flat(history[-2])
            grad_step(probe, probe_flat, x, y)
            history.append(history[-1] - np.float32(0.05) * probe_flat.to_numpy(grad=True))
        worker.finish(0.05, 0, 40)
        ps.wait_done()
        served, _, _ = ps.snapshot()
        ps.end()
        (out / "result.json").write_text(json.dumps({"max_abs_diff": float(np.abs(served - history[-1]).max()), **ps.summary()}))
    ps.free()


def nan_push(out: Path) -> None:
    """1 server, 2 workers: worker 1's second push is NaN; it is rejected and the parameters stay finite."""
    cfg = Config(optimizer="sgd", momentum=0.0, weight_decay=0.0)
    roles, model, flat, ps = setup(1, cfg)
    if roles.is_server:
        ps.serve()
    else:
        worker = DownpourWorker(ps, flat, cfg, roles.index)
        worker.start(resumed=False)
        for k in range(5):
            x, y = batch(k, roles.index)
            grad_step(model, flat, x, y)
            if roles.index == 1 and k == 1:
                flat.grad[3] = float("nan")
            worker.step(0.1, 0, k + 1)
        worker.finish(0.1, 0, 5)
        if roles.is_root:
            ps.wait_done()
            served, _, _ = ps.snapshot()
            result = {"finite": bool(np.isfinite(served).all()), **ps.summary()}
            (out / "result.json").write_text(json.dumps(result))
            ps.end()
    ps.free()


def stalled_worker(out: Path) -> None:
    """1 server, 2+ workers pushing for a fixed time; the test SIGSTOPs the last worker for a while.

    Every worker writes its pid; the root records (time, shard version) after each of its own pushes. max_staleness=8
    (drop): worker 1 also stalls 1 s between its 6th gradient and push (SIGSTOP may hit it between a push and a
    fetch, where a stall costs no staleness); that push is far staler, dropped, and the worker re-fetches and goes on.
    """
    cfg = Config(optimizer="adagrad", weight_decay=0.0, max_staleness=8)
    roles, model, flat, ps = setup(1, cfg)
    if roles.is_server:
        ps.serve()
    else:
        (out / f"worker{roles.index}.pid").write_text(str(os.getpid()))
        worker = DownpourWorker(ps, flat, cfg, roles.index)
        worker.start(resumed=False)
        trace, k, t_end = [], 0, time.time() + float(os.environ.get("DURATION", "8"))
        while time.time() < t_end:
            x, y = batch(k, roles.index)
            grad_step(model, flat, x, y)
            if roles.index == 1 and k == 5:
                time.sleep(1.0)  # a stall between fetch and push, whatever SIGSTOP hits: this push is stale
            worker.step(0.01, 0, k + 1)
            k += 1
            if roles.is_root:
                trace.append((time.time(), int(ps.head(0)[ctl.VERSION])))
            time.sleep(0.005)
        worker.finish(0.01, 0, k)
        if roles.is_root:
            ps.wait_done()
            (out / "result.json").write_text(json.dumps({"trace": trace, **ps.summary()}))
            ps.end()
    ps.free()


def vector_setup(servers: int, n: int, cfg: Config, init: np.ndarray | None = None):
    roles = split_roles(comm, servers)
    vec = FlatVector(np.zeros(n, np.float32))
    initial = (np.zeros(n, np.float32) if init is None else init, None, None) if roles.is_root else None
    ps = ParamServer(roles, n, optimizer=cfg.optimizer, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                     push_dtype=cfg.push_dtype, initial=initial)  # fmt: skip
    return roles, vec, ps


def serve_or_start(roles, ps, flat, cfg):
    """A server serves until the end and frees the windows (returns None); a worker gets its started DownpourWorker."""
    if roles.is_server:
        ps.serve()
        ps.free()
        return None
    worker = DownpourWorker(ps, flat, cfg, roles.index)
    worker.start(resumed=False)
    return worker


def ledger(out: Path) -> None:
    """SERVERS servers, the rest workers, 200 pushes each of random gradients (sizes spanning 6 decades), plain SGD
    (lr 0.01, no momentum), a random fetch cadence and max_staleness=3 (drop): every worker keeps, in float64, the sum
    of the updates it knows were applied; the final parameters must equal minus the sum of all of them."""
    servers, n = int(os.environ.get("SERVERS", "1")), int(os.environ.get("N", "10007"))
    cfg = Config(optimizer="sgd", momentum=0.0, weight_decay=0.0, max_staleness=3, n_fetch=10**6)
    roles, vec, ps = vector_setup(servers, n, cfg)
    if (worker := serve_or_start(roles, ps, vec, cfg)) is None:
        return
    rng = np.random.default_rng(roles.index)
    mine = np.zeros(n, np.float64)
    for k in range(200):
        vec.grad[:] = rng.standard_normal(n).astype(np.float32) * np.float32(10.0 ** rng.uniform(-3, 3))
        applied = int(worker.row[ctl.APPLIED])
        worker.step(0.01, 0, k + 1)  # n_push = 1: a push; n_fetch = 10^6: never a fetch
        if int(worker.row[ctl.APPLIED]) > applied:
            mine += np.float64(np.float32(-0.01)) * vec.grad
        if rng.random() < 0.3:
            worker.fetch()
    worker.finish(0.01, 0, 200)
    total = roles.group.reduce(mine, op=MPI.SUM, root=0)  # the workers' group: its rank 0 is the root worker
    if roles.is_root:
        ps.wait_done()
        served, _, rows = ps.snapshot()
        err = np.abs(served.astype(np.float64) - total)
        tol = 1e-5 * np.abs(total).max() + 1e-6
        result = {"max_err": float(err.max()), "tol": float(tol), "torn_retries": worker.torn_retries,
                  "shards_agree": bool((rows == rows[0]).all()), **ps.summary()}  # fmt: skip
        (out / "result.json").write_text(json.dumps(result))
        ps.end()
    ps.free()


def torn_reads(out: Path) -> None:
    """1 server, 2 pushing workers and (the root) a reader: every push adds the same constant to every parameter, so
    a whole copy of the shard has all elements equal. The reader fetches for DURATION seconds and until it has seen 20
    versions (at most 60 s), counting copies that are not (torn) and the protocol's retries, then stops the pushers."""
    n = int(os.environ.get("N", str(1 << 22)))
    cfg = Config(optimizer="sgd", momentum=0.0, weight_decay=0.0, n_fetch=10**6)
    roles, vec, ps = vector_setup(1, n, cfg)
    if (worker := serve_or_start(roles, ps, vec, cfg)) is None:
        return
    t0, fetches, torn, seen = time.time(), 0, 0, set()
    if roles.is_root:  # the reader
        while time.time() - t0 < float(os.environ.get("DURATION", "6")) or (len(seen) < 20 and time.time() - t0 < 60):
            worker.fetch()
            fetches += 1
            torn += int(vec.data.min() != vec.data.max())
            seen.add(float(vec.data[0]))
        worker.request_stop()
        worker.finish(1.0, 0, 0)
        ps.wait_done()
        summary = ps.summary()
        result = {"fetches": fetches, "torn": torn, "versions_seen": len(seen), "torn_retries": worker.torn_retries, **summary}
        (out / "result.json").write_text(json.dumps(result))
        ps.end()
    else:
        vec.grad[:] = -1.0
        k = 0
        while not worker.stop_requested():
            worker.step(1.0, 0, k)
            k += 1
        worker.finish(1.0, 0, k)
    ps.free()


def bounded_delay(out: Path) -> None:
    """1 server, 3 workers, max_delay=2; worker 2 computes 4x slower. Every worker logs (time, steps done) when it
    starts a step and the time each push starts; the test replays the log."""
    cfg = Config(optimizer="sgd", momentum=0.0, weight_decay=0.0, max_delay=2)
    roles, model, flat, ps = setup(1, cfg)
    if (worker := serve_or_start(roles, ps, flat, cfg)) is None:
        return
    starts, pushes, steps = [], [], 30
    for k in range(steps):
        starts.append((time.time(), k))
        x, y = batch(k, roles.index)
        grad_step(model, flat, x, y)
        time.sleep(0.04 if roles.index == 2 else 0.01)
        pushes.append(time.time())
        worker.step(0.01, 0, k + 1)
    worker.finish(0.01, 0, steps)
    logs = roles.group.gather({"worker": roles.index, "starts": starts, "pushes": pushes}, root=0)
    if roles.is_root:
        ps.wait_done()
        (out / "result.json").write_text(json.dumps({"logs": logs, **ps.summary()}))
        ps.end()
    ps.free()


def roles_and_windows(out: Path) -> None:
    """Placement first / last / env, and the Window class's checks, on 3 ranks."""
    rank, found = comm.Get_rank(), {}
    for placement, env in (("first", None), ("last", None), ("env", {"HPCDNN_ROLE": "server" if rank == 1 else "worker"})):
        roles = split_roles(comm, 1, placement, env=env)
        found[placement] = {"servers": roles.servers, "workers": roles.workers, "root": roles.root, "index": roles.index}
        roles.free()
    try:
        split_roles(comm, 1, "env", env={"HPCDNN_ROLE": "gpu"})
        found["bad_env"] = None
    except ValueError as e:
        found["bad_env"] = str(e)
    from hpcdnn.mpi.window import Window

    w = Window(8 if rank == 0 else 0, np.float32, comm=comm)
    w.accumulate(np.full(8, rank + 1, np.float32), 0)  # 1 + 2 + 3 on every element, concurrently
    comm.Barrier()
    found["sum"] = w.read(0, 0, 8).tolist()
    try:
        w.get(np.empty(2, np.float32), 0, 7)
    except ValueError as e:
        found["bounds"] = str(e)
    w.free()
    try:
        w.read(0)
    except RuntimeError as e:
        found["freed"] = str(e)
    everyone = comm.gather(found, root=0)
    if rank == 0:
        (out / "result.json").write_text(json.dumps(everyone))


if __name__ == "__main__":
    torch.set_num_threads(1)
    case, out = sys.argv[1], Path(sys.argv[2])
    {
        "adagrad_vs_torch": adagrad_vs_torch,
        "sgd_vs_torch": sgd_vs_torch,
        "nan_push": nan_push,
        "overlap_vs_delayed_sgd": overlap_vs_delayed_sgd,
        "stalled_worker": stalled_worker,
        "ledger": ledger,
        "torn_reads": torn_reads,
        "bounded_delay": bounded_delay,
        "roles": roles_and_windows,
    }[case](out)
