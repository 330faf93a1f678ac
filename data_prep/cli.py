"""`data-prep` command line: one subcommand per data source, plus finalize, verify and inspect.

data-prep idx --dir /usr/share/datasets/fashion-mnist --out data/fashion
mpirun -n 8 python -m mpi4py -m data_prep imagenet --root /datasets/ILSVRC2012 --out /scratch/imagenet
sbatch --array=0-63 slurm/prep_imagenet.sbatch   (each task: --task-index/--num-tasks from Slurm)
data-prep finalize /scratch/imagenet && data-prep verify /scratch/imagenet

Every multi-word flag may also be spelled with underscores: --shard_size is --shard-size.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from data_prep import manifest as mf
from data_prep.pipeline import NoSpace, OutLock, Settings, check_out, check_plan, kept_shards, make_plan, run
from data_prep.sources import folder, idx, imagenet
from data_prep.sources.base import PrepError, Source
from hpcdnn.atomic import NoSpaceError, is_no_space
from hpcdnn.data.jpeg import JPEG_QUALITY
from hpcdnn.data.schema import COMPRESSIONS, ENCODINGS

SOURCES = {"imagenet": imagenet, "folder": folder, "idx": idx}
MPI_ENV = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")


def dashed(argv: list[str]) -> list[str]:
    """`argv` with underscores in flag names turned into dashes (--shard_size=8 -> --shard-size=8); values untouched."""
    out, flags = [], True
    for arg in argv:
        if arg == "--":
            flags = False  # everything after a bare -- is a value
        elif flags and arg.startswith("--"):
            name, eq, value = arg.partition("=")
            arg = name.replace("_", "-") + eq + value
        out.append(arg)
    return out


def fraction(text: str) -> float:
    """argparse type of --max-reject-fraction: a number from 0 to 1 (a negative or NaN one would refuse every run, or none)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a fraction from 0 to 1 (e.g. 0.001: one input in a thousand may be rejected)")
    return value


def seed(text: str) -> int:
    """argparse type of --seed: an integer from 0 to 2**63 - 1 (numpy refuses negative seeds; int64 holds it everywhere)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer from 0 to 2**63 - 1 (e.g. --seed 0)")
    return value


class Parser(argparse.ArgumentParser):
    """An ArgumentParser that takes both spellings of every multi-word flag, --shard-size and --shard_size.

    Flags are declared and shown dashed; the command line is normalised before parsing, so no flag can miss out.
    Sub-commands' parsers are of this class too (argparse makes them with the parent's class).
    """

    def parse_known_args(self, args=None, namespace=None):
        return super().parse_known_args(dashed(sys.argv[1:] if args is None else list(args)), namespace)


def add_prep_arguments(p: argparse.ArgumentParser) -> None:
    d = Settings()
    p.add_argument(
        "--out",
        required=True,
        type=Path,
        help="output directory: new, empty or one of ours (re-running resumes; held locked while running)",
    )
    p.add_argument("--size", type=int, default=d.size, help=f"side of the stored square images (default {d.size}; IDX keeps its own size)")
    p.add_argument(
        "--encoding", choices=ENCODINGS, default=d.encoding, help=f"raw uint8 pixels, or jpeg quality-{JPEG_QUALITY} bytes (smaller)"
    )
    p.add_argument(
        "--compression", choices=COMPRESSIONS, default=d.compression, help="HDF5 filter for raw images (default none: fastest reads)"
    )
    p.add_argument("--shard-size", type=int, default=d.shard_size, help=f"images per shard (default {d.shard_size})")
    p.add_argument("--seed", type=seed, default=d.seed, help="seed of the shuffle across shards")
    p.add_argument("--resample", choices=["bilinear", "bicubic", "lanczos"], default=d.resample, help="antialiased resize filter")
    p.add_argument(
        "--max-pixels", type=int, default=d.max_pixels, help="reject larger inputs as decompression bombs (default: Pillow's limit)"
    )
    p.add_argument(
        "--max-reject-fraction", type=fraction, default=0.001, help="fail when more inputs than this are rejected (default 0.001)"
    )
    p.add_argument("--threads", type=int, default=0, help="decoding threads per process (default: this process's CPUs / ranks on the node)")
    p.add_argument("--task-index", type=int, help="job-array task index (default: from SLURM_ARRAY_TASK_ID)")
    p.add_argument("--num-tasks", type=int, help="job-array task count (default: from SLURM_ARRAY_TASK_COUNT)")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="data-prep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in SOURCES.items():
        p = sub.add_parser(name, help=module.__doc__.splitlines()[0], description=module.__doc__)
        module.add_arguments(p)
        add_prep_arguments(p)
    p = sub.add_parser("finalize", help="merge job-array tasks' results into manifest.json")
    p.add_argument("dir", type=Path)
    p.add_argument("--max-reject-fraction", type=fraction, default=0.001)
    p = sub.add_parser("verify", help="re-hash every shard against the manifest; non-zero exit naming bad files")
    p.add_argument("dir", type=Path)
    p = sub.add_parser("inspect", help="human summary: splits, per-class counts, bytes, rejected inputs")
    p.add_argument("dir", type=Path)
    return parser


def array_task(args: argparse.Namespace) -> tuple[int, int]:
    """(task index, task count) from the flags, else from a Slurm job array, else (0, 1)."""
    env = os.environ
    count = args.num_tasks if args.num_tasks is not None else int(env.get("SLURM_ARRAY_TASK_COUNT", 1))
    if args.task_index is not None:
        index = args.task_index
    elif "SLURM_ARRAY_TASK_ID" in env:
        index = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", 0))
    else:
        index = 0
    if count < 1 or not 0 <= index < count:
        raise PrepError(
            f"task index {index} of {count} tasks is out of range; use --task-index 0..{count - 1} (or --array=0-{count - 1} in Slurm)"
        )
    return index, count


def decode_threads(args: argparse.Namespace, comm) -> int:
    """--threads, else the placement rule: this node's CPUs divided among its ranks (collective over `comm`)."""
    if args.threads:
        return args.threads
    from hpcdnn.placement import default_threads, threads_per_rank  # imported here: it loads Numba, finalize/verify do not need it

    return threads_per_rank(comm) if comm else default_threads()


