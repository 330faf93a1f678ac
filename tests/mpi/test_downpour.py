"""Downpour SGD under real mpirun (Open MPI or MPICH, whichever this venv has), every case with a timeout."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import REPO, mpirun, signal_once_logging
from test_tensorboard import assert_same, expected_events

pytestmark = pytest.mark.mpi
CASES = Path(__file__).with_name("downpour_cases.py")


def hpcdnn(n: int, *args, timeout: float = 240) -> subprocess.CompletedProcess:
    """`hpcdnn train` as a real job: n ranks under mpirun (n = 0: one plain process)."""
    cmd = [sys.executable, "-m", "hpcdnn", "train", *map(str, args)]
    if n:
        cmd = [*mpirun(n), sys.executable, "-m", "mpi4py", "-m", "hpcdnn", "train", *map(str, args)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:  # a hang (seen once in CI): SIGUSR2 makes the CLI print every thread's stack
        proc.send_signal(signal.SIGUSR2)
        time.sleep(5)
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"{' '.join(cmd)} hung for {timeout} s; its stacks:\n{out[-3000:]}\n{err[-6000:]}") from None
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}\n{out[-3000:]}\n{err[-3000:]}"
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def case(n: int, name: str, out: Path, timeout: float = 120, env: dict | None = None) -> dict:
    cmd = [*mpirun(n), sys.executable, "-m", "mpi4py", str(CASES), name, str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
    assert r.returncode == 0, f"{name} exited {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return json.loads((out / "result.json").read_text())


def params(run: Path) -> np.ndarray:
    with h5py.File(run / "checkpoint.h5", "r") as f:
        return f["params"][...]


COMMON = ["--config=fashion_small", "--batch_size=32", "--log_every=10", "--threads=1", "--lr_schedule=constant", "--lr=0.02"]


@pytest.mark.parametrize("ranks", [2, 3])
def test_one_worker_sgd_equals_torch_sgd(tmp_path, ranks):
    """1 or 2 servers + 1 worker, n_fetch = n_push = 1: 50 momentum-SGD pushes == torch.optim.SGD within 1e-5."""
    r = case(ranks, "sgd_vs_torch", tmp_path)
    assert r["pushes_applied"] == r["pushes_sent"] == 50 and r["servers"] == ranks - 1
    assert r["staleness_max"] == 0
    assert r["max_abs_diff"] < 1e-5


@pytest.mark.parametrize("servers", [1, 2])
def test_one_worker_driver_equals_local_trainer(fashion_tiny, tmp_path, servers):
    """The whole driver path (initial placement, data order, cadence): one Downpour worker == `--topology=local`.

    10 steps, not 50: alexnet_small's max-pooling turns the last-ulp difference between the servers' p + delta and
    the local fused update into a different argmax within ~15 steps on this data (both runs are deterministic);
    the 50-step equality is the smooth-model case above.
    """
    args = [*COMMON, f"--data={fashion_tiny}", "--max_steps=10", "--optimizer=sgd", "--momentum=0.9"]
    hpcdnn(0, *args, f"--run_dir={tmp_path / 'local'}")
    hpcdnn(servers + 1, *args, f"--run_dir={tmp_path / 'dp'}", "--topology=downpour", f"--servers={servers}")
    assert np.abs(params(tmp_path / "dp") - params(tmp_path / "local")).max() < 1e-6
    summary = json.loads((tmp_path / "dp" / "summary.json").read_text())
    assert summary["pushes_sent"] == summary["pushes_applied"] == 10 and summary["servers"] == servers


def test_three_workers_account_for_every_push(fashion_tiny, tmp_path, read_events):
    """1 server + 3 workers, Adagrad, max_staleness=1 (drop): sent == applied + rejected, histogram sums to applied."""
    run = tmp_path / "dp3"
    hpcdnn(4, *COMMON, f"--data={fashion_tiny}", f"--run_dir={run}", "--topology=downpour", "--optimizer=adagrad", "--epochs=2",
           "--max_staleness=1", "--warmstart_steps=3", "--tensorboard=true")  # fmt: skip
    s = json.loads((run / "summary.json").read_text())
    events = read_events(run)  # the push and staleness counts reach TensorBoard as logged
    assert_same(events, expected_events(run))
    assert {"train/pushes_applied", "train/staleness_mean", "summary/pushes_sent", "summary/staleness_max"} <= set(events)
    assert s["workers"] == 3 and s["pushes_sent"] == sum(s["worker_steps"]) > 0
    assert s["pushes_sent"] == s["pushes_applied"] + s["pushes_rejected"]
    assert sum(s["staleness_hist"]) == s["pushes_applied"]
    assert s["staleness_max"] <= 1 and s["rejected_stale"] == s["pushes_rejected"]
    assert np.isfinite(params(run)).all()
    # the control words of 3 workers cannot be resumed by 2: a clear error on every rank, the checkpoint untouched
    before = (run / "checkpoint.h5").read_bytes()
    cmd = [*mpirun(3), sys.executable, "-m", "mpi4py", "-m", "hpcdnn", "train", *COMMON, f"--data={fashion_tiny}", f"--run_dir={run}",
           "--topology=downpour", "--optimizer=adagrad", "--epochs=2", "--max_staleness=1", "--warmstart_steps=3", "--resume"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode != 0 and "another number of workers (3, now 2)" in r.stderr, r.stderr[-2000:]
    assert (run / "checkpoint.h5").read_bytes() == before


def test_adagrad_one_worker_matches_torch(tmp_path):
    """2 servers + 1 worker: 30 Adagrad pushes (weight decay on) equal torch.optim.Adagrad's trajectory."""
    r = case(3, "adagrad_vs_torch", tmp_path)
    assert r["pushes_applied"] == 30
    assert r["max_abs_diff"] < 1e-5


