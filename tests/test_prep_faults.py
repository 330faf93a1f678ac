"""data-prep under faults: an --out that is not ours, two runs into one --out, a full disk, bad flags, bad names, empty inputs.

Everything is real: real input trees and IDX files (tests/fakes.py), real data-prep processes, a real tmpfs filled up.
"""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, prep_process, shard_bytes
from fakes import make_folder_tree, make_idx_dataset

from data_prep.pipeline import LOCKS, PARTS, PLAN
from hpcdnn.data.schema import sha256_file


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file under `root` (hidden ones too) by relative path: to show that a refused run changed no byte."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def one_error_line(r: subprocess.CompletedProcess) -> str:
    """The single stderr line of a failed run (no traceback, no h5py noise)."""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one error line, got:\n{r.stderr}"
    return lines[0]


@pytest.fixture(scope="module")
def idx_in(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("idx")
    make_idx_dataset(d, n_train=400, n_test=100)
    return d


# --- item 2: an --out that is not ours ---------------------------------------------------------------------------------


def test_out_holding_someone_elses_files_is_refused_and_left_untouched(idx_in, tmp_path):
    out = tmp_path / "theirs"
    out.mkdir()
    (out / "manifest.json").write_text('{"mine": "not data-prep"}\n')
    (out / "train-00000-of-00008.h5").write_bytes(b"their own file, same name as our first shard")
    (out / "notes.txt").write_text("keep me\n")
    before = tree_bytes(out)
    r = prep_process("idx", "--dir", idx_in, "--out", out, "--shard-size", "50", check=False)
    assert r.returncode == 2
    line = one_error_line(r)
    assert str(out) in line and "not a data-prep output" in line and "new or empty directory" in line
    assert tree_bytes(out) == before and sorted(p.name for p in out.iterdir()) == sorted(before)  # not one byte, no new entry
    ours = tmp_path / "ours"  # while an empty directory, and one of ours (a run killed before finalize), are taken
    ours.mkdir()
    prep_process("idx", "--dir", idx_in, "--out", ours, "--shard-size", "50")
    (ours / "manifest.json").unlink()
    r = prep_process("idx", "--dir", idx_in, "--out", ours, "--shard-size", "50")
    assert "wrote 0 shards" in r.stdout and (ours / "manifest.json").is_file()


def test_out_that_is_a_file_is_refused(idx_in, tmp_path):
    out = tmp_path / "file"
    out.write_text("x")
    r = prep_process("idx", "--dir", idx_in, "--out", out, check=False)
    assert r.returncode == 2 and "is not a directory" in one_error_line(r) and out.read_text() == "x"


# --- two runs into one --out ---------------------------------------------------------------------------------------------


def start_paused(*args) -> subprocess.Popen:
    """A data-prep process stopped (SIGSTOP) while it holds its --out lock: the lock is surely held while we look."""
    out = Path(args[args.index("--out") + 1])
    proc = subprocess.Popen([sys.executable, "-m", "data_prep", *map(str, args)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not any(p.stat().st_size for p in (out / LOCKS).glob("*")):  # the holder writes its name once locked
        assert proc.poll() is None, f"the first run ended early: {proc.communicate()}"
        assert time.monotonic() < deadline, "the first run never took its lock"
        time.sleep(0.001)
    proc.send_signal(signal.SIGSTOP)
    return proc


def resume_and_wait(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGCONT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()


@pytest.fixture(scope="module")
def big_idx(tmp_path_factory) -> Path:
    """Enough samples for ~400 small shards (seconds of work): a run stopped right after locking is far from done."""
    d = tmp_path_factory.mktemp("big")
    make_idx_dataset(d, n_train=4000, n_test=100)
    return d


def test_second_run_into_the_same_out_is_refused_naming_the_first(big_idx, tmp_path):
    out = tmp_path / "out"
    first = start_paused("idx", "--dir", big_idx, "--out", out, "--shard-size", "10", "--threads", "1")
    try:
        r = prep_process("idx", "--dir", big_idx, "--out", out, "--shard-size", "10", check=False)
        assert r.returncode == 2
        line = one_error_line(r)
        assert f"pid {first.pid}" in line and "wait for that run to end or stop it" in line
        # a job-array task would write the same shards too: refused as well
        r = prep_process("idx", "--dir", big_idx, "--out", out, "--shard-size", "10", "--task-index", "0", "--num-tasks", "2", check=False)
        assert r.returncode == 2 and f"pid {first.pid}" in one_error_line(r)
    finally:
        resume_and_wait(first)
    prep_process("verify", out)


def test_job_array_tasks_run_together_but_not_the_same_task_twice(big_idx, tmp_path):
    out = tmp_path / "array"
    common = ["idx", "--dir", big_idx, "--out", out, "--shard-size", "10", "--num-tasks", "2", "--threads", "1"]
    task0 = start_paused(*common, "--task-index", "0")
    try:
        r = prep_process(*common, "--task-index", "0", check=False)
        assert r.returncode == 2 and f"job-array task 0 of 2, pid {task0.pid}" in one_error_line(r)
        r = prep_process(*common, "--task-index", "1", timeout=300)  # the other task writes beside the stopped one
        assert "task 1 of 2 done" in r.stdout
    finally:
        resume_and_wait(task0)
    prep_process("finalize", out)
    prep_process("verify", out)


# --- item 6: a full disk -------------------------------------------------------------------------------------------------


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 200 KiB tmpfs (real ENOSPC); skipped where mounting is not permitted (not root, no CAP_SYS_ADMIN)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        if os.environ.get("CI"):
            raise RuntimeError(f"CI must run the full-disk test, but mount -t tmpfs failed: {r.stderr.strip()}")
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()}); run as root")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_full_disk_is_one_line_exit_1_keeps_finished_shards_and_resumes(idx_in, small_tmpfs, tmp_path):
    args = ["idx", "--dir", idx_in, "--shard-size", "50", "--threads", "1"]
    clean = tmp_path / "clean"
    prep_process(*args, "--out", clean)
    out = small_tmpfs / "out"
    r = prep_process(*args, "--out", out, check=False)
    assert r.returncode == 1, r.stderr  # not 139 (the segfault of h5py's clean-up after the failed write)
    line = one_error_line(r)
    records = sorted((out / PARTS).glob("*.json"))
    assert line.startswith(f"data-prep: error: no space left on device writing {out}/")
    assert line.endswith(f" ({len(records)} shards kept; free space and re-run to resume)") and records
    for rec in records:  # every finished shard intact, nothing half-written left behind
        assert json.loads(rec.read_text())["sha256"] == sha256_file(out / rec.name.removesuffix(".json"))
    assert not list(out.glob("*.tmp.*"))
    subprocess.run(["mount", "-o", "remount,size=4m", str(small_tmpfs)], check=True)  # free space
    r = prep_process(*args, "--out", out)
    assert f"kept {len(records)} finished ones" in r.stdout
    prep_process("verify", out)
    assert shard_bytes(out) == shard_bytes(clean)


@pytest.mark.parametrize("filler_kib", [200, 184])  # nothing left: plan.json/lock fail; 16 KiB left: the first shard fails in HDF5
def test_disk_full_from_the_start_is_one_line_too(idx_in, small_tmpfs, filler_kib):
    with open(small_tmpfs / "filler", "wb") as f:
        with contextlib.suppress(OSError):  # ENOSPC when asked for all of it
            f.write(bytes(filler_kib * 1024))
    out = small_tmpfs / "out"
    r = prep_process("idx", "--dir", idx_in, "--out", out, "--shard-size", "50", check=False)
    assert r.returncode == 1, r.stderr
    line = one_error_line(r)
    assert line.startswith(f"data-prep: error: no space left on device writing {out}") and "(0 shards kept;" in line
    assert not list(out.glob("*.tmp.*")) and not list(out.glob("*.h5"))


# --- item 8: flags, file names, empty inputs, a damaged plan -------------------------------------------------------------


@pytest.mark.parametrize(
    "flag,value",
    [
        ("--max-reject-fraction", "-1"),
        ("--max-reject-fraction", "1.5"),
        ("--max-reject-fraction", "nan"),
        ("--seed", "-1"),
        ("--seed", str(2**64)),
    ],
)
def test_out_of_range_flags_are_refused_naming_the_value_before_any_work(idx_in, tmp_path, flag, value):
    out = tmp_path / "out"
    r = prep_process("idx", "--dir", idx_in, "--out", out, flag, value, check=False)
    assert r.returncode == 2 and f"argument {flag}: '{value}' is not" in r.stderr
    assert not out.exists()


def test_finalize_refuses_a_negative_reject_fraction(tmp_path):
    r = prep_process("finalize", tmp_path, "--max-reject-fraction", "-0.5", check=False)
    assert r.returncode == 2 and "argument --max-reject-fraction: '-0.5' is not a fraction" in r.stderr


def test_file_name_that_is_not_utf8_is_rejected_naming_it(tmp_path):
    tree = make_folder_tree(tmp_path / "train", n_per_class=4)["root"]
    shutil.copy(tree / "cat" / "cat_000.jpg", os.fsdecode(bytes(tree / "cat") + b"/caf\xe9.jpg"))
    out = tmp_path / "out"
    prep_process("folder", "--train", tree, "--out", out, "--size", "32", "--max-reject-fraction", "0.2")
    manifest = json.loads((out / "manifest.json").read_text())
    assert [(r["path"], r["reason"].split(";")[0]) for r in manifest["rejected"]] == [("cat/caf\\xe9.jpg", "file name is not valid UTF-8")]
    assert manifest["splits"]["train"]["count"] == 12


def test_class_directory_name_that_is_not_utf8_is_refused(tmp_path):
    tree = make_folder_tree(tmp_path / "train", n_per_class=2)["root"]
    os.rename(tree / "dog", os.fsdecode(bytes(tree) + b"/d\xf6g"))
    r = prep_process("folder", "--train", tree, "--out", tmp_path / "out", "--size", "32", check=False)
    assert r.returncode == 2 and "d\\xf6g" in r.stderr and "not valid UTF-8" in r.stderr and "rename" in r.stderr


def test_empty_class_is_named_in_a_warning(tmp_path):
    tree = make_folder_tree(tmp_path / "train", n_per_class=2)["root"]
    (tree / "bird").mkdir()
    r = prep_process("folder", "--train", tree, "--out", tmp_path / "out", "--size", "32")
    assert "data-prep: warning: 1 of 4 classes have no training images and can never be learnt: ['bird']" in r.stderr


def test_empty_split_is_refused_naming_it(tmp_path):
    train = make_folder_tree(tmp_path / "train", n_per_class=2)["root"]
    for c in ("cat", "dog", "fish"):
        (tmp_path / "val" / c).mkdir(parents=True)
    out = tmp_path / "out"
    r = prep_process("folder", "--train", train, "--val", tmp_path / "val", "--out", out, "--size", "32", check=False)
    assert r.returncode == 2 and f"split(s) val ({tmp_path / 'val'}) have no input images" in one_error_line(r)
    assert not out.exists()


def test_damaged_plan_is_named(idx_in, tmp_path):
    out = tmp_path / "out"
    prep_process("idx", "--dir", idx_in, "--out", out, "--shard-size", "50")
    (out / PLAN).write_text('{"schema_version": 1, "spl')
    r = prep_process("idx", "--dir", idx_in, "--out", out, "--shard-size", "50", check=False)
    assert r.returncode == 2 and f"{out / PLAN} is not valid JSON" in one_error_line(r)


def test_labels_file_that_is_not_utf8_is_named(imagenet2012, tmp_path):
    bad = tmp_path / "labels.txt"
    bad.write_bytes(b"ILSVRC2012_val_00000001.JPEG n01440764 \xff\n")
    r = prep_process("imagenet", "--root", imagenet2012["root"], "--val-labels", bad, "--out", tmp_path / "out", check=False)
    assert r.returncode == 2 and f"{bad}: not UTF-8 text" in one_error_line(r)
