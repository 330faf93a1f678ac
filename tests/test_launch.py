"""`hpcdnn launch` (hpcdnn/launch.py) and the ranks' heartbeat (hpcdnn/heartbeat.py) on one host: a rank killed or
frozen ends the job with exit 75 naming it, a launcher that exits 0 on an unfinished run is not believed, a normal
or preempted run keeps the launcher's status, a rank's own error is not a lost node. Cross-node faults:
tests/cluster/test_faults.py."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import REPO, mpirun

from hpcdnn import heartbeat
from hpcdnn.launch import EXIT_LOST, Rank, Watcher

COMMON = ["--config=fashion_small", "--batch_size=16", "--log_every=1", "--threads=1", "--lr_schedule=constant", "--lr=0.005"]
TRAIN = [sys.executable, "-m", "hpcdnn", "train", *COMMON]
LONG = "--epochs=100000"  # a run that only a fault or a signal ends (on tiny data an epoch is a few steps)


def train(data: Path, run_dir: Path, *args, ranks: int = 0) -> list[str]:
    """`hpcdnn train` as one process (ranks=0) or under mpirun -n ranks with --topology=allreduce."""
    if not ranks:
        return [*TRAIN, f"--data={data}", f"--run_dir={run_dir}", *map(str, args)]
    return [*mpirun(ranks), sys.executable, "-m", "mpi4py", *TRAIN[1:], f"--data={data}", f"--run_dir={run_dir}",
            "--topology=allreduce", *map(str, args)]  # fmt: skip


class Watch:
    """`hpcdnn launch -- CMD` as a real process; its output goes to a file (a leftover rank holding a pipe cannot
    block the test)."""

    def __init__(self, run_dir: Path, cmd: list[str], timeout_s: float = 30) -> None:
        self.run_dir, self.log = run_dir, run_dir.with_suffix(".log")
        argv = [sys.executable, "-m", "hpcdnn", "launch", f"--heartbeat_timeout={timeout_s}", "--", *cmd]
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)

    def ranks(self) -> dict[int, dict]:
        try:
            return {r["rank"]: r for r in json.loads((self.run_dir / "ranks.json").read_text())["ranks"]}
        except (OSError, ValueError):
            return {}

    def wait_step(self, rank: int, step: int = 1, timeout: float = 120) -> dict:
        """Rank `rank`'s record once its heartbeat reports `step`; fails if the watcher ends or waits too long."""
        deadline = time.time() + timeout
        while (self.ranks().get(rank) or {}).get("step", -1) < step:
            assert self.proc.poll() is None and time.time() < deadline, f"rank {rank} never reached step {step}\n{self.output()}"
            time.sleep(0.2)
        return self.ranks()[rank]

    def wait(self, timeout: float = 120) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()

    def output(self) -> str:
        return self.log.read_text()[-4000:]


def failed(run_dir: Path) -> dict:
    return json.loads((run_dir / "failed.json").read_text())


def test_watch_spec_and_where_ranks_find_it(tmp_path, monkeypatch):
    assert heartbeat.parse("ab12@10.0.0.1:5000,127.0.0.1:5000") == ("ab12", [("10.0.0.1", 5000), ("127.0.0.1", 5000)])
    for bad in ("10.0.0.1:5000", "tok@", "tok@host", "tok@host:port"):
        with pytest.raises(ValueError, match="TOKEN@HOST:PORT"):
            heartbeat.parse(bad)
    monkeypatch.delenv(heartbeat.ENV, raising=False)
    assert heartbeat.find(tmp_path) is None  # no watcher: train runs as it always did
    (tmp_path / heartbeat.FILE).write_text(json.dumps({"watch": "t@h:1"}))
    assert heartbeat.find(tmp_path) == (str(tmp_path / heartbeat.FILE), "t@h:1")
    monkeypatch.setenv(heartbeat.ENV, "u@g:2")
    assert heartbeat.find(tmp_path) == (heartbeat.ENV, "u@g:2")  # the environment wins over the file


def test_normal_run_keeps_the_launchers_status(tiny, tmp_path):
    run = tmp_path / "run"
    w = Watch(run, train(tiny, run, "--max_steps=3"))
    assert w.wait() == 0, w.output()
    assert [(r["state"], r["step"], r["role"]) for r in w.ranks().values()] == [("finished", 3, "worker")]
    assert (run / "summary.json").exists() and not (run / "failed.json").exists()
    assert not (run / heartbeat.FILE).exists()  # removed at the watcher's exit


@pytest.mark.mpi
def test_killed_rank_ends_the_job_naming_it(tiny, tmp_path):
    """SIGKILL rank 1 of 2 mid-run: exit 75 within 60 s, the error and failed.json name rank 1, its host, its step."""
    run = tmp_path / "run"
    w = Watch(run, train(tiny, run, LONG, ranks=2))
    victim = w.wait_step(1)
    os.kill(victim["pid"], signal.SIGKILL)
    t0 = time.time()
    assert w.wait(timeout=90) == EXIT_LOST, w.output()
    assert time.time() - t0 < 60
    out = w.output()
    assert f"lost rank 1 (worker) on {victim['host']} (pid {victim['pid']})" in out and "process or its node died" in out
    f = failed(run)
    assert [(x["rank"], x["host"], x["pid"]) for x in f["lost"]] == [(1, victim["host"], victim["pid"])]
    assert f["exit"] == EXIT_LOST and f["lost"][0]["step"] >= 1


