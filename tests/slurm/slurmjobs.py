"""Fixtures for tests/slurm: a real Slurm brought up once per session with ../shared/ci/slurm-up.sh, down at the end.

Run the tests with `make test-slurm` (= pytest -m slurm tests/slurm); plain `pytest` skips them (the `cluster` fixture
checks the -m expression). They need root (slurmd, munged); elsewhere they skip naming the reason.
HPCDNN_SLURM_KEEP=1 leaves the cluster up afterwards (quicker reruns).

Why not tests/slurm/conftest.py: tests/*.py do `from conftest import ...`, and pytest drops sys.modules["conftest"]
before importing a second conftest.py, so theirs would resolve to this one. Test modules import these fixtures.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SLURM_DIR = REPO / "slurm"
CI_DIR = Path(os.environ.get("HPCDNN_SLURM_CI", REPO.parent / "shared" / "ci"))
VENV = Path(sys.prefix)
__all__ = ["cluster", "slurm", "idx_input", "dataset"]  # what test modules take with `from slurmjobs import *`
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


@pytest.fixture(scope="session")
def cluster(request):
    """Start the shared one-host Slurm (two slurmd 'nodes' for heterogeneous jobs, 4 CPUs each) and stop it afterwards."""
    if "slurm" not in (request.config.getoption("-m") or ""):
        pytest.skip("Slurm tests run with `make test-slurm` (pytest -m slurm tests/slurm)")
    if os.geteuid() != 0:
        pytest.skip("Slurm tests start slurmctld/slurmd/munged and need root (CI runs them as root)")
    up, down = CI_DIR / "slurm-up.sh", CI_DIR / "slurm-down.sh"
    if not up.is_file():
        pytest.skip(f"{up} not found: set HPCDNN_SLURM_CI to the directory holding slurm-up.sh and slurm-down.sh")
    env = {**os.environ, "SLURM_NODES": "2", "SLURM_CPUS": "4"}
    r = subprocess.run(["bash", str(up)], capture_output=True, text=True, timeout=600, env=env)
    if r.returncode != 0:
        pytest.fail(f"slurm-up.sh exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    yield
    if os.environ.get("HPCDNN_SLURM_KEEP") != "1":
        subprocess.run(["bash", str(down)], capture_output=True, text=True, timeout=180, env=env)


class Slurm:
    """Submit the repository's real sbatch scripts and watch their jobs; cancels whatever it submitted at the end."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.jobs: list[str] = []
        self.env = {
            **os.environ,
            "HPCDNN_HOME": str(REPO),
            "HPCDNN_VENV": str(VENV),
            "PATH": f"{VENV / 'bin'}:{os.environ.get('PATH', '')}",
            "OMPI_MCA_osc": "^ucx",  # the wheel's UCX OSC component prints errors on machines without UCX devices
        }

    def sbatch(self, script: str, *args, opts: tuple = (), env: dict | None = None, wait: float = 0) -> str:
        """sbatch [opts] slurm/<script> [args]; returns the job id. Output goes to tmp/slurm-<id>.out. With `wait` (seconds),
        poll until the job has finished (sbatch --wait polls Slurm at growing intervals, up to 30 s late)."""
        cmd = ["sbatch", "--parsable", "--output", str(self.tmp / "slurm-%j.out"), *opts, str(SLURM_DIR / script), *map(str, args)]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env={**self.env, **(env or {})}, cwd=self.tmp)
        assert r.returncode == 0, f"{' '.join(cmd)} exited {r.returncode}: {r.stderr}"
        jid = r.stdout.strip().split(";")[0].split("+")[0]
        self.jobs.append(jid)
        if wait:
            self.wait(jid, wait)
        return jid

    def show(self, jid: str) -> dict:
        """`scontrol show job -o` of the job (its first component) as a dict; {} once Slurm has forgotten it."""
        r = subprocess.run(["scontrol", "show", "job", "-o", jid], capture_output=True, text=True, timeout=30)
        if r.returncode != 0 or not r.stdout.strip():
            return {}
        line = r.stdout.strip().splitlines()[0]
        return dict(m.groups() for m in re.finditer(r"(\w[\w/:]*)=(\S*)", line))

    def wait(self, jid: str, timeout: float, states=TERMINAL, what: str = "") -> dict:
        """Poll until the job's state is in `states` (default: finished); fail with its output otherwise."""
        end = time.monotonic() + timeout
        info = {}
        while time.monotonic() < end:
            info = self.show(jid)
            if info.get("JobState") in states:
                return info
            time.sleep(1)
        pytest.fail(
            f"job {jid}{' ' + what if what else ''}: not {sorted(states)} after {timeout:.0f} s: {info.get('JobState')}\n{self.diagnose(jid)}"
        )

    def wait_until(self, predicate, timeout: float, what: str, jid: str | None = None):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            value = predicate()
            if value:
                return value
            if jid and self.show(jid).get("JobState") in TERMINAL:
                pytest.fail(f"job {jid} ended before {what}\n{self.out(jid)}")
            time.sleep(0.5)
        pytest.fail(f"no {what} after {timeout:.0f} s\n{self.diagnose(jid) if jid else ''}")

    def wait_requeued(self, jid: str, timeout: float = 60) -> dict:
        """Wait until the job is pending again after a requeue (Restarts >= 1). Slurm then holds it for cred_expire + 1 s
        (31 s with slurm-up.sh's cred_expire=30; starting it earlier fails with 'Job credential revoked')."""
        return self.wait_until(lambda: (i := self.show(jid)).get("JobState") == "PENDING" and int(i.get("Restarts", 0)) >= 1 and i,
                               timeout, f"requeue of job {jid}", jid)  # fmt: skip

    def signal_batch(self, jid: str, sig: str = "USR1") -> None:
        """What --signal=B:USR1@lead does at the lead time: signal the batch shell (only it, not its children)."""
        subprocess.run(["scancel", f"--signal={sig}", "--batch", jid], check=True, timeout=30)

    def out(self, jid: str | None) -> str:
        p = self.tmp / f"slurm-{jid}.out"
        return f"--- {p}:\n{p.read_text()[-6000:]}" if p.exists() else f"(no {p})"

    def diagnose(self, jid: str) -> str:
        """What a timed-out wait prints: the job's Slurm record, its steps, the processes still running, its output."""
        info = self.show(jid)
        state = " ".join(f"{k}={info.get(k)}" for k in ("JobState", "Reason", "Restarts", "ExitCode", "RunTime", "NodeList"))
        steps = subprocess.run(["squeue", "--steps", "-j", jid], capture_output=True, text=True, timeout=30).stdout
        procs = subprocess.run(["ps", "-eo", "pid=,ppid=,stat=,etime=,args="], capture_output=True, text=True, timeout=30)
        rows = [line.split(None, 4) for line in procs.stdout.splitlines()]
        keep = {r[0] for r in rows if len(r) == 5 and "slurmstepd" in r[4]}  # every job's processes hang below these
        for _ in range(8):  # descendants, a few generations deep
            keep |= {r[0] for r in rows if len(r) == 5 and r[1] in keep}
        mine = "\n".join(" ".join(r) for r in rows if len(r) == 5 and r[0] in keep)
        ranks = [int(r[0]) for r in rows if len(r) == 5 and r[0] in keep and "hpcdnn train" in r[4]]
        for pid in ranks:  # a hung rank prints every thread's Python stack (cli.py's SIGUSR2 faulthandler) into the output
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGUSR2)
        if ranks:
            time.sleep(3)
        return f"--- job {jid}: {state}\n--- steps:\n{steps}--- processes:\n{mine}\n{self.out(jid)}"

    def cancel_all(self) -> None:
        for jid in self.jobs:
            if self.show(jid).get("JobState") not in TERMINAL | {""}:
                subprocess.run(["scancel", jid], capture_output=True, timeout=30)


@pytest.fixture
def slurm(cluster, tmp_path):
    s = Slurm(tmp_path)
    yield s
    s.cancel_all()


def make_idx_input(d: Path) -> Path:
    """MNIST-style IDX files (600 train, 100 test, 28x28, 10 classes) in `d`, real files made by tests/fakes.py."""
    sys.path.insert(0, str(REPO / "tests"))
    from fakes import make_idx_dataset

    make_idx_dataset(d, n_train=600, n_test=100, seed=1)
    return d


def shard_idx(idx: Path, out: Path) -> Path:
    """`idx` sharded into `out` by a serial in-process data-prep run: the jobs' data and the array's reference bytes."""
    from data_prep.cli import main

    assert main(["idx", "--dir", str(idx), "--out", str(out), "--shard-size", "50"]) == 0
    return out


@pytest.fixture(scope="session")
def idx_input(cluster, tmp_path_factory):
    return make_idx_input(tmp_path_factory.mktemp("idx"))


@pytest.fixture(scope="session")
def dataset(idx_input, tmp_path_factory):
    return shard_idx(idx_input, tmp_path_factory.mktemp("data") / "idx")
