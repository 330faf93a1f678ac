"""Benchmark Sandblaster L-BFGS: an iteration against one pure distributed gradient evaluation, and, with one rank
slowed 3x, dynamic portions with backup tasks against a static equal split.

    python bench/sandblaster.py                      # 2 ranks, then 3 ranks, 1 torch thread each, batch 2048
    python bench/sandblaster.py --ranks 3 --batch 4096 --repeats 7

It relaunches itself as `mpirun -n RANKS python -m mpi4py bench/sandblaster.py ...` for each --ranks. Every rank builds
alexnet_small (28x28x1, dropout off, the objective Sandblaster optimises) on one fixed random batch, so no data set
is needed. Variants, each timed between two barriers (the slowest rank decides), interleaved over --repeats rounds,
median kept:

  pure eval       each rank forward/backward on its 1/RANKS of the batch (chunks of 64, as ours), then one in-place
                  float32 Allreduce of the gradient: the floor any distributed gradient evaluation pays
  L-BFGS iter     one Sandblaster iteration: direction from the sharded history (Gram allreduce, lincomb, allgather),
                  step, and one evaluation with dynamic portions (Fetch_and_op claims, CAS flags, float64 Allreduce)
  with rank 1 slowed 3x (it sleeps twice its compute time after every chunk), and stalled 10x:
  static          the same iteration, portions dealt round robin, nothing re-run
  dynamic         portions claimed from the counter, backups off (sb_backup_after = inf)
  dynamic+backup  claims and backup tasks after --backup-after portion times idle (default: the config's sb_backup_after)

Goals: L-BFGS iter <= 1.15 x pure eval. With rank 1 slowed F times among W ranks, a static split takes F x (1/W of
the work) while ideal dynamic sharing takes 1 / (W - 1 + 1/F): static / dynamic = F (W - 1 + 1/F) / W, for F = 3 2.0
(W = 2) and 2.33 (W = 3), for F = 10 5.5 and 7.0 (on dedicated cores; here ranks share 2 cores with whatever else
runs). Backups pay when the straggler's last portion is the tail: the larger F, the more. Always exits 0.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from launch import relaunch  # bench/launch.py (this script's directory is on sys.path)

from hpcdnn.config import Config

CHILD = "HPCDNN_BENCH_SANDBLASTER_CHILD"
CHUNK = 64


def run_rank(args: argparse.Namespace) -> None:
    """One rank: build the variants, time them interleaved, print the table on rank 0."""
    import torch
    import torch.nn.functional as F
    from mpi4py import MPI

    from hpcdnn.models import build_model
    from hpcdnn.models.flat import FlatParams
    from hpcdnn.mpi.lbfgs import ShardedLBFGS, line_search
    from hpcdnn.mpi.portions import Objective, Portions
    from hpcdnn.mpi.roles import set_threads
    from hpcdnn.topologies.sandblaster_data import ModelPortions, auto_portions

    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    set_threads(args.threads)
    torch.manual_seed(0)
    model = build_model("alexnet_small", 10, (28, 28, 1)).eval()
    flat = FlatParams(model)
    gen = torch.Generator().manual_seed(1)
    images, labels = torch.randn(args.batch, 1, 28, 28, generator=gen), torch.randint(0, 10, (args.batch,), generator=gen)
    count = args.portions or auto_portions(args.batch, world)
    fn = ModelPortions(model, flat, count, CHUNK, dropout=False, seed=0)
    fn.set_batch(images, labels, (0, 0))
    x = fn.x
    slow, stall = dict(slow_rank=1, slow_factor=3.0), dict(slow_rank=1, slow_factor=10.0)
    objectives = {
        "L-BFGS iter": Portions(count, comm=comm, backup_after=args.backup_after),
        "static (3x)": Portions(count, comm=comm, dynamic=False, **slow),
        "dynamic (3x)": Portions(count, comm=comm, backup_after=float("inf"), **slow),
        "dynamic+backup (3x)": Portions(count, comm=comm, backup_after=args.backup_after, **slow),
        "static (10x)": Portions(count, comm=comm, dynamic=False, **stall),
        "dynamic (10x)": Portions(count, comm=comm, backup_after=float("inf"), **stall),
        "dynamic+backup (10x)": Portions(count, comm=comm, backup_after=args.backup_after, **stall),
    }
    objectives = {k: Objective(fn, p, x, comm=comm, weight_decay=5e-4) for k, p in objectives.items()}
    for o in objectives.values():
        o.expected = args.batch
    opt = ShardedLBFGS(flat.numel, args.history, comm=comm)
    share = [k * args.batch // world for k in range(world + 1)]
    grad = flat.to_numpy(grad=True)

    def pure() -> None:
        flat.zero_grad()
        for a in range(share[rank], share[rank + 1], CHUNK):
            b = min(a + CHUNK, share[rank + 1])
            F.cross_entropy(model(images[a:b]), labels[a:b], reduction="sum").backward()
        comm.Allreduce(MPI.IN_PLACE, grad)

    state = {}

    def iteration(objective) -> None:
        if "g" not in state:
            state["f"], state["g"] = objective()
        d, gtd = opt.direction(state["g"])
        ls = line_search(objective, x, d, state["f"], gtd, args.step * (1e-3 if opt.fresh else 1.0), mode="none")
        opt.propose(ls.t, d, ls.g)
        state["f"], state["g"] = ls.f, ls.g

    variants = {"pure eval": pure} | {k: (lambda o=o: iteration(o)) for k, o in objectives.items()}
    for v in variants.values():  # warm-up: compile kernels, fill the history a little
        v()
    times = {k: [] for k in variants}
    names = list(variants)
    for r in range(args.repeats):
        for k in names[r % len(names) :] + names[: r % len(names)]:  # rotate the order each round
            comm.Barrier()
            t0 = time.perf_counter()
            variants[k]()
            comm.Barrier()
            times[k].append(comm.allreduce(time.perf_counter() - t0, op=MPI.MAX))
    stats = {k: comm.allreduce(o.portions.stats.as_array(), op=MPI.SUM) for k, o in objectives.items()}
    if rank == 0:
        med = {k: statistics.median(v) for k, v in times.items()}
        rate = args.batch / med["pure eval"]
        print(f"\n{world} ranks x {args.threads} thread(s), alexnet_small ({flat.param_count:,} parameters), batch {args.batch} in "
              f"{count} portions, history {args.history}, backups after {args.backup_after:g} portion times, {args.repeats} rounds (median); "
              f"pure eval = {rate:.0f} img/s")  # fmt: skip
        print(f"{'variant':<24} {'s/iter':>8} {'vs pure':>8} {'backups':>8} {'discarded':>10}")
        for k in variants:
            s = stats.get(k)
            extra = f"{s[1]:>8d} {s[3]:>10d}" if s is not None else f"{'':>8} {'':>10}"
            print(f"{k:<24} {med[k]:>8.3f} {med[k] / med['pure eval']:>8.3f} {extra}")
        goal = med["L-BFGS iter"] / med["pure eval"]
        print(f"L-BFGS iteration / pure evaluation = {goal:.3f} (goal <= 1.15: {'met' if goal <= 1.15 else 'NOT met'})")
        for f in ("3x", "10x"):
            print(f"slow rank 1 ({f}): static / dynamic = {med[f'static ({f})'] / med[f'dynamic ({f})']:.2f}, "
                  f"static / dynamic+backup = {med[f'static ({f})'] / med[f'dynamic+backup ({f})']:.2f}", flush=True)  # fmt: skip
    for o in objectives.values():
        o.portions.free()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", default="2,3", help="comma-separated rank counts, one mpirun each")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--batch", type=int, default=2048, help="global batch (samples per gradient evaluation)")
    ap.add_argument("--portions", type=int, default=0, help="portions per batch (0 = the driver's auto)")
    ap.add_argument("--history", type=int, default=10, help="L-BFGS memory m")
    ap.add_argument("--backup-after", type=float, default=Config.sb_backup_after, help="idle wait before a backup, in portion times")
    ap.add_argument("--step", type=float, default=0.1, help="fixed step (small: random labels, the point is the timing)")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved timings per variant; the median is kept")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds before an mpirun is killed")
    args = ap.parse_args(argv)
    if os.environ.get(CHILD):
        run_rank(args)
        return 0
    for ranks in [int(r) for r in args.ranks.split(",")]:
        relaunch(__file__, ranks, sys.argv[1:] if argv is None else argv, CHILD, args.timeout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
