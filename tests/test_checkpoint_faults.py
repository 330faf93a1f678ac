"""Checkpoints are untrusted input: every way a file can differ from what `save` writes is refused before a byte of
its arrays is used, with an error naming the file and the fault; a full disk keeps the previous checkpoint."""

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from test_checkpoint import sample

from hpcdnn import checkpoint as ck
from hpcdnn.atomic import NoSpaceError

REPO = Path(__file__).resolve().parent.parent


def rewrite(src: Path, dst: Path, params=None, **params_kw) -> None:
    """Copy checkpoint `src` to `dst` item by item, /params replaced by `params` (a callable making it in the new file)."""
    with h5py.File(src, "r") as a, h5py.File(dst, "w") as b:
        for name in ("optim", "rng"):
            a.copy(name, b)
        if params is None:
            b.create_dataset("params", data=a["params"][...], **params_kw)
        else:
            params(b)
        b.attrs.update(dict(a.attrs))


@pytest.fixture
def good(tmp_path) -> Path:
    path = tmp_path / "good.h5"
    ck.save(path, sample())
    return path


def test_external_storage_is_refused_without_reading_the_outside_file(good, tmp_path):
    """/params stored in an outside file (HDF5 external storage) is refused; the outside file is a FIFO, so any read
    of it would block: the load, in a subprocess, must end at once with the error naming the file."""
    outside = tmp_path / "outside.bin"
    outside.write_bytes(np.zeros(1000, np.float32).tobytes())
    bad = tmp_path / "bad.h5"
    rewrite(good, bad, params=lambda f: f.create_dataset("params", (1000,), np.float32, external=[(str(outside), 0, 4000)]))
    outside.unlink()
    os.mkfifo(outside)  # opening it for reading blocks until a writer comes: none will
    code = f"from hpcdnn import checkpoint as ck\nck.load({str(bad)!r})"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode != 0 and "keeps its data in external file(s)" in r.stderr and str(bad) in r.stderr, r.stderr[-2000:]


@pytest.mark.parametrize("kind", ["soft", "external"])
def test_links_are_refused(good, tmp_path, kind):
    bad = tmp_path / "bad.h5"
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["x"] = np.zeros(1000, np.float32)
    link = h5py.SoftLink("/optim/momentum_buffer") if kind == "soft" else h5py.ExternalLink(str(other), "/x")
    rewrite(good, bad, params=lambda f: f.__setitem__("params", link))
    with pytest.raises(ValueError, match=f"{bad}: refused as a checkpoint: /params is a {type(link).__name__}"):
        ck.load(bad)


def test_a_linked_group_is_refused(good, tmp_path):
    """/optim as a soft link (here to /rng): a group is walked only when it is stored in the file under its own name."""
    bad = tmp_path / "bad.h5"
    with h5py.File(good, "r") as a, h5py.File(bad, "w") as b:
        a.copy("rng", b)
        b["params"] = a["params"][...]
        b["optim"] = h5py.SoftLink("/rng")
        b.attrs.update(dict(a.attrs))
    with pytest.raises(ValueError, match=f"{bad}: refused as a checkpoint: /optim is not part of a checkpoint"):
        ck.load(bad)


def test_non_float_params_and_missing_keys_are_refused(good, tmp_path):
    bad = tmp_path / "bad.h5"
    rewrite(good, bad, params=lambda f: f.create_dataset("params", data=np.arange(1000, dtype=np.int64)))
    with pytest.raises(ValueError, match="/params has dtype int64, expected float32"):
        ck.load(bad)
    rewrite(good, bad)
    with h5py.File(bad, "a") as f:
        del f.attrs["checksum"]
        del f["rng"]
    with pytest.raises(ValueError, match="/rng missing"):
        ck.load(bad)
    rewrite(good, bad)
    with h5py.File(bad, "a") as f:
        del f.attrs["checksum"]
    with pytest.raises(ValueError, match=f"{bad}: .*attribute.s. checksum missing"):
        ck.load(bad)


def test_a_flipped_byte_fails_the_checksum(good):
    with h5py.File(good, "r") as f:
        offset = f["params"].id.get_offset()
    data = bytearray(good.read_bytes())
    data[offset + 123] ^= 0x01
    good.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{good}: refused as a checkpoint: its arrays' sha256 .*corrupted"):
        ck.load(good)


def test_non_finite_params_malformed_state_and_old_format_are_refused(tmp_path):
    path = tmp_path / "c.h5"
    nan = sample()
    nan.params[3] = np.nan
    ck.save(path, nan)
    with pytest.raises(ValueError, match="1 of its parameters are NaN or infinite"):
        ck.load(path)
    ck.save(path, sample())
    with h5py.File(path, "a") as f:
        f.attrs["state"] = '{"schedule": '
    with pytest.raises(ValueError, match=f"{path}: .*state attribute is not valid JSON"):
        ck.load(path)
    with h5py.File(path, "a") as f:
        f.attrs["format_version"] = 1
    with pytest.raises(ValueError, match="checkpoint format 1, this hpcdnn reads 2"):
        ck.load(path)


