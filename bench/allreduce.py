"""Benchmark synchronous data-parallel SGD: our GradAllreduce against PyTorch DDP (gloo), side by side in one mpirun.

    python bench/allreduce.py                                   # 2 ranks x 1 torch thread, alexnet_small, batch 64/rank
    python bench/allreduce.py --model alexnet --batch 8 --steps 2   # 233 MB of gradient: where overlap could pay

It relaunches itself as `mpirun -n RANKS python -m mpi4py bench/allreduce.py ...` (ranks x threads <= cores). Each rank
builds the same model three times from one seed, fed a fixed random batch (no data loading), dropout on:

  blocking  FlatParams + GradAllreduce(overlap=False) + FlatOptimizer (SGD, momentum 0.9, weight decay 5e-4)
  overlap   the same with GradAllreduce(overlap=True): buckets start from backward hooks
  ddp       torch.nn.parallel.DistributedDataParallel over gloo (env://, a free port), torch.optim.SGD, same settings

A step is zero grad, forward, cross-entropy, backward, gradient average, SGD step. Each timing runs --steps steps
between two barriers and keeps the slowest rank's time; the variants run --repeats times, interleaved (the order
rotating each repeat), and the MEDIAN images/s (all ranks) of each is printed with its ratio to DDP, and the median
of the ratios within one repeat ("paired": neighbours in time share the machine's load, the noise here). Then the
reduction alone: one in-place Allreduce of the flat gradient, the bucketed synchronize(), np.copyto of the same bytes.
Always exits 0: it reports, it does not gate.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import socket
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from launch import relaunch  # bench/launch.py (this script's directory is on sys.path)

CHILD = "HPCDNN_BENCH_ALLREDUCE_CHILD"
MODELS = {"alexnet_small": ((28, 28, 1), 10, 28), "alexnet": ((227, 227, 3), 1000, 227)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Variants:
    """The three variants' step functions and what the report needs from them."""

    steps: dict[str, Callable[[], None]] = field(default_factory=dict)  # name -> one training step
    reducers: dict = field(default_factory=dict)  # "blocking"/"overlap" -> GradAllreduce
    flats: dict = field(default_factory=dict)  # "blocking"/"overlap" -> FlatParams
    sync_ms: dict[str, list[float]] = field(default_factory=lambda: {"blocking": [], "overlap": []})  # per step, rank 0


def timed(comm, fn: Callable[[], None], n: int) -> float:
    """Seconds for n calls of fn between two barriers, the slowest rank's."""
    from mpi4py import MPI

    comm.Barrier()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    comm.Barrier()
    return comm.allreduce(time.perf_counter() - t0, op=MPI.MAX)


def start(args: argparse.Namespace, comm):
    """Threads, the gloo process group on a free port, and this rank's fixed batch (x, y)."""
    import torch
    import torch.distributed as dist

    from hpcdnn.placement import set_threads

    rank, size = comm.Get_rank(), comm.Get_size()
    set_threads(args.threads)
    port = comm.bcast(free_port() if rank == 0 else None)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=size)
    shape, classes, crop = MODELS[args.model]
    torch.manual_seed(1000 + rank)  # each rank its own batch
    return torch.randn(args.batch, shape[2], crop, crop), torch.randint(0, classes, (args.batch,))


