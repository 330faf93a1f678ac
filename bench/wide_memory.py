"""Peak memory of one rank training WideNet split over K ranks, measured beside hpcdnn/memory.py's estimate.

    python bench/wide_memory.py [--ks 1 2 4] [--batch 32] [--steps 2] [--hidden 10240] [--threads 1]

For each K a fresh subprocess plays rank 0 of a K-rank replica: it imports what a training rank imports (the
driver, MPI initialised, the Numba update kernels loaded), builds WideNet(10, 1, 28) on the meta device, keeps only
rank 0's share of every layer (hpcdnn/mpi/partition.py's partition_model; a stand-in communicator gives it the other
ranks' activations as copies of its own, so no mpirun is needed and the buffers have their real sizes), flattens it
(FlatParams), and runs --steps steps of zero_grad, forward, cross-entropy, backward and SGD with momentum (FlatOptimizer)
on a random batch of 28x28x1 images. It prints its peak RSS (ru_maxrss) and memory.rank_bytes for the same rank
(topology local, sgd, momentum 0.9). The table gives the ratio of each peak to K = 1's against the goal 1.15 / K,
also net of the runtime (the RSS before the model), and the machine's load average before and after.
A full 2- or 4-rank MPI run is not made here: this is one rank's share. Always exits 0: it reports, it does not gate.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

CLASSES, SHAPE = 10, (1, 28, 28)  # Fashion-MNIST: (C, H, W) as the model takes one image
GOAL = 1.15  # peak RSS at K ranks <= GOAL / K x the peak at one rank


def peak_rss() -> int:
    """This process's peak resident set size in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class StandInComm:
    """Rank `rank` of a K-rank communicator without MPI: every other rank's piece is a copy of this rank's.

    Gathered and reduced buffers are allocated and filled exactly as with real ranks, so their memory is real; only the
    values differ (they are not needed for a memory measurement).
    """

    def __init__(self, size: int, rank: int = 0) -> None:
        self.size, self.rank = size, rank

    def Get_size(self) -> int:  # noqa: N802 (mpi4py's names)
        return self.size

    def Get_rank(self) -> int:  # noqa: N802
        return self.rank

    def Allgatherv(self, send: np.ndarray, recv) -> None:  # noqa: N802
        buf, counts = recv
        flat, mine, at = buf.reshape(-1), send.reshape(-1), 0
        for c in counts:
            flat[at : at + c] = mine[:c]
            at += c

    def Allreduce(self, send: np.ndarray, recv: np.ndarray, op=None) -> None:  # noqa: N802
        np.copyto(recv, send)


def child(k: int, batch: int, steps: int, hidden: int, threads: int) -> dict:
    """Rank 0's share of WideNet over k ranks: measure its peak RSS through `steps` training steps; the figures as a dict."""
    import torch
    import torch.nn.functional as F
    from mpi4py import MPI  # noqa: F401 (a rank initialises MPI; its memory is part of the runtime)

    import hpcdnn.train  # noqa: F401 (what a training rank imports)
    from hpcdnn import memory
    from hpcdnn.models import FlatParams
    from hpcdnn.models.wide import WideNet
    from hpcdnn.mpi.partition import partition_model, partition_numel, plan
    from hpcdnn.optim import FlatOptimizer

    torch.set_num_threads(threads)
    for kind in ("sgd", "adagrad"):  # load both update kernels, as RUNTIME_BYTES assumes
        FlatOptimizer(kind, torch.zeros(64), torch.zeros(64), momentum=0.9, weight_decay=0.0, eps=1e-10).step(0.1)
    with torch.device("meta"):
        model = WideNet(CLASSES, SHAPE[0], SHAPE[1], hidden=hidden)
    runtime = peak_rss()  # what the rank holds before its model: counted in memory.RUNTIME_BYTES
    per_sample = memory.activation_bytes_per_sample(model, SHAPE)
    params = partition_numel(model, k, 0)
    largest = max(
        len(plan(m, k, 0).rows) * int(np.prod(m.weight.shape[1:]))
        for m in model.modules()
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
    )
    estimate = memory.rank_bytes(params, topology="local", optimizer="sgd", momentum=0.9, batch_size=batch,
                                 activations_bytes=per_sample, largest_param=largest)  # fmt: skip
    t0 = time.perf_counter()
    if k == 1:
        model = model.to_empty(device="cpu")
        model.reset_parameters()
    else:
        model = partition_model(model, StandInComm(k))
    flat = FlatParams(model)
    opt = FlatOptimizer("sgd", flat.data, flat.grad, momentum=0.9, weight_decay=5e-4, eps=1e-10)
    torch.manual_seed(0)
    x, y = torch.randn(batch, *SHAPE), torch.randint(0, CLASSES, (batch,))
    model.train()
    for _ in range(steps):
        flat.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step(0.001)
    return {"k": k, "params": params, "largest": largest, "runtime": runtime, "peak": peak_rss(), "estimate": estimate,
            "runtime_const": memory.RUNTIME_BYTES, "seconds": time.perf_counter() - t0, "loss": loss.item()}  # fmt: skip


