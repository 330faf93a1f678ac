"""slurm/submit_prep.sh: a data-prep job array and its afterok finalize job on a real Slurm."""

from __future__ import annotations

import subprocess

import pytest
from slurmjobs import *  # noqa: F403  (the fixtures: cluster, slurm, idx_input, dataset)
from slurmjobs import SLURM_DIR

pytestmark = pytest.mark.slurm


def shard_bytes(out):
    names = sorted(p.name for p in out.glob("*.h5")) + ["manifest.json", "mean.npy"]
    return {n: (out / n).read_bytes() for n in names}


def submit_prep(slurm, *args):
    """slurm/submit_prep.sh ARGS: (completed process, [array job id, finalize job id])."""
    r = subprocess.run(
        [str(SLURM_DIR / "submit_prep.sh"), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=slurm.tmp,
        env={**slurm.env, "FINALIZE_ARGS": f"--output={slurm.tmp}/slurm-%j.out"},
    )
    ids = r.stdout.split()
    slurm.jobs += [i for i in ids if i.isdigit()]
    return r, ids


def test_array_of_three_tasks_then_finalize_writes_the_serial_bytes(slurm, idx_input, dataset):
    out = slurm.tmp / "array"
    r, ids = submit_prep(slurm, "--array=0-2", "--cpus-per-task=1", f"--output={slurm.tmp}/slurm-%A_%a.out", "--",
                         "idx", "--dir", idx_input, "--out", out, "--shard-size", "50")  # fmt: skip
    assert r.returncode == 0 and len(ids) == 2, r.stderr
    array, final = ids
    info = slurm.wait(final, 240, what="(finalize)")
    assert info.get("JobState") == "COMPLETED", f"{info}\n{slurm.out(final)}\n" + "\n".join(slurm.out(f"{array}_{t}") for t in range(3))
    ends = []
    for task in range(3):  # each task did its own third of the shards, with the task index from the array
        log = (slurm.tmp / f"slurm-{array}_{task}.out").read_text()
        assert f"task {task} of 3 done" in log, log
        task_info = slurm.show(f"{array}_{task}")
        assert task_info.get("JobState") == "COMPLETED"
        ends.append(task_info["EndTime"])
    assert info["StartTime"] >= max(ends), (info["StartTime"], ends)  # afterok: finalize started after every task ended
    assert "every shard matches the manifest" in (slurm.tmp / f"slurm-{final}.out").read_text()
    assert shard_bytes(out) == shard_bytes(dataset)


def test_failed_task_never_runs_finalize(slurm, tmp_path):
    """A task that fails (missing input) leaves the afterok finalize job unrunnable: no manifest is written."""
    out = tmp_path / "bad"
    r, ids = submit_prep(slurm, "--array=0-1", "--cpus-per-task=1", f"--output={slurm.tmp}/slurm-%A_%a.out", "--",
                         "idx", "--dir", tmp_path / "missing", "--out", out)  # fmt: skip
    assert r.returncode == 0 and len(ids) == 2, r.stderr
    array, final = ids
    for task in range(2):
        assert slurm.wait(f"{array}_{task}", 120).get("JobState") == "FAILED"
    assert "required input(s) missing" in (slurm.tmp / f"slurm-{array}_0.out").read_text()
    # DependencyParameters=kill_invalid_depend (the CI slurm.conf) cancels it; elsewhere it stays PENDING forever
    info = slurm.wait(final, 60, states={"CANCELLED"})
    assert "Dependency" in info.get("Reason", ""), info
    assert not (out / "manifest.json").exists()