def build_variants(args: argparse.Namespace, comm, x, y) -> Variants:
    """The same model three times from one seed: ours blocking, ours overlapping, DDP."""
    import torch
    import torch.nn.functional as F

    from hpcdnn.models import FlatParams, build_model
    from hpcdnn.mpi.allreduce import GradAllreduce
    from hpcdnn.optim import FlatOptimizer

    shape, classes, crop = MODELS[args.model]
    lr, momentum, wd = 0.01, 0.9, 5e-4

    def fresh():
        torch.manual_seed(0)
        return build_model(args.model, classes, shape, crop)

    v = Variants()
    for mode in ("blocking", "overlap"):
        model = fresh()
        flat = FlatParams(model)
        ar = GradAllreduce(flat, comm, bucket_mb=args.bucket_mb, overlap=mode == "overlap")
        ar.broadcast_parameters()
        opt = FlatOptimizer("sgd", flat.data, flat.grad, momentum=momentum, weight_decay=wd, eps=1e-10)

        def ours(model=model, flat=flat, ar=ar, opt=opt, times=v.sync_ms[mode]) -> None:
            flat.zero_grad()
            F.cross_entropy(model(x), y).backward()
            t0 = time.perf_counter()
            ar.synchronize()  # includes waiting for the slowest rank's backward
            times.append(1e3 * (time.perf_counter() - t0))
            opt.step(lr)

        v.steps[mode], v.reducers[mode], v.flats[mode] = ours, ar, flat
    ddp = torch.nn.parallel.DistributedDataParallel(fresh(), bucket_cap_mb=args.ddp_bucket_mb)
    ddp_opt = torch.optim.SGD(ddp.parameters(), lr=lr, momentum=momentum, weight_decay=wd)

    def torch_ddp() -> None:
        ddp_opt.zero_grad()
        F.cross_entropy(ddp(x), y).backward()
        ddp_opt.step()

    v.steps["ddp"] = torch_ddp
    return v


def throughput(args: argparse.Namespace, comm, v: Variants) -> tuple[dict[str, list[float]], int]:
    """Images/s (all ranks) of each variant, --repeats timings interleaved with a rotating order; and torch's threads."""
    import torch

    for fn in v.steps.values():
        fn()  # warm-up: allocator, oneDNN primitives, Numba kernels, gloo connections
    threads = torch.get_num_threads()  # after the first Numba kernel, which can reset the shared OpenMP pool
    names = list(v.steps)
    samples: dict[str, list[float]] = {k: [] for k in names}
    for r in range(args.repeats):
        for k in names[r % len(names) :] + names[: r % len(names)]:
            samples[k].append(comm.Get_size() * args.batch * args.steps / timed(comm, v.steps[k], args.steps))
    return samples, threads


