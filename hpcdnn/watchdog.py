"""No orphans, no silent hangs: a rank whose launcher is gone exits, and a rank that finishes no step for
`--stall_timeout` seconds says what it waits in and for whom, dumps every thread's stack, then ends the whole job.

    with watchdog.watched(cfg.stall_timeout, comm):          # hpcdnn/cli.py, around train()
        ...
    watchdog.progress(step)                                  # heartbeat.note(step=...) calls it after every step
    with watchdog.Waiting("ring allreduce", peer=2):         # around a blocking communication (hpcdnn/mpi/)
        ...

Parent watch: under a launcher (mpirun's prterun, MPICH's hydra_pmi_proxy, srun's slurmstepd: found by their
environment) a daemon thread compares os.getppid() with the parent it saw at start about once a second; a rank
reparented to init (mpirun SIGKILLed) prints one line and leaves with os._exit(ORPHAN_EXIT): its other threads may be
stuck in MPI, so no cleanup that could block. A plain `hpcdnn train` from a shell is not watched: `nohup ... &` must
outlive its terminal.

Stall timeout: the clock starts at the first finished step (or, on a Downpour server, the first poll), so a slow
start (data load, model build, numba compile) never counts; after that a step, or a server's poll pass, must come
every `stall_timeout` seconds. A stall prints the waits each thread recorded ("waiting in OP, for rank K since T s
at step S"), the stacks, then calls comm.Abort(STALL_EXIT): a rank stuck in MPI cannot take part in a collective.
Cost per step: one timestamp; per recorded wait: one dict write and one delete.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import sys
import threading
import time
from collections.abc import Iterator

STALL_EXIT = 3  # exit code of a job ended by the stall timeout (comm.Abort's errorcode)
ORPHAN_EXIT = 4  # exit code of a rank that found its launcher gone
INTERVAL_S = 1.0  # between two looks at the parent and the clock
ABORT_GRACE_S = 30.0  # a comm.Abort that has not ended this process by then: os._exit
LAUNCHER_ENV = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "SLURM_STEP_ID")  # set by mpirun, Hydra, PMIx, srun

_last: float | None = None  # time.monotonic() of the last progress; None until the first step
_step = 0  # the last finished step
_waits: dict[int, tuple[str, int | None, float, int]] = {}  # thread ident -> (op, peer rank, since, step)
_comm = None  # the communicator the watchdog ends and names ranks in (COMM_WORLD from the CLI)
_paused = 0  # > 0 inside paused(): the stall clock is suspended


def progress(step: int | None = None) -> None:
    """A step finished (or a server polled): restart the stall clock. Cheap: called every step."""
    global _last, _step
    _last = time.monotonic()
    if step is not None:
        _step = step


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """Suspend the stall clock around a wait that may rightly outlast --stall_timeout: the ranks waiting for the
    root's evaluation, Downpour's root waiting for the slowest worker to finish. The clock restarts on leaving."""
    global _paused
    _paused += 1
    try:
        yield
    finally:
        _paused -= 1
        progress()


class Waiting:
    """`with Waiting(op, peer=K):` records that this thread waits in `op` (for rank K of the watchdog's communicator),
    so a stall report names it; cleared on leaving the block."""

    __slots__ = ("op", "peer", "ident")

    def __init__(self, op: str, peer: int | None = None) -> None:
        self.op, self.peer = op, peer

    def __enter__(self) -> Waiting:
        self.ident = threading.get_ident()
        _waits[self.ident] = (self.op, self.peer, time.monotonic(), _step)
        return self

    def __exit__(self, *exc) -> None:
        _waits.pop(self.ident, None)

    def update(self, op: str, peer: int | None = None) -> None:
        """Inside the block: now waiting in `op` (for rank `peer`), e.g. the next bucket of a ring."""
        self.op, self.peer = op, peer
        _waits[self.ident] = (op, peer, time.monotonic(), _step)


def begin(op: str, peer: int | None = None) -> bool:
    """Record a wait unless this thread is already in one (the outer wait says more); True if recorded: call end()."""
    ident = threading.get_ident()
    if ident in _waits:
        return False
    _waits[ident] = (op, peer, time.monotonic(), _step)
    return True


def end() -> None:
    """Clear this thread's wait recorded by begin()."""
    _waits.pop(threading.get_ident(), None)


def world_rank(comm, rank: int) -> int:
    """`rank` of `comm` as a rank of the watchdog's communicator (what the stall report and the user's mpirun see)."""
    if _comm is None or comm is None:
        return rank
    try:
        return int(comm.Get_group().Translate_ranks([rank], _comm.Get_group())[0])
    except Exception:  # a communicator without a group (intercommunicators): its own numbering
        return rank


def launched() -> bool:
    """True when a launcher (mpirun, Hydra, srun) started this process, so its going away means the job is over."""
    return any(os.environ.get(k) for k in LAUNCHER_ENV)


def _say(text: str) -> None:
    """Write to the process's stderr without Python's buffers or exceptions (the pipe may be gone with the launcher)."""
    with contextlib.suppress(OSError):
        os.write(2, text.encode(errors="replace"))


def report(rank: int, timeout: float, now: float) -> str:
    """The stall message: how long, what each thread waits in and for whom, and how to raise the timeout."""
    lines = [f"hpcdnn: error (rank {rank}): no step finished for {now - (_last or now):.0f} s (last step {_step}, "
             f"--stall_timeout={timeout:g}); ending the job"]  # fmt: skip
    names, waits = {t.ident: t.name for t in threading.enumerate()}, dict(_waits)
    for ident, (op, peer, since, step) in sorted(waits.items()):
        who = f", for rank {peer}" if peer is not None else ""
        lines.append(f"hpcdnn:   thread {names.get(ident, ident)}: waiting in {op}{who} since {now - since:.1f} s at step {step}")
    for ident, frame in sys._current_frames().items():  # the others: where in hpcdnn they are (no recorded wait)
        where = _in_hpcdnn(frame)
        if ident not in waits and ident != threading.get_ident() and where:
            lines.append(f"hpcdnn:   thread {names.get(ident, ident)}: in {where} (not a recorded wait)")
    lines.append("hpcdnn: if a step can legitimately take this long, raise it: --stall_timeout=SECONDS (0 turns the check off)")
    lines.append(f"hpcdnn: stacks of every thread of rank {rank}:")
    return "\n".join(lines) + "\n"


def _in_hpcdnn(frame) -> str:
    """The innermost frame of hpcdnn's own code in a stack, as 'function (hpcdnn/path.py:line)'; '' if none."""
    package = os.path.dirname(os.path.abspath(__file__))
    while frame is not None:
        path = frame.f_code.co_filename
        if path.startswith(package):
            return f"{frame.f_code.co_name} (hpcdnn/{os.path.relpath(path, package)}:{frame.f_lineno})"
        frame = frame.f_back
    return ""


class Watchdog:
    """The daemon thread: parent watch (when `parent` is a pid) and the stall clock (when `timeout` > 0)."""

    def __init__(self, timeout: float, comm=None, parent: int | None = None) -> None:
        self.timeout, self.comm, self.parent = timeout, comm, parent
        self.rank = comm.Get_rank() if comm is not None else 0
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="hpcdnn-watchdog", daemon=True)

    def _run(self) -> None:
        while not self.stopped.wait(INTERVAL_S):
            if self.parent is not None and os.getppid() != self.parent:
                self._orphaned()
            last = _last
            if self.timeout > 0 and last is not None and not _paused and time.monotonic() - last > self.timeout:
                self._stalled()

    def _orphaned(self) -> None:
        _say(f"hpcdnn: error (rank {self.rank}): the launcher (pid {self.parent}) is gone; exiting\n")
        os._exit(ORPHAN_EXIT)

    def _stalled(self) -> None:
        _say(report(self.rank, self.timeout, time.monotonic()))
        with contextlib.suppress(Exception):
            faulthandler.dump_traceback(file=sys.__stderr__, all_threads=True)
        # Abort may wait on a launcher or a peer that is gone: exit on our own if it has not ended us by then
        grace = threading.Timer(ABORT_GRACE_S, os._exit, (STALL_EXIT,))
        grace.daemon = True
        grace.start()
        if self.comm is not None and self.comm.Get_size() > 1:
            self.comm.Abort(STALL_EXIT)
        os._exit(STALL_EXIT)

    def stop(self) -> None:
        self.stopped.set()


@contextlib.contextmanager
def watched(timeout: float, comm=None) -> Iterator[Watchdog]:
    """Run the watchdog around a training run: parent watch under a launcher, stall timeout when `timeout` > 0."""
    global _comm, _last, _paused
    if not timeout >= 0:
        raise ValueError(f"stall_timeout must be >= 0 seconds, not {timeout} (0 turns the stall check off)")
    _comm, _last, _paused = comm, None, 0
    _waits.clear()
    dog = Watchdog(timeout, comm, os.getppid() if launched() else None)
    if dog.parent is not None or timeout > 0:
        dog.thread.start()
    try:
        yield dog
    finally:
        dog.stop()
        _comm, _last = None, None