def get_comm():
    """COMM_WORLD when launched by mpirun/srun with more than one rank, else None (no MPI initialised)."""
    if not any(v in os.environ for v in MPI_ENV):
        return None
    from mpi4py import MPI

    return MPI.COMM_WORLD if MPI.COMM_WORLD.Get_size() > 1 else None


def check_counts(source: Source, args: argparse.Namespace) -> list[str]:
    """Refuse a split with no inputs (nothing to train or evaluate on); return warnings naming classes without training images."""
    empty = [
        f"{split} ({getattr(args, split)})" if getattr(args, split, None) else split for split, items in source.splits.items() if not items
    ]
    if empty:
        raise PrepError(
            f"split(s) {', '.join(empty)} have no input images: a run cannot train or evaluate on an empty split; "
            "add images, or leave the split out"
        )
    if "train" not in source.splits:
        return []
    counts = Counter(item.label for item in source.splits["train"])
    missing = [c["name"] for c in source.classes if counts[c["index"]] == 0]
    if not missing:
        return []
    return [
        f"{len(missing)} of {len(source.classes)} classes have no training images and can never be learnt: {missing[:10]}"
        f"{' …' if len(missing) > 10 else ''}; add their images, or remove those classes from the input"
    ]


def prepare(args: argparse.Namespace, comm) -> int:
    """Check the arguments and --out, then write this process's shards holding the --out lock (rank 0 holds it for all)."""
    rank = comm.Get_rank() if comm else 0
    task, tasks = array_task(args)
    if args.shard_size < 1 or args.size < 1 or args.max_pixels < 1:
        raise PrepError(f"--shard-size {args.shard_size}, --size {args.size} and --max-pixels {args.max_pixels} must be positive")
    if args.command == "idx" and args.size != Settings.size:
        raise PrepError("--size does not apply to idx: IDX images keep their own size (28x28)")
    source = SOURCES[args.command].open_source(args)
    warnings = check_counts(source, args)
    settings = Settings(args.encoding, args.compression, args.shard_size, args.seed, source.image_shape[0], args.max_pixels, args.resample)
    plan = make_plan(source, settings)
    if rank == 0:
        check_out(args.out)  # before anything is written into it
        args.out.mkdir(parents=True, exist_ok=True)
    with OutLock(args.out, task, tasks) if rank == 0 else contextlib.nullcontext():
        if rank == 0:
            for note in source.notes:
                print(f"data-prep: note: {note}", file=sys.stderr)
            for warning in warnings:
                print(f"data-prep: warning: {warning}", file=sys.stderr)
            check_plan(args.out, plan)
        if comm:
            comm.Barrier()
        return write_all(args, comm, source, plan, settings, task, tasks)


