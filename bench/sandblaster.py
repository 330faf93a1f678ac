"""Benchmark Sandblaster L-BFGS: an iteration against one pure distributed gradient evaluation; with one rank slowed,
dynamic portions with backup tasks against a static equal split; the per-portion data path against every rank reading
the whole batch; the gradient by Reduce_scatter against a full Allreduce.

    python bench/sandblaster.py                      # 2 ranks, then 3 ranks, 1 torch thread each, batch 2048
    python bench/sandblaster.py --ranks 3 --batch 4096 --repeats 7

It writes a random 28x28x1 data set (4 batches of samples, through `data-prep idx`) to a temporary directory unless
--data is given, then relaunches itself as `mpirun -n RANKS python -m mpi4py bench/sandblaster.py ...` for each
--ranks. Every rank builds alexnet_small (dropout off, the objective Sandblaster optimises). Variants, each timed
between two barriers (the slowest rank decides), interleaved over --repeats rounds, median kept:

  pure eval        each rank forward/backward on its 1/RANKS of the batch (chunks of 64, as ours), then one in-place
                   float32 Allreduce of the gradient: the floor any distributed gradient evaluation pays
  L-BFGS iter      one Sandblaster iteration on a batch already read: direction from the sharded history (Gram
                   allreduce, lincomb, allgather), step, one evaluation with dynamic portions (Fetch_and_op claims,
                   CAS flags), the gradient Reduce_scattered in float64
  ... Allreduce g  the same with the former full-gradient float64 Allreduce (Objective(gradient="full"))
  g Allreduce / g Reduce_scatter   the combine step alone: n+5 float64 Allreduce vs n float64 Reduce_scatter + 5-scalar Allreduce
  new batch, whole / portions      a new batch and its first evaluation: every rank reading and augmenting the whole batch
                   (the former path, kept here as `WholeBatch`: ShardLoader with one prefetch thread) vs each rank reading
                   only the portions it claims (PortionData)
  data, whole / own share          reading and augmenting alone: the whole batch vs 1/RANKS of it
  with rank 1 slowed 3x (it sleeps twice its compute time after every chunk), and stalled 10x:
  static           portions dealt round robin, nothing re-run
  dynamic          portions claimed from the counter, backups off (sb_backup_after = inf)
  dynamic+backup   claims and backup tasks after --backup-after portion times idle (default: the config's sb_backup_after)

Goals: L-BFGS iter <= 1.15 x pure eval. With rank 1 slowed F times among W ranks, a static split takes F x (1/W of
the work) while ideal dynamic sharing takes 1 / (W - 1 + 1/F): static / dynamic = F (W - 1 + 1/F) / W, for F = 3 2.0
(W = 2) and 2.33 (W = 3), for F = 10 5.5 and 7.0 (on dedicated cores; here ranks share the cores with whatever else
runs). Reading a share instead of the whole batch divides the data work by W. The load average is printed with the
results. Always exits 0.
"""

from __future__ import annotations

import argparse
import gzip
import os
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

from launch import relaunch  # bench/launch.py (this script's directory is on sys.path)

from hpcdnn.config import Config

CHILD = "HPCDNN_BENCH_SANDBLASTER_CHILD"
CHUNK = 64
AUG = dict(seed=0, crop=28, pad=2, flip=True, pca_std=0.1)  # the fashion_sandblaster augmentation


def make_data(work: Path, n: int) -> Path:
    """n random 28x28x1 training images (10 classes) as IDX files, through `data-prep idx` into shards in work/data."""
    import numpy as np

    from data_prep import cli

    rng = np.random.default_rng(0)
    (work / "idx").mkdir(parents=True, exist_ok=True)
    for prefix, count in (("train", n), ("t10k", 100)):
        for kind, arr in (("images", rng.integers(0, 256, (count, 28, 28))), ("labels", rng.integers(0, 10, count))):
            arr = arr.astype(np.uint8)
            header = struct.pack(f">BBBB{arr.ndim}i", 0, 0, 0x08, arr.ndim, *arr.shape)
            name = f"{prefix}-{kind}-idx{arr.ndim}-ubyte.gz"
            (work / "idx" / name).write_bytes(gzip.compress(header + arr.tobytes(), mtime=0))
    if cli.main(["idx", "--dir", str(work / "idx"), "--out", str(work / "data")]) != 0:
        raise RuntimeError(f"data-prep idx into {work / 'data'} failed (see above)")
    return work / "data"


