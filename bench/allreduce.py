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

from launch import relaunch  # bench/launch.py (this script's directory is on sys.path)

CHILD = "HPCDNN_BENCH_ALLREDUCE_CHILD"
MODELS = {"alexnet_small": ((28, 28, 1), 10, 28), "alexnet": ((227, 227, 3), 1000, 227)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_rank(args: argparse.Namespace) -> None:
    """One rank: build the three variants, time them interleaved, print the tables on rank 0."""
    import numpy as np
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from mpi4py import MPI

    from hpcdnn.models import FlatParams, build_model
    from hpcdnn.mpi.allreduce import GradAllreduce
    from hpcdnn.mpi.roles import set_threads
    from hpcdnn.optim import FlatOptimizer

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    set_threads(args.threads)
    port = comm.bcast(free_port() if rank == 0 else None)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=size)
    shape, classes, crop = MODELS[args.model]
    torch.manual_seed(1000 + rank)  # each rank its own batch
    x = torch.randn(args.batch, shape[2], crop, crop)
    y = torch.randint(0, classes, (args.batch,))
    lr, momentum, wd = 0.01, 0.9, 5e-4

    def fresh():
        torch.manual_seed(0)
        return build_model(args.model, classes, shape, crop)

    steps: dict[str, Callable[[], None]] = {}
    reducers, flats, sync_ms = {}, {}, {"blocking": [], "overlap": []}
    for mode in ("blocking", "overlap"):
        model = fresh()
        flat = FlatParams(model)
        ar = GradAllreduce(flat, comm, bucket_mb=args.bucket_mb, overlap=mode == "overlap")
        ar.broadcast_parameters()
        opt = FlatOptimizer("sgd", flat.data, flat.grad, momentum=momentum, weight_decay=wd, eps=1e-10)

        def ours(model=model, flat=flat, ar=ar, opt=opt, times=sync_ms[mode]) -> None:
            flat.zero_grad()
            F.cross_entropy(model(x), y).backward()
            t0 = time.perf_counter()
            ar.synchronize()  # includes waiting for the slowest rank's backward
            times.append(1e3 * (time.perf_counter() - t0))
            opt.step(lr)

        steps[mode], reducers[mode], flats[mode] = ours, ar, flat
    ddp = torch.nn.parallel.DistributedDataParallel(fresh(), bucket_cap_mb=args.bucket_mb)
    ddp_opt = torch.optim.SGD(ddp.parameters(), lr=lr, momentum=momentum, weight_decay=wd)

    def torch_ddp() -> None:
        ddp_opt.zero_grad()
        F.cross_entropy(ddp(x), y).backward()
        ddp_opt.step()

    steps["ddp"] = torch_ddp

    def timed(fn: Callable[[], None], n: int) -> float:
        comm.Barrier()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        comm.Barrier()
        return comm.allreduce(time.perf_counter() - t0, op=MPI.MAX)

    for fn in steps.values():
        fn()  # warm-up: allocator, oneDNN primitives, Numba kernels, gloo connections
    threads = torch.get_num_threads()  # after the first Numba kernel, which can reset the shared OpenMP pool
    names = list(steps)
    samples: dict[str, list[float]] = {k: [] for k in names}
    for r in range(args.repeats):
        for k in names[r % len(names) :] + names[: r % len(names)]:
            samples[k].append(size * args.batch * args.steps / timed(steps[k], args.steps))
    digests = [hashlib.sha1(flats[m].to_numpy().tobytes()).hexdigest() for m in ("blocking", "overlap")]
    identical = comm.allgather(digests)
    early = reducers["overlap"].last_early

    # the reduction alone, on this model's flat gradient
    g = flats["blocking"].to_numpy(grad=True)
    g0 = np.random.default_rng(rank).standard_normal(g.size, dtype=np.float32) / 2**20  # sums of 2**20 x stay finite
    dst = np.empty_like(g)
    buckets = reducers["overlap"].buckets
    ops = {
        "Allreduce (one call, in place)": lambda: comm.Allreduce(MPI.IN_PLACE, g, MPI.SUM),
        f"Allreduce ({len(buckets)} buckets, in place)": lambda: [comm.Allreduce(MPI.IN_PLACE, g[a:b], MPI.SUM) for a, b, _ in buckets],
        f"Iallreduce ({len(buckets)} buckets) + Waitall": lambda: MPI.Request.Waitall(
            [comm.Iallreduce(MPI.IN_PLACE, g[a:b], MPI.SUM) for a, b, _ in buckets]
        ),
        "GradAllreduce.synchronize() (blocking)": reducers["blocking"].synchronize,
        "GradAllreduce.synchronize() (overlap)": reducers["overlap"].synchronize,
        "np.copyto (same bytes)": lambda: np.copyto(dst, g),
    }
    reps = max(3, min(50, int(2e9 // max(g.nbytes, 1))))
    op_ms = {k: [] for k in ops}
    for r in range(3):
        for k in list(ops) if r % 2 == 0 else list(reversed(ops)):
            for buf in (g, flats["overlap"].to_numpy(grad=True)):
                buf[:] = g0
            op_ms[k].append(1e3 * timed(ops[k], reps) / reps)
    for ar in reducers.values():
        ar.close()
    dist.destroy_process_group()
    if rank:
        return

    med = {k: statistics.median(v) for k, v in samples.items()}
    paired = {k: statistics.median(a / b for a, b in zip(samples[k], samples["ddp"])) for k in names}  # same repeat: same load
    print(f"{size} ranks x {threads} torch thread(s) | {args.model} {crop}x{crop}x{shape[2]} | batch {args.batch}/rank | "
          f"{flats['blocking'].param_count:,} parameters ({g.nbytes / 2**20:.1f} MiB gradient) | {reducers['blocking']!r}")  # fmt: skip
    print(f"{MPI.Get_library_version().splitlines()[0].strip()} | torch {torch.__version__} | median of {args.repeats} interleaved timings of {args.steps} steps\n")  # fmt: skip
    print(f"{'variant':<10} {'img/s (all ranks)':>18} {'vs ddp':>8} {'paired':>8}   samples")
    for k in names:
        print(f"{k:<10} {med[k]:>18.1f} {med[k] / med['ddp']:>7.2f}x {paired[k]:>7.2f}x   " + ", ".join(f"{v:.1f}" for v in samples[k]))
    overlap_gain = statistics.median(a / b for a, b in zip(samples["overlap"], samples["blocking"]))
    print(f"\nours/DDP = {paired['blocking']:.2f}x blocking, {paired['overlap']:.2f}x overlap (medians of ratios within a repeat; goal >= 1.0x); "
          f"overlap/blocking = {overlap_gain:.2f}x; overlap started {early} of {len(reducers['overlap'].buckets)} bucket(s) during backward")  # fmt: skip
    print(f"time in synchronize() per step on rank 0 (reduction + waiting for the other ranks), median: "
          f"{statistics.median(sync_ms['blocking']):.1f} ms blocking, {statistics.median(sync_ms['overlap']):.1f} ms overlap")  # fmt: skip
    print(f"replicas bitwise identical across ranks: {'yes' if all(d == identical[0] for d in identical) else 'NO'}\n")
    print(f"{'reduction alone (' + f'{g.nbytes / 2**20:.1f} MiB' + ')':<42} {'ms':>8} {'GB/s':>7}")
    for k, v in op_ms.items():
        ms = statistics.median(v)
        print(f"{k:<42} {ms:>8.3f} {g.nbytes / ms / 1e6:>7.2f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=2, help="MPI ranks (ranks x threads <= cores)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--model", choices=sorted(MODELS), default="alexnet_small")
    ap.add_argument("--batch", type=int, default=64, help="images per rank per step")
    ap.add_argument("--steps", type=int, default=5, help="steps per timing")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved timings per variant; the median is kept")
    ap.add_argument("--bucket-mb", type=float, default=25.0, help="bucket size in MiB, ours and DDP's")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds before the mpirun is killed")
    args = ap.parse_args(argv)
    if os.environ.get(CHILD):
        run_rank(args)
        return 0
    relaunch(__file__, args.ranks, sys.argv[1:] if argv is None else argv, CHILD, args.timeout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