def write_all(args: argparse.Namespace, comm, source: Source, plan: dict, settings: Settings, task: int, tasks: int) -> int:
    """Write this rank's shards, then (rank 0) print the summary and finalize unless this is one task of a job array."""
    rank, size = (comm.Get_rank(), comm.Get_size()) if comm else (0, 1)
    threads = decode_threads(args, comm)
    t0 = time.perf_counter()
    mine = run(source, plan, args.out, settings, worker=task * size + rank, workers=tasks * size, threads=threads, show=rank == 0)
    totals = comm.gather(mine) if comm else [mine]
    if rank != 0:
        return 0
    seconds = time.perf_counter() - t0
    images = sum(t["images"] for t in totals)
    written, skipped = sum(t["shards_written"] for t in totals), sum(t["shards_skipped"] for t in totals)
    print(
        f"data-prep: wrote {written} shards ({images} images) and kept {skipped} finished ones in {seconds:.1f} s, "
        f"{images / max(seconds, 1e-9):.0f} img/s with {size} rank(s) x {threads} thread(s)"
    )
    if tasks > 1:
        print(f"data-prep: task {task} of {tasks} done; after every task finishes run: data-prep finalize {args.out}")
        return 0
    mf.finalize(args.out, args.max_reject_fraction)
    print(mf.describe(args.out, per_class=False))
    return 0


def out_of_space(e: BaseException, out: Path, comm) -> int:
    """Report a full disk (or quota) in one line, exit 1: finished shards stay and a re-run resumes.

    After HDF5 itself hit the full disk it can no longer close that file and crashes at exit (a segfault in its
    clean-up), so the process then ends at once with os._exit, its output flushed; nothing of ours is left unwritten.
    """
    path = getattr(e, "path", None) or getattr(e, "filename", None) or out
    print(
        f"data-prep: error: no space left on device writing {path} ({kept_shards(out)} shards kept; free space and re-run to resume)",
        file=sys.stderr,
    )
    if comm:
        comm.Abort(1)
    if getattr(e, "in_hdf5", "errno = " in str(e)):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    return 1


@contextlib.contextmanager
def quiet_no_space_noise() -> Iterator[None]:
    """Drop the tracebacks h5py prints (excepthook, then unraisablehook) for objects it frees after a write hit a full
    disk: that failure is reported once, as one line."""
    excepthook, unraisablehook = sys.excepthook, sys.unraisablehook

    def except_hook(kind, value, tb) -> None:
        if not is_no_space(value):
            excepthook(kind, value, tb)

    def unraisable_hook(unraisable) -> None:
        if not is_no_space(unraisable.exc_value):
            unraisablehook(unraisable)

    sys.excepthook, sys.unraisablehook = except_hook, unraisable_hook
    try:
        yield
    finally:
        sys.excepthook, sys.unraisablehook = excepthook, unraisablehook


def main(argv: list[str] | None = None) -> int:
    """The `data-prep` command: exit 0 on success, 1 on a failed verify or a full disk, 2 on bad arguments or inputs."""
    args = build_parser().parse_args(argv)
    comm = get_comm() if args.command in SOURCES else None
    with quiet_no_space_noise():
        return run_command(args, comm)


def run_command(args: argparse.Namespace, comm) -> int:
    """One parsed command; errors become one line and an exit code (a failing MPI rank aborts the whole job)."""
    try:
        if args.command in SOURCES:
            return prepare(args, comm)
        if args.command == "finalize":
            mf.finalize(args.dir, args.max_reject_fraction)
            print(mf.describe(args.dir, per_class=False))
        elif args.command == "verify":
            problems = mf.verify(args.dir)
            for p in problems:
                print(f"data-prep verify: {p}", file=sys.stderr)
            if problems:
                return 1
            print(f"data-prep verify: {args.dir}: every shard matches the manifest")
        elif args.command == "inspect":
            print(mf.describe(args.dir))
        return 0
    except (NoSpace, NoSpaceError) as e:
        return out_of_space(e, getattr(args, "out", None) or args.dir, comm)
    except (PrepError, FileNotFoundError, ValueError) as e:
        print(f"data-prep: error: {e}", file=sys.stderr)
        if comm:
            comm.Abort(2)
        return 2
    except BaseException as e:
        if is_no_space(e):
            return out_of_space(e, getattr(args, "out", None) or args.dir, comm)
        if comm:  # one failing rank must end the job, not leave the others waiting in a collective
            import traceback

            traceback.print_exc()
            comm.Abort(1)
        raise