def test_nan_push_is_rejected(tmp_path):
    r = case(3, "nan_push", tmp_path)
    assert r["rejected_nonfinite"] == 1 and r["pushes_applied"] == 9 and r["pushes_sent"] == 10
    assert r["finite"]


def test_stalled_worker_does_not_stop_the_others(tmp_path):
    """SIGSTOP one of two workers for 3 s: the server keeps applying the other's pushes; afterwards all finish."""
    cmd = [*mpirun(3), sys.executable, "-m", "mpi4py", str(CASES), "stalled_worker", str(tmp_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "DURATION": "9"})
    try:
        pid_file = tmp_path / "worker1.pid"
        deadline = time.time() + 60
        while not pid_file.exists() and time.time() < deadline:
            time.sleep(0.1)
        assert pid_file.exists(), "worker 1 never started"
        time.sleep(1.5)
        pid = int(pid_file.read_text())
        os.kill(pid, signal.SIGSTOP)
        t0 = time.time()
        time.sleep(3)
        t1 = time.time()
        os.kill(pid, signal.SIGCONT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    r = json.loads((tmp_path / "result.json").read_text())
    during = [applied for t, applied in r["trace"] if t0 + 0.5 <= t <= t1]
    assert len(during) >= 10 and during[-1] - during[0] >= 10, "the server stopped applying while a worker was frozen"
    assert r["pushes_sent"] == r["pushes_applied"] + r["pushes_rejected"]
    assert min(r["worker_steps"]) > 0


def test_error_on_every_rank_aborts_instead_of_hanging(fashion_tiny, tmp_path):
    """--servers equal to the rank count leaves no worker: every rank errors and the job ends (no hang)."""
    cmd = [*mpirun(3), sys.executable, "-m", "mpi4py", "-m", "hpcdnn", "train", *COMMON, f"--data={fashion_tiny}",
           f"--run_dir={tmp_path}", "--topology=downpour", "--servers=3"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=REPO)
    assert r.returncode != 0
    assert "leaves no worker" in r.stderr


def test_signal_checkpoints_and_resume_finishes(fashion_tiny, tmp_path):
    """SIGUSR1 to mpirun mid-run: every rank stops cleanly (exit 0), preempted.json + checkpoint; --resume finishes
    with every worker at its full step count and every push accounted for across both runs."""
    run = tmp_path / "run"
    args = [*COMMON, f"--data={fashion_tiny}", f"--run_dir={run}", "--topology=downpour", "--optimizer=adagrad", "--batch_size=16",
            "--epochs=3", "--log_every=3"]  # fmt: skip
    cmd = [*mpirun(3), sys.executable, "-m", "mpi4py", "-m", "hpcdnn", "train", *args]
    code, err = signal_once_logging(cmd, run)  # mpirun forwards SIGUSR1 to every rank
    assert code == 0, err[-3000:]
    stopped = json.loads((run / "preempted.json").read_text())
    assert 0 < stopped["step"] < 60 and not (run / "summary.json").exists()
    hpcdnn(3, *args, "--resume")
    s = json.loads((run / "summary.json").read_text())
    assert s["worker_steps"] == [60, 60] and s["steps"] == 60  # 640 images / 2 workers / 16 per batch x 3 epochs
    assert s["pushes_sent"] == s["pushes_applied"] + s["pushes_rejected"] == 120
    assert not (run / "preempted.json").exists()


def test_roles_placement_and_window_checks(tmp_path):
    cmd = [*mpirun(3), sys.executable, "-m", "mpi4py", str(CASES), "roles", str(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = json.loads((tmp_path / "result.json").read_text())
    assert [x["first"]["servers"] for x in ranks] == [[0]] * 3 and ranks[0]["first"]["workers"] == [1, 2]
    assert ranks[0]["last"]["servers"] == [2] and ranks[0]["last"]["root"] == 0
    assert ranks[0]["env"]["servers"] == [1] and ranks[0]["env"]["workers"] == [0, 2]
    assert [x["env"]["index"] for x in ranks] == [0, 0, 1]  # worker 0, the server's shard 0, worker 1
    assert all("HPCDNN_ROLE='gpu'" in x["bad_env"] for x in ranks)
    assert ranks[0]["sum"] == [6.0] * 8
    assert all("outside rank 0's part of 8" in x["bounds"] and "freed" in x["freed"] for x in ranks)
