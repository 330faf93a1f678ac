"""Benchmark Downpour's parameter server on one host: the server-side design (the library: the worker Puts its
gradient, the server applies SGD/Adagrad, the worker Gets the parameters) against the worker-side design it replaced
(re-implemented in bench/downpour_case.py: the worker computes the update and applies it with MPI accumulates).

    python bench/downpour.py [--repeats 5] [--alexnet-steps 5] [--seconds 3] [--steps 80] [--skip-train]

Part 1 (mpirun -n 2: 1 server, 1 worker with 2 threads; AlexNet's flat vector, 60,965,224 float32 + alignment
padding, 244 MB; the gradient of one real AlexNet batch): one push and one fetch, n_push = n_fetch = 1.
  server-side  push = credit check + finite check + MPI_Put of the gradient (fp32, or bf16 words) + header;
               apply = waiting until the server has applied it (SGD momentum 0.9 or Adagrad, weight decay 5e-4, on
               the server's 1 or 2 Numba threads: 1 is what a server gets by default, 2 what --threads=2 gives it);
               fetch = the seqlock MPI_Get of the published buffer.
  worker-side  push = finite check + (Adagrad) square kernel, MPI_Get_accumulate(SUM) of g^2, delta kernel,
               MPI_Accumulate(SUM) of the step, in 1M-float pieces, (SGD) delta kernel with worker-side momentum and
               MPI_Accumulate; fetch = MPI_Get_accumulate(NO_OP).
  memcpy       np.copyto of the same bytes in the worker.
  "vs memcpy" = time(2 memcpys) / time(push + fetch), goal >= 0.5 for Adagrad too; old/new = time(worker-side) /
  time(server-side). B/param = bytes MPI moves per parameter (push / fetch), by construction. Best of --repeats
  interleaved rounds (the median of push+fetch beside it, and "paired": the median over rounds of the ratio within
  a round, steadier when other jobs come and go).
Part 2 (same ranks): AlexNet 227x227, batch 32, Adagrad, n_fetch = n_push = 1: a local step (forward, backward,
  Adagrad) against a Downpour step (forward, backward, push + fetch) in both designs, --alexnet-steps interleaved,
  medians; overhead = (downpour step - local step) / local step, goal < 5% (and "paired": the median over rounds of
  the overhead within a round).
Part 3 (mpirun -n 9 --oversubscribe: 1 server + 8 workers, every rank 1 thread: 9 RANKS SHARE 2 CORES): a tiny
  model of --n floats; every worker pushes (never fetches) as fast as its credit allows for --seconds; pushes/s the
  server applied (its VERSION word) against two ceilings measured in this process: the memory-bandwidth bound =
  memcpy bandwidth (256 MiB np.copyto, read + write bytes) / bytes an apply touches (read gradient, read params,
  write params, read + write the momentum or sum of squares: 20 B/param), and the apply kernel alone on 1 thread.
Part 4: `hpcdnn train` on Fashion-MNIST alexnet_small, --steps steps per worker, 1 thread per rank: images/s of
  local (1 process, 2 threads), allreduce (2 ranks), downpour (1 server + 2 workers, Adagrad).
Ratios are measured side by side in one run; the 1-minute load average is printed beside every figure (other jobs
on this machine show there). It reports and always exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from launch import mpirun  # bench/launch.py (this script's directory is on sys.path)

REPO = Path(__file__).resolve().parent.parent
CASE = Path(__file__).resolve().parent / "downpour_case.py"
WIRE = {"sgd": "4/4", "adagrad": "4/4", "adagrad bf16": "2/4", "old sgd": "4/4", "old adagrad": "12/4"}  # B/param push/fetch


def load() -> float:
    return os.getloadavg()[0]


def run_case(ranks: int, part: str, *argv: str, timeout: float = 900) -> dict | None:
    """bench/downpour_case.py PART under mpirun; its JSON, or None after printing why not."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [*mpirun(ranks), sys.executable, "-m", "mpi4py", str(CASE), part, f"--out={out}", *argv]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=timeout)
        except subprocess.TimeoutExpired:
            print(f"{part}: mpirun -n {ranks} did not finish in {timeout:.0f} s (load {load():.2f})")
            return None
        if r.returncode or not out.exists():
            print(f"{part}: {' '.join(cmd)} exited {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
            return None
        return json.loads(out.read_text())


def ceilings(n: int, repeats: int = 7) -> dict:
    """One thread, this process: memcpy bandwidth of 256 MiB and of the tiny model (read + write bytes / s), and the
    server's apply kernels alone on n floats (s per apply, best)."""
    import numpy as np

    from hpcdnn.kernels import update
    from hpcdnn.kernels.jit import numba_threads

    numba_threads(1)

    def best(fn, reps: int) -> float:
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)

    big, small = (np.ones(m, np.float32) for m in (1 << 26, n))
    dst = np.empty_like(big)
    out = {"dram_bw": 2 * big.nbytes / best(lambda: np.copyto(dst, big), repeats)}
    sdst = np.empty_like(small)
    out["cache_bw"] = 2 * small.nbytes / (best(lambda: [np.copyto(sdst, small) for _ in range(100)], repeats) / 100)
    front, back, g, state = small.copy(), np.empty_like(small), small * np.float32(1e-3), np.zeros_like(small)
    for name, fn in {
        "sgd": lambda: update.sgd(front, g, state, 1e-6, momentum=0.9, weight_decay=5e-4, out=back),
        "adagrad": lambda: update.adagrad(front, g, state, 1e-6, eps=1e-10, weight_decay=5e-4, out=back),
    }.items():
        fn()  # compile / warm
        out[f"apply {name}"] = best(fn, 20 * repeats)
    return out


