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
from hpcdnn.models.flat import FlatParams
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
    ps = ParamServer(roles, flat.numel, adagrad=cfg.optimizer == "adagrad", atomic_fetch=cfg.atomic_fetch)
    if roles.is_root:
        ps.load(flat.to_numpy())
    comm.Barrier()
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
        served, _ = ps.snapshot()
        ref_flat = FlatParams(ref).to_numpy()
        diff = float(np.abs(served - ref_flat).max())
        (out / "result.json").write_text(json.dumps({"max_abs_diff": diff, **ps.summary()}))
    ps.free()


def adagrad_vs_torch(out: Path) -> None:
    cfg = Config(optimizer="adagrad", weight_decay=1e-3, adagrad_eps=1e-10)
    one_worker_vs_torch(out, cfg, lambda ps: torch.optim.Adagrad(ps, lr=0.05, eps=1e-10, weight_decay=1e-3), 30)


def sgd_vs_torch(out: Path) -> None:
    cfg = Config(optimizer="sgd", momentum=0.9, weight_decay=1e-3)
    one_worker_vs_torch(out, cfg, lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-3), 50)


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
            served, _ = ps.snapshot()
            result = {"finite": bool(np.isfinite(served).all()), **ps.summary()}
            (out / "result.json").write_text(json.dumps(result))
    ps.free()


def stalled_worker(out: Path) -> None:
    """1 server, 2+ workers pushing for a fixed time; the test SIGSTOPs the last worker for a while.

    Every worker writes its pid; the root records (time, applied pushes) after each of its own pushes.
    """
    cfg = Config(optimizer="adagrad", weight_decay=0.0)
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
            worker.step(0.01, 0, k + 1)
            k += 1
            if roles.is_root:
                trace.append((time.time(), ps.control.counter(ctl.APPLIED)))
            time.sleep(0.005)
        worker.finish(0.01, 0, k)
        if roles.is_root:
            ps.wait_done()
            (out / "result.json").write_text(json.dumps({"trace": trace, **ps.summary()}))
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
        "stalled_worker": stalled_worker,
        "roles": roles_and_windows,
    }[case](out)
