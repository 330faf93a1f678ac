"""No orphans, no silent hangs (hpcdnn/watchdog.py): a killed mpirun leaves no rank behind, a frozen rank ends the job
with a report of who waits for whom and every stack, and a healthy run with a short --stall_timeout is left alone."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from conftest import REPO, mpirun
from test_downpour import hpcdnn

pytestmark = pytest.mark.mpi
TOKEN = "HPCDNN_TEST_JOB"  # in the environment of every process of a job this file starts, to find them in /proc
ARGS = ["--config=fashion_small", "--batch_size=16", "--threads=1", "--log_every=1", "--lr_schedule=constant"]


def job_pids(token: str) -> dict[int, dict[str, str]]:
    """Live (not zombie) processes whose environment holds TOKEN=token: pid -> the MPI rank variables of its environment."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rpartition(")")[2].split()[0]
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if state != "Z" and f"{TOKEN}={token}".encode() in env:
            pairs = (e.decode(errors="replace").partition("=") for e in env)
            found[int(entry.name)] = {k: v for k, _, v in pairs if k in ("OMPI_COMM_WORLD_RANK", "PMI_RANK")}
    return found


def rank_pid(token: str, rank: int) -> int:
    """The pid of MPI rank `rank` of the job (Open MPI or MPICH set its rank in the environment)."""
    for pid, env in job_pids(token).items():
        if str(rank) in env.values():
            return pid
    raise AssertionError(f"no process of job {token} is rank {rank}: {job_pids(token)}")


def start(data: Path, run_dir: Path, token: str, *extra: str) -> tuple[subprocess.Popen, Path]:
    """3-rank training under mpirun in its own session (so killing it reaches no one else), output to files."""
    cmd = [*mpirun(3), sys.executable, "-m", "mpi4py", "-m", "hpcdnn", "train", *ARGS, f"--data={data}", f"--run_dir={run_dir}", *extra]
    err = run_dir.parent / f"{run_dir.name}.stderr"
    with open(err, "w") as stderr:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=stderr, cwd=REPO, start_new_session=True, env={**os.environ, TOKEN: token}
        )
    return proc, err


def wait_training(proc: subprocess.Popen, run_dir: Path, err: Path, timeout: float = 240) -> None:
    """Until the run has logged a step (every rank is past its setup); fails if it ends or stays silent first."""
    metrics, deadline = run_dir / "metrics.jsonl", time.monotonic() + timeout
    while not metrics.exists() or not metrics.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"the run never logged a step (exit {proc.poll()})\n{err.read_text()[-3000:]}")
        time.sleep(0.2)


