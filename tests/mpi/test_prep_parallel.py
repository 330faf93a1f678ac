"""data-prep under a real `mpirun -n 3` and as job-array tasks: the same bytes as a serial run."""

import pytest
from conftest import prep, prep_process, shard_bytes

pytestmark = pytest.mark.mpi


@pytest.fixture(scope="module")
def serial(imagenet2012, tmp_path_factory):
    out = tmp_path_factory.mktemp("serial")
    assert prep(*common(imagenet2012, out)) == 0
    return out


def common(info, out):
    return ["imagenet", "--root", info["root"], "--out", out, "--size", "40", "--shard-size", "3", "--encoding", "raw"]


def test_mpirun_3_ranks_writes_serial_bytes(imagenet2012, serial, tmp_path):
    out = tmp_path / "mpi"
    r = prep_process(*common(imagenet2012, out), mpi=3, timeout=180)
    assert "3 rank(s)" in r.stdout
    assert shard_bytes(out) == shard_bytes(serial)
    prep_process("verify", out)


def test_job_array_tasks_then_finalize(imagenet2012, serial, tmp_path):
    out = tmp_path / "array"
    for task in (2, 0, 1):  # any order; Slurm gives SLURM_ARRAY_TASK_ID / _COUNT / _MIN
        env = {"SLURM_ARRAY_TASK_ID": str(task + 5), "SLURM_ARRAY_TASK_MIN": "5", "SLURM_ARRAY_TASK_COUNT": "3"}
        r = prep_process(*common(imagenet2012, out), env=env)
        assert f"task {task} of 3 done" in r.stdout
        if task != 1:
            assert not (out / "manifest.json").exists()
            r = prep_process("finalize", out, check=False)
            assert r.returncode == 2 and "not finished" in r.stderr
    prep_process("finalize", out)
    assert shard_bytes(out) == shard_bytes(serial)


def test_mpi_and_tasks_combined(imagenet2012, serial, tmp_path):
    out = tmp_path / "both"
    for task in (0, 1):
        prep_process(*common(imagenet2012, out), "--task-index", task, "--num-tasks", 2, mpi=2, timeout=180)
    prep_process("finalize", out)
    assert shard_bytes(out) == shard_bytes(serial)


def test_bad_input_under_mpirun_fails_fast(tmp_path):
    r = prep_process("imagenet", "--root", tmp_path / "missing", "--out", tmp_path / "o", mpi=3, timeout=120, check=False)
    assert r.returncode != 0
    assert "is not a directory" in r.stderr
