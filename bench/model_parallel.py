"""Benchmark model-parallel replicas (--mp=K) side by side in one run: AlexNet's two towers against the whole model on
the same cores, and the peak memory per rank of the wide model split K ways.

    make bench-model-parallel
    python bench/model_parallel.py [--batch 32] [--steps 4] [--wide-batch 32] [--ks 1,2,4]

Cases, each a fresh process (or mpirun) launched from here:
  whole   the paper's AlexNet (227 px, 1000 classes) in one process with 2 torch threads: forward + backward images/s.
  towers  the same model as hpcdnn.mpi.towers.AlexNetTowers on 2 ranks x 1 thread (the same 2 cores): images/s, the
          bytes each rank sent per step (exchange.STATS) against what data parallelism sends per step (the gradient,
          ring allreduce: 2 x 4 bytes x parameters x (K-1)/K), and the share of the step spent in the exchanges.
  data    both ranks of a replica read the same batch (same seed, no message; what `train` does) vs rank 0 reads and
          broadcasts it: seconds per batch on Fashion-MNIST shards.
  wide K  the wide model (hpcdnn/models/wide.py) split over K ranks (K = 1: whole), each rank built from the meta
          device so that it never holds more than its partition; 2 steps of forward, backward and an SGD update;
          peak resident memory (ru_maxrss) of the largest rank, its ratio to K = 1 and the goal 1.15 / K, also without
          the runtime (the peak before the model is built: torch, Numba, MPI), which every rank pays whatever K.
Goals (issue 13): towers >= 0.9x whole; memory <= 1.15 x (1/K) of K = 1. Inputs are fixed random batches. The load
average before the run is printed beside the figures: numbers taken while the cores are shared mean little.
Always exits 0: it reports, it does not gate.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def timed_exchanges() -> dict:
    """Wrap the exchange primitives with a wall-clock counter (seconds spent inside MPI exchanges)."""
    from hpcdnn.mpi import exchange

    spent = {"s": 0.0}
    for name in ("_gather", "_reduce_scatter", "_allreduce"):
        inner = getattr(exchange, name)

        def wrapped(*a, _inner=inner, **k):
            t = time.perf_counter()
            try:
                return _inner(*a, **k)
            finally:
                spent["s"] += time.perf_counter() - t

        setattr(exchange, name, wrapped)
    return spent


def alexnet_case(mode: str, batch: int, steps: int) -> dict:
    """whole (1 process) or towers (this rank of 2): best-of-steps images/s of forward + backward."""
    import torch
    import torch.nn.functional as F

    from hpcdnn.models import AlexNet
    from hpcdnn.models.flat import FlatParams

    comm = None
    spent = {"s": 0.0}
    torch.manual_seed(0)
    model = AlexNet(1000)
    if mode == "towers":
        from mpi4py import MPI

        from hpcdnn.mpi import exchange
        from hpcdnn.mpi.towers import AlexNetTowers

        comm = MPI.COMM_WORLD
        spent = timed_exchanges()
        model = AlexNetTowers(model, comm)
    flat = FlatParams(model)
    x, y = torch.randn(batch, 3, 227, 227), torch.randint(0, 1000, (batch,))
    times, exchange_s, sent = [], [], 0
    for i in range(steps + 1):
        if comm is not None:
            comm.Barrier()
            exchange.STATS.reset()
        spent["s"] = 0.0
        t = time.perf_counter()
        flat.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if i:  # the first step warms up
            times.append(time.perf_counter() - t)
            exchange_s.append(spent["s"])
            if comm is not None:
                sent = exchange.STATS.forward_bytes + exchange.STATS.backward_bytes
    best = min(range(len(times)), key=times.__getitem__)
    out = {"images_per_s": batch / times[best], "step_s": times[best], "exchange_s": exchange_s[best], "sent_bytes": sent,
           "parameters": flat.param_count}  # fmt: skip
    if comm is not None:
        every = comm.gather(out, root=0)
        out = every[0] if every else out
        if every:
            out["parameters"] = sum(e["parameters"] for e in every)
            out["sent_bytes"] = max(e["sent_bytes"] for e in every)
            out["exchange_s"] = max(e["exchange_s"] for e in every)
    return out


def wide_case(k: int, batch: int) -> dict:
    """This rank's share of the wide model (K ranks; K = 1 whole): 2 SGD steps, then the largest rank's peak RSS."""
    import torch
    import torch.nn.functional as F

    from hpcdnn.models import build_model
    from hpcdnn.models.flat import FlatParams

    comm = None
    if k > 1:
        from mpi4py import MPI  # noqa: F401  (MPI's own memory belongs to the runtime)
    runtime = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # imports and MPI, before the model
    torch.manual_seed(0)
    if k == 1:
        model = build_model("wide", 10, (28, 28, 1))
    else:
        from mpi4py import MPI

        from hpcdnn.mpi.partition import partition_model

        comm = MPI.COMM_WORLD
        with torch.device("meta"):
            meta = build_model("wide", 10, (28, 28, 1))
        model = partition_model(meta, comm)
    flat = FlatParams(model)
    x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    for _ in range(2):
        flat.zero_grad()
        F.cross_entropy(model(x), y).backward()
        with torch.no_grad():
            flat.data.add_(flat.grad, alpha=-0.001)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = {"peak_rss": rss, "runtime": runtime, "parameters": flat.param_count}
    if comm is not None:
        every = comm.gather(out, root=0)
        if every:
            top = max(every, key=lambda e: e["peak_rss"])
            out = {"peak_rss": top["peak_rss"], "runtime": top["runtime"], "parameters": sum(e["parameters"] for e in every)}
    return out


def data_case(data: str, batch: int, steps: int) -> dict:
    """2 ranks of a replica need the same batch: both read it (same seed, no message) or rank 0 reads and broadcasts.
    Seconds per batch of each way (the loader's own prefetch thread hides reading only if a core is free for it)."""
    import numpy as np
    from mpi4py import MPI

    from hpcdnn.data.loader import ShardLoader

    comm = MPI.COMM_WORLD
    out = {}
    for way in ("both read", "read + bcast"):
        loader = (
            ShardLoader(data, "train", batch, rank=0, world=1, seed=0, train=True, pad=2) if way == "both read" or comm.rank == 0 else None
        )
        it = iter(loader) if loader else None
        shape = None
        comm.Barrier()
        t = time.perf_counter()
        for _ in range(steps):
            x = next(it)[0].numpy() if it else None
            if way == "read + bcast":
                shape = comm.bcast(x.shape if x is not None else None, root=0)
                buf = x if x is not None else np.empty(shape, np.float32)
                comm.Bcast(buf, root=0)
        comm.Barrier()
        out[way] = (time.perf_counter() - t) / steps
        if loader:
            loader.close()
    return out


def launch(ranks: int, threads: int, *args: str, timeout: float = 1800) -> dict:
    """Run this file's worker mode as one process (ranks = 1) or under mpirun; its JSON result."""
    from hpcdnn.mpirun import mpirun

    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", *args]
    if ranks > 1:
        cmd = [*mpirun(ranks), sys.executable, "-m", "mpi4py", str(Path(__file__).resolve()), "--worker", *args]
    env = {**os.environ, **{v: str(threads) for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")}}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {r.returncode}:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def report(args) -> None:
    load = os.getloadavg()
    print(f"model-parallel benchmark, load average {load[0]:.2f} {load[1]:.2f} (2-core machine), {time.strftime('%Y-%m-%d %H:%M')}")
    single = launch(1, 1, "alexnet", "whole", str(args.batch), str(args.steps))
    whole = launch(1, 2, "alexnet", "whole", str(args.batch), str(args.steps))
    towers = launch(2, 1, "alexnet", "towers", str(args.batch), str(args.steps))
    dp = 2 * 4 * whole["parameters"] * (2 - 1) / 2  # ring allreduce of the fp32 gradient over 2 ranks, per rank
    print(f"AlexNet 227 px, batch {args.batch}, forward+backward (best of {args.steps} steps):")
    print(f"  whole, 1 rank x 1 thread      {single['images_per_s']:8.1f} img/s   (one core, for scale)")
    print(f"  whole, 1 rank x 2 threads     {whole['images_per_s']:8.1f} img/s")
    print(
        f"  two towers, 2 ranks x 1 thread {towers['images_per_s']:7.1f} img/s   ratio {towers['images_per_s'] / whole['images_per_s']:.2f}x (goal >= 0.9)"
    )
    print(f"  sent per rank per step: towers {towers['sent_bytes'] / 1e6:.2f} MB vs data parallelism's gradient {dp / 1e6:.1f} MB "
          f"({towers['sent_bytes'] / dp:.3f}x); exchanges {towers['exchange_s'] / towers['step_s']:.1%} of the step")  # fmt: skip
    if Path(args.data, "manifest.json").is_file():
        d = launch(2, 1, "data", args.data, str(args.data_batch), "50")
        print(f"one batch of {args.data_batch} for both ranks of a replica ({args.data}): both read {d['both read'] * 1e3:.2f} ms, "
              f"rank 0 reads + Bcast {d['read + bcast'] * 1e3:.2f} ms")  # fmt: skip
    else:
        print(f"(no data set at {args.data}: `make bench` prepares it; the read-vs-broadcast case is skipped)")
    base = None
    for k in args.ks:
        w = launch(k, 1, "wide", str(k), str(args.wide_batch))
        base = base or (w if k == 1 else None)
        ratio = "(no K=1 figure)"
        if base:
            net = (w["peak_rss"] - w["runtime"]) / (base["peak_rss"] - base["runtime"])
            ratio = f"{w['peak_rss'] / base['peak_rss']:.3f} of K=1, {net:.3f} without the runtime (goal <= {1.15 / k:.3f})"
        print(f"  wide model ({w['parameters']:,} parameters), K={k}: peak RSS of the largest rank {w['peak_rss'] / 2**30:.2f} GiB "
              f"(runtime {w['runtime'] / 2**30:.2f} GiB before the model), {ratio}")  # fmt: skip


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        kind, *rest = sys.argv[2:]
        if kind == "data":
            out = data_case(rest[0], int(rest[1]), int(rest[2]))
        elif kind == "alexnet":
            out = alexnet_case(rest[0], int(rest[1]), int(rest[2]))
        else:
            out = wide_case(int(rest[0]), int(rest[1]))
        rank = 0
        if "mpi4py" in sys.modules:
            from mpi4py import MPI

            rank = MPI.COMM_WORLD.Get_rank()
        if rank == 0:
            print(json.dumps(out), flush=True)
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32, help="AlexNet images per step")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per case (after one warm-up step)")
    ap.add_argument("--wide-batch", type=int, default=32, help="wide-model images per step")
    ap.add_argument("--data", default=str(REPO / "data" / "fashion-mnist"), help="shards for the read-vs-broadcast case")
    ap.add_argument("--data-batch", type=int, default=128, help="images per batch in the read-vs-broadcast case")
    ap.add_argument("--ks", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4], help="partitions of the wide model")
    report(ap.parse_args())


if __name__ == "__main__":
    main()