class WholeBatch:
    """The former data path, kept as the baseline: every rank reads and augments the whole batch (a one-rank
    ShardLoader of the batch size with one prefetch thread, iterated as the loop did); `portion` slices rows of it."""

    def __init__(self, directory, **kw):
        self.directory, self.kw, self.loader, self.current, self.next = directory, kw, None, None, None

    def batches(self, epoch: int, batch_size: int) -> int:
        from hpcdnn.data.schema import load_manifest

        return load_manifest(self.directory)["splits"]["train"]["count"] // batch_size

    def portion(self, epoch: int, batch: int, batch_size: int, lo: int, hi: int):
        from hpcdnn.data.loader import ShardLoader

        if self.current != (epoch, batch, batch_size):
            if self.next != (epoch, batch, batch_size):  # not the batch the running iterator yields next: start there
                self.close()
                self.loader = ShardLoader(self.directory, "train", batch_size, train=True, prefetch=1, **self.kw)
                self.it = self.loader.iter_epoch(epoch, start_batch=batch)
            self.x, self.y = next(self.it)
            self.current, self.next = (epoch, batch, batch_size), (epoch, batch + 1, batch_size)
        return self.x[lo:hi], self.y[lo:hi]

    def close(self) -> None:
        if self.loader is not None:
            self.loader.close()


def build(args: argparse.Namespace, comm) -> dict:
    """Model, data paths, portion functions and objectives of every variant (collective: the windows)."""
    import numpy as np
    import torch

    from hpcdnn.models import build_model
    from hpcdnn.models.flat import FlatParams
    from hpcdnn.mpi.lbfgs import ShardedLBFGS
    from hpcdnn.mpi.portions import Objective, Portions
    from hpcdnn.topologies.sandblaster_data import ModelPortions, PortionData, auto_portions

    torch.manual_seed(0)
    model = build_model("alexnet_small", 10, (28, 28, 1)).eval()
    flat = FlatParams(model)
    count = args.portions or auto_portions(args.batch, comm.Get_size())
    data = {name: PortionData(args.data, **AUG, workers=args.threads) for name in ("fixed", "new", "alone")}
    data["old"] = WholeBatch(args.data, **AUG, workers=args.threads)
    fns = {name: ModelPortions(model, flat, count, CHUNK, dropout=False, seed=0, data=data[name]) for name in ("fixed", "new", "old")}
    fns["fixed"].set_batch(0, 0, args.batch)
    slow, stall = dict(slow_rank=1, slow_factor=3.0), dict(slow_rank=1, slow_factor=10.0)
    specs = {  # name -> (portion function, Portions settings, gradient)
        "L-BFGS iter": ("fixed", dict(backup_after=args.backup_after), "shard"),
        "L-BFGS iter, Allreduce g": ("fixed", dict(backup_after=args.backup_after), "full"),
        "new batch, whole-batch data": ("old", dict(backup_after=args.backup_after), "shard"),
        "new batch, portion data": ("new", dict(backup_after=args.backup_after), "shard"),
        "static (3x)": ("fixed", dict(dynamic=False, **slow), "shard"),
        "dynamic (3x)": ("fixed", dict(backup_after=float("inf"), **slow), "shard"),
        "dynamic+backup (3x)": ("fixed", dict(backup_after=args.backup_after, **slow), "shard"),
        "static (10x)": ("fixed", dict(dynamic=False, **stall), "shard"),
        "dynamic (10x)": ("fixed", dict(backup_after=float("inf"), **stall), "shard"),
        "dynamic+backup (10x)": ("fixed", dict(backup_after=args.backup_after, **stall), "shard"),
    }
    objectives = {}
    for name, (fn, kw, gradient) in specs.items():
        objectives[name] = Objective(fns[fn], Portions(count, comm=comm, **kw), fns[fn].x, comm=comm, weight_decay=5e-4, gradient=gradient)
        objectives[name].expected = args.batch
    opt = ShardedLBFGS(flat.numel, args.history, comm=comm)
    return dict(model=model, flat=flat, count=count, data=data, fns=fns, objectives=objectives, opt=opt, x=fns["fixed"].x,
                buf=np.zeros(flat.numel + 5), shard=np.empty(opt.hi - opt.lo))  # fmt: skip


