"""Images/s of alexnet_small across the virtual cluster's nodes (imported by network_case.py, run by bench/network.py).

Every rank uses 1 torch thread and its own fixed random batch (no data loading, as bench/allreduce.py):
  local      rank 0 alone (its node), SGD momentum 0.9 + weight decay on FlatParams; the other ranks sleep
  allreduce  all 3 ranks: ours (GradAllreduce blocking and overlapping, FlatOptimizer) vs torch DDP over gloo,
             built and timed by bench/allreduce.py's build_variants/throughput (interleaved, rotating order);
             gloo's rendezvous on rank 0's node address (MASTER_ADDR), GLOO_SOCKET_IFNAME=eth0
  downpour   rank 0 serves, ranks 1 and 2 train (fashion_downpour: Adagrad, n_push = n_fetch = 1, no warmstart)
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


def downpour_rate(comm, args, x, y) -> dict:
    """1 server (rank 0) + the other ranks as workers, `downpour_steps` timed steps each after one warm-up step."""
    import torch
    import torch.nn.functional as F

    from hpcdnn.config import load_config
    from hpcdnn.models import FlatParams, build_model
    from hpcdnn.mpi.downpour import DownpourWorker
    from hpcdnn.mpi.param_server import ParamServer
    from hpcdnn.mpi.roles import split_roles

    cfg = dataclasses.replace(load_config("fashion_downpour"), warmstart_steps=0)
    roles = split_roles(comm, cfg.servers)
    torch.manual_seed(0)
    model = build_model(MODEL, CLASSES, SHAPE, CROP)
    flat = FlatParams(model)
    ps = ParamServer(roles, flat.numel, adagrad=cfg.optimizer == "adagrad", atomic_fetch=cfg.atomic_fetch)
    if roles.is_root:
        ps.load(flat.to_numpy())
    comm.Barrier()
    out = {}
    if roles.is_server:
        ps.serve()
    else:
        worker = DownpourWorker(ps, flat, cfg, roles.index)
        worker.start(resumed=False)
        comm_s = 0.0
        for i in range(args.downpour_steps + 1):  # step 0 warms up (Numba kernels, first RMA epochs)
            if i == 1:
                roles.group.Barrier()
                t0 = time.perf_counter()
            flat.zero_grad()
            F.cross_entropy(model(x), y).backward()
            t = time.perf_counter()
            worker.step(cfg.lr, 0, i)
            comm_s += (time.perf_counter() - t) if i else 0.0
        elapsed = roles.group.allreduce(time.perf_counter() - t0, op=MPI.MAX)
        comm_s = roles.group.allreduce(comm_s, op=MPI.MAX)
        worker.finish(cfg.lr, 0, args.downpour_steps + 1)
        n_workers = len(roles.workers)
        out = {"img_s": n_workers * args.batch * args.downpour_steps / elapsed, "workers": n_workers,
               "push_fetch_share": comm_s / elapsed, "step_s": elapsed / args.downpour_steps, "load": load1()}  # fmt: skip
    ps.free()
    roles.free()
    return comm.bcast(out, root=1)


def train_all(comm, args) -> dict:
    """The three trainers in turn, every rank on 1 torch thread."""
    from hpcdnn.models import build_model
    from hpcdnn.placement import set_threads

    set_threads(1)
    x, y = batch(args, comm.Get_rank())
    out = {"local": local_rate(comm, args, x, y)}
    out["allreduce"] = allreduce_vs_ddp(comm, args, x, y)
    out["downpour"] = downpour_rate(comm, args, x, y)
    out["params"] = sum(p.numel() for p in build_model(MODEL, CLASSES, SHAPE, CROP).parameters())
    return out
