"""A crashed rank under the real Slurm ends the job FAILED, never requeued as if it had been preempted.

The job is slurm/train_downpour.sbatch (1 server + 2 workers, alexnet_small on 600 generated 28x28 images) under
the watcher (`hpcdnn launch`, env.sh's default); its server rank is SIGKILLed once the run trains. Before this,
the launcher's SIGTERM to the survivors could make them write preempted.json and env.sh requeued on it whatever
the exit code (slurm/env.sh: only a fresh preempted.json with exit 0 and no failed.json requeues now).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
from slurmjobs import *  # noqa: F403  (the fixtures: cluster, slurm, idx_input, dataset)
from slurmjobs import TERMINAL, VENV

pytestmark = pytest.mark.slurm

ARGS = ["--batch_size=16", "--lr_schedule=constant", "--lr=0.01", "--log_every=5", "--epochs=100", "--max_steps=2000",
        "--checkpoint_every=10"]  # fmt: skip
RANK_VARS = (b"OMPI_COMM_WORLD_RANK=", b"PMIX_RANK=", b"PMI_RANK=")


def rank_of(pid: int) -> int | None:
    """The MPI rank in a process's environment (Open MPI's mpirun, srun's PMIx, MPICH); None for other processes."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"mpi4py" not in f.read():
                return None
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = f.read().split(b"\0")
    except OSError:
        return None
    found = [int(v.split(b"=", 1)[1]) for v in env if v.startswith(RANK_VARS)]
    return found[0] if found else None


def rank_pids(jid: str) -> dict[int, int]:
    pids = subprocess.run(["scontrol", "listpids", jid], capture_output=True, text=True, timeout=30).stdout.split()
    ranks = {rank_of(int(p)): int(p) for p in pids if p.isdigit()}
    ranks.pop(None, None)
    return ranks


def test_killed_server_rank_fails_the_job_without_requeue(slurm, dataset, tmp_path):
    """SIGKILL the Downpour server rank once the job trains (under mpirun, as tests/slurm/test_train_jobs.py's Downpour
    job: srun --mpi=pmix with 3 tasks fails MPI_Init now and then on this host): the job ends FAILED with a non-zero exit code, is not
    requeued (Restarts 0, no `scontrol requeue` in its output) and leaves no fresh preempted.json."""
    run = tmp_path / "run"
    opts = ("--nodes=1", "--ntasks=3", "--cpus-per-task=1", "--overcommit")
    env = {"CONFIG": "fashion_small", "DATA": str(dataset), "RUN_DIR": str(run), "LAUNCHER": "mpirun"}
    jid = slurm.sbatch("train_downpour.sbatch", *ARGS, opts=opts, env=env)
    slurm.wait_until(lambda: (run / "checkpoint.h5").exists(), 240, "a periodic checkpoint (the run trains)", jid)
    ranks = slurm.wait_until(lambda: (r := rank_pids(jid)) and len(r) == 3 and r, 60, "the job's 3 rank processes", jid)
    killed_at = time.time()
    os.kill(ranks[0], signal.SIGKILL)  # rank 0 serves (--placement=first)
    info = slurm.wait(jid, 300, TERMINAL | {"REQUEUED", "PENDING"}, what="after SIGKILL of the server rank")  # or requeued
    out = slurm.out(jid)
    assert info["JobState"] == "FAILED" and info["ExitCode"] != "0:0", f"{info}\n{out}"
    assert info["Restarts"] == "0" and "scontrol requeue" not in out, f"{info}\n{out}"
    marker = run / "preempted.json"
    assert not marker.exists() or marker.stat().st_mtime < killed_at, f"a fresh preempted.json after a crash\n{out}"


def test_a_rank_dying_after_the_stop_fails_the_job_instead_of_requeueing(slurm, dataset, tmp_path):
    """A real stop (SIGUSR1 to the batch shell, as --signal=B:USR1 sends) writes preempted.json, then a worker rank
    dies while exiting (SIGKILL, like a segfault in teardown): the launcher exits non-zero, so the job ends FAILED
    and is not requeued (env.sh requeued on a fresh preempted.json whatever the launcher's exit code)."""
    run = tmp_path / "run"
    wrapper = tmp_path / "python-dies-after-the-stop"  # PYTHON may wrap the ranks' interpreter (slurm/env.sh)
    wrapper.write_text(f"""#!/bin/bash
"{VENV}/bin/python" "$@" &
child=$!
trap 'kill -USR1 $child' USR1  # pass mpirun's forwarded stop on to the rank
trap 'kill -TERM $child' TERM
while :; do wait $child; rc=$?; kill -0 $child 2>/dev/null || break; done
for i in $(seq 60); do [ -f "{run}/preempted.json" ] && break; sleep 0.5; done
[ "${{OMPI_COMM_WORLD_RANK:-${{PMIX_RANK:-0}}}}" = 2 ] && [ -f "{run}/preempted.json" ] && kill -KILL $$
exit $rc
""")
    wrapper.chmod(0o755)
    opts = ("--nodes=1", "--ntasks=3", "--cpus-per-task=1", "--overcommit")
    env = {"CONFIG": "fashion_small", "DATA": str(dataset), "RUN_DIR": str(run), "LAUNCHER": "mpirun", "PYTHON": str(wrapper)}
    jid = slurm.sbatch("train_downpour.sbatch", *ARGS, opts=opts, env=env)
    slurm.wait_until(lambda: (run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_text(), 240, "training", jid)
    slurm.signal_batch(jid)
    info = slurm.wait(jid, 300, TERMINAL | {"REQUEUED", "PENDING"}, what="after the stop")
    out = slurm.out(jid)
    assert info["JobState"] == "FAILED" and info["ExitCode"] != "0:0", f"{info}\n{out}"
    assert info["Restarts"] == "0" and "scontrol requeue" not in out, f"{info}\n{out}"
    assert "a crash, not a preemption: not requeueing" in out, out
