"""A timeline of a run (`hpcdnn train --trace=PATH`): one Chrome-trace / Perfetto JSON file, one process per rank.

    trace.start("run.json", comm=comm, role="worker", root=True)   # collective: a Barrier aligns the clocks
    with trace.span("forward"): ...                                 # a complete ("X") event on this rank's "compute" track
    trace.instant("won", "sandblaster", k=3)                        # an instant ("i") event
    trace.finish()                                                  # collective: rank 0 collects and writes PATH atomically

Off (the default: no start(), or an empty path) every call is a cheap no-op: span() hands back one shared null
context and traced() one flag test. This module imports neither torch nor mpi4py (the communicator is passed in), so
every layer, mpi/ included, may record into it (tests/test_layout.py keeps it a leaf).

Tracks: pid = the rank in `comm`, named "rank R: ROLE[ (root)] @ HOST" (ROLE: worker, server, or coordinator, the
Sandblaster rank that holds the portion counter); tid = one of TRACKS. The events, by track (i = instant, C = counter,
b/e = async slice; the rest are complete spans):
  compute  forward, backward, apply (the optimizer, with any communication it does) - the SGD topologies;
           evaluation (of the objective), portion / backup portion (args k, finished), idle (no portion left to
           claim, waiting), won / discarded (i), read samples, L-BFGS iteration, line search (args evals, t, ok) - Sandblaster
  comm     push > push shard S, fetch > fetch shard S, push rejected (i), bounded-delay wait (i), wait for comm thread,
           warmstart wait, snapshot and wait for workers (root), and on servers serve > apply (args worker, n), shard
           version (C) - Downpour (with --overlap, push and fetch go on the track "comm thread"); allreduce (one blocking call), or
           bucket B (b/e, issue to observed completion) and allreduce wait, broadcast parameters - allreduce;
           claim (i), objective reduce, lbfgs direction, lbfgs dot, stop agreed (i) - Sandblaster; stop agreement
  data     data wait (the step waiting for its next batch)
  loader   load batch (the prefetch thread reading and augmenting one)
  driver   checkpoint > checkpoint write, evaluate (end of an epoch), final evaluation
A bucket's async slice ends when a Testall said done or the Waitall returned: MPI may have finished it earlier, never
later. On CUDA the compute spans time the launches, not the kernels (no syncs are added).

Clocks: time.monotonic_ns, i.e. Linux's CLOCK_MONOTONIC, which every process of one host shares. start() takes each
rank's clock right after a Barrier; a rank's zero is the reading of the lowest rank on its host, so ranks of one host
are exactly aligned and hosts are aligned to within the Barrier's exit skew (microseconds on shared memory or a fast
network, more on Ethernet) plus the hosts' clocks drifting apart over the run: milliseconds per hour where NTP
disciplines their rate, up to ~0.2 s per hour (a 50 ppm oscillator) where nothing does. Compare events of different
hosts only above that; ranks of one host compare exactly.
Size: at most `max_events` (MAX_EVENTS by default) events per rank are kept in memory (roughly 100-200 bytes each);
later ones are counted, not kept, and the file says how many were dropped (otherData.dropped and an instant event).
Rank 0 receives the ranks' events one rank at a time and streams them into the file, so it never holds them all.
"""

from __future__ import annotations

import functools
import json
import socket
import time
from pathlib import Path

from hpcdnn.atomic import atomic_path

MAX_EVENTS = 500_000  # per rank; beyond it events are dropped (counted)
TRACKS = ("compute", "comm", "data", "loader", "driver")  # tids 0.. in this order; other names get the next tids
_clock = time.monotonic_ns
TAG = 7  # the events' messages to rank 0, on the recorder's own duplicate of the communicator


