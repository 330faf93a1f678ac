"""Atomic file writes: write to a temporary name beside the target, fsync, rename, fsync the directory.

A reader (or a resumed run) therefore sees either the old file or the complete new one, never a torn write.
Shards, manifests and checkpoints all go through here.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import socket
from collections.abc import Iterator
from pathlib import Path

TMP_MARK = ".tmp."
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)  # a full disk, a full quota


class NoSpaceError(ValueError):
    """A write that ran out of disk or quota: one line naming the file and what was kept; the CLI prints it as an error
    without a traceback (a ValueError, so every caller that reports bad input reports this too). `in_hdf5`: the HDF5
    library met it (it may then crash closing that file at exit: end the process with os._exit)."""

    def __init__(self, message: str, path: Path, in_hdf5: bool = False) -> None:
        super().__init__(message)
        self.path, self.in_hdf5 = path, in_hdf5


def is_no_space(e: BaseException) -> bool:
    """True for an out-of-disk or out-of-quota error, also when h5py keeps the errno only in its message."""
    return (isinstance(e, OSError) and e.errno in NO_SPACE) or any(f"errno = {n}," in str(e) for n in NO_SPACE)


def tmp_name(path: Path) -> Path:
    """The temporary name for `path`: unique per host and process, recognisable for clean-up."""
    return path.with_name(f"{path.name}{TMP_MARK}{socket.gethostname()}.{os.getpid()}")


def fsync_path(path: Path) -> None:
    """fsync a file or directory by path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, sync_dir: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write; on success fsync it and rename it to `path`, else delete it. A full disk or
    quota (in the block too, h5py's included) raises NoSpaceError naming `path`.

    sync_dir=False skips the directory fsync (the rename may then be lost in a power cut, never torn): for files
    whose completion is recorded, and re-checked, elsewhere.
    """
    path = Path(path)
    tmp = tmp_name(path)
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
        if sync_dir:
            fsync_path(path.parent)
    except OSError as e:  # a full disk: one line, the temporary removed, `path` as it was
        if not is_no_space(e):
            raise
        kept = f"the previous {path.name} is kept" if path.exists() else "nothing was written"
        raise NoSpaceError(f"no space left on device writing {path}; {kept}", path, in_hdf5="errno = " in str(e)) from None
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Atomically replace `path` with `data`."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: str | os.PathLike, obj: object) -> None:
    """Atomically write `obj` as stable, human-readable, strict JSON (sorted keys, so equal data gives equal bytes;
    a NaN or infinity becomes null, which every JSON reader accepts)."""
    write_bytes(path, (json.dumps(finite(obj), indent=1, sort_keys=True, allow_nan=False) + "\n").encode())


def finite(obj: object) -> object:
    """`obj` with every non-finite float (NaN, +-inf) replaced by None, in nested dicts, lists and tuples."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def remove_stale_tmp(path: str | os.PathLike) -> None:
    """Delete temporaries of `path` left behind by a killed writer."""
    path = Path(path)
    for stale in path.parent.glob(f"{path.name}{TMP_MARK}*"):
        stale.unlink(missing_ok=True)
