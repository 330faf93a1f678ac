"""The sharded parameter server of Downpour SGD: P server ranks each own one slice of the flat parameter vector.

Memory (all `MPI.Win.Allocate`, see window.py): on server s, `params` holds its slice (balanced, cache-line aligned,
`models.flat.shard_ranges`) and `sum_sq` the Adagrad accumulator of that slice; server 0 also holds the control
words (control.py: pushes applied/rejected, staleness statistics, done/stop/warm flags, each worker's progress).

Where the update is computed — a design decision. Workers compute it and apply it with element-wise atomic RMA:
  SGD      params += -lr * g                                (MPI_Accumulate SUM)
  Adagrad  old = sum_sq; sum_sq += g^2                      (MPI_Get_accumulate SUM: atomic read-modify-write)
           params += -lr * g / (sqrt(old + g^2) + eps)      (MPI_Accumulate SUM)
MPI guarantees concurrent accumulates to one location are atomic per element, so no push is ever lost and no
lock is exclusive. The alternative, an inbox per worker that the server drains and applies (DistBelief's shape),
needs W shard-sized inboxes per server, a flow-control flag per worker, and server CPU per push. On one host's shared
memory the worker-side update costs about the same bytes as a Put of the gradient (bench/downpour.py measures it);
across a network MPI float accumulates are not done by the NIC and this design is slower (the server-side design is
an open issue). So servers stay passive: they only keep MPI progressing and wait until every worker has said it is
done. Reads (fetches) use MPI_Get_accumulate(NO_OP), atomic per element against concurrent accumulates as the
standard requires (`atomic_fetch=False` switches to plain MPI_Get; bench/downpour.py measures both).
"""

from __future__ import annotations

import os
import time

import numpy as np
from mpi4py import MPI

from hpcdnn import trace
from hpcdnn.models.flat import shard_ranges
from hpcdnn.mpi import control as ctl
from hpcdnn.mpi.control import Control
from hpcdnn.mpi.window import Window


class ParamServer:
    """Collective constructor over roles.comm; afterwards servers call `serve()`, workers fetch and push."""

    def __init__(self, roles, numel: int, *, adagrad: bool, atomic_fetch: bool = True) -> None:
        self.roles, self.comm, self.numel, self.adagrad = roles, roles.comm, numel, adagrad
        self.atomic_fetch = atomic_fetch
        self.shards = shard_ranges(numel, len(roles.servers))  # shard i lives on rank roles.servers[i]
        mine = self.shards[roles.index] if roles.is_server else (0, 0)
        n_local = mine[1] - mine[0]
        self.params = Window(n_local, np.float32, comm=self.comm)
        self.sum_sq = Window(n_local if adagrad else 0, np.float32, comm=self.comm)
        self.control = Control(self.comm, roles.servers[0], len(roles.workers))  # the control words (control.py)

    # -- worker side
    def fetch(self, out: np.ndarray) -> int:
        """Copy the server-held parameters into `out` (flat, float32); returns the update count they are at least as new as."""
        version = self.control.counter(ctl.APPLIED)
        read = self.params.get_atomic if self.atomic_fetch else self.params.get
        for i, (server, (lo, hi)) in enumerate(zip(self.roles.servers, self.shards)):
            if hi > lo:
                with trace.span(f"fetch shard {i}", "comm", "comm", n=hi - lo):
                    read(out[lo:hi], server)
        return version

    def pieces(self, chunk: int = 1 << 22):
        """(server rank, lo, hi, offset in that server's shard) covering the flat vector in bounded pieces."""
        for server, (lo, hi) in zip(self.roles.servers, self.shards):
            for a in range(lo, hi, chunk):
                yield server, a, min(hi, a + chunk), a - lo

    def add_params(self, delta: np.ndarray, server: int, offset: int) -> None:
        """params[offset:offset+len] += delta on `server`, element-wise atomic (MPI_Accumulate SUM)."""
        self.params.accumulate(delta, server, offset)

    def add_sum_sq(self, g2: np.ndarray, old: np.ndarray, server: int, offset: int) -> None:
        """Atomically old = sum_sq[...]; sum_sq[...] += g2 on `server` (MPI_Get_accumulate SUM)."""
        self.sum_sq.get_accumulate(g2, old, server, offset)

    # -- whole-vector access for initialisation and checkpoints (the root worker)
    def load(self, params: np.ndarray, sum_sq: np.ndarray | None = None) -> None:
        """Overwrite every shard (call before workers start, or while they are stopped)."""
        for server, (lo, hi) in zip(self.roles.servers, self.shards):
            if hi > lo:
                self.params.put(np.ascontiguousarray(params[lo:hi], dtype=np.float32), server)
                if self.adagrad:
                    src = np.zeros(hi - lo, np.float32) if sum_sq is None else sum_sq[lo:hi]
                    self.sum_sq.put(np.ascontiguousarray(src, dtype=np.float32), server)

    def snapshot(self) -> tuple[np.ndarray, np.ndarray | None]:
        """The whole server-held state (parameters and Adagrad accumulator), read atomically per element."""
        params = np.empty(self.numel, np.float32)
        self.fetch(params)
        if not self.adagrad:
            return params, None
        acc = np.empty(self.numel, np.float32)
        for server, (lo, hi) in zip(self.roles.servers, self.shards):
            if hi > lo:
                self.sum_sq.get_atomic(acc[lo:hi], server)
        return params, acc

    # -- server side
    @trace.traced("serve", "comm", "comm")  # spans "spin" while pushes arrive; a counter of pushes applied
    def serve(self, poll: float = 0.002, busy: float = 0.005) -> None:
        """Keep MPI progressing until every worker has reported done; no collective a stalled worker could block.

        Polling matters where the transport needs the target's help: with MPICH's shared-memory RMA each lock
        epoch on this server waits for its next MPI call (Open MPI's osc/sm needs no help). So the server spins
        while pushes are arriving (for `busy` seconds after the last one it saw) and sleeps `poll` between checks.
        """
        n_workers, seen, active, spinning = len(self.roles.workers), -1, time.monotonic(), trace.now()
        while True:
            words = self.control.read(ctl.APPLIED, ctl.DONE - ctl.APPLIED + 1)
            if words[ctl.DONE - ctl.APPLIED] >= n_workers:
                trace.complete("spin", spinning, "comm", "comm")
                return
            self.comm.Iprobe(MPI.ANY_SOURCE, MPI.ANY_TAG)
            now = time.monotonic()
            if words[0] != seen:
                seen, active = words[0], now
                trace.counter("pushes applied", int(seen))
                spinning = spinning or trace.now()
            if now - active < busy:
                os.sched_yield()
            else:  # idle: the spin (pushes arriving) ends
                trace.complete("spin", spinning, "comm", "comm")
                spinning = 0
                time.sleep(poll)

    @trace.traced("wait for workers", "comm", "comm")
    def wait_done(self, poll: float = 0.01, report=None) -> None:
        """Root worker: wait until every worker has reported done."""
        n_workers, last = len(self.roles.workers), time.monotonic()
        while (done := self.control.counter(ctl.DONE)) < n_workers:
            if report and time.monotonic() - last > 30:
                report(f"waiting for {n_workers - done} worker(s) to finish")
                last = time.monotonic()
            time.sleep(poll)

    def summary(self) -> dict:
        """Push and staleness counts for summary.json (control.summary) and the server count."""
        return {**self.control.summary(), "servers": len(self.roles.servers)}

    def free(self) -> None:
        """Collective over roles.comm: the final teardown."""
        for w in (self.params, self.sum_sq, self.control):
            w.free()