def test_frozen_rank_is_lost_after_the_heartbeat_timeout(tiny, tmp_path):
    """SIGSTOP the only rank: no heartbeat for 3 s -> exit 75 naming it; the frozen process is killed with its group."""
    run = tmp_path / "run"
    w = Watch(run, train(tiny, run, LONG), timeout_s=3)
    rank = w.wait_step(0)
    os.kill(rank["pid"], signal.SIGSTOP)
    try:
        assert w.wait(timeout=60) == EXIT_LOST, w.output()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(rank["pid"], signal.SIGKILL)
    assert "lost rank 0 (worker)" in w.output() and "no heartbeat for" in w.output()
    assert failed(run)["lost"][0]["reason"].startswith("no heartbeat")


# A launcher that behaves like Open MPI's mpirun when a node dies: its rank vanishes and it exits 0.
VANISHING = textwrap.dedent("""
    import json, os, signal, subprocess, sys, time
    run_dir, cmd = sys.argv[1], sys.argv[2:]
    child = subprocess.Popen(cmd, start_new_session=True)
    while True:
        try:
            if json.load(open(os.path.join(run_dir, "ranks.json")))["ranks"][0]["step"] >= 1:
                break
        except (OSError, ValueError, IndexError, KeyError):
            pass
        time.sleep(0.2)
    os.kill(child.pid, signal.SIGKILL)
    sys.exit(0)
""")


def test_launcher_exiting_0_on_an_unfinished_run_is_not_believed(tiny, tmp_path):
    run = tmp_path / "run"
    w = Watch(run, [sys.executable, "-c", VANISHING, str(run), *train(tiny, run, LONG)])
    assert w.wait() == EXIT_LOST, w.output()
    assert "lost rank 0 (worker)" in w.output() and failed(run)["lost"][0]["rank"] == 0
    # no rank ever connects and nothing is written: still not a success
    empty = tmp_path / "empty"
    w = Watch(empty, ["sh", "-c", "exit 0", "sh", f"--run_dir={empty}"])
    assert w.wait() == EXIT_LOST, w.output()
    assert "the launcher exited 0 but the run did not finish" in w.output() and "no rank reached the watcher" in w.output()


@pytest.mark.mpi
def test_preempted_run_keeps_its_status(tiny, tmp_path):
    """SIGUSR1 to the watcher reaches the ranks through the launcher: checkpoint, preempted.json, exit 0, no failure."""
    run = tmp_path / "run"
    w = Watch(run, train(tiny, run, LONG, ranks=2))
    w.wait_step(1)
    w.proc.send_signal(signal.SIGUSR1)
    assert w.wait() == 0, w.output()
    assert (run / "preempted.json").exists() and (run / "checkpoint.h5").exists() and not (run / "failed.json").exists()
    assert {r["state"] for r in w.ranks().values()} == {"preempted"} and len(w.ranks()) == 2


@pytest.mark.mpi
def test_a_ranks_error_is_not_a_lost_node(tiny, tmp_path):
    """Every rank refuses the config and the job aborts: the launcher's non-zero status, the error named, no failed.json."""
    run = tmp_path / "run"
    cmd = [*train(tiny, run, ranks=2)[:-1], "--topology=downpour", "--servers=2"]
    w = Watch(run, cmd)
    code = w.wait()
    assert code not in (0, EXIT_LOST), w.output()
    assert "failed: ValueError" in w.output() and "leaves no worker" in w.output()
    assert not (run / "failed.json").exists()


def test_rank_that_cannot_reach_the_watcher_warns_once_and_trains(tiny, tmp_path):
    run = tmp_path / "run"
    w = Watch(run, ["env", f"{heartbeat.ENV}=tok@127.0.0.1:9", *train(tiny, run, "--max_steps=2")])  # port 9: refused
    assert w.wait() == 0, w.output()  # launcher 0 and a fresh summary.json: the run finished
    assert w.output().count("heartbeat: cannot reach the watcher") == 1
    assert (run / "summary.json").exists()


@pytest.mark.parametrize("mpi", [True, False])
def test_a_survivors_mpi_error_does_not_hide_the_dead_peer(tmp_path, mpi):
    """Rank 1 is SIGKILLed; rank 0's MPI then raises (MPICH returns the error) and says "error" - the watcher may read
    that before rank 1's closed connection (CI, MPICH). An MPI error is the peer's loss showing, so rank 1 is lost
    (exit 75); any other error comes first and the closures that follow are the job's abort, not a lost node."""
    w = Watcher(["true"], tmp_path)
    try:
        for rank in (0, 1):
            w.ranks[rank] = Rank({"rank": rank, "host": "h", "pid": 100 + rank, "world": 2}, now=1.0)
        w.ranks[0].update({"t": "error", "error": "Exception: See the MPI_ERROR field", "mpi": mpi}, now=10.0)
        w.ranks[1].state, w.ranks[1].closed_at = "closed", 10.2  # read after rank 0's error
        assert [r.rank for r in w._lost(11.0)] == ([1] if mpi else [])
    finally:
        w.sel.close()
        w.server.close()
