"""Plan, decode and write shards: the part of data-prep that every source shares.

The plan (a seeded shuffle of each split, cut into shards) depends only on the input listing and the settings,
so any number of MPI ranks or job-array tasks write exactly the bytes a serial run writes: shard g goes to
worker g mod W. Each finished shard leaves a small record in DIR/.parts (count, sha256, rejects, exact
statistics); a shard whose record and hash agree is skipped on a re-run, anything else is redone.
DIR is ours once it holds plan.json: a non-empty directory without one is refused, and a run holds DIR/.locks
(flock) so a second run into the same DIR is refused while the first lives (job-array tasks share it, see OutLock).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from data_prep.sources.base import Options, PrepError, Source
from hpcdnn.atomic import is_no_space, remove_stale_tmp, write_json
from hpcdnn.data.jpeg import encode_jpeg
from hpcdnn.data.schema import SCHEMA_VERSION, SPLITS, ShardSchema, sha256_file, shard_name
from hpcdnn.kernels.stats import ImageStats
from hpcdnn.progress import Bar

PLAN = "plan.json"
PARTS = ".parts"
LOCKS = ".locks"
NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)  # file systems without flock (Lustre -o noflock)


@dataclass
class Settings:
    """Everything that decides the output bytes; recorded in plan.json and checked on every re-run."""

    encoding: str = "raw"  # raw uint8 pixels or jpeg bytes (hpcdnn.data.jpeg, quality JPEG_QUALITY)
    compression: str = "none"  # raw only: none | lzf | gzip
    shard_size: int = 1024  # images per shard (1024 raw 256x256x3 images ~ 200 MB)
    seed: int = 0  # shuffle seed: the order of samples across shards
    size: int = 256  # side of the stored square images (IDX keeps 28)
    max_pixels: int = 89_478_485  # larger inputs are rejected as decompression bombs
    resample: str = "bilinear"  # antialiased resize filter: bilinear | bicubic | lanczos


def fingerprint(source: Source) -> str:
    """sha256 of every (split, key, label): two tasks that listed different inputs must not share a DIR."""
    h = hashlib.sha256()
    for split, items in sorted(source.splits.items()):
        for it in items:
            h.update(f"{split}\0{it.key}\0{it.label}\n".encode())
    return h.hexdigest()


def make_plan(source: Source, settings: Settings) -> dict:
    """The shard layout: per split, a seeded permutation cut into shards of `shard_size`."""
    splits = {}
    for split, items in source.splits.items():
        total = -(-len(items) // settings.shard_size)
        shards = [
            {"file": shard_name(split, k, total), "planned": min(settings.shard_size, len(items) - k * settings.shard_size)}
            for k in range(total)
        ]
        splits[split] = {"planned": len(items), "shards": shards}
    return {
        "schema_version": SCHEMA_VERSION,
        "source": source.name,
        "image_shape": list(source.image_shape),
        "classes": source.classes,
        "settings": asdict(settings),
        "splits": splits,
        "fingerprint": fingerprint(source),
    }


def shard_items(source: Source, split: str, settings: Settings) -> list[list]:
    """Items of each shard of `split` in the planned (shuffled) order."""
    items = source.splits[split]
    rng = np.random.default_rng([settings.seed, SPLITS.index(split)])
    perm = rng.permutation(len(items))
    return [[items[j] for j in perm[k : k + settings.shard_size]] for k in range(0, len(items), settings.shard_size)]


def check_out(out: Path) -> None:
    """Refuse, before any write, an --out that is a file or a non-empty directory that is not a data-prep output of ours."""
    if out.exists() and not out.is_dir():
        raise PrepError(f"--out {out} exists and is not a directory; give a directory (new or empty) for the shards")
    if not out.is_dir() or (out / PLAN).is_file():
        return  # new, or ours: a re-run resumes
    # what a run that was killed, or is starting beside us (job-array tasks), leaves before plan.json exists
    foreign = sorted(e.name for e in os.scandir(out) if e.name not in (PARTS, LOCKS) and not e.name.startswith(f"{PLAN}.tmp."))
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" … ({len(foreign)} entries)" if len(foreign) > 5 else "")
        raise PrepError(
            f"--out {out} is not empty and is not a data-prep output (no {PLAN}; it holds {shown}); "
            "choose a new or empty directory, or remove its contents"
        )


def check_plan(out: Path, plan: dict) -> None:
    """Write plan.json, or check an existing one matches: a DIR is never mixed from two different inputs."""
    path = out / PLAN
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise PrepError(f"{path} is not valid JSON ({e}): this output's plan is damaged; choose a new --out, or empty {out}") from None
        if old != plan:
            diff = [k for k in plan if not isinstance(old, dict) or old.get(k) != plan[k]]
            settings = old.get("settings") if isinstance(old, dict) else old
            raise PrepError(
                f"{out} was started with different inputs or settings (differs in: {', '.join(diff)}; was {json.dumps(settings)}); "
                "re-run with the same arguments to resume, or choose a new --out"
            )
    else:
        with no_space_as(path):
            write_json(path, plan)


class OutLock:
    """flock()s held for a run so that two runs never write one --out at once; the kernel drops them when a run dies.

    A whole run holds DIR/.locks/out exclusively. Job-array task i of N holds it shared (tasks write different
    shards of one DIR at the same time) and DIR/.locks/task-i-of-N exclusively (the same task twice is refused).
    Where the file system has no flock (Lustre mounted -o noflock) the run goes on with a warning.
    """

    def __init__(self, out: Path, task: int = 0, tasks: int = 1):
        self.out, self.task, self.tasks, self.files = out, task, tasks, []

    def __enter__(self) -> OutLock:
        (self.out / LOCKS).mkdir(exist_ok=True)
        whole = self.tasks == 1
        role = "data-prep" if whole else f"data-prep job-array task {self.task} of {self.tasks}"
        try:
            self.take("out", fcntl.LOCK_EX if whole else fcntl.LOCK_SH, role)
            if not whole:
                self.take(f"task-{self.task}-of-{self.tasks}", fcntl.LOCK_EX, role)
        except BaseException:
            self.__exit__()
            raise
        return self

    def take(self, name: str, mode: int, role: str) -> None:
        """Lock DIR/.locks/NAME without waiting and write who holds it; a held lock raises naming its holder."""
        path = self.out / LOCKS / name
        f = open(path, "a+b", buffering=0)  # held open for the run (closed in __exit__); unbuffered: close has nothing to flush
        try:
            fcntl.flock(f, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().decode(errors="replace").strip() or "another process"
            f.close()
            raise PrepError(
                f"{self.out} is being written by {holder} (lock {path}); wait for that run to end or stop it. "
                "Two runs into one --out would write the same shards; job-array tasks need distinct --task-index"
            ) from None
        except OSError as e:
            f.close()
            if e.errno not in NO_FLOCK:
                raise
            print(
                f"data-prep: warning: {path}: no flock on this file system ({e.strerror}); a concurrent run goes undetected",
                file=sys.stderr,
            )
            return
        self.files.append(f)
        with no_space_as(path):
            f.truncate(0)
            f.write(f"{role}, pid {os.getpid()} on {socket.gethostname()}\n".encode())

    def __exit__(self, *exc) -> None:
        for f in self.files:
            f.close()  # closing the file releases its lock
        self.files = []


class NoSpace(Exception):
    """A write into --out ran out of disk (ENOSPC) or quota (EDQUOT); `in_hdf5` when it happened inside the HDF5 library."""

    def __init__(self, path: Path, in_hdf5: bool = False):
        super().__init__(f"no space left on device writing {path}")
        self.path, self.in_hdf5 = path, in_hdf5


@contextlib.contextmanager
def no_space_as(path: Path, in_hdf5: bool = False) -> Iterator[None]:
    """Turn a full disk or quota met inside the block into NoSpace(path): one line for the user, not a traceback."""
    try:
        yield
    except OSError as e:
        if not is_no_space(e):
            raise
        raise NoSpace(path, in_hdf5) from None


def kept_shards(out: Path) -> int:
    """How many shards of DIR are finished (record and file present): what a re-run keeps."""
    parts = out / PARTS
    if not parts.is_dir():
        return 0
    return sum(1 for r in parts.glob("*.json") if (out / r.name.removesuffix(".json")).is_file())


def record_path(out: Path, file: str) -> Path:
    """Where the record of a finished shard lives (count, sha256, rejects, exact statistics)."""
    return out / PARTS / f"{file}.json"


def is_done(out: Path, file: str) -> bool:
    """A shard counts as done when its record exists and its file still hashes to the recorded sha256."""
    record = record_path(out, file)
    if not (record.exists() and (out / file).exists()):
        return False
    try:
        return json.loads(record.read_text())["sha256"] == sha256_file(out / file)
    except (ValueError, UnicodeDecodeError, KeyError, TypeError):
        return False  # a damaged record: the shard is written again (and the record with it)


class ShardStats:
    """Exact statistics of one shard, summed by the decoding threads into per-thread partials (no lock per image)."""

    def __init__(self, shape):
        self.shape, self.parts, self.lock = shape, {}, threading.Lock()

    def add(self, image: np.ndarray) -> None:
        part = self.parts.get(threading.get_ident())
        if part is None:
            with self.lock:
                part = self.parts.setdefault(threading.get_ident(), ImageStats.zeros(self.shape))
        part.add_one(image)

    def total(self) -> ImageStats:
        total = ImageStats.zeros(self.shape)
        for part in self.parts.values():
            total.merge(part)
        return total


def decode_into(source: Source, split: str, item, opts: Options, buf: np.ndarray, pos: int, stats: ShardStats, encoding: str):
    """Worker-thread body: decode one item into buf[pos] and its statistics; returns the Decoded (pixels dropped) and JPEG bytes."""
    d = source.load(item, split, opts)
    data = None
    if d.array is not None:
        buf[pos] = d.array
        stats.add(d.array)
        if encoding == "jpeg":
            data = encode_jpeg(d.array)
        d.array = None
    return d, data


def write_shard(
    out: Path, job: dict, buf: np.ndarray, results: list, stats: ImageStats, schema: ShardSchema, num_classes: int, source_name: str
) -> dict:
    """Write one shard and its record from decoded results; returns the record."""
    keep, rejected, converted, jpegs = [], [], [], []
    for pos, (item, (d, data)) in enumerate(zip(job["items"], results)):
        if d.reason:
            rejected.append({"path": item.key, "reason": d.reason})
            continue
        keep.append(pos)
        jpegs.append(data)
        if d.note:
            converted.append({"path": item.key, "note": d.note})
    images = buf if len(keep) == len(buf) else buf[keep]
    labels = np.array([job["items"][p].label for p in keep], dtype=np.int32)
    keys = [job["items"][p].key for p in keep]
    file = job["file"]
    remove_stale_tmp(out / file)
    attrs = {"num_classes": num_classes, "source": source_name, "split": job["split"], "shard_index": job["index"]}
    with no_space_as(out / file, in_hdf5=True):  # the half-written temporary is deleted on the way out
        # no directory fsync: the record below (fsynced with its directory) marks completion, and a resume re-hashes the shard
        schema.write(out / file, images if schema.encoding == "raw" else jpegs, labels, keys, attrs, sync_dir=False)
    record = {
        "file": file,
        "split": job["split"],
        "count": len(keep),
        "planned": len(buf),
        "sha256": sha256_file(out / file),
        "bytes": (out / file).stat().st_size,
        "rejected": rejected,
        "converted": converted,
        "stats": stats.to_json(),
    }
    with no_space_as(record_path(out, file)):
        write_json(record_path(out, file), record)
    return record


def run(source: Source, plan: dict, out: Path, settings: Settings, *, worker: int, workers: int, threads: int, show: bool) -> dict:
    """Write this worker's shards of `plan` (g mod workers == worker), skipping finished ones. Returns counts for the summary."""
    opts = Options(size=settings.size, max_pixels=settings.max_pixels, resample=settings.resample)
    schema = ShardSchema(tuple(source.image_shape), settings.encoding, settings.compression)
    jobs, g = [], 0
    for split in plan["splits"]:
        for k, items in enumerate(shard_items(source, split, settings)):
            if g % workers == worker:
                jobs.append({"split": split, "index": k, "file": plan["splits"][split]["shards"][k]["file"], "items": items})
            g += 1
    (out / PARTS).mkdir(parents=True, exist_ok=True)
    todo = [j for j in jobs if not is_done(out, j["file"])]
    label = f"data-prep worker {worker}/{workers}" if workers > 1 else "data-prep"
    progress = Bar(sum(len(j["items"]) for j in todo), enabled=show, unit="image", desc=label)
    t0, images = time.perf_counter(), 0
    with ThreadPoolExecutor(max(1, threads)) as pool, progress:
        pending: deque = deque()

        def submit(job):
            buf = np.empty((len(job["items"]), *source.image_shape), np.uint8)
            stats = ShardStats(tuple(source.image_shape))
            futs = [
                pool.submit(decode_into, source, job["split"], it, opts, buf, p, stats, settings.encoding)
                for p, it in enumerate(job["items"])
            ]
            pending.append((job, buf, stats, futs))

        queue = deque(todo)
        while queue or pending:
            while queue and len(pending) < 2:  # decode the next shard while this one is written
                submit(queue.popleft())
            job, buf, stats, futs = pending.popleft()
            results = []
            for f in futs:
                results.append(f.result())
                progress.update()
            write_shard(out, job, buf, results, stats.total(), schema, len(source.classes), source.name)
            images += len(job["items"])
    return {"shards_written": len(todo), "shards_skipped": len(jobs) - len(todo), "images": images, "seconds": time.perf_counter() - t0}
