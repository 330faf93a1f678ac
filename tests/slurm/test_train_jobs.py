"""The training sbatch scripts on a real Slurm: jobs run, a signalled job checkpoints, requeues itself and resumes.

Every job is tiny (alexnet_small on 600 generated 28x28 images, batch 16, one thread per rank). Where a run must be
bitwise equal to an uninterrupted one (local, allreduce on CPU), the reference runs while the requeued job waits.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import warnings

import h5py
import numpy as np
import pytest
from slurmjobs import *  # noqa: F403  (the fixtures: cluster, slurm, idx_input, dataset)
from slurmjobs import REPO

pytestmark = pytest.mark.slurm

ARGS = ["--batch_size=16", "--lr_schedule=constant", "--lr=0.01", "--log_every=5", "--epochs=100"]


def env_for(dataset, run_dir, **more) -> dict:
    return {"CONFIG": "fashion_small", "DATA": str(dataset), "RUN_DIR": str(run_dir), **more}


def checkpoint(run_dir) -> tuple[np.ndarray, int]:
    with h5py.File(run_dir / "checkpoint.h5", "r") as f:
        return f["params"][...], int(f.attrs["step"])


def metrics_lines(run_dir) -> int:
    p = run_dir / "metrics.jsonl"
    return len(p.read_text().splitlines()) if p.exists() else 0


def assert_completed(slurm, jid, info=None):
    info = info or slurm.show(jid)
    assert info.get("JobState") == "COMPLETED" and info.get("ExitCode") == "0:0", (
        f"{info.get('JobState')} {info.get('ExitCode')}\n{slurm.out(jid)}"
    )


def preempt_and_resume(slurm, jid, run_dir, timeout=240) -> tuple[int, str]:
    """Once the job is training, signal its batch shell like --signal=B:USR1 does; expect checkpoint, preempted.json,
    a requeue and a resumed run that completes. Returns (step it stopped at, job output)."""
    slurm.wait_until(lambda: metrics_lines(run_dir) >= 1, 180, "training (a metrics line)", jid)
    slurm.signal_batch(jid)
    marker = run_dir / "preempted.json"
    stopped = slurm.wait_until(lambda: marker.exists() and json.loads(marker.read_text()), 60, "preempted.json", jid)
    assert stopped["signal"] == signal.SIGUSR1, stopped
    slurm.wait_requeued(jid, 180)  # the launcher must exit first: rank teardown under srun can be slow on a loaded host
    assert_completed(slurm, jid, slurm.wait(jid, timeout, what="after the requeue"))
    out = (slurm.tmp / f"slurm-{jid}.out").read_text()
    if "ending it (STOP_GRACE)" in out:  # the ranks checkpointed but the launcher hung on: env.sh ended it and requeued
        warnings.warn(f"job {jid}: the launcher did not exit after the checkpoint; ended after STOP_GRACE\n{out[-3000:]}", stacklevel=1)
    else:
        assert f"stopped by a signal at step {stopped['step']} (launcher exit 0)" in out, out
    assert f"resuming at step {stopped['step']} " in out, out  # --resume added by the script, not by the user
    assert int(slurm.show(jid)["Restarts"]) == 1
    assert not marker.exists(), "a run that finishes must delete preempted.json"
    return stopped["step"], out


def test_local_preempted_requeued_resumed_equals_uninterrupted(slurm, dataset, tmp_path):
    """train_local.sbatch, SIGUSR1 to the batch shell mid-run: the job requeues itself (Slurm holds it ~35-60 s),
    resumes with --resume from RUN_DIR/checkpoint.h5 and ends with the parameters of an uninterrupted run."""
    run, ref = tmp_path / "run", tmp_path / "ref"
    args = [*ARGS, "--max_steps=150", "--checkpoint_every=50"]
    jid = slurm.sbatch("train_local.sbatch", *args, opts=("--cpus-per-task=1",), env=env_for(dataset, run))
    slurm.wait_until(lambda: metrics_lines(run) >= 1, 180, "training", jid)
    reference = subprocess.Popen(  # the same run, uninterrupted, outside Slurm, while the job is requeued
        [sys.executable, "-m", "hpcdnn", "train", "--config", "fashion_small", f"--data={dataset}", f"--run_dir={ref}", "--threads=1", *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    try:
        step, out = preempt_and_resume(slurm, jid, run)
        assert 0 < step < 150
        assert "found " in out and "checkpoint.h5: resuming (restart 1)" in out
        _, err = reference.communicate(timeout=240)
        assert reference.returncode == 0, err[-3000:]
    finally:
        reference.kill()
    (got, got_step), (want, want_step) = checkpoint(run), checkpoint(ref)
    assert got_step == want_step == 150
    assert np.isfinite(want).all() and np.array_equal(got, want), f"max diff {np.abs(got - want).max()}"


def test_time_limit_signal_stops_and_requeues(slurm, dataset, tmp_path):
    """The real --signal=B:USR1@180: the test shortens the running job's time limit so that less than 180 s remain;
    slurmctld signals the batch shell, the run stops with a checkpoint and the job requeues itself. (That the requeued
    job resumes is what the other preemption tests show; this one cancels it while it is held.)"""
    run = tmp_path / "run"
    jid = slurm.sbatch(
        "train_local.sbatch", *ARGS, "--max_steps=100000", opts=("--cpus-per-task=1", "--time=10"), env=env_for(dataset, run)
    )
    slurm.wait_until(lambda: metrics_lines(run) >= 1, 180, "training", jid)
    elapsed = time.time() - time.mktime(time.strptime(slurm.show(jid)["StartTime"], "%Y-%m-%dT%H:%M:%S"))
    minutes = int((elapsed + 170) // 60)  # the end comes 110-170 s from now: inside the 180 s lead, after the checkpoint
    subprocess.run(["scontrol", "update", f"JobId={jid}", f"TimeLimit={minutes}"], check=True, timeout=30)
    marker = run / "preempted.json"
    stopped = slurm.wait_until(lambda: marker.exists() and json.loads(marker.read_text()), 100, "the time-limit signal", jid)
    assert stopped["signal"] == signal.SIGUSR1
    slurm.wait_requeued(jid, 180)
    out = (slurm.tmp / f"slurm-{jid}.out").read_text()
    assert "got SIGUSR1" in out and f"stopped by a signal at step {stopped['step']} (launcher exit 0)" in out, out
    assert f"scontrol requeue {jid}" in out
    _, step = checkpoint(run)
    assert step == stopped["step"] > 0
    subprocess.run(["scancel", jid], check=True, timeout=30)


HANGS_AFTER_PREEMPT = """#!/bin/bash
# the real interpreter; then, if the run stopped for a signal (or always, with HANG_AFTER=any), a teardown that never
# ends (a rank hung after its checkpoint). SIGUSR1 is passed on to the interpreter like mpirun and srun do.
trap 'kill -USR1 "$child" 2>/dev/null' USR1
"$REAL_PYTHON" "$@" &
child=$!
while kill -0 "$child" 2>/dev/null; do wait "$child"; done
wait "$child"
rc=$?
trap '' USR2  # like a hung rank, whose SIGUSR2 only dumps its stacks
[ -f "$RUN_DIR/preempted.json" ] || [ "${HANG_AFTER:-}" = any ] && exec sleep 600
exit $rc
"""


def test_launcher_stuck_after_the_checkpoint_is_ended_and_the_job_requeued(slurm, dataset, tmp_path):
    """The run checkpoints on SIGUSR1 but its launcher never exits: STOP_GRACE seconds after preempted.json the batch
    shell ends the launcher and requeues anyway; the requeued job resumes and completes."""
    run, wrapper = tmp_path / "run", tmp_path / "python-hangs-after-preempt"
    wrapper.write_text(HANGS_AFTER_PREEMPT)
    wrapper.chmod(0o755)
    env = env_for(dataset, run, PYTHON=str(wrapper), REAL_PYTHON=sys.executable, STOP_GRACE="5")
    jid = slurm.sbatch("train_local.sbatch", *ARGS, "--max_steps=150", opts=("--cpus-per-task=1",), env=env)
    slurm.wait_until(lambda: metrics_lines(run) >= 1, 180, "training", jid)
    slurm.signal_batch(jid)
    marker = run / "preempted.json"
    stopped = slurm.wait_until(lambda: marker.exists() and json.loads(marker.read_text()), 60, "preempted.json", jid)
    slurm.wait_requeued(jid, 180)
    assert_completed(slurm, jid, slurm.wait(jid, 240, what="after the requeue"))
    out = (slurm.tmp / f"slurm-{jid}.out").read_text()
    assert "s after the run left" in out and "ending it (STOP_GRACE)" in out, out
    assert f"stopped by a signal at step {stopped['step']} (launcher exit 143)" in out, out  # SIGTERM ended it
    assert f"resuming at step {stopped['step']} " in out, out
    assert checkpoint(run)[1] == 150 and not marker.exists()


def test_launcher_stuck_after_a_finished_run_is_ended_and_the_job_completes(slurm, dataset, tmp_path):
    """The run finishes (summary.json) but its launcher never exits: STOP_GRACE seconds later the batch shell ends it
    and the job completes with exit 0 instead of holding the allocation until its time limit."""
    run, wrapper = tmp_path / "run", tmp_path / "python-hangs-after-exit"
    wrapper.write_text(HANGS_AFTER_PREEMPT)
    wrapper.chmod(0o755)
    env = env_for(dataset, run, PYTHON=str(wrapper), REAL_PYTHON=sys.executable, STOP_GRACE="5", HANG_AFTER="any")
    jid = slurm.sbatch("train_local.sbatch", *ARGS, "--max_steps=20", opts=("--cpus-per-task=1",), env=env, wait=240)
    assert_completed(slurm, jid)
    out = (slurm.tmp / f"slurm-{jid}.out").read_text()
    assert "summary.json: ending it (STOP_GRACE)" in out and "the run had finished" in out, out
    assert json.loads((run / "summary.json").read_text())["steps"] == 20


def test_allreduce_preempted_requeued_resumed_is_bitwise(slurm, dataset, tmp_path):
    """train_allreduce.sbatch with 2 ranks under srun --mpi=pmix, preempted and resumed; the reference, uninterrupted,
    under mpirun: the final parameters are bitwise equal (CPU)."""
    run, ref = tmp_path / "run", tmp_path / "ref"
    args = [*ARGS, "--max_steps=60", "--checkpoint_every=20"]
    opts = ("--nodes=1", "--ntasks=2", "--cpus-per-task=1")
    jid = slurm.sbatch("train_allreduce.sbatch", *args, opts=opts, env=env_for(dataset, run, LAUNCHER="srun"))
    ref_id = slurm.sbatch("train_allreduce.sbatch", *args, opts=opts, env=env_for(dataset, ref, LAUNCHER="mpirun"))
    step, out = preempt_and_resume(slurm, jid, run)
    assert "srun --mpi=pmix" in out and "allreduce: 2 worker(s)" in out
    assert 0 < step < 60
    assert_completed(slurm, ref_id, slurm.wait(ref_id, 240))
    assert "mpirun -n 2" in (slurm.tmp / f"slurm-{ref_id}.out").read_text()
    (got, got_step), (want, want_step) = checkpoint(run), checkpoint(ref)
    assert got_step == want_step == 60
    assert np.isfinite(want).all() and np.array_equal(got, want), f"max diff {np.abs(got - want).max()}"


def test_downpour_preempted_requeued_resumed(slurm, dataset, tmp_path):
    """train_downpour.sbatch, 1 server + 2 workers under mpirun (every rank gets the forwarded SIGUSR1, servers too):
    every rank exits 0, the job requeues and the resumed run finishes."""
    run = tmp_path / "run"
    opts = ("--nodes=1", "--ntasks=3", "--cpus-per-task=1", "--overcommit")
    jid = slurm.sbatch("train_downpour.sbatch", *ARGS, "--max_steps=200", "--checkpoint_every=10", opts=opts,
                       env=env_for(dataset, run, LAUNCHER="mpirun"))  # fmt: skip
    step, out = preempt_and_resume(slurm, jid, run)
    assert "downpour: 2 worker(s), 1 server(s)" in out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["topology"] == "downpour" and summary["steps"] == 200


def test_downpour_hetjob_servers_and_workers_in_their_components(slurm, dataset, tmp_path):
    """train_downpour_hetjob.sbatch: component 0 (1 task) serves, component 1 (2 tasks, GPU request lifted) trains;
    one srun heterogeneous step, roles from HPCDNN_ROLE per component."""
    run = tmp_path / "run"
    pmix = tmp_path / "pmix"  # two slurmd on one host: keep their PMIx directories apart
    opts = ("--ntasks=1", "--cpus-per-task=1", ":", "--ntasks=2", "--cpus-per-task=1", "--gpus-per-task=0")
    # few, large RMA epochs: the components sit on two 'nodes', so Open MPI moves the 3 MB pushes over TCP (slow here)
    jid = slurm.sbatch("train_downpour_hetjob.sbatch", *ARGS, "--max_steps=3", "--n_fetch=3", "--n_push=3", opts=opts,
                       env=env_for(dataset, run, LAUNCHER="srun", HET_PMIX_TMPDIR=str(pmix)), wait=240)  # fmt: skip
    assert_completed(slurm, jid)
    out = (slurm.tmp / f"slurm-{jid}.out").read_text()
    assert "--het-group=0" in out and "HPCDNN_ROLE=server" in out and "HPCDNN_ROLE=worker" in out
    assert "downpour: 2 worker(s), 1 server(s)" in out
    nodes = subprocess.run(["scontrol", "show", "job", jid], capture_output=True, text=True).stdout
    assert len(set(re.findall(r"\bNodeList=(\S+)", nodes))) == 2, nodes  # the components ran on different nodes
    assert json.loads((run / "summary.json").read_text())["steps"] == 3


def test_sandblaster_job(slurm, dataset, tmp_path):
    """train_sandblaster.sbatch (its preset, fashion_sandblaster): 2 ranks under the auto launcher, a few L-BFGS steps."""
    run = tmp_path / "run"
    jid = slurm.sbatch("train_sandblaster.sbatch", "--batch_size=256", "--max_steps=4", "--log_every=2", opts=("--nodes=1", "--ntasks=2", "--cpus-per-task=1"),
                       env={"DATA": str(dataset), "RUN_DIR": str(run)}, wait=180)  # fmt: skip
    assert_completed(slurm, jid)
    out = (slurm.tmp / f"slurm-{jid}.out").read_text()
    assert "--config fashion_sandblaster" in out and "srun --mpi=pmix" in out, out  # auto: this Slurm has pmix
    assert json.loads((run / "summary.json").read_text())["steps"] == 4


def test_killed_rank_ends_job_and_a_resubmission_resumes_from_periodic_checkpoint(slurm, dataset, tmp_path):
    """A rank killed with SIGKILL (no signal contract) ends the whole job within seconds, FAILED and not requeued; the
    same script submitted again with the same RUN_DIR resumes from the last --checkpoint_every checkpoint."""
    run = tmp_path / "run"
    opts = ("--nodes=1", "--ntasks=2", "--cpus-per-task=1")
    args = [*ARGS, "--max_steps=70", "--checkpoint_every=10"]
    jid = slurm.sbatch("train_allreduce.sbatch", *args, opts=opts, env=env_for(dataset, run, LAUNCHER="mpirun"))
    slurm.wait_until(lambda: (run / "checkpoint.h5").exists() and checkpoint(run)[1] >= 10, 180, "a periodic checkpoint", jid)
    pids = subprocess.run(["scontrol", "listpids", jid], capture_output=True, text=True, timeout=30).stdout.split()
    ranks = [int(p) for p in pids if p.isdigit() and b"hpcdnn" in _cmdline(int(p)) and b"mpi4py" in _cmdline(int(p))
             and b"mpirun" not in _cmdline(int(p)) and b"prterun" not in _cmdline(int(p))]  # fmt: skip
    assert len(ranks) == 2, (pids, [_cmdline(int(p)) for p in pids if p.isdigit()])
    killed_at = time.monotonic()
    os.kill(ranks[-1], signal.SIGKILL)
    info = slurm.wait(jid, 60, what="after SIGKILL of a rank")
    took = time.monotonic() - killed_at
    assert info["JobState"] == "FAILED" and info["ExitCode"] != "0:0" and info["Restarts"] == "0", info
    assert took < 30, f"the job took {took:.0f} s to end after a rank died"
    assert not (run / "preempted.json").exists()
    at = checkpoint(run)[1]
    per_epoch = int(re.search(r"(\d+) steps/epoch", slurm.out(jid))[1])
    assert (at % 10 == 0 or at % per_epoch == 0) and at < 70, at  # a periodic or an end-of-epoch checkpoint
    again = slurm.sbatch("train_allreduce.sbatch", *args, opts=opts, env=env_for(dataset, run, LAUNCHER="srun"), wait=180)
    assert_completed(slurm, again)
    out = (slurm.tmp / f"slurm-{again}.out").read_text()
    assert f"resuming at step {at} " in out, out
    assert checkpoint(run)[1] == 70


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""
