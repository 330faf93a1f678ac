"""The measuring side of bench/sim_validate.py: the compute calibration in this process, and the real and emulated
runs it compares with the cost model (`hpcdnn train` / `hpcdnn simulate` in subprocesses, each in its own run dir).

    calibrate(batch=128, steps=10, repeats=5)             # alexnet_small images/s on 2 and on 1 torch thread(s)
    train_runs(("local", "allreduce"), steps=200, data=DATA, tmp=TMP)   # downpour: 1 server + 2 workers
    emulated_downpour(steps=200, data=DATA, tmp=TMP, compute_cv=0.05)
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from launch import mpirun, repo_env  # bench/launch.py (this script's directory is on sys.path)

REPO = Path(__file__).resolve().parent.parent
FASHION = Path("/usr/share/datasets/fashion-mnist")  # the Makefile's FASHION (Debian's dataset-fashion-mnist)
# what every real and emulated run shares: no warm start (worker 0 alone for its first steps would not be the
# steady state the cost model predicts), no checkpoint between steps; metrics lines every WINDOWS-th of the run
COMMON = ["--checkpoint_every=0", "--warmstart_steps=0"]
WINDOWS = 4  # the first window (start-up: oneDNN primitives, Numba, the loader's first shards) is left out of `steady`
RUNS = {  # name: (ranks, config and overrides); each rank runs --threads=THREADS[name]
    "local": (1, ["--config=fashion_small", "--topology=local"]),
    "allreduce": (2, ["--config=fashion_small", "--topology=allreduce"]),
    "downpour": (3, ["--config=fashion_downpour"]),
}
THREADS = {"local": 2, "allreduce": 1, "downpour": 1}


def load() -> float:
    """The 1-minute load average: other jobs on this machine show there."""
    return round(os.getloadavg()[0], 2)


def prepare_data(data: Path) -> str | None:
    """Shard Fashion-MNIST into `data` as the Makefile's bench target does, if it is missing; None, or why not."""
    if (data / "manifest.json").exists():
        return None
    if not FASHION.is_dir():
        return (f"{data} has no manifest.json and {FASHION} is missing: run `make fashion-mnist` (root installs Debian's "
                f"dataset-fashion-mnist), then `data-prep idx --dir {FASHION} --out {data} --shard-size 8192`")  # fmt: skip
    cmd = [sys.executable, "-m", "data_prep", "idx", "--dir", str(FASHION), "--out", str(data), "--shard-size", "8192"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    return None if r.returncode == 0 else f"{' '.join(cmd)} exited {r.returncode}: {r.stderr.strip()[-800:]}"


def make_step(batch: int):
    """One training step of alexnet_small on a fixed synthetic batch of 28x28x1 images, as the SGD topologies take it:
    the flat gradient zeroed, forward, cross-entropy, backward, the repo's SGD kernel (momentum 0.9, weight decay)."""
    import torch
    import torch.nn.functional as F

    from hpcdnn.models import FlatParams, build_model
    from hpcdnn.optim import FlatOptimizer

    torch.manual_seed(0)
    model = build_model("alexnet_small", 10, (28, 28, 1), crop=28)
    flat = FlatParams(model)
    opt = FlatOptimizer("sgd", flat.data, flat.grad, momentum=0.9, weight_decay=5e-4, eps=1e-10)
    x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))

    def step() -> None:
        flat.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step(0.01)

    return step


def timed(step, batch: int, steps: int, rates: list[float], times: list[float]) -> None:
    """Run `steps` steps of `batch` images: append the images/s over them to rates, each step's seconds to times."""
    t0 = time.perf_counter()
    for _ in range(steps):
        s0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - s0)
    rates.append(steps * batch / (time.perf_counter() - t0))


def calibrate(batch: int, steps: int, repeats: int, threads: tuple[int, ...] = (2, 1)) -> dict:
    """alexnet_small forward + backward + SGD step images/s in this process at each torch thread count: repeats
    interleaved over the counts, each `steps` timed steps after warm-up; the median images/s, the coefficient of
    variation of one step's time, the load."""
    from hpcdnn.placement import set_threads

    step = make_step(batch)
    times: dict[int, list[float]] = {t: [] for t in threads}
    rates: dict[int, list[float]] = {t: [] for t in threads}
    for t in threads:  # warm-up at each count: oneDNN primitives, the Numba kernels, the allocator
        set_threads(t)
        for _ in range(3):
            step()
    for _ in range(repeats):
        for t in threads:
            set_threads(t)
            timed(step, batch, steps, rates[t], times[t])
    out = {}
    for t in threads:
        cv = statistics.pstdev(times[t]) / statistics.mean(times[t])
        out[t] = {"images_per_s": statistics.median(rates[t]), "all": [round(r, 1) for r in rates[t]], "step_cv": cv, "load": load()}
    return out


