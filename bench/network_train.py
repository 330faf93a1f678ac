"""Images/s of alexnet_small across the virtual cluster's nodes (imported by network_case.py, run by bench/network.py).

Every rank uses 1 torch thread and its own fixed random batch (no data loading, as bench/allreduce.py):
  local      rank 0 alone (its node), SGD momentum 0.9 + weight decay on FlatParams; the other ranks sleep
  allreduce  all 3 ranks: ours (GradAllreduce blocking and overlapping, FlatOptimizer) vs torch DDP over gloo,
             built and timed by bench/allreduce.py's build_variants/throughput (interleaved, rotating order);
             gloo's rendezvous on rank 0's node address (MASTER_ADDR), GLOO_SOCKET_IFNAME=eth0
  downpour   its own job (network_case.py downpour): rank 0 serves, the others train (fashion_downpour: Adagrad,
             weight decay 5e-4, n_push = n_fetch = 1, no warmstart), with the server-side update (the library, with or
             without --overlap) or the deleted worker-side one (network_case.WorkerSide); bench/network.py places
             the ranks (server on its own node, or all on one)
"""

from __future__ import annotations

import dataclasses
import os
import socket
import statistics
import time

from mpi4py import MPI
from network_case import idle_wait, load1

MODEL, SHAPE, CLASSES, CROP = "alexnet_small", (28, 28, 1), 10, 28


def batch(args, rank: int):
    import torch

    torch.manual_seed(1000 + rank)
    return torch.randn(args.batch, SHAPE[2], CROP, CROP), torch.randint(0, CLASSES, (args.batch,))


def local_rate(comm, args, x, y) -> dict | None:
    """Rank 0 trains alone for `repeats` timings of `steps` steps; the median images/s (others sleep meanwhile)."""
    import torch
    import torch.nn.functional as F

    from hpcdnn.models import FlatParams, build_model
    from hpcdnn.optim import FlatOptimizer

    out = None
    if comm.Get_rank() == 0:
        torch.manual_seed(0)
        model = build_model(MODEL, CLASSES, SHAPE, CROP)
        flat = FlatParams(model)
        opt = FlatOptimizer("sgd", flat.data, flat.grad, momentum=0.9, weight_decay=5e-4, eps=1e-10)

        def step() -> None:
            flat.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step(0.01)

        step()  # warm-up
        rates = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            for _ in range(args.steps):
                step()
            rates.append(args.batch * args.steps / (time.perf_counter() - t))
        out = {"img_s": statistics.median(rates), "samples": rates, "load": load1()}
    idle_wait(comm)
    return out


@dataclasses.dataclass
class _VariantArgs:
    """What bench/allreduce.py's build_variants/throughput read from their argparse namespace."""

    model: str = MODEL
    bucket_mb: float = 1.0  # ours (Config's default)
    ddp_bucket_mb: float = 25.0  # DDP's default
    batch: int = 32
    steps: int = 4
    repeats: int = 3


def allreduce_vs_ddp(comm, args, x, y) -> dict:
    """Ours (blocking, overlap) vs DDP/gloo over all ranks, one rank per node; images/s over all ranks."""
    import torch.distributed as dist
    from allreduce import build_variants, throughput  # bench/allreduce.py: the same variants as on one host

    rank = comm.Get_rank()
    if rank == 0:
        with socket.socket() as s:
            s.bind(("0.0.0.0", 0))
            port = s.getsockname()[1]
        master = (socket.gethostbyname(socket.gethostname()), port)  # this node's address on the cluster's subnet
    master = comm.bcast(master if rank == 0 else None)
    os.environ.update(MASTER_ADDR=master[0], MASTER_PORT=str(master[1]), GLOO_SOCKET_IFNAME="eth0")
    dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=comm.Get_size())
    v_args = _VariantArgs(batch=args.batch, steps=args.steps, repeats=args.repeats)
    v = build_variants(v_args, comm, x, y)
    samples, _ = throughput(v_args, comm, v)
    default = "overlap" if v.reducers["overlap"].auto_overlap else "blocking"  # what GradAllreduce(overlap=None) picks
    for ar in v.reducers.values():
        ar.close()
    dist.destroy_process_group()
    paired = {k: statistics.median(a / b for a, b in zip(samples[k], samples["ddp"])) for k in samples}
    return {k: {"img_s": statistics.median(s), "vs_ddp": paired[k], "samples": s} for k, s in samples.items()} | {
        "default": default,
        "master": master[0],
        "load": load1(),
    }


