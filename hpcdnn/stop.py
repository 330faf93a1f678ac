"""SIGUSR1/SIGTERM become a flag, so a run stops at a step boundary with a checkpoint instead of dying.

Slurm's `--signal=B:USR1@lead` (forwarded to the ranks by mpirun or srun), preemption and time limits end a job
with a signal. `install()` is called first thing by the CLI (a signal during imports, MPI start-up or data
loading must not kill a rank either) and again by the drivers, which get the same object and poll `.received`.
A signal is not the only thing that stops a run: a launcher ends the survivors of a crashed rank with SIGTERM too.
So before the root writes preempted.json (the batch script requeues on it), every rank of the job, servers too, says
it is ending cleanly (`end_cleanly`); a rank that never does was lost, and the run fails naming it instead.
This module imports nothing heavy on purpose.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
PREEMPTED = "preempted.json"  # in the run directory while a stopped run waits for --resume (sbatch scripts requeue on it)
AGREE_S = 30.0  # how long the root waits at the end for every rank's "ending cleanly"; silent longer: lost
AGREE_TAG = 18500  # the goodbyes' point-to-point tag on the job's communicator (below MPI's minimum TAG_UB, 32767)
_current: StopSignal | None = None


class RankLost(ValueError):
    """A rank never said it was ending cleanly. A ValueError so the CLI prints it as one line and aborts the job."""


class StopSignal:
    """Remembers the last SIGUSR1/SIGTERM received (`received`); `close()` puts the previous handlers back."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.held = False  # True: kept until the process exits (`install(hold=True)`), close() leaves it installed
        self.old = {}
        if threading.current_thread() is threading.main_thread():
            self.old = {s: signal.signal(s, self._handle) for s in SIGNALS}

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def close(self) -> None:
        global _current
        if self.held:  # installed by the CLI: a signal during teardown must not kill the rank (it exits 0 anyway)
            return
        for s, h in self.old.items():
            signal.signal(s, h)
        self.old = {}
        if _current is self:
            _current = None


def mark_preempted(run_dir: Path, step: int, signum: int | None) -> None:
    """Root only, after the checkpoint is written: record the stop so the batch script requeues and the user knows."""
    from hpcdnn.atomic import write_json

    write_json(Path(run_dir) / PREEMPTED, {"step": step, "signal": signum or "peer", "time": time.time()})
    print(f"hpcdnn: stopped by signal at step {step}; checkpoint in {run_dir}; --resume continues", flush=True)


def install(hold: bool = False) -> StopSignal:
    """The process's StopSignal, created (and the handlers installed) on first use. hold=True (the CLI) keeps the
    handlers until the process exits, so a signal that arrives while a finished or stopped run tears down is ignored."""
    global _current
    if _current is None:
        _current = StopSignal()
    _current.held = _current.held or hold
    return _current


def end_cleanly(roles, run_dir: Path, step: int, signum: int | None, stopped: bool, servers: bool, timeout_s: float = AGREE_S) -> None:
    """Every rank at the end of train(), in two rounds: the workers before their teardown (which blocks on a dead
    rank), the servers (Downpour) once the root has ended them. Each rank tells the root it ends cleanly; the root
    raises RankLost naming a silent rank of a `stopped` run, and writes preempted.json after the servers' round."""
    group = [] if roles is None else (roles.servers if servers else roles.workers)
    missing = goodbyes(roles.comm, roles.root, group, timeout_s) if group else []
    who = ", ".join(f"rank {r} ({'server' if r in roles.servers else 'worker'})" for r in missing)
    if missing and stopped:
        raise RankLost(
            f"{who} never said it was ending cleanly within {timeout_s:g} s after the stop at step {step}: lost (crashed, "
            f"killed, or its node died), so this is no preemption: no {PREEMPTED}, no requeue. The checkpoint in {run_dir} "
            "is kept: find that rank's error above, then --resume continues"
        )
    if missing:  # the run finished and its summary is written: a rank lost while tearing down changes nothing
        print(f"hpcdnn: warning: {who} never said it was ending cleanly within {timeout_s:g} s of the finish", flush=True)
    elif stopped and servers and (roles is None or roles.is_root):
        mark_preempted(run_dir, step, signum)


def goodbyes(comm, root: int, ranks: list[int], timeout_s: float = AGREE_S) -> list[int]:
    """Each of `ranks` but the root sends the root one word; the root returns those it did not hear from within
    timeout_s (nonblocking and polled: a dead rank must not hang the root as a barrier would); [] elsewhere."""
    import numpy as np

    rank = comm.Get_rank()
    words = np.ones(comm.Get_size(), np.int64)
    if rank != root:
        if rank in ranks:  # one word: sent eagerly, complete at once even if the root is gone
            _wait(comm.Isend(words[rank : rank + 1], dest=root, tag=AGREE_TAG), timeout_s)
        return []
    others = [r for r in ranks if r != root]
    reqs = [comm.Irecv(words[r : r + 1], source=r, tag=AGREE_TAG) for r in others]
    done = _wait_all(reqs, timeout_s)
    for req, ok in zip(reqs, done):
        if not ok:
            req.Cancel()
    return [r for r, ok in zip(others, done) if not ok]


def _wait(req, timeout_s: float) -> bool:
    """Whether `req` completed within timeout_s (left pending if not: the process is about to end)."""
    end = time.monotonic() + timeout_s
    while not req.Test():
        if time.monotonic() > end:
            return False
        time.sleep(0.01)
    return True


def _wait_all(reqs: list, timeout_s: float) -> list[bool]:
    """Which of `reqs` completed within timeout_s."""
    done, end = [False] * len(reqs), time.monotonic() + timeout_s
    while not all(done) and time.monotonic() <= end:
        for i, r in enumerate(reqs):
            done[i] = done[i] or bool(r.Test())
        if not all(done):
            time.sleep(0.01)
    return done