class Recorder:
    """One rank's events as tuples (phase, name, category, track, start ns, duration ns, args); see the module docstring."""

    def __init__(self, path: str, comm=None, role: str = "worker", root: bool = False, max_events: int = MAX_EVENTS) -> None:
        self.path, self.comm, self.role, self.root, self.max_events = path, comm, role, root, max_events
        self.rank = comm.Get_rank() if comm is not None else 0
        self.host = socket.gethostname()
        self.events: list[tuple] = []
        self.dropped = 0
        self.tracks = {name: i for i, name in enumerate(TRACKS)}
        if comm is not None:
            self.comm = comm = comm.Dup()  # private: our messages at the end never match anyone else's
            comm.Barrier()
        now = _clock()
        self.wall = time.time()  # the run's wall-clock start, for the file's otherData
        seen = comm.allgather((self.host, now)) if comm is not None else [(self.host, now)]
        self.zero = next(t for h, t in seen if h == self.host)  # the lowest rank on this host: one clock per host
        self.skew_ns = max(t for _, t in seen) - min(t for _, t in seen)  # spread of the readings (same-host ranks)

    def add(self, ph: str, name: str, cat: str, tid: str, t0: int, dur: int = 0, args: dict | None = None) -> None:
        if len(self.events) < self.max_events:
            self.events.append((ph, name, cat, tid, t0, dur, args))
        else:
            self.dropped += 1

    def json_events(self) -> list[dict]:
        """This rank's events as Chrome-trace dicts (ts and dur in microseconds since the aligned zero), metadata first."""
        pid, out = self.rank, []
        for ph, name, cat, tid, t0, dur, args in self.events:
            e = {"ph": ph, "name": name, "cat": cat, "pid": pid, "tid": self.tracks.setdefault(tid, len(self.tracks)),
                 "ts": (t0 - self.zero) / 1e3}  # fmt: skip
            if ph == "X":
                e["dur"] = dur / 1e3
            elif ph == "i":
                e["s"] = "t"
            elif ph in ("b", "e"):
                e["id"] = dur  # async events carry their id in the duration slot
            if args:
                e["args"] = args
            out.append(e)
        if self.dropped:
            out.append({"ph": "i", "s": "p", "name": f"trace truncated: {self.dropped} events dropped", "cat": "trace", "pid": pid,
                        "tid": 0, "ts": (_clock() - self.zero) / 1e3})  # fmt: skip
        name = f"rank {pid}: {self.role}{' (root)' if self.root else ''} @ {self.host}"
        meta = [{"ph": "M", "name": "process_name", "pid": pid, "tid": 0, "args": {"name": name}},
                {"ph": "M", "name": "process_sort_index", "pid": pid, "tid": 0, "args": {"sort_index": pid}}]  # fmt: skip
        for track, tid in self.tracks.items():
            meta.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": track}})
            meta.append({"ph": "M", "name": "thread_sort_index", "pid": pid, "tid": tid, "args": {"sort_index": tid}})
        return meta + out

    def finish(self) -> Path | None:
        """Collective: rank 0 writes its events, then each other rank's in turn (one rank's list in memory at a time), to
        a temporary file renamed into place (hpcdnn.atomic); returns the path on rank 0, None elsewhere."""
        mine = (self.json_events(), {"rank": self.rank, "host": self.host, "role": self.role, "dropped": self.dropped})
        comm, size = self.comm, self.comm.Get_size() if self.comm is not None else 1
        if self.rank != 0:
            comm.send(mine, dest=0, tag=TAG)
            comm.Free()
            return None
        path, infos = Path(self.path), []
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp, open(tmp, "w") as f:
            f.write('{"traceEvents":[')
            for r in range(size):
                events, info = mine if r == 0 else comm.recv(source=r, tag=TAG)
                f.write(("," if r else "") + ",".join(json.dumps(e, separators=(",", ":"), default=_plain) for e in events))
                infos.append(info)
            other = {"hpcdnn": "hpcdnn --trace", "start_unix_s": self.wall, "ranks": infos, "dropped": sum(i["dropped"] for i in infos),
                     "clock": "CLOCK_MONOTONIC, zeroed after a Barrier per host", "barrier_skew_us": self.skew_ns / 1e3}  # fmt: skip
            f.write('],"displayTimeUnit":"ms","otherData":' + json.dumps(other) + "}")
        if comm is not None:
            comm.Free()
        return path


def _plain(value):
    """JSON for what json does not know: numpy scalars (their Python value), anything else as its repr."""
    return value.item() if hasattr(value, "item") else repr(value)


_rec: Recorder | None = None  # the recorder of this process; None = tracing off


