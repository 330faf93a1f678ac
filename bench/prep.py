"""Benchmark data-prep (images/s) against a naive Pillow -> h5py loop and against the decode+resize limit.

    make bench-prep
    python bench/prep.py [--images 600] [--workdir DIR] [--repeats 3]

Inputs: N generated JPEGs in DIR/src/<class>/ (4 classes), q90, sized like ImageNet photos (500x375 60%, 375x500 20%,
500x333 20%; none is big enough for the JPEG `draft` shortcut, so ours gets no help from it), ~110 KB each:
`tests.fakes.photo_array` plus per-pixel grain (photo_array alone gives ~70 KB). Files stay in the page cache.
Every variant makes 256x256x3 uint8 from the same files; each is run --repeats times, interleaved, and the BEST is kept.

  naive        1 thread: per file `Image.open(p).convert("RGB")`, resize the shorter side to 256 with Image.LANCZOS,
               centre crop 256x256, `np.asarray`, `ds[i] = arr` and `lab[i] = label` into
               `f.create_dataset("images", (N, 256, 256, 3), np.uint8, chunks=True)` (h5py's auto chunks) and an int64
               labels dataset; no fsync, no hash, no statistics.
  limit 1t/2t  data_prep.decode.load_image(path, 256, resample="bilinear") only (our decode path: one resize of the
               centre box), nothing stored; 1 thread in a plain loop, 2 threads via ThreadPoolExecutor.
  ours 1t/2t   data_prep.cli.main(["folder", ..., "--threads", T, "--shard-size", "128"]) in process, end to end:
               plan, decode, shards, fsync, sha256, exact statistics, finalize; a fresh --out each time, after a
               warm-up run so the Numba compile is not timed.
  ours-lanczos the same with --resample lanczos: the filter naive uses, to show how much of the gain is the filter.
  naive 1-img chunks  (info only) naive with chunks=(1, 256, 256, 3). h5py's auto chunks ((75, 32, 32, 1) at N=600)
               turn every `ds[i] = arr` into partial writes of 192 chunks, about half of naive's time; this row removes that.

"1t" rows run with the whole process pinned to ONE cpu (sched_setaffinity on every thread), so "per core" means one
core: our pipeline's writer thread and the parallel statistics kernel cannot borrow the second core. "2t" rows get all;
so does the extra row "ours 1t unpinned" (--threads 1 as a user would run it; not used in any ratio).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import h5py
import numba
import numpy as np
import PIL
from PIL import Image

from data_prep import cli
from data_prep.decode import load_image
from data_prep.pipeline import Settings

ROOT = Path(__file__).resolve().parents[1]
SIZE = 256
CLASSES = ("c0", "c1", "c2", "c3")
SHAPES = ((500, 375), (500, 375), (500, 375), (375, 500), (500, 333))  # drawn uniformly: 60/20/20 %


def machine() -> str:
    """One line: cpus usable, CPU model, library versions."""
    model = "unknown CPU"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    cpus = len(os.sched_getaffinity(0))
    versions = f"Python {platform.python_version()}, Pillow {PIL.__version__}, h5py {h5py.__version__}, numba {numba.__version__}"
    return f"nproc {cpus} ({os.cpu_count()} online), {model}; {versions}"


def pin(cpus: set[int]) -> None:
    """Restrict every thread of this process (and threads it starts later) to `cpus`."""
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError):  # a thread may exit meanwhile
            os.sched_setaffinity(int(tid), cpus)


def make_photos(jobs: list[tuple[str, int, int]], seed: int) -> int:
    """Write each (path, width, height) as a grainy photo-like q90 JPEG; returns the bytes written."""
    sys.path.insert(0, str(ROOT))
    from tests.fakes import photo_array

    rng, total = np.random.default_rng(seed), 0
    for path, w, h in jobs:
        a = photo_array(w, h, rng).astype(np.float32)
        a += rng.normal(0, 26, (h, w, 1)).astype(np.float32) + rng.normal(0, 6.5, (h, w, 3)).astype(np.float32)
        Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(path, "JPEG", quality=90)
        total += os.path.getsize(path)
    return total


def generate(src: Path, n: int, seed: int = 0) -> tuple[list[str], list[int], float]:
    """N JPEGs spread over CLASSES in src/<class>/; returns sorted paths, labels and the mean file size."""
    rng = np.random.default_rng(seed)
    jobs, labels = [], []
    for i in range(n):
        label = i % len(CLASSES)
        (src / CLASSES[label]).mkdir(parents=True, exist_ok=True)
        w, h = SHAPES[rng.integers(len(SHAPES))]
        jobs.append((str(src / CLASSES[label] / f"img{i:06d}.JPEG"), w, h))
        labels.append(label)
    workers = len(os.sched_getaffinity(0))
    with ProcessPoolExecutor(workers) as pool:
        total = sum(pool.map(make_photos, [jobs[k::workers] for k in range(workers)], [seed + 1 + k for k in range(workers)]))
    order = sorted(range(n), key=lambda i: jobs[i][0])
    return [jobs[i][0] for i in order], [labels[i] for i in order], total / max(n, 1)


def naive(paths: list[str], labels: list[int], out: Path, chunks: bool | tuple[int, ...] = True) -> None:
    """The typical script (see the module docstring)."""
    with h5py.File(out, "w") as f:
        ds = f.create_dataset("images", (len(paths), SIZE, SIZE, 3), np.uint8, chunks=chunks)
        lab = f.create_dataset("labels", (len(paths),), np.int64)
        for i, p in enumerate(paths):
            im = Image.open(p).convert("RGB")
            scale = SIZE / min(im.size)
            im = im.resize((max(SIZE, round(im.width * scale)), max(SIZE, round(im.height * scale))), Image.LANCZOS)
            left, top = (im.width - SIZE) // 2, (im.height - SIZE) // 2
            ds[i] = np.asarray(im.crop((left, top, left + SIZE, top + SIZE)))
            lab[i] = labels[i]


def limit(paths: list[str], threads: int) -> None:
    """Decode + resize only, through our own decode path."""

    def one(p: str) -> None:
        if load_image(p, SIZE, max_pixels=Settings.max_pixels, resample="bilinear").array is None:
            raise RuntimeError(f"{p} did not decode")

    if threads == 1:
        for p in paths:
            one(p)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(one, paths))


def ours(src: Path, out: Path, threads: int, resample: str = "bilinear") -> None:
    """The real data-prep, in process, its own output silenced."""
    argv = ["folder", "--train", str(src), "--out", str(out), "--threads", str(threads), "--shard-size", "128", "--resample", resample]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        if cli.main(argv) != 0:
            raise RuntimeError(f"data-prep {' '.join(argv)} failed")


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def measure(variants: dict[str, tuple[set[int], Callable[[Path], None]]], n: int, repeats: int, out: Path) -> dict[str, list[float]]:
    """img/s of every run of every variant; runs are interleaved, so a slow spell of the machine hits all alike."""
    rates: dict[str, list[float]] = {k: [] for k in variants}
    home = os.sched_getaffinity(0)
    for _ in range(repeats):
        for name, (cpus, fn) in variants.items():
            remove(out)
            pin(cpus)
            t = time.perf_counter()
            fn(out)
            rates[name].append(n / (time.perf_counter() - t))
            pin(home)
            remove(out)
    return rates


def report(rates: dict[str, list[float]], cpu: int) -> None:
    """The table (best of the runs) and the ratios against the issue's goals."""
    best = {k: max(v) for k, v in rates.items()}
    print(f"\n{'variant':<20}{'best img/s':>11}   every run (img/s); 1t rows pinned to cpu {cpu}")
    for name, r in rates.items():
        print(f"{name:<20}{best[name]:>11.0f}   {', '.join(f'{x:.0f}' for x in r)}")
    print()
    checks = [
        ("ours 1t / naive", "ours 1t", "naive (LANCZOS)", 2.0),
        ("ours 1t / limit 1t", "ours 1t", "limit 1t", 0.85),
        ("ours 2t / limit 2t", "ours 2t", "limit 2t", 0.85),
        ("ours-lanczos 1t / naive", "ours-lanczos 1t", "naive (LANCZOS)", None),
        ("ours 1t / naive 1-img chunks", "ours 1t", "naive 1-img chunks", None),
    ]
    for label, num, den, goal in checks:
        ratio = best[num] / best[den]
        print(f"{label:<30}{ratio:>6.2f}x   " + (f"goal >= {goal:.2f}  {'PASS' if ratio >= goal else 'MISS'}" if goal else "(no goal)"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=600, help="number of generated JPEGs (default 600)")
    p.add_argument("--workdir", type=Path, help="where to put inputs and outputs (default: a temporary dir, deleted at the end)")
    p.add_argument("--repeats", type=int, default=3, help="runs of each variant; the best is reported (default 3)")
    args = p.parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-prep-"))
    work.mkdir(parents=True, exist_ok=True)
    all_cpus = os.sched_getaffinity(0)
    one_cpu = {min(all_cpus)}
    src = work / "src"
    try:
        print(f"machine: {machine()}")
        for old in (src, work / "warm", work / "out-warm", work / "out"):  # a reused --workdir starts clean
            remove(old)
        t0 = time.perf_counter()
        paths, labels, mean_bytes = generate(src, args.images)
        took = time.perf_counter() - t0
        print(f"inputs: {len(paths)} JPEGs q90 in {src}, mean {mean_bytes / 1e3:.1f} KB each (generated in {took:.1f} s, not timed)")
        generate(work / "warm", 8, seed=99)
        ours(work / "warm", work / "out-warm", 1)  # compile (or load cached) Numba kernels; not timed
        remove(work / "out-warm")
        variants: dict[str, tuple[set[int], Callable[[Path], None]]] = {
            "naive (LANCZOS)": (one_cpu, lambda out: naive(paths, labels, out)),
            "naive 1-img chunks": (one_cpu, lambda out: naive(paths, labels, out, (1, SIZE, SIZE, 3))),  # info only
            "limit 1t": (one_cpu, lambda out: limit(paths, 1)),
            "limit 2t": (all_cpus, lambda out: limit(paths, 2)),
            "ours 1t": (one_cpu, lambda out: ours(src, out, 1)),
            "ours 2t": (all_cpus, lambda out: ours(src, out, 2)),
            "ours-lanczos 1t": (one_cpu, lambda out: ours(src, out, 1, "lanczos")),
            "ours 1t unpinned": (all_cpus, lambda out: ours(src, out, 1)),  # info only: its writer may use the other cpu
        }
        report(measure(variants, len(paths), args.repeats, work / "out"), min(one_cpu))
    finally:
        pin(all_cpus)
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
