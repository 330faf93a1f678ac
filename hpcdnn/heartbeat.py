"""Rank side of `hpcdnn launch` (hpcdnn/launch.py): tell the watcher this rank is alive, where it is, and how it ended.

    with heartbeat.watched(cfg.run_dir, comm) as beat:    # hpcdnn/cli.py, around train()
        beat.end(train(cfg, ...))                         # "finished", or "preempted" when a signal stopped the run
    heartbeat.note(role="server")                         # hpcdnn/train.py: the role, and the step as it advances
    heartbeat.note(step=at.step)

The watcher is found through HPCDNN_WATCH ("TOKEN@HOST:PORT,HOST:PORT,...", set by `hpcdnn launch`; srun and Hydra
forward it, Open MPI's mpirun needs `-x HPCDNN_WATCH`), else through RUN_DIR/watch.json (same content, written by the
watcher when the run directory is shared). Without either, nothing happens: `hpcdnn train` runs as it always did.
A daemon thread sends one JSON line about every second (rank, host, pid, role, step); the last line says
"finished", "preempted" or "error". A rank that cannot reach the watcher warns once and trains on.
No mpi4py here: the rank and world size come from the communicator the caller already has.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from hpcdnn import watchdog

ENV = "HPCDNN_WATCH"
FILE = "watch.json"  # in the run directory, while a watcher runs: {"watch": "TOKEN@HOST:PORT,..."}
INTERVAL_S = 1.0  # between heartbeats
CONNECT_TIMEOUT_S = 2.0  # per watcher address tried
SEND_TIMEOUT_S = 5.0  # a send that blocks longer (link down) gives up: the watcher will notice the silence
_current: Beat | None = None


def parse(spec: str) -> tuple[str, list[tuple[str, int]]]:
    """'TOKEN@HOST:PORT,HOST:PORT' -> (token, [(host, port), ...]); ValueError naming the bad value otherwise."""
    token, at, rest = spec.strip().rpartition("@")
    try:
        addrs = [(h, int(p)) for h, _, p in (a.rpartition(":") for a in rest.split(",") if a)]
    except ValueError:
        addrs = []
    if not at or not token or not addrs or any(not h for h, _ in addrs):
        raise ValueError(f"{ENV}={spec!r}: expected TOKEN@HOST:PORT[,HOST:PORT...] as `hpcdnn launch` sets it")
    return token, addrs


def find(run_dir: str | os.PathLike | None) -> tuple[str, str] | None:
    """(where the watcher was found, its spec): HPCDNN_WATCH first, else RUN_DIR/watch.json; None without a watcher."""
    spec = os.environ.get(ENV)
    if spec:
        return ENV, spec
    path = Path(run_dir) / FILE if run_dir else None
    if path is not None and path.is_file():
        try:
            return str(path), json.loads(path.read_text())["watch"]
        except (OSError, ValueError, KeyError, TypeError):
            return str(path), ""  # unreadable: parse() refuses it and the rank warns
    return None


class Beat:
    """One rank's connection to the watcher; every method is a no-op once it is closed (or never connected)."""

    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world, self.role, self.step = rank, world, "worker", 0
        self.sock: socket.socket | None = None
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.warned = False

    def connect(self, source: str, spec: str) -> bool:
        """Say hello to the first watcher address that answers; warn once and stay disconnected if none does."""
        try:
            token, addrs = parse(spec)
        except ValueError as err:
            return self._warn(f"{err} (from {source})")
        errors = []
        for host, port in addrs:
            try:
                self.sock = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S)
                break
            except OSError as err:
                errors.append(f"{host}:{port}: {err.strerror or err}")
        if self.sock is None:
            return self._warn(f"cannot reach the watcher ({'; '.join(errors)}; from {source})")
        self.sock.settimeout(SEND_TIMEOUT_S)
        hello = {"t": "hello", "token": token, "host": socket.gethostname(), "pid": os.getpid(), "world": self.world}
        if not self.send(hello):
            return False
        threading.Thread(target=self._beat, name="hpcdnn-heartbeat", daemon=True).start()
        return True

    def send(self, msg: dict) -> bool:
        """One JSON line with the rank, role and step added; False (after one warning) once the watcher is gone."""
        with self.lock:
            if self.sock is None:
                return False
            line = json.dumps({"rank": self.rank, "role": self.role, "step": self.step, **msg}) + "\n"
            try:
                self.sock.sendall(line.encode())
                return True
            except OSError as err:
                self._close()
                return self._warn(f"lost the watcher ({err}); training on without it")

    def _beat(self) -> None:
        while not self.stopped.wait(INTERVAL_S):
            if not self.send({"t": "beat"}):
                return

    def end(self, summary: dict | None = None, error: BaseException | None = None) -> None:
        """The goodbye: "error" (with the message), "preempted" (a signal stopped the run) or "finished"."""
        self.stopped.set()
        if error is not None:
            # an MPI error on this rank is often the consequence of a peer that died: the watcher still calls that peer lost
            mpi = type(error).__module__.startswith("mpi4py")
            self.send({"t": "error", "error": f"{type(error).__name__}: {error}"[:500], "mpi": mpi})
        else:
            self.send({"t": "preempted" if (summary or {}).get("preempted") else "finished"})
        with self.lock:
            self._close()

    def _close(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.close()
            self.sock = None

    def _warn(self, what: str) -> bool:
        if not self.warned:
            self.warned = True
            print(f"hpcdnn: warning (rank {self.rank}): heartbeat: {what}", file=sys.stderr, flush=True)
        return False


@contextlib.contextmanager
def watched(run_dir: str | os.PathLike | None, comm=None) -> Iterator[Beat]:
    """Connect this rank to the watcher if one is running (else a silent Beat); an exception leaving the block is
    reported as this rank's "error" goodbye, so the watcher tells a failed run from a lost node."""
    global _current
    beat = Beat(comm.Get_rank() if comm is not None else 0, comm.Get_size() if comm is not None else 1)
    found = find(run_dir)
    if found:
        beat.connect(*found)
    _current = beat
    try:
        yield beat
    except BaseException as err:
        beat.end(error=err)
        raise
    finally:
        beat.end()  # a no-op after the goodbye; without one (a caller that never said) it is "finished"
        _current = None


def note(role: str | None = None, step: int | None = None) -> None:
    """Record this rank's role or current step for the next heartbeat (nothing when no watcher is connected); a step
    also restarts the stall clock (hpcdnn/watchdog.py)."""
    if step is not None:
        watchdog.progress(step)
    beat = _current
    if beat is None:
        return
    if role is not None and role != beat.role:
        beat.role = role
        beat.send({"t": "beat"})  # at once: a node lost before the next heartbeat is still named with its role
    if step is not None:
        beat.step = step