def reductions(comm, v: Variants) -> tuple[dict[str, list[float]], int]:
    """Milliseconds per call of each way to reduce this model's flat gradient, 3 interleaved rounds; and its bytes."""
    import numpy as np
    from mpi4py import MPI

    g = v.flats["blocking"].to_numpy(grad=True)
    g0 = np.random.default_rng(comm.Get_rank()).standard_normal(g.size, dtype=np.float32) / 2**20  # sums of 2**20 x stay finite
    dst = np.empty_like(g)
    buckets = v.reducers["overlap"].buckets
    ops = {
        "Allreduce (one call, in place)": lambda: comm.Allreduce(MPI.IN_PLACE, g, MPI.SUM),
        f"Allreduce ({len(buckets)} buckets, in place)": lambda: [comm.Allreduce(MPI.IN_PLACE, g[a:b], MPI.SUM) for a, b, _ in buckets],
        f"Iallreduce ({len(buckets)} buckets) + Waitall": lambda: MPI.Request.Waitall(
            [comm.Iallreduce(MPI.IN_PLACE, g[a:b], MPI.SUM) for a, b, _ in buckets]
        ),
        "GradAllreduce.synchronize() (blocking)": v.reducers["blocking"].synchronize,
        "GradAllreduce.synchronize() (overlap)": v.reducers["overlap"].synchronize,
        "np.copyto (same bytes)": lambda: np.copyto(dst, g),
    }
    reps = max(3, min(50, int(2e9 // max(g.nbytes, 1))))
    op_ms = {k: [] for k in ops}
    for r in range(3):
        for k in list(ops) if r % 2 == 0 else list(reversed(ops)):
            for buf in (g, v.flats["overlap"].to_numpy(grad=True)):
                buf[:] = g0
            op_ms[k].append(1e3 * timed(comm, ops[k], reps) / reps)
    return op_ms, g.nbytes


def run_rank(args: argparse.Namespace) -> None:
    """One rank: build the three variants, time them interleaved, then the reductions alone; rank 0 prints the tables."""
    import torch.distributed as dist
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    x, y = start(args, comm)
    v = build_variants(args, comm, x, y)
    samples, threads = throughput(args, comm, v)
    digests = [hashlib.sha1(v.flats[m].to_numpy().tobytes()).hexdigest() for m in ("blocking", "overlap")]
    identical = comm.allgather(digests)
    early = v.reducers["overlap"].last_early  # before the reductions below call synchronize() again
    op_ms, nbytes = reductions(comm, v)
    for ar in v.reducers.values():
        ar.close()
    dist.destroy_process_group()
    if comm.Get_rank() == 0:
        report(args, comm.Get_size(), threads, v, samples, all(d == identical[0] for d in identical), early, op_ms, nbytes)


def report(args, size: int, threads: int, v: Variants, samples, identical: bool, early: int, op_ms, nbytes: int) -> None:
    """Print the variants' table, the overlap summary and the reductions' table."""
    import torch
    from mpi4py import MPI

    shape, _, crop = MODELS[args.model]
    names = list(samples)
    med = {k: statistics.median(val) for k, val in samples.items()}
    paired = {k: statistics.median(a / b for a, b in zip(samples[k], samples["ddp"])) for k in names}  # same repeat: same load
    print(f"{size} ranks x {threads} torch thread(s) | {args.model} {crop}x{crop}x{shape[2]} | batch {args.batch}/rank | "
          f"{v.flats['blocking'].param_count:,} parameters ({nbytes / 2**20:.1f} MiB gradient) | {v.reducers['blocking']!r}")  # fmt: skip
    print(f"{MPI.Get_library_version().splitlines()[0].strip()} | torch {torch.__version__} | median of {args.repeats} interleaved timings of {args.steps} steps\n")  # fmt: skip
    print(f"{'variant':<10} {'img/s (all ranks)':>18} {'vs ddp':>8} {'paired':>8}   samples")
    for k in names:
        print(f"{k:<10} {med[k]:>18.1f} {med[k] / med['ddp']:>7.2f}x {paired[k]:>7.2f}x   " + ", ".join(f"{s:.1f}" for s in samples[k]))
    overlap_gain = statistics.median(a / b for a, b in zip(samples["overlap"], samples["blocking"]))
    print(f"\nours/DDP = {paired['blocking']:.2f}x blocking, {paired['overlap']:.2f}x overlap (medians of ratios within a repeat; goal >= 1.0x); "
          f"overlap/blocking = {overlap_gain:.2f}x; overlap started {early} of {len(v.reducers['overlap'].buckets)} bucket(s) during backward")  # fmt: skip
    print(f"time in synchronize() per step on rank 0 (reduction + waiting for the other ranks), median: "
          f"{statistics.median(v.sync_ms['blocking']):.1f} ms blocking, {statistics.median(v.sync_ms['overlap']):.1f} ms overlap")  # fmt: skip
    print(f"replicas bitwise identical across ranks: {'yes' if identical else 'NO'}\n")
    print(f"{'reduction alone (' + f'{nbytes / 2**20:.1f} MiB' + ')':<42} {'ms':>8} {'GB/s':>7}")
    for k, ms_list in op_ms.items():
        ms = statistics.median(ms_list)
        print(f"{k:<42} {ms:>8.3f} {nbytes / ms / 1e6:>7.2f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=2, help="MPI ranks (ranks x threads <= cores)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--model", choices=sorted(MODELS), default="alexnet_small")
    ap.add_argument("--batch", type=int, default=64, help="images per rank per step")
    ap.add_argument("--steps", type=int, default=5, help="steps per timing")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved timings per variant; the median is kept")
    ap.add_argument("--bucket-mb", type=float, default=1.0, help="our bucket size in MiB (Config's default)")
    ap.add_argument("--ddp-bucket-mb", type=float, default=25.0, help="DDP's bucket size in MiB (its default)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds before the mpirun is killed")
    args = ap.parse_args(argv)
    if os.environ.get(CHILD):
        run_rank(args)
        return 0
    relaunch(__file__, args.ranks, sys.argv[1:] if argv is None else argv, CHILD, args.timeout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