def kill_job(proc: subprocess.Popen, token: str) -> None:
    """Clean up whatever this test started and is still there (by pid: mpirun and the processes holding our token)."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    for pid in job_pids(token):
        for sig in (signal.SIGCONT, signal.SIGKILL):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass


def test_killed_mpirun_leaves_no_rank(fashion_tiny, tmp_path):
    """SIGKILL mpirun while Downpour trains (1 server, 2 workers): within 60 s no process of the job is left. Before
    the watchdog a worker polling the server's window, reparented to init, waited forever (allreduce ranks, inside MPI
    collectives, were already ended by the MPI library)."""
    token = uuid.uuid4().hex
    proc, err = start(fashion_tiny, tmp_path / "run", token, "--topology=downpour", "--lr=0.005", "--epochs=500")
    try:
        wait_training(proc, tmp_path / "run", err)
        assert len(job_pids(token)) >= 4, f"expected mpirun and 3 ranks: {job_pids(token)}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 60
        while job_pids(token) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not job_pids(token), f"processes of the job still alive 60 s after mpirun was killed: {job_pids(token)}"
    finally:
        kill_job(proc, token)


def test_frozen_rank_ends_the_job_with_a_report(fashion_tiny, tmp_path):
    """SIGSTOP rank 1 once training runs: the others find no step finished for --stall_timeout=15 s, say what they
    wait in (rank 2 in the ring for its left neighbour, rank 1; or the per-step stop agreement, by where rank 1 froze),
    dump their stacks and end the job non-zero."""
    token = uuid.uuid4().hex
    proc, err = start(fashion_tiny, tmp_path / "run", token, "--topology=allreduce", "--epochs=500", "--stall_timeout=15")
    try:
        wait_training(proc, tmp_path / "run", err)
        os.kill(rank_pid(token, 1), signal.SIGSTOP)
        try:
            rc = proc.wait(timeout=180)  # 15 s and an abort; a hang guard, not a speed check
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the job with a frozen rank was still running after 180 s\n{err.read_text()[-3000:]}") from None
        text = err.read_text()
        assert rc != 0, text[-3000:]
        reports = {
            int(r): block
            for r, block in re.findall(r"hpcdnn: error \(rank (\d)\): no step finished(.*?)stacks of every thread", text, re.S)
        }
        reports.pop(1, None)  # the frozen rank itself, continued by mpirun to be killed, may report too: not its say
        assert reports, f"no live rank reported the stall:\n{text[-3000:]}"
        for rank, block in reports.items():
            assert "--stall_timeout=SECONDS (0 turns the check off)" in block, block
            ring = re.search(r"waiting in ring allreduce of bucket \d+ \(receiving from its left neighbour\), for rank (\d) since", block)
            assert ring or "waiting in the stop agreement" in block, f"rank {rank} names no wait:\n{block}"
            assert not ring or rank != 2 or ring[1] == "1", f"rank 2's left neighbour is rank 1:\n{block}"
        assert "most recent call first" in text, text[-3000:]  # faulthandler's stacks of every thread
    finally:
        kill_job(proc, token)


def test_short_stall_timeout_spares_a_healthy_run(fashion_tiny, tmp_path):
    """A run whose steps take well under --stall_timeout=10 s finishes: its start-up (imports, data, model) is exempt."""
    r = hpcdnn(
        3,
        *ARGS,
        "--topology=allreduce",
        f"--data={fashion_tiny}",
        f"--run_dir={tmp_path / 'run'}",
        "--epochs=2",
        "--stall_timeout=10",
        timeout=300,
    )
    assert "no step finished" not in r.stderr


STALL = """
import time
from hpcdnn import watchdog
with watchdog.watched(1.0):
    time.sleep(3)  # start-up: the clock starts at the first step
    watchdog.progress(7)
    with watchdog.paused():
        time.sleep(3)  # the others wait for the root's evaluation: no alarm either
    with watchdog.Waiting("a test receive", peer=5):
        time.sleep(60)
"""


def test_stall_report_names_the_wait_and_step():
    """One process, no MPI: no alarm during the 3 s before the first step, nor during 3 s paused(); then 1 s without a step reports the
    recorded wait, the step and how to raise the timeout, dumps the stacks and exits STALL_EXIT (3)."""
    r = subprocess.run([sys.executable, "-c", STALL], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 3, r.stderr
    assert "(last step 7, --stall_timeout=1)" in r.stderr, r.stderr
    assert "waiting in a test receive, for rank 5 since" in r.stderr and "at step 7" in r.stderr, r.stderr
    assert "raise it: --stall_timeout=SECONDS (0 turns the check off)" in r.stderr, r.stderr
    assert "most recent call first" in r.stderr, r.stderr


RANK = """
import sys, time
from hpcdnn import watchdog
with watchdog.watched(0):  # the stall check off: only the parent watch
    open(sys.argv[1], "w").close()
    time.sleep(600)
"""
LAUNCHER = """
import subprocess, sys, time
subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]], stderr=open(sys.argv[3], "w"))
time.sleep(600)
"""


def test_rank_whose_launcher_is_killed_says_so_and_exits(tmp_path):
    """No MPI: a stand-in launcher starts a 'rank' (OMPI_COMM_WORLD_SIZE set, as under mpirun) and is SIGKILLed; the
    rank, reparented, prints one line naming the launcher's pid and exits within 60 s."""
    token, ready, err = uuid.uuid4().hex, tmp_path / "ready", tmp_path / "rank.stderr"
    env = {**os.environ, TOKEN: token, "OMPI_COMM_WORLD_SIZE": "1"}
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, RANK, str(ready), str(err)], env=env, cwd=REPO, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert launcher.poll() is None and time.monotonic() < deadline, (
                f"the rank never started\n{err.read_text() if err.exists() else ''}"
            )
            time.sleep(0.1)
        launcher.kill()
        launcher.wait()
        deadline = time.monotonic() + 60
        while job_pids(token) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not job_pids(token), f"the rank is still alive 60 s after its launcher was killed: {job_pids(token)}"
        assert err.read_text() == f"hpcdnn: error (rank 0): the launcher (pid {launcher.pid}) is gone; exiting\n"
    finally:
        kill_job(launcher, token)