def run_child(k: int, args: argparse.Namespace) -> dict | None:
    """One fresh interpreter per K, so no peak carries over; None (with its stderr shown) if it failed."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", str(k), "--batch", str(args.batch), "--steps", str(args.steps),
           "--hidden", str(args.hidden), "--threads", str(args.threads)]  # fmt: skip
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root)
    if r.returncode != 0:
        print(f"K={k} failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
        return None
    return json.loads(r.stdout.strip().splitlines()[-1])


def report(rows: list[dict]) -> None:
    """The table: per K its peak, the ratios to K = 1 against the goal, and the estimate beside the peak."""
    mib = 1 << 20
    print(f"{'K':>2} {'params/rank':>12} {'runtime MiB':>11} {'peak MiB':>9} {'peak/K1':>8} {'goal':>6} {'met':>4} "
          f"{'net/K1':>7} {'estimate MiB':>12} {'est/peak':>8} {'s':>5} {'loss':>6}")  # fmt: skip
    base = rows[0] if rows and rows[0]["k"] == 1 else None
    for r in rows:
        ratio = r["peak"] / base["peak"] if base else float("nan")
        net = (r["peak"] - r["runtime"]) / (base["peak"] - base["runtime"]) if base else float("nan")
        goal = GOAL / r["k"]
        print(f"{r['k']:>2} {r['params']:>12,} {r['runtime'] / mib:>11.0f} {r['peak'] / mib:>9.0f} {ratio:>8.3f} {goal:>6.3f} "
              f"{'yes' if ratio <= goal else 'no':>4} {net:>7.3f} {r['estimate'] / mib:>12.0f} {r['estimate'] / r['peak']:>8.2f} "
              f"{r['seconds']:>5.1f} {r['loss']:>6.2f}")  # fmt: skip
    if rows:
        print(f"runtime = peak RSS after imports, MPI, kernels and the meta model; hpcdnn/memory.py's RUNTIME_BYTES = "
              f"{rows[0]['runtime_const'] / mib:.0f} MiB also covers the data loader")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Parse options; as --child K measure one K, else run every K in a fresh process and print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4], help="ranks per replica to measure (the first should be 1)")
    ap.add_argument("--batch", type=int, default=32, help="images per step")
    ap.add_argument("--steps", type=int, default=2, help="training steps per K")
    ap.add_argument("--hidden", type=int, default=10240, help="WideNet's FC width (10240 = the model's default)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in each measured process")
    ap.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.batch, args.steps, args.hidden, args.threads)))
        return 0
    print(f"WideNet(10, 1, 28, hidden={args.hidden}), batch {args.batch}, {args.steps} steps, {args.threads} torch thread(s), "
          f"{os.cpu_count()} CPUs; rank 0's share of K ranks; peak = ru_maxrss of a fresh process")  # fmt: skip
    load0 = os.getloadavg()
    rows = [r for r in (run_child(k, args) for k in args.ks) if r is not None]
    load1 = os.getloadavg()
    report(rows)
    print(
        f"load average (1/5/15 min) before: {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}, after: {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