def variants(args: argparse.Namespace, comm, b: dict) -> dict:
    """name -> a callable running one instance of the variant on every rank."""
    import torch.nn.functional as F
    from mpi4py import MPI

    from hpcdnn.mpi.lbfgs import line_search

    rank, world, n, opt, data = comm.Get_rank(), comm.Get_size(), b["flat"].numel, b["opt"], b["data"]["alone"]
    share = [k * args.batch // world for k in range(world + 1)]
    images, labels = data.portion(0, 0, args.batch, share[rank], share[rank + 1])
    grad, state, batches = b["flat"].to_numpy(grad=True), {}, data.batches(0, args.batch)
    counts = [hi - lo for lo, hi in opt.ranges]

    def pure() -> None:
        b["flat"].zero_grad()
        for a in range(0, len(labels), CHUNK):
            F.cross_entropy(b["model"](images[a : a + CHUNK]), labels[a : a + CHUNK], reduction="sum").backward()
        comm.Allreduce(MPI.IN_PLACE, grad)

    def iteration(objective) -> None:
        if "g" not in state:  # ShardedLBFGS takes the shard or the full vector: the variants share one state
            state["f"], state["g"] = objective()
        d, gtd = opt.direction(state["g"])
        ls = line_search(objective, b["x"], d, state["f"], gtd, args.step * (1e-3 if opt.fresh else 1.0), mode="none")
        opt.propose(ls.t, d, ls.g)
        state["f"], state["g"] = ls.f, ls.g

    def new_batch(name: str, fn) -> None:
        state[name] = state.get(name, 0) + 1  # a different batch every time: nothing cached
        fn.set_batch(0, state[name] % batches, args.batch)
        b["objectives"][name]()

    def data_only(lo: int, hi: int) -> None:
        state["data"] = state.get("data", 0) + 1  # a new batch every time, as a rank sees it
        data.portion(1, state["data"] % batches, args.batch, lo, hi)

    out = {"pure eval": pure}
    out |= {k: (lambda o=o: iteration(o)) for k, o in b["objectives"].items() if not k.startswith("new batch")}
    out |= {
        k: (lambda k=k, fn=b["fns"][key]: new_batch(k, fn))
        for k, key in (("new batch, whole-batch data", "old"), ("new batch, portion data", "new"))
    }
    out["data, whole batch"] = lambda: data_only(0, args.batch)
    out["data, own share"] = lambda: data_only(share[rank], share[rank + 1])
    out["g Allreduce"] = lambda: comm.Allreduce(MPI.IN_PLACE, b["buf"])
    out["g Reduce_scatter"] = lambda: (comm.Reduce_scatter(b["buf"][:n], b["shard"], counts), comm.Allreduce(MPI.IN_PLACE, b["buf"][n:]))
    return out


def timed(comm, runs: dict, repeats: int) -> dict:
    """Median seconds per variant (max over ranks), the variants interleaved and rotated each round, after one warm-up."""
    from mpi4py import MPI

    for v in runs.values():  # warm-up: compile kernels, fill the history a little, read the fixed batch
        v()
    times = {k: [] for k in runs}
    names = list(runs)
    for r in range(repeats):
        for k in names[r % len(names) :] + names[: r % len(names)]:
            comm.Barrier()
            t0 = time.perf_counter()
            runs[k]()
            comm.Barrier()
            times[k].append(comm.allreduce(time.perf_counter() - t0, op=MPI.MAX))
    return {k: statistics.median(v) for k, v in times.items()}


def report(args: argparse.Namespace, world: int, b: dict, med: dict, stats: dict) -> None:
    """The table and the ratios (rank 0)."""
    print(f"\n{world} ranks x {args.threads} thread(s), alexnet_small ({b['flat'].param_count:,} parameters), batch {args.batch} in "
          f"{b['count']} portions, history {args.history}, backups after {args.backup_after:g} portion times, {args.repeats} rounds (median); "
          f"pure eval = {args.batch / med['pure eval']:.0f} img/s; load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")  # fmt: skip
    print(f"{'variant':<30} {'s/iter':>8} {'vs pure':>8} {'backups':>8} {'discarded':>10}")
    for k in med:
        s = stats.get(k)
        extra = f"{s[1]:>8d} {s[3]:>10d}" if s is not None else f"{'':>8} {'':>10}"
        print(f"{k:<30} {med[k]:>8.4f} {med[k] / med['pure eval']:>8.3f} {extra}")
    goal = med["L-BFGS iter"] / med["pure eval"]
    print(f"L-BFGS iteration / pure evaluation = {goal:.3f} (goal <= 1.15: {'met' if goal <= 1.15 else 'NOT met'})")
    print(f"gradient: Allreduce / Reduce_scatter = {med['g Allreduce'] / med['g Reduce_scatter']:.2f} (combine alone), "
          f"{med['L-BFGS iter, Allreduce g'] / med['L-BFGS iter']:.3f} (whole iteration)")  # fmt: skip
    print(f"data path: whole batch / own portions = {med['data, whole batch'] / med['data, own share']:.2f} (reading alone), "
          f"{med['new batch, whole-batch data'] / med['new batch, portion data']:.3f} (new batch + first evaluation)")  # fmt: skip
    for f in ("3x", "10x"):
        print(f"slow rank 1 ({f}): static / dynamic = {med[f'static ({f})'] / med[f'dynamic ({f})']:.2f}, "
              f"static / dynamic+backup = {med[f'static ({f})'] / med[f'dynamic+backup ({f})']:.2f}", flush=True)  # fmt: skip


def run_rank(args: argparse.Namespace) -> None:
    """One rank: build the variants, time them interleaved, print the table on rank 0."""
    from mpi4py import MPI

    from hpcdnn.placement import set_threads

    comm = MPI.COMM_WORLD
    set_threads(args.threads)
    b = build(args, comm)
    med = timed(comm, variants(args, comm, b), args.repeats)
    stats = {k: comm.allreduce(o.portions.stats.as_array(), op=MPI.SUM) for k, o in b["objectives"].items()}
    if comm.Get_rank() == 0:
        report(args, comm.Get_size(), b, med, stats)
    for o in b["objectives"].values():
        o.portions.free()
    for d in b["data"].values():
        d.close()


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
    ap.add_argument("--data", default="", help="shards of 28x28x1 images with >= 2 batches (default: a random set, written once)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds before an mpirun is killed")
    args = ap.parse_args(argv)
    if os.environ.get(CHILD):
        run_rank(args)
        return 0
    argv = sys.argv[1:] if argv is None else argv
    with tempfile.TemporaryDirectory(prefix="bench-sandblaster-") as tmp:
        if not args.data:
            argv = [*argv, "--data", str(make_data(Path(tmp), 4 * args.batch))]
        for ranks in [int(r) for r in args.ranks.split(",")]:
            relaunch(__file__, ranks, argv, CHILD, args.timeout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
