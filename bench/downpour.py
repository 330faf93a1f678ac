"""Benchmark Downpour's parameter server: RMA push/fetch vs memcpy, server overhead per AlexNet step, and images/s.

    python bench/downpour.py [--mpi-prefix "mpirun ..."] [--steps 120] [--skip-train]

Part 1 (mpirun -n 2: one server, one worker; AlexNet-sized flat vector of 61M float32 = 244 MB):
  fetch atomic   MPI_Get_accumulate(NO_OP) of every shard (what workers use)      bytes: 1 vector
  fetch plain    MPI_Get (not atomic against concurrent accumulates)               bytes: 1 vector
  push sgd       sgd_delta kernel + MPI_Accumulate(SUM)                             bytes: 1 vector
  push adagrad   square + MPI_Get_accumulate(SUM) of the accumulator + delta kernel + MPI_Accumulate(SUM)
  put (inbox)    MPI_Put of the gradient: the push of the server-side-update design we did not choose
  memcpy         np.copyto of the same 244 MB, in the same process, interleaved with the above
  Ratio "push+fetch vs memcpy" = time(2 memcpys) / time(push + fetch) (goal >= 0.5).
Part 2 (same ranks): AlexNet (227x227, batch 32) steps on the worker, local optimizer vs Downpour push+fetch;
  overhead = (downpour step - local step) / local step (goal < 5%).
Part 3: `hpcdnn train` on Fashion-MNIST alexnet_small for --steps steps per worker with 2 workers (1 thread each):
  images/s of local (1 process, 2 threads), allreduce (2 ranks), downpour (1 server + 2 workers).
Interleaved repetitions, best (part 1) or median (part 2) kept; ratios are measured side by side in one run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from launch import mpirun  # bench/launch.py (this script's directory is on sys.path)

REPO = Path(__file__).resolve().parent.parent
N = 61_000_000


# ---- parts 1 and 2: run under mpirun -n 2 (rank 0 serves, rank 1 works)
def rma_part(repeats: int, alexnet_steps: int) -> None:
    from mpi4py import MPI

    from hpcdnn.mpi.roles import split_roles
    from hpcdnn.placement import set_threads

    comm = MPI.COMM_WORLD
    roles = split_roles(comm, 1)
    set_threads(2 if not roles.is_server else 1)
    results = {}
    for kind in ("sgd", "adagrad"):
        results |= vector_traffic(roles, kind, repeats)
    if alexnet_steps:
        results |= alexnet_steps_part(roles, alexnet_steps)
    if not roles.is_server:
        print("RESULT " + json.dumps(results), flush=True)


def vector_traffic(roles, kind: str, repeats: int) -> dict:
    """Part 1: fetches, the push of `kind`, a Put and a memcpy of the AlexNet-sized vector; best of `repeats`."""
    import torch

    from hpcdnn.config import Config
    from hpcdnn.kernels import update
    from hpcdnn.mpi import control as ctl
    from hpcdnn.mpi.downpour import DownpourWorker
    from hpcdnn.mpi.param_server import ParamServer

    cfg = Config(optimizer=kind, momentum=0.9, weight_decay=5e-4)
    ps = ParamServer(roles, N, adagrad=kind == "adagrad")
    roles.comm.Barrier()
    results = {}
    if roles.is_server:
        ps.serve()
    else:
        host = np.random.default_rng(0).standard_normal(N).astype(np.float32)
        grad = (host * 1e-3).astype(np.float32)
        ps.load(host)
        scratch = np.empty_like(host)

        class Flat:  # all the worker reads of a model here: its flat parameter vector
            numel, device = N, torch.device("cpu")

            def to_numpy(self, grad=False, _host=host):
                return _host

        worker = DownpourWorker(ps, Flat(), cfg, 0)
        worker.acc_view = grad

        def fetch_plain():
            ps.atomic_fetch = False
            ps.fetch(host)
            ps.atomic_fetch = True

        ops = {"fetch atomic": lambda: ps.fetch(host), "fetch plain": fetch_plain,
               f"push {kind}": lambda: worker._apply(grad, np.float32(-1e-4)),
               "put (inbox)": lambda: ps.params.put(grad, roles.servers[0]), "memcpy": lambda: np.copyto(scratch, grad)}  # fmt: skip
        times = {k: [] for k in ops}
        for _ in range(repeats):
            for name, op in ops.items():
                t = time.perf_counter()
                op()
                times[name].append(time.perf_counter() - t)
        results = {k: min(v) for k, v in times.items()}
        ps.control.add(ctl.DONE)  # release the server
        assert update.grad_is_finite(host)
    ps.free()
    return results


def alexnet_steps_part(roles, steps: int) -> dict:
    """Part 2: an AlexNet step with the local optimizer vs with Downpour push + fetch (n_fetch = n_push = 1)."""
    import torch
    import torch.nn.functional as F

    from hpcdnn.config import Config
    from hpcdnn.models import build_model
    from hpcdnn.models.flat import FlatParams
    from hpcdnn.mpi.downpour import DownpourWorker
    from hpcdnn.mpi.param_server import ParamServer
    from hpcdnn.optim import FlatOptimizer

    torch.manual_seed(0)
    model = build_model("alexnet", 1000, (256, 256, 3), 227)
    flat = FlatParams(model)
    ps = ParamServer(roles, flat.numel, adagrad=True)
    if roles.is_root:
        ps.load(flat.to_numpy())
    roles.comm.Barrier()
    results = {}
    if roles.is_server:
        ps.serve()
    else:
        x, y = torch.randn(32, 3, 227, 227), torch.randint(0, 1000, (32,))
        opt = FlatOptimizer("adagrad", flat.data, flat.grad, momentum=0, weight_decay=5e-4, eps=1e-10)
        worker = DownpourWorker(ps, flat, Config(optimizer="adagrad", weight_decay=5e-4), 0)
        worker.start(resumed=False)
        local, dp, comm_only = [], [], []
        for i in range(steps + 1):
            for which in ("local", "downpour"):
                t = time.perf_counter()
                flat.zero_grad()
                F.cross_entropy(model(x), y).backward()
                t_compute = time.perf_counter()
                opt.step(1e-4) if which == "local" else worker.step(1e-4, 0, i)
                t_end = time.perf_counter()
                if i:  # the first round warms up
                    (local if which == "local" else dp).append(t_end - t)
                    if which == "downpour":
                        comm_only.append(t_end - t_compute)
        worker.finish(1e-4, 0, steps)
        results = {"alexnet local step": statistics.median(local), "alexnet downpour step": statistics.median(dp),
                   "alexnet push+fetch": statistics.median(comm_only)}  # fmt: skip
    ps.free()
    return results


# ---- part 3: the trainer, three topologies
def train_part(steps: int, data: Path) -> dict:
    out, common = {}, ["--config=fashion_small", f"--data={data}", f"--max_steps={steps}", "--log_every=1000", "--epochs=8"]

    def mpi_train(n: int, *args: str) -> list[str]:
        return [*mpirun(n), sys.executable, "-m", "mpi4py", "-m", "hpcdnn", "train", *common, *args]

    runs = {
        "local (1 process, 2 threads)": [sys.executable, "-m", "hpcdnn", "train", *common, "--threads=2"],
        "allreduce (2 ranks x 1 thread)": mpi_train(2, "--topology=allreduce", "--threads=1"),
        "downpour (1 server + 2 workers x 1 thread)": mpi_train(
            3, "--topology=downpour", "--optimizer=adagrad", "--lr=0.01", "--threads=1"
        ),
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name, cmd in runs.items():
            run = Path(tmp) / name.split()[0]
            r = subprocess.run([*cmd, f"--run_dir={run}"], capture_output=True, text=True, cwd=REPO, timeout=3600)
            if r.returncode:
                print(r.stdout[-2000:], r.stderr[-2000:])
                raise SystemExit(f"{name} failed")
            out[name] = json.loads((run / "summary.json").read_text())["images_per_s"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--alexnet-steps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=120, help="trainer steps per worker in part 3")
    ap.add_argument("--data", default=str(REPO / "data" / "fashion-mnist"))
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--rma-part", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rma_part:
        return rma_part(args.repeats, args.alexnet_steps)
    cmd = [*mpirun(2), sys.executable, "-m", "mpi4py", __file__, "--rma-part", f"--repeats={args.repeats}",
           f"--alexnet-steps={args.alexnet_steps}"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=3600)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    if r.returncode or not lines:
        raise SystemExit(f"RMA part failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    res = json.loads(lines[0][7:])
    gb = N * 4 / 1e9
    print(f"Downpour parameter server, 1 server + 1 worker, {N / 1e6:.0f}M float32 ({gb * 1e3:.0f} MB), best of {args.repeats}")
    print(f"{'operation':<16}{'ms':>9}{'GB/s':>9}")
    for k in ("memcpy", "fetch atomic", "fetch plain", "push sgd", "push adagrad", "put (inbox)"):
        print(f"{k:<16}{res[k] * 1e3:9.1f}{gb / res[k]:9.2f}")
    for push in ("sgd", "adagrad"):
        for fetch in ("atomic", "plain"):
            ratio = 2 * res["memcpy"] / (res[f"push {push}"] + res[f"fetch {fetch}"])
            print(f"push {push} + fetch {fetch}: {ratio:.2f}x memcpy of the same bytes (goal >= 0.5)")
    if "alexnet local step" in res:
        loc, dp, c = res["alexnet local step"], res["alexnet downpour step"], res["alexnet push+fetch"]
        print(f"\nAlexNet 227x227 batch 32, Adagrad, n_fetch = n_push = 1 (median of {args.alexnet_steps}): local step {loc:.3f} s, "
              f"Downpour step {dp:.3f} s (push+fetch {c * 1e3:.0f} ms): overhead {100 * (dp - loc) / loc:+.1f}% "
              f"(push+fetch = {100 * c / dp:.1f}% of the step; goal < 5%)")  # fmt: skip
    if args.skip_train:
        return
    data = Path(args.data)
    if not (data / "manifest.json").exists():
        raise SystemExit(
            f"{data} has no manifest.json: run `make demo` or data-prep idx --dir /usr/share/datasets/fashion-mnist --out {data}"
        )
    rates = train_part(args.steps, data)
    print(f"\nhpcdnn train, Fashion-MNIST alexnet_small, batch 128 per worker, {args.steps} steps per worker (images/s, all workers)")
    base = rates["local (1 process, 2 threads)"]
    for k, v in rates.items():
        print(f"{k:<44}{v:9.1f}  {v / base:5.2f}x local")


if __name__ == "__main__":
    main()
