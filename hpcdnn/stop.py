"""SIGUSR1/SIGTERM become a flag, so a run stops at a step boundary with a checkpoint instead of dying.

Slurm's `--signal=B:USR1@lead` (forwarded to the ranks by mpirun or srun), preemption and time limits end a job
with a signal. `install()` is called first thing by the CLI (a signal during imports, MPI start-up or data
loading must not kill a rank either) and again by the drivers, which get the same object and poll `.received`.
This module imports nothing heavy on purpose.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
PREEMPTED = "preempted.json"  # in the run directory while a stopped run waits for --resume (sbatch scripts requeue on it)
_current: StopSignal | None = None


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