def start(path: str, comm=None, role: str = "worker", root: bool = False, max_events: int = MAX_EVENTS) -> bool:
    """Begin recording into `path` (collective over `comm` when given); an empty path leaves tracing off. True if on."""
    global _rec
    if not path:
        _rec = None
        return False
    _rec = Recorder(path, comm, role, root, max_events)
    return True


def finish() -> Path | None:
    """Collective: write the file (rank 0) and stop recording; a no-op when tracing is off. The path on rank 0."""
    global _rec
    rec, _rec = _rec, None
    return rec.finish() if rec is not None else None


def enabled() -> bool:
    return _rec is not None


def set_role(role: str) -> None:
    """Rename this rank's role (Sandblaster's counter holder calls itself the coordinator)."""
    if _rec is not None:
        _rec.role = role


class _Span:
    __slots__ = ("name", "cat", "tid", "args", "t0")

    def __init__(self, name: str, cat: str, tid: str, args: dict) -> None:
        self.name, self.cat, self.tid, self.args = name, cat, tid, args

    def __enter__(self) -> _Span:
        self.t0 = _clock()
        return self

    def __exit__(self, *exc) -> None:
        rec = _rec
        if rec is not None:
            rec.add("X", self.name, self.cat, self.tid, self.t0, _clock() - self.t0, self.args or None)

    def set(self, **args) -> None:
        """Add arguments known only at the end (a line search's step length)."""
        self.args.update(args)


class _Null:
    __slots__ = ()

    def __enter__(self) -> _Null:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def set(self, **args) -> None:
        pass


_NULL = _Null()


def span(name: str, cat: str = "compute", tid: str = "compute", **args) -> _Span | _Null:
    """A context manager recording a complete event `name` on track `tid` (a shared no-op when tracing is off)."""
    return _NULL if _rec is None else _Span(name, cat, tid, args)


def instant(name: str, cat: str = "compute", tid: str = "compute", **args) -> None:
    """An instant event (something without a duration: a claim, a discarded copy)."""
    if _rec is not None:
        _rec.add("i", name, cat, tid, _clock(), 0, args or None)


def now() -> int:
    """The clock in ns for complete(); 0 when tracing is off."""
    return _clock() if _rec is not None else 0


def complete(name: str, t0: int, cat: str = "compute", tid: str = "compute", **args) -> None:
    """A complete event from `t0` (a now() reading) to now: for intervals that a with-block cannot hold."""
    if _rec is not None and t0:
        _rec.add("X", name, cat, tid, t0, _clock() - t0, args or None)


def async_begin(name: str, ident: int, cat: str = "comm", tid: str = "comm", **args) -> None:
    """Start an async slice (MPI work in flight, e.g. an Iallreduce); async_end with the same name and id closes it."""
    if _rec is not None:
        _rec.add("b", name, cat, tid, _clock(), ident, args or None)


def async_end(name: str, ident: int, cat: str = "comm", tid: str = "comm") -> None:
    if _rec is not None:
        _rec.add("e", name, cat, tid, _clock(), ident, None)


def counter(name: str, value: float, cat: str = "comm", tid: str = "comm") -> None:
    """A counter sample ("C"): Perfetto draws the series as a graph on this rank's track."""
    if _rec is not None:
        _rec.add("C", name, cat, tid, _clock(), 0, {"value": value})


def traced(name: str, cat: str = "compute", tid: str = "compute"):
    """Decorator: each call of the function is a span (one flag test when tracing is off)."""

    def wrap(fn):
        @functools.wraps(fn)
        def inner(*a, **kw):
            if _rec is None:
                return fn(*a, **kw)
            with _Span(name, cat, tid, {}):
                return fn(*a, **kw)

        return inner

    return wrap


def iterate(iterable, name: str = "data wait", cat: str = "data", tid: str = "data"):
    """`iterable` itself when tracing is off; else a generator that records every wait for its next item as a span."""
    if _rec is None:
        return iterable
    return _timed_iter(iter(iterable), name, cat, tid)


def _timed_iter(it, name: str, cat: str, tid: str):
    try:
        while True:
            t0 = _clock()
            try:
                item = next(it)
            except StopIteration:
                return
            complete(name, t0, cat, tid)
            yield item
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()
