"""The sharded parameter server of Downpour SGD: P server ranks each own one slice of the flat parameter vector.

Memory (all `MPI.Win.Allocate`, see window.py): on server s, `params` holds its slice (balanced, cache-line aligned,
`models.flat.shard_ranges`) and `sum_sq` the Adagrad accumulator of that slice; server 0 also holds `ctrl`, int64
counters (pushes applied/rejected, staleness statistics, done/stop/warm flags, each worker's progress).

Where the update is computed — a design decision. Workers compute it and apply it with element-wise atomic RMA:
  SGD      params += -lr * g                                (MPI_Accumulate SUM)
  Adagrad  old = sum_sq; sum_sq += g^2                      (MPI_Get_accumulate SUM: atomic read-modify-write)
           params += -lr * g / (sqrt(old + g^2) + eps)      (MPI_Accumulate SUM)
MPI guarantees concurrent accumulates to one location are atomic per element, so no push is ever lost and no
lock is exclusive. The alternative, an inbox per worker that the server drains and applies (DistBelief's shape),
needs W shard-sized inboxes per server, a flow-control flag per worker, and server CPU per push (Adagrad over 61M
floats is 33-49 ms on this machine); with server-side updates the push is a Put (14 GB/s here) instead of an
Accumulate (14.7 GB/s Open MPI, 10 GB/s MPICH) plus, for Adagrad, a Get_accumulate (6 GB/s): about the same bytes
on the wire for SGD, and a worker-side Adagrad costs one extra read of the accumulator but no server compute or
queueing. So servers stay passive: they only keep MPI progressing and wait until every worker has said it is done.
Reads (fetches) use MPI_Get_accumulate(NO_OP), atomic per element against concurrent accumulates as the standard
requires (`atomic_fetch=False` switches to plain MPI_Get; bench/downpour.py measures both).
"""

from __future__ import annotations

import os
import time

import numpy as np
from mpi4py import MPI

from hpcdnn.models.flat import shard_ranges
from hpcdnn.mpi.window import Window

# server 0's int64 control words
APPLIED, STOP, WARM, DONE, REJ_NONFINITE, REJ_STALE, SCALED, STALE_SUM, STALE_MAX = range(9)
HIST, HIST_BINS = 16, 16  # staleness histogram: bin 0 = 0, bin k = [2^(k-1), 2^k), last bin open-ended
WORKER_BASE, PER_WORKER = HIST + HIST_BINS, 4  # per worker: pushes sent, steps, epoch, batch
SENT, STEPS, EPOCH, BATCH = range(PER_WORKER)


def worker_row(counters, worker: int):
    """A worker's (pushes sent, steps, epoch, batch) out of the control words (a checkpoint's or `counters()`)."""
    start = WORKER_BASE + PER_WORKER * worker
    return counters[start : start + PER_WORKER]


def staleness_bin(tau: int) -> int:
    return min(HIST_BINS - 1, int(tau).bit_length())


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
        n_ctrl = WORKER_BASE + PER_WORKER * len(roles.workers)
        self.head = roles.servers[0]
        self.ctrl = Window(n_ctrl if self.comm.Get_rank() == self.head else 0, np.int64, comm=self.comm)

    # -- counters on server 0
    def counter(self, index: int) -> int:
        return int(self.ctrl.fetch_and_op(0, self.head, index, op=MPI.NO_OP))

    def add(self, index: int, value: int = 1, op=MPI.SUM) -> None:
        self.ctrl.fetch_and_op(value, self.head, index, op=op)

    def set(self, index: int, value: int) -> None:
        self.ctrl.fetch_and_op(value, self.head, index, op=MPI.REPLACE)

    def worker_word(self, worker: int, field: int) -> int:
        return WORKER_BASE + PER_WORKER * worker + field

    def counters(self) -> np.ndarray:
        """Every control word, read atomically element by element."""
        return self.ctrl.read(self.head, 0, self.ctrl.counts[self.head])

    # -- worker side
    def fetch(self, out: np.ndarray) -> int:
        """Copy the server-held parameters into `out` (flat, float32); returns the update count they are at least as new as."""
        version = self.counter(APPLIED)
        read = self.params.get_atomic if self.atomic_fetch else self.params.get
        for server, (lo, hi) in zip(self.roles.servers, self.shards):
            if hi > lo:
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

    def record_push(self, tau: int, scaled: bool) -> None:
        """Count an applied push and its staleness (after its accumulates completed)."""
        items = [(STALE_SUM, tau, MPI.SUM), (STALE_MAX, tau, MPI.MAX), (HIST + staleness_bin(tau), 1, MPI.SUM)]
        items += [(SCALED, 1, MPI.SUM)] if scaled else []
        self.ctrl.update_many(self.head, [*items, (APPLIED, 1, MPI.SUM)])  # one epoch: one round trip

    def report(self, worker: int, words: list[int]) -> None:
        """Publish a worker's (pushes sent, steps, epoch, batch), atomically per word (MPI_Accumulate REPLACE)."""
        self.ctrl.accumulate(np.array(words, np.int64), self.head, self.worker_word(worker, 0), op=MPI.REPLACE)

    # -- whole-vector access for initialisation and checkpoints (the root worker)
    def load(self, params: np.ndarray, sum_sq: np.ndarray | None = None) -> None:
        """Overwrite every shard (call before workers start, or while they are stopped)."""
        for server, (lo, hi) in zip(self.roles.servers, self.shards):
            if hi > lo:
                self.params.put(np.ascontiguousarray(params[lo:hi], dtype=np.float32), server)
                if self.adagrad:
                    src = np.zeros(hi - lo, np.float32) if sum_sq is None else sum_sq[lo:hi]
                    self.sum_sq.put(np.ascontiguousarray(src, dtype=np.float32), server)

    def restore_counters(self, words: np.ndarray) -> None:
        """Overwrite server 0's control words (resume; workers must not be running)."""
        self.ctrl.put(np.ascontiguousarray(words, dtype=np.int64), self.head, 0)

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
    def serve(self, poll: float = 0.002, busy: float = 0.005) -> None:
        """Keep MPI progressing until every worker has reported done; no collective a stalled worker could block.

        Polling matters where the transport needs the target's help: with MPICH's shared-memory RMA each lock
        epoch on this server waits for its next MPI call (measured here: 18 ms per epoch polling every 10 ms,
        27 us spinning; Open MPI's osc/sm needs no help: 3-5 us either way). So the server spins while pushes
        are arriving (for `busy` seconds after the last one it saw) and sleeps `poll` between checks when idle.
        """
        n_workers, seen, active = len(self.roles.workers), -1, time.monotonic()
        while True:
            words = self.ctrl.read(self.head, APPLIED, DONE - APPLIED + 1)
            if words[DONE - APPLIED] >= n_workers:
                return
            self.comm.Iprobe(MPI.ANY_SOURCE, MPI.ANY_TAG)
            now = time.monotonic()
            if words[0] != seen:
                seen, active = words[0], now
            if now - active < busy:
                os.sched_yield()
            else:
                time.sleep(poll)

    def wait_done(self, poll: float = 0.01, report=None) -> None:
        """Root worker: wait until every worker has reported done."""
        n_workers, last = len(self.roles.workers), time.monotonic()
        while (done := self.counter(DONE)) < n_workers:
            if report and time.monotonic() - last > 30:
                report(f"waiting for {n_workers - done} worker(s) to finish")
                last = time.monotonic()
            time.sleep(poll)

    def free(self) -> None:
        """Collective over roles.comm: the final teardown."""
        for w in (self.params, self.sum_sq, self.ctrl):
            w.free()
