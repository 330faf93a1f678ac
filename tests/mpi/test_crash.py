"""A crashed rank is not a preemption: only a stop every rank ends cleanly writes preempted.json (hpcdnn/stop.py).

Under real mpirun (Open MPI or MPICH, whichever this venv has). Two launches keep the survivors of a killed rank
running, as srun without --kill-on-bad-exit does: Open MPI's `--enable-recovery`, MPICH's `-disable-auto-cleanup`.
This file is also the MPI program of the agreement cases: `python -m mpi4py tests/mpi/test_crash.py CASE OUT`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.mpi
HERE = Path(__file__)
REPO = HERE.resolve().parents[2]
ARGS = ["--config=fashion_small", "--batch_size=16", "--log_every=2", "--threads=1", "--lr_schedule=constant", "--lr=0.02",
        "--topology=downpour", "--servers=1", "--epochs=50"]  # fmt: skip


def keep_survivors() -> list[str]:
    """The launcher flag that leaves the other ranks running when one dies (the default kills them at once)."""
    from hpcdnn.mpirun import flavour

    return ["--enable-recovery"] if flavour() == "openmpi" else ["-disable-auto-cleanup"]


def rank_pids(launcher_pid: int) -> dict[int, int]:
    """{rank: pid} of the launcher's descendants, from the rank each MPI puts in its processes' environment."""
    found, todo = {}, [launcher_pid]
    while todo:
        pid = todo.pop()
        try:
            kids = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:  # exited meanwhile
            continue
        todo += kids
        for var in env:
            if pid != launcher_pid and var.startswith((b"OMPI_COMM_WORLD_RANK=", b"PMI_RANK=")):
                found[int(var.split(b"=")[1])] = pid
    return found


def test_killed_server_ends_the_job_without_preempted_json(fashion_tiny, tmp_path):
    """SIGKILL the Downpour server (rank 0) mid-run: the job exits non-zero, leaves no preempted.json, and the
    output names the lost rank."""
    from conftest import mpirun

    run = tmp_path / "run"
    cmd = [*mpirun(3), sys.executable, "-m", "mpi4py", "-m", "hpcdnn", "train", *ARGS, f"--data={fashion_tiny}", f"--run_dir={run}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        wait_for_metrics(proc, run)
        ranks = rank_pids(proc.pid)
        assert sorted(ranks) == [0, 1, 2], ranks
        os.kill(ranks[0], signal.SIGKILL)
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode != 0, out[-2000:] + err[-3000:]
    assert not (run / "preempted.json").exists()
    named = ("rank 0", f"PID {ranks[0]} ")  # Open MPI: "process rank 0 with PID ..."; MPICH's Hydra names the PID
    assert any(n in out + err for n in named), out[-2000:] + err[-3000:]


def wait_for_metrics(proc: subprocess.Popen, run: Path, timeout: float = 180) -> None:
    metrics, end = run / "metrics.jsonl", time.monotonic() + timeout
    while not (metrics.exists() and metrics.read_text()):
        if proc.poll() is not None or time.monotonic() > end:
            raise AssertionError(f"the run never logged a step (exit {proc.poll()})")
        time.sleep(0.1)


def agreement(case: str, out: Path) -> dict | None:
    """Run an agreement case on 3 real ranks (1 server, 2 workers) that survive a killed peer; its result.json, or
    None where MPICH ended the job itself (it kills a rank that talks to a dead one): then no preempted.json either."""
    from conftest import mpirun

    cmd = [*mpirun(3, *keep_survivors()), sys.executable, "-m", "mpi4py", str(HERE), case, str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=REPO)
    if not (out / "result.json").exists():
        from hpcdnn.mpirun import flavour

        assert flavour() == "mpich" and case != "all_end", (
            f"{case} exited {r.returncode} without a result\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        )
        assert r.returncode != 0 and not (out / "preempted.json").exists(), r.stderr[-3000:]
        return None
    return json.loads((out / "result.json").read_text())


def test_a_worker_lost_after_the_stop_is_named_and_no_preempted_json(tmp_path):
    """A stopped run whose worker rank 2 dies (SIGKILL) before it ends cleanly: the root raises RankLost naming rank 2
    and writes no preempted.json (the code before: the root wrote it regardless of the other ranks)."""
    r = agreement("worker_killed", tmp_path)
    if r is not None:
        assert r["error"].startswith("rank 2 (worker) never said it was ending cleanly"), r
        assert "no preempted.json" in r["error"] and not r["preempted"], r


def test_a_server_lost_in_teardown_is_named_and_no_preempted_json(tmp_path):
    """The same for the Downpour server (rank 0), which ends after the workers' round."""
    r = agreement("server_killed", tmp_path)
    if r is not None:
        assert r["error"].startswith("rank 0 (server) never said it was ending cleanly"), r
        assert not r["preempted"], r


def test_every_rank_ending_cleanly_writes_preempted_json(tmp_path):
    """The control: nobody dies, the stop is a preemption; the root writes preempted.json with the step and signal."""
    r = agreement("all_end", tmp_path)
    assert r["error"] == "" and r["preempted"] == {"step": 7, "signal": int(signal.SIGUSR1)}, r


def _case(name: str, out: Path) -> None:
    """One agreement case on COMM_WORLD: rank 0 serves, ranks 1 and 2 work (1 is the root); stopped at step 7."""
    from mpi4py import MPI

    from hpcdnn import stop
    from hpcdnn.mpi.roles import split_roles

    comm = MPI.COMM_WORLD
    roles = split_roles(comm, 1)
    rank, error = comm.Get_rank(), ""
    end = dict(run_dir=out, step=7, signum=int(signal.SIGUSR1), stopped=True, timeout_s=5.0)
    if (name, rank) in (("worker_killed", 2), ("server_killed", 0)):
        os.kill(os.getpid(), signal.SIGKILL)
    try:
        if not roles.is_server:
            stop.end_cleanly(roles, servers=False, **end)
        stop.end_cleanly(roles, servers=True, **end)
    except stop.RankLost as e:
        error = str(e)
    if roles.is_root:
        marker = out / stop.PREEMPTED
        found = json.loads(marker.read_text()) if marker.exists() else None
        result = {"error": error, "preempted": found and {k: found[k] for k in ("step", "signal")}}
        (out / "result.json").write_text(json.dumps(result))
    roles.free()
    if name != "all_end":  # a peer is dead: Finalize would wait for it
        os._exit(0)


if __name__ == "__main__":
    _case(sys.argv[1], Path(sys.argv[2]))