def print_vector(res: dict, repeats: int, steps: int) -> None:
    p1, n = res["part1"], res["numel"]
    mb = n * 4 / 1e6
    print(f"{res['mpi']}\nPart 1: push + fetch of AlexNet's flat vector ({res['param_count']:,} parameters, {n:,} float32 with "
          f"padding, {mb:.0f} MB), 1 server + 1 worker (2 threads), best of {repeats} interleaved rounds")  # fmt: skip
    print(f"{'variant':<24}{'push ms':>9}{'apply ms':>10}{'fetch ms':>10}{'push+fetch':>12}{'(median)':>10}{'vs memcpy':>11}"
          f"{'paired':>8}{'B/param':>9}{'load':>7}")  # fmt: skip
    memcpy = min(r[0] for r in p1["memcpy"])
    best = {}
    for k, rows in p1.items():
        b = min(rows, key=lambda r: r[0] + r[1] + r[2])
        total, med = sum(b[:3]), statistics.median(r[0] + r[1] + r[2] for r in rows)
        best[k] = total
        paired = statistics.median(2 * m[0] / sum(r[:3]) for m, r in zip(p1["memcpy"], rows))
        ratio = f"{2 * memcpy / total:10.2f}x{paired:7.2f}x" if k != "memcpy" else f"{'':>19}"
        wire = WIRE.get(k.split(" (")[0], "")
        print(f"{k:<24}{b[0] * 1e3:9.1f}{b[1] * 1e3:10.1f}{b[2] * 1e3:10.1f}{total * 1e3:12.1f}{med * 1e3:10.1f}{ratio}"
              f"{wire:>9}{statistics.mean(r[3] for r in rows):7.2f}")  # fmt: skip
    print(f"memcpy: {mb / memcpy / 1e3:.1f} GB/s copied; goal push+fetch >= 0.5x memcpy for Adagrad too (worker-side was 0.39x)")
    for opt in ("sgd", "adagrad"):
        for thr in (1, 2):
            k = f"{opt} ({thr} thr)"
            print(f"{opt:<8} server-side, server {thr} thread(s): {best[f'old {opt}'] / best[k]:.2f}x faster than worker-side "
                  f"(push+fetch {best[k] * 1e3:.0f} vs {best[f'old {opt}'] * 1e3:.0f} ms); load "
                  f"{statistics.mean(r[3] for r in p1[k]):.2f}")  # fmt: skip
    if "part2" not in res:
        return
    p2 = res["part2"]
    loc = statistics.median(r[0] for r in p2["local"])
    print(f"\nPart 2: AlexNet 227x227, batch 32, Adagrad, n_fetch = n_push = 1, worker 2 threads; medians of {steps} interleaved steps")
    print(f"{'variant':<26}{'step s':>8}{'update ms':>11}{'overhead':>10}{'paired':>9}{'load':>7}"
          "   (update = optimizer step, or push + fetch)")  # fmt: skip
    for k, rows in p2.items():
        step, upd = statistics.median(r[0] for r in rows), statistics.median(r[1] for r in rows)
        paired = statistics.median((r[0] - base[0]) / base[0] for r, base in zip(rows, p2["local"]))
        over = f"{100 * (step - loc) / loc:+9.1f}%{100 * paired:+8.1f}%" if k != "local" else f"{'':>19}"
        print(f"{k:<26}{step:8.3f}{upd * 1e3:11.0f}{over}{statistics.mean(r[2] for r in rows):7.2f}")
    print("goal: Downpour overhead < 5% of the local step (worker-side was +6.3%)")
    if not res["finite"]:
        print("WARNING: the parameters became non-finite during the benchmark")