def small_tmpfs(mnt: Path, size: int) -> None:
    """Mount a tmpfs of `size` bytes on `mnt` (root only; skipped with the reason elsewhere, never under CI)."""
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)]).returncode:
        if os.environ.get("CI"):
            raise RuntimeError("CI runs as root: the ENOSPC tests must mount their tmpfs")
        pytest.skip("mounting a tmpfs needs root")


def test_full_disk_keeps_the_previous_checkpoint(tmp_path):
    """On a real 256 KiB tmpfs: a small checkpoint fits, a 400 KB one does not: one error line naming the file and the
    kept checkpoint, no temporary left, the previous checkpoint still loads."""
    mnt = tmp_path / "small"
    small_tmpfs(mnt, 256 << 10)
    try:
        path = mnt / ck.LATEST
        ck.save(path, sample(1))
        big = sample(2)
        big.params = np.ones(100_000, np.float32)
        with pytest.raises(NoSpaceError) as err:
            ck.save(path, big)
        assert str(err.value) == (
            f"no space left on device writing {path}; the previous checkpoint {path} (step 1) is kept. Free space or move "
            "--run_dir, then --resume"
        )
        assert [p.name for p in mnt.iterdir()] == [ck.LATEST]
        assert ck.load(path).step == 1
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_training_on_a_full_disk_ends_with_one_line(tiny, tmp_path):
    """`hpcdnn train` with its run directory on a tmpfs that holds one checkpoint but not a second beside it: the
    second checkpoint fails for space; one error line, no traceback, a non-zero exit, the first checkpoint loads."""
    args = ["--config", "fashion_small", f"--data={tiny}", "--batch_size=16", "--epochs=1", "--threads=1", "--log_every=1"]
    ref = tmp_path / "ref"
    train = [sys.executable, "-m", "hpcdnn", "train", *args]
    subprocess.run([*train, f"--run_dir={ref}", "--max_steps=1"], check=True, capture_output=True, timeout=300, cwd=REPO)
    pages = sum(-(-p.stat().st_size // 4096) for p in ref.iterdir()) * 4096
    mnt = tmp_path / "small"
    small_tmpfs(mnt, pages + (ref / ck.LATEST).stat().st_size // 2)
    try:
        run = mnt / "run"
        r = subprocess.run([*train, f"--run_dir={run}", "--max_steps=3", "--checkpoint_every=1"], capture_output=True, text=True,
                           timeout=300, cwd=REPO)  # fmt: skip
        errors = [line for line in r.stderr.splitlines() if "error" in line.lower()]
        # a full disk exits 1 (hpcdnn/cli.py), with no segfault and no traceback
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
        assert errors == [
            f"hpcdnn: error: no space left on device writing {run / ck.LATEST}; the previous checkpoint {run / ck.LATEST} (step 1) "
            "is kept. Free space or move --run_dir, then --resume"
        ], r.stderr[-3000:]
        assert ck.load(run / ck.LATEST).step == 1
        assert not [p.name for p in run.iterdir() if ".tmp." in p.name]
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_disk_filling_up_mid_run_ends_with_one_line(tiny, tmp_path):
    """The run directory's disk is full but for one page, which config.toml takes: the first metrics line meets the
    full disk (at step 1, long before the epoch's checkpoint): one error line naming metrics.jsonl, exit 1, no traceback."""
    mnt = tmp_path / "small"
    small_tmpfs(mnt, 1 << 20)
    run = mnt / "run"
    try:
        with contextlib.suppress(OSError), open(mnt / "filler", "wb", buffering=0) as f:  # take every free page ...
            while True:
                f.write(b"\0" * 4096)
        os.truncate(mnt / "filler", (mnt / "filler").stat().st_size - 4096)  # ... but one
        cmd = [sys.executable, "-m", "hpcdnn", "train", "--config", "fashion_small", f"--data={tiny}", f"--run_dir={run}",
               "--batch_size=16", "--epochs=2", "--threads=1", "--log_every=1"]  # fmt: skip
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
        errors = [line for line in r.stderr.splitlines() if "error" in line.lower()]
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
        assert errors == [
            f"hpcdnn: error: no space left on device writing {run / 'metrics.jsonl'}; free space or move --run_dir, then "
            "--resume continues from the last checkpoint (if one was written)"
        ], r.stderr[-3000:]
        assert (run / "config.toml").is_file() and not (run / ck.LATEST).exists()
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