def calibrate_pair(batch: int, steps: int, repeats: int, ranks: int = 2, timeout: float = 600) -> dict:
    """The 1-thread rate as a rank of allreduce or Downpour gets it: `ranks` processes of 1 thread each computing at
    once (this script's `pair-child`, started together after every one has warmed up); the mean over the processes
    of each one's median images/s, and the coefficient of variation of one step's time."""
    cmd = [sys.executable, __file__, "pair-child", str(batch), str(steps), str(repeats)]
    env = repo_env()
    procs = [subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env) for _ in range(ranks)]
    try:
        for p in procs:
            if p.stdout.readline().strip() != "ready":
                raise RuntimeError(f"{' '.join(cmd)} did not start (exit {p.wait(timeout=60)})")
        for p in procs:  # all warmed up: go together
            p.stdin.write("go\n")
            p.stdin.flush()
        got = [json.loads(p.communicate(timeout=timeout)[0]) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    times = [t for g in got for t in g["times"]]
    return {"images_per_s": statistics.mean(statistics.median(g["rates"]) for g in got), "all": [round(r, 1) for g in got for r in g["rates"]],
            "step_cv": statistics.pstdev(times) / statistics.mean(times), "load": load()}  # fmt: skip


def pair_child(batch: int, steps: int, repeats: int) -> None:
    """One process of calibrate_pair: warm up on 1 thread, say "ready", wait for "go", print the timings as JSON."""
    from hpcdnn.placement import set_threads

    set_threads(1)
    step = make_step(batch)
    for _ in range(3):
        step()
    print("ready", flush=True)
    sys.stdin.readline()
    rates, times = [], []
    for _ in range(repeats):
        timed(step, batch, steps, rates, times)
    print(json.dumps({"rates": rates, "times": times}), flush=True)


def run(cmd: list[str], run_dir: Path, timeout: float) -> dict:
    """One hpcdnn run into run_dir: its summary.json plus the wall time and load, or {"error": why}."""
    env = repo_env()
    t0 = time.perf_counter()
    try:
        r = subprocess.run([*cmd, f"--run_dir={run_dir}", "--overwrite"], capture_output=True, text=True, cwd=REPO, env=env,
                           timeout=timeout)  # fmt: skip
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish in {timeout:.0f} s: {' '.join(cmd)}", "load": load()}
    summary = run_dir / "summary.json"
    if r.returncode or not summary.exists():
        return {"error": f"exit {r.returncode}: {' '.join(cmd)}: {r.stderr.strip()[-1500:]}", "load": load()}
    got = json.loads(summary.read_text())
    wall = round(time.perf_counter() - t0, 1)
    return got | {"steady_images_per_s": steady(run_dir / "metrics.jsonl", got), "wall_s": wall, "load": load()}


def steady(metrics: Path, summary: dict) -> float | None:
    """Images/s after the first metrics window: the run's images per step (summary.json) over the training time
    (metrics `time`) from the first training line to the last; None with fewer than two lines."""
    lines = [x for x in map(json.loads, metrics.read_text().splitlines()) if "loss" in x and "time" in x]
    if len(lines) < 2 or not summary.get("steps"):
        return None
    per_step = summary["images_per_s"] * summary["train_time_s"] / summary["steps"]
    first, last = lines[0], lines[-1]
    return round((last["step"] - first["step"]) * per_step / max(last["time"] - first["time"], 1e-9), 1)


def train_runs(names: tuple[str, ...], steps: int, data: Path, tmp: Path, timeout: float = 900) -> dict:
    """`hpcdnn train` for real, the RUNS named: local (1 process, 2 threads), allreduce (mpirun -n 2, 1 thread
    each), downpour (mpirun -n 3: 1 server + 2 workers, 1 thread each), `steps` steps per worker."""
    out = {}
    for name in names:
        ranks, argv = RUNS[name]
        args = ["train", *argv, *COMMON, f"--log_every={max(steps // WINDOWS, 1)}", f"--data={data}", f"--max_steps={steps}",
                f"--threads={THREADS[name]}"]  # fmt: skip
        if ranks == 1:
            cmd = [sys.executable, "-m", "hpcdnn", *args]
        else:
            cmd = [*mpirun(ranks), sys.executable, "-m", "mpi4py", "-m", "hpcdnn", *args]
        out[name] = run(cmd, tmp / f"train_{name}", timeout)
        got = out[name]
        print(f"  measured {name}: {got.get('steady_images_per_s', got.get('error'))} img/s after the first window, "
              f"{got.get('images_per_s')} over the run (load {load()})", flush=True)  # fmt: skip
    return out


def emulated_downpour(steps: int, data: Path, tmp: Path, compute_cv: float, timeout: float = 900) -> dict:
    """`hpcdnn simulate` of fashion_downpour on this machine's profile, 1 server + 2 workers, `steps` steps per worker;
    a replica's compute time varies with the coefficient of variation measured in the calibration."""
    cmd = [sys.executable, "-m", "hpcdnn", "simulate", "--config", "fashion_downpour", "--workers=2", "--servers=1", "--device=cpu",
           f"--compute-cv={compute_cv:.4f}", *COMMON, f"--log_every={max(steps // WINDOWS, 1)}", f"--data={data}", f"--max_steps={steps}",
           "--threads=1"]  # fmt: skip
    out = run(cmd, tmp / "sim_downpour", timeout)
    print(f"  emulated downpour: staleness mean {out.get('staleness_mean', out.get('error'))} (load {load()})", flush=True)
    return out


def loader_rate(data: Path, batch: int, batches: int, threads: int) -> dict:
    """The training loader alone (fashion_small's augmentation: flip, PCA lighting), `threads` augmentation threads,
    no model: images/s over `batches` batches after the first (a diagnostic: the calibration's batches are synthetic)."""
    from hpcdnn.data.loader import ShardLoader
    from hpcdnn.placement import set_threads

    set_threads(threads)
    loader = ShardLoader(data, "train", batch, seed=0, train=True, flip=True, pca_std=0.1, crop=28, workers=threads)
    try:
        it = iter(loader)
        next(it)  # the first batch: opening the shards, the producer thread
        t0 = time.perf_counter()
        for _ in range(batches):
            next(it)
        rate = batches * batch / (time.perf_counter() - t0)
    finally:
        loader.close()
    return {"images_per_s": rate, "threads": threads, "load": load()}


if __name__ == "__main__":
    if sys.argv[1:2] != ["pair-child"]:
        sys.exit("usage: sim_validate_case.py pair-child BATCH STEPS REPEATS (bench/sim_validate.py runs it)")
    pair_child(*map(int, sys.argv[2:5]))