def print_throughput(res: dict, ceil: dict, seconds: float) -> None:
    n, W = res["n"], res["workers"]
    touched = 20 * n  # read g, read params, write params, read + write state: 4 B each per parameter
    bound = ceil["dram_bw"] / touched
    print(f"\nPart 3: server throughput, 1 server + {W} workers = {W + 1} ranks SHARING 2 CORES (every rank 1 thread), "
          f"{n:,} floats, {seconds:g} s of pushing per round, median of {len(next(iter(res['rows'].values())))} rounds")  # fmt: skip
    print(f"ceilings (this process, 1 thread, load {load():.2f}): memcpy {ceil['dram_bw'] / 1e9:.1f} GB/s (256 MiB, read + write), "
          f"{ceil['cache_bw'] / 1e9:.1f} GB/s ({n * 4 / 1e6:.1f} MB, in cache); an apply touches {touched / 1e6:.1f} MB "
          f"-> memory-bandwidth bound {bound:,.0f} pushes/s")  # fmt: skip
    print(f"{'optimizer':<10}{'pushes/s':>10}{'vs bw bound':>13}{'kernel alone/s':>16}{'vs kernel':>11}{'per worker (min-max)':>23}"
          f"{'load':>7}")  # fmt: skip
    for opt, rows in res["rows"].items():
        rate = statistics.median(r["pushes_per_s"] for r in rows)
        kern = 1 / ceil[f"apply {opt}"]
        lo, hi = min(min(r["per_worker"]) for r in rows), max(max(r["per_worker"]) for r in rows)
        print(f"{opt:<10}{rate:10.0f}{rate / bound:12.2f}x{kern:16.0f}{rate / kern:10.2f}x{f'{lo}-{hi}':>23}"
              f"{statistics.mean(r['load'] for r in rows):7.2f}")  # fmt: skip


def train_part(steps: int, data: Path) -> None:
    """Part 4: the trainer, three topologies."""
    common = ["--config=fashion_small", f"--data={data}", f"--max_steps={steps}", "--log_every=1000", "--epochs=8"]

    def mpi_train(n: int, *args: str) -> list[str]:
        return [*mpirun(n), sys.executable, "-m", "mpi4py", "-m", "hpcdnn", "train", *common, *args]

    runs = {
        "local (1 process, 2 threads)": [sys.executable, "-m", "hpcdnn", "train", *common, "--threads=2"],
        "allreduce (2 ranks x 1 thread)": mpi_train(2, "--topology=allreduce", "--threads=1"),
        "downpour (1 server + 2 workers x 1 thread)": mpi_train(
            3, "--topology=downpour", "--optimizer=adagrad", "--lr=0.01", "--threads=1"
        ),
    }
    print(f"\nPart 4: hpcdnn train, Fashion-MNIST alexnet_small, batch 128 per worker, {steps} steps per worker")
    print(f"{'topology':<44}{'img/s':>9}{'vs local':>10}{'load':>7}")
    base = None
    with tempfile.TemporaryDirectory() as tmp:
        for name, cmd in runs.items():
            run = Path(tmp) / name.split()[0]
            r = subprocess.run([*cmd, f"--run_dir={run}"], capture_output=True, text=True, cwd=REPO, timeout=1800)
            if r.returncode:
                print(f"{name}: failed (exit {r.returncode})\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
                continue
            rate = json.loads((run / "summary.json").read_text())["images_per_s"]
            base = base or rate
            print(f"{name:<44}{rate:9.1f}{rate / base:9.2f}x{load():7.2f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5, help="interleaved rounds in parts 1 and 3")
    ap.add_argument("--alexnet-steps", type=int, default=5, help="measured AlexNet steps per variant in part 2 (0: skip)")
    ap.add_argument("--n", type=int, default=100_000, help="floats of part 3's tiny model")
    ap.add_argument("--seconds", type=float, default=3.0, help="pushing time per round in part 3")
    ap.add_argument("--workers", type=int, default=8, help="workers in part 3")
    ap.add_argument("--steps", type=int, default=80, help="trainer steps per worker in part 4")
    ap.add_argument("--data", default=str(REPO / "data" / "fashion-mnist"))
    ap.add_argument("--skip-train", action="store_true")
    args = ap.parse_args()
    t0 = time.perf_counter()
    res = run_case(2, "vector", f"--repeats={args.repeats}", f"--alexnet-steps={args.alexnet_steps}")
    if res:
        print_vector(res, args.repeats, args.alexnet_steps)
    ceil = ceilings(args.n)
    res = run_case(args.workers + 1, "throughput", f"--repeats={args.repeats}", f"--n={args.n}", f"--seconds={args.seconds}")
    if res:
        print_throughput(res, ceil, args.seconds)
    if not args.skip_train:
        data = Path(args.data)
        if (data / "manifest.json").exists():
            train_part(args.steps, data)
        else:
            print(f"\nPart 4 skipped: {data} has no manifest.json (make demo, or data-prep idx --dir "
                  f"/usr/share/datasets/fashion-mnist --out {data})")  # fmt: skip
    print(f"\nwhole run {time.perf_counter() - t0:.0f} s, load {load():.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