def _downpour_parts(comm, design: str, cfg, flat, serving: bool):
    """(parameter server, roles or None, communicate(step), done(steps)) for one design; servers get no-op callables."""
    communicate = done = None
    roles = None
    if design == "server":
        from hpcdnn.mpi.downpour import DownpourWorker
        from hpcdnn.mpi.param_server import ParamServer
        from hpcdnn.mpi.roles import split_roles

        roles = split_roles(comm, 1)
        ps = ParamServer(roles, flat.numel, optimizer=cfg.optimizer, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                         eps=cfg.adagrad_eps, push_dtype=cfg.push_dtype,
                         initial=(flat.to_numpy(), None, None) if roles.is_root else None)  # fmt: skip
        if not serving:
            worker = DownpourWorker(ps, flat, cfg, roles.index)
            worker.start(resumed=False)
            communicate, done = (lambda i: worker.step(cfg.lr, 0, i)), (lambda n: worker.finish(cfg.lr, 0, n))
        return ps, roles, communicate, done
    from network_case import WorkerSide

    ps = WorkerSide(comm, 0, flat.numel, cfg.weight_decay, cfg.adagrad_eps)
    if comm.Get_rank() == 1:
        ps.load(flat.to_numpy())
    comm.Barrier()
    if not serving:
        host, grad = flat.to_numpy(), flat.to_numpy(grad=True)
        ps.fetch(host)

        def communicate(i: int) -> None:
            ps.push(grad, host, cfg.lr)
            ps.fetch(host)

        def done(n: int) -> None:
            ps.done()

    return ps, roles, communicate, done


def downpour_rate(comm, args) -> dict:
    """fashion_downpour on alexnet_small: rank 0 serves, the other ranks train `steps` timed steps each after one
    warm-up step, every rank on 1 torch thread. design "server": the library (ParamServer + DownpourWorker, with
    --overlap if asked); "worker": the deleted worker-side update (network_case.WorkerSide), push then fetch."""
    import torch
    import torch.nn.functional as F

    from hpcdnn.config import load_config
    from hpcdnn.models import FlatParams, build_model
    from hpcdnn.placement import set_threads

    set_threads(1)
    cfg = dataclasses.replace(load_config("fashion_downpour"), warmstart_steps=0)
    if args.overlap:
        cfg = dataclasses.replace(cfg, overlap=True)
    x, y = batch(args, comm.Get_rank())
    torch.manual_seed(0)
    model = build_model(MODEL, CLASSES, SHAPE, CROP)
    flat = FlatParams(model)
    serving, workers = comm.Get_rank() == 0, comm.Get_size() - 1
    group = comm.Split(0 if serving else 1, comm.Get_rank())
    ps, roles, communicate, done = _downpour_parts(comm, args.design, cfg, flat, serving)
    out = {}
    if serving:
        if args.design == "server":
            ps.serve()
        else:
            ps.serve(workers)
    else:
        comm_s = 0.0
        for i in range(args.steps + 1):  # step 0 warms up (Numba kernels, first RMA epochs)
            if i == 1:
                group.Barrier()
                t0 = time.perf_counter()
            flat.zero_grad()
            F.cross_entropy(model(x), y).backward()
            t = time.perf_counter()
            communicate(i + 1)
            comm_s += (time.perf_counter() - t) if i else 0.0
        done(args.steps + 1)  # with --overlap: waits for the last step's push and fetch
        elapsed = group.allreduce(time.perf_counter() - t0, op=MPI.MAX)
        comm_s = group.allreduce(comm_s, op=MPI.MAX)
        if args.design == "server" and roles.is_root:
            ps.wait_done()
            applied = ps.summary()["pushes_applied"]
            ps.end()
        out = {"img_s": workers * args.batch * args.steps / elapsed, "workers": workers, "comm_share": comm_s / elapsed,
               "step_s": elapsed / args.steps, "design": args.design, "overlap": bool(args.overlap), "load": load1()}  # fmt: skip
        if args.design == "server" and roles.is_root:
            out["pushes_applied"] = applied
    ps.free()
    if args.design == "server":
        roles.free()
    group.Free()
    return comm.bcast(out, root=1)


def train_all(comm, args) -> dict:
    """Local and allreduce in turn, every rank on 1 torch thread (Downpour: downpour_rate, its own job)."""
    from hpcdnn.models import build_model
    from hpcdnn.placement import set_threads

    set_threads(1)
    x, y = batch(args, comm.Get_rank())
    out = {"local": local_rate(comm, args, x, y)}
    out["allreduce"] = allreduce_vs_ddp(comm, args, x, y)
    out["params"] = sum(p.numel() for p in build_model(MODEL, CLASSES, SHAPE, CROP).parameters())
    return out
