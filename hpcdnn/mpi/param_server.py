"""The sharded parameter server of Downpour SGD: P server ranks each own one slice of the flat parameter vector and
apply the workers' gradients to it themselves, as DistBelief's servers did.

Memory on server s (every window `MPI.Win.Allocate`d over roles.comm; workers expose nothing):
  params   2 x shard floats: a double buffer; buffer VERSION % 2 is published, the server writes the other
  inbox    W x shard elements (float32, or 16-bit words with --push_dtype): worker w's slot is inbox[w]
  words    int64 flags, per-worker sequence numbers and rows (control.py has the layout)
  state    the optimizer's per-parameter state (Adagrad's sum of squares, SGD's momentum): server-private numpy

A push (worker w to shard s), one-sided:
  1. credit: w reads s's head words and waits until DONE[w] == SEQ[w] (its previous push there is applied, so the
     slot is free). No push is ever overwritten before it is applied, none is lost.
  2. w Puts its gradient slice into inbox[w], then in one lock epoch Puts its header (the row) and, after a Flush,
     sets SEQ[w] += 1 (and its CLOCK): whoever sees the new SEQ sees the slot and the header.
  3. s, polling its words, sees SEQ[w] > DONE[w]: sets WRITING = VERSION + 1, applies SGD/momentum or Adagrad
     (kernels/update.py, the server's threads) reading buffer VERSION % 2 and writing the other one, then sets
     VERSION += 1, DONE[w] = SEQ[w] and copies the header into ROWS[w], in one lock epoch.
A fetch of shard s reads VERSION (v), Gets buffer v % 2, then reads WRITING: the server began rewriting that
buffer only if WRITING >= v + 2, so WRITING <= v + 1 means the copy is whole (a seqlock over two buffers; the reader
retries otherwise, the server never waits for readers). A worker's fetch first waits for its own pushes to be applied
(DONE[w] == SEQ[w]): it reads its own writes, so one worker is exactly the serial optimizer.

Bytes on the wire per push: the gradient (4 bytes/parameter, 2 with bf16/fp16) plus ~250 bytes of header; per
fetch: 4 bytes/parameter. The earlier design (workers computing the update and applying it with MPI accumulates)
moved 12-25 bytes/parameter and serialised workers behind one lock per target across a network (README, bench/).

Servers poll their own words, spinning (sched_yield) for 2 ms after the last push and then sleeping with exponential
backoff, to 0.25 ms naps while pushes keep coming (over TCP a worker's operation completes when the server next enters
MPI) and 2 ms naps after a second without one: an idle server costs no core (`serve` says what was measured). Two-sided messages from the root worker carry
what is not on the push path: the initial state (LOAD), a consistent snapshot of a shard for checkpoints (SNAP,
answered between two updates) and the end of the run (END).
"""

from __future__ import annotations

import os
import time

import numpy as np
from mpi4py import MPI

from hpcdnn import trace, watchdog
from hpcdnn.kernels import precision, update
from hpcdnn.models.flat import shard_ranges
from hpcdnn.mpi import control as ctl
from hpcdnn.mpi.window import Window

TAG_LOAD, TAG_SNAP, TAG_STATE, TAG_END = 7301, 7302, 7303, 7304


class Backoff:
    """Waiting for a word to change: yield the core, then sleep 50 us doubling to `cap` seconds."""

    def __init__(self, cap: float = 0.002) -> None:
        self.cap, self.sleep, self.waited = cap, 0.0, 0.0

    def __call__(self) -> None:
        if self.sleep == 0.0:
            os.sched_yield()
            self.sleep = 5e-5
            return
        time.sleep(self.sleep)
        self.waited += self.sleep
        self.sleep = min(self.cap, self.sleep * 2)


class ParamServer:
    """Collective constructor over roles.comm; afterwards servers call `serve()`, workers post, fetch and report.

    optimizer "sgd" (momentum, weight decay: torch.optim.SGD's step) or "adagrad" (torch.optim.Adagrad's), applied
    by the servers. `rows`: rows of accounting to keep (>= workers; more when resuming with fewer workers).
    `initial` (root worker only): (params, optimizer state or None, rows per shard or None) to start from.
    """

    def __init__(self, roles, numel: int, *, optimizer: str = "sgd", momentum: float = 0.0, weight_decay: float = 0.0,
                 eps: float = 1e-10, push_dtype: str = "fp32", rows: int | None = None, initial=None) -> None:  # fmt: skip
        self.roles, self.comm, self.numel = roles, roles.comm, numel
        self.adagrad, self.momentum, self.weight_decay, self.eps = optimizer == "adagrad", momentum, weight_decay, eps
        if push_dtype not in precision.DTYPES:
            raise ValueError(f"--push_dtype={push_dtype}; expected one of {sorted(precision.DTYPES)}")
        self.push_dtype, self.wire = push_dtype, np.dtype(precision.DTYPES[push_dtype])
        self.shards = shard_ranges(numel, len(roles.servers))  # shard i lives on rank roles.servers[i]
        self.layout = ctl.Layout(len(roles.workers), rows)
        lo, hi = self.shards[roles.index] if roles.is_server else (0, 0)
        self.n = hi - lo
        W = len(roles.workers)
        self.params = Window(2 * self.n, np.float32, comm=self.comm)
        self.inbox = Window(W * self.n, self.wire, comm=self.comm)
        self.words = Window(self.layout.size if roles.is_server else 0, np.int64, comm=self.comm)
        self.version, self.start = 0, 0  # start: the worker a poll looks at first
        self.state = None
        if roles.is_server:
            self.state = np.zeros(self.n, np.float32) if self.adagrad or momentum else None
            self.scratch = np.empty(self.n, np.float32) if push_dtype != "fp32" else None
            self._receive_initial()
        elif roles.is_root:
            self._send_initial(*initial) if initial is not None else None
        self.comm.Barrier()  # every shard holds its starting point before any worker fetches

    # ---- setup (two-sided, root -> servers)
    def _send_initial(self, params: np.ndarray, state: np.ndarray | None, rows) -> None:
        for i, (server, (lo, hi)) in enumerate(zip(self.roles.servers, self.shards)):
            mine = np.zeros((self.layout.rows, ctl.ROW), np.int64)
            if rows is not None:
                saved = np.asarray(rows[i], np.int64)
                mine[: saved.shape[0]] = saved
            state_part = state[lo:hi] if state is not None else np.zeros(hi - lo, np.float32)
            for part in (params[lo:hi], state_part):
                self.comm.Send(np.ascontiguousarray(part, np.float32), dest=server, tag=TAG_LOAD)
            self.comm.Send(mine, dest=server, tag=TAG_LOAD)

    def _receive_initial(self) -> None:
        front = self.params.local[: self.n]
        state = np.empty(self.n, np.float32)
        rows = np.empty((self.layout.rows, ctl.ROW), np.int64)
        root = self.roles.root
        self.comm.Recv(front, source=root, tag=TAG_LOAD)
        self.comm.Recv(state, source=root, tag=TAG_LOAD)
        self.comm.Recv(rows, source=root, tag=TAG_LOAD)
        if self.state is not None:
            self.state[:] = state
        self.words.local[self.layout.row0 :] = rows.reshape(-1)
        self.params.sync()
        self.words.sync()

    # ---- worker side
    def head(self, s: int) -> np.ndarray:
        """Shard s's flags, SEQ, DONE and CLOCK words, each read atomically."""
        return self.words.read(self.roles.servers[s], 0, self.layout.head)

    def wait_applied(self, s: int, worker: int, seq: int) -> np.ndarray:
        """Wait until shard s has applied `seq` pushes of `worker` (its slot is free, its writes are visible); returns
        the head words read last."""
        wait, server = Backoff(), self.roles.servers[s]
        with watchdog.Waiting(f"a push to parameter server shard {s} (its slot is still busy)", watchdog.world_rank(self.comm, server)):
            while (head := self.head(s))[self.layout.done + worker] < seq:
                wait()
        return head

    def post(self, s: int, worker: int, grad: np.ndarray, row: np.ndarray, seq: int, clock: int) -> None:
        """Put a gradient slice (already encoded to the push dtype) into worker's slot on shard s, then its header
        and SEQ = seq (the caller has waited for its credit: shard s has applied seq - 1)."""
        server, L = self.roles.servers[s], self.layout
        self.inbox.put(grad, server, worker * self.n_of(s))
        items = [(L.seq + worker, seq, MPI.REPLACE), (L.clock + worker, clock, MPI.REPLACE)]
        self.words.put_then_update(row, server, L.posted(worker).start, items)

    def fetch_shard(self, s: int, out: np.ndarray, version: int | None = None) -> tuple[int, int]:
        """Copy shard s's published parameters into `out`, never torn; returns (its version, retries). `version`: the
        VERSION word just read (wait_applied's head), which saves a round trip."""
        server, n, retries = self.roles.servers[s], self.n_of(s), 0
        while True:
            v = int(self.words.read(server, ctl.VERSION, 1)[0]) if version is None else version
            self.params.get(out, server, (v % 2) * n)
            if int(self.words.read(server, ctl.WRITING, 1)[0]) <= v + 1:
                return v, retries
            retries, version = retries + 1, None

    def set_everywhere(self, index: int, value: int, op=MPI.REPLACE) -> None:
        for server in self.roles.servers:
            self.words.fetch_and_op(value, server, index, op=op)

    def report(self, worker: int, row: np.ndarray) -> None:
        """A finished worker's final row (its rejected pushes too) on every shard, its clock out of the way, and one
        more FINISHED (call once every push of it has been applied)."""
        L = self.layout
        for server in self.roles.servers:
            items = [(L.clock + worker, ctl.FINISHED_CLOCK, MPI.REPLACE), (ctl.FINISHED, 1, MPI.SUM)]
            self.words.put_then_update(row, server, L.row(worker).start, items)

    def n_of(self, s: int) -> int:
        lo, hi = self.shards[s]
        return hi - lo

    def rows(self, s: int = 0) -> np.ndarray:
        """Shard s's rows (every worker's accounting as of its last push applied there)."""
        L = self.layout
        return self.words.read(self.roles.servers[s], L.row0, L.size - L.row0).reshape(L.rows, ctl.ROW)

    def summary(self, rows: np.ndarray | None = None) -> dict:
        """Push and staleness counts for summary.json and the logs (control.summary), and the server count."""
        return {**ctl.summary(self.rows() if rows is None else rows, self.layout.workers), "servers": len(self.roles.servers)}

    @trace.traced("wait for workers", "comm", "comm")
    def wait_done(self, report=None) -> None:
        """Root worker: wait until every worker has finished on every shard."""
        W, last = self.layout.workers, time.monotonic()
        for server in self.roles.servers:
            wait = Backoff(0.01)
            with watchdog.Waiting("the other workers' last pushes (their count on this server)", watchdog.world_rank(self.comm, server)):
                while (done := int(self.words.read(server, ctl.FINISHED, 1)[0])) < W:
                    if report and time.monotonic() - last > 30:
                        report(f"waiting for {W - done} worker(s) to finish")
                        last = time.monotonic()
                    wait()

    @trace.traced("snapshot", "comm", "comm")
    def snapshot(self) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """Root worker: every shard's parameters, optimizer state and rows, each shard taken between two updates
        (two-sided: the server answers at its next poll). Returns (params, state or None, rows: shards x R x ROW)."""
        params = np.empty(self.numel, np.float32)
        state = np.empty(self.numel, np.float32) if self.adagrad or self.momentum else None
        rows = np.empty((len(self.roles.servers), self.layout.rows, ctl.ROW), np.int64)
        for i, (server, (lo, hi)) in enumerate(zip(self.roles.servers, self.shards)):
            waiting = watchdog.Waiting(f"a snapshot from parameter server shard {i}", watchdog.world_rank(self.comm, server))
            with waiting:
                self.comm.Send(np.zeros(1, np.int64), dest=server, tag=TAG_SNAP)
                self.comm.Recv(params[lo:hi], source=server, tag=TAG_STATE)
                self.comm.Recv(state[lo:hi] if state is not None else np.empty(hi - lo, np.float32), source=server, tag=TAG_STATE)
                self.comm.Recv(rows[i], source=server, tag=TAG_STATE)
        return params, state, rows

    def end(self) -> None:
        """Root worker, after the last snapshot: every server leaves `serve()`."""
        for server in self.roles.servers:
            self.comm.Send(np.zeros(1, np.int64), dest=server, tag=TAG_END)

    # ---- server side
    def serve(self, **idle) -> None:
        """Apply pushes until the root worker says END; answer snapshots between updates (serve_all: the policy)."""
        serve_all([self], **idle)

    def poll(self) -> tuple[int, bool]:
        """One pass: apply every posted push (round robin from a moving start, so no worker is always served last),
        answer a snapshot request; returns (pushes applied, END received)."""
        L, W, me, root = self.layout, self.layout.workers, self.comm.Get_rank(), self.roles.root
        head, applied, msg = self.words.read(me, 0, L.head), 0, np.empty(1, np.int64)
        for i in range(W):
            w = (self.start + i) % W
            if head[L.seq + w] > head[L.done + w]:
                self._apply(w, int(head[L.seq + w]))
                applied += 1
        self.start = (self.start + 1) % max(W, 1)
        if self.comm.Iprobe(source=root, tag=TAG_END):  # only our tags: another message on comm is not ours to take
            self.comm.Recv(msg, source=root, tag=TAG_END)
            return applied, True
        if self.comm.Iprobe(source=root, tag=TAG_SNAP):
            self.comm.Recv(msg, source=root, tag=TAG_SNAP)
            self._send_snapshot(root)
        return applied, False

    def _apply(self, w: int, seq: int) -> None:
        """Apply worker w's posted push (number `seq`) to this shard and publish the result."""
        L, n, me, v = self.layout, self.n, self.comm.Get_rank(), self.version
        self.inbox.sync()
        self.words.sync()
        header = self.words.local[L.posted(w)].copy()
        g = precision.decode(self.inbox.local[w * n : (w + 1) * n], self.scratch, self.push_dtype)
        front, back = self.params.local[(v % 2) * n : (v % 2 + 1) * n], self.params.local[((v + 1) % 2) * n : ((v + 1) % 2 + 1) * n]
        lr = -ctl.lr_of(header[ctl.LR])
        with trace.span("apply", "comm", "comm", worker=w, n=n):
            self.words.fetch_and_op(v + 1, me, ctl.WRITING, op=MPI.REPLACE)
            if n:
                if self.adagrad:
                    update.adagrad(front, g, self.state, lr, eps=self.eps, weight_decay=self.weight_decay, out=back)
                else:
                    update.sgd(front, g, self.state, lr, momentum=self.momentum, weight_decay=self.weight_decay, out=back)
            self.params.sync()
            self.version = v + 1
            items = [(ctl.VERSION, v + 1, MPI.REPLACE), (L.done + w, seq, MPI.REPLACE)]
            items += [(L.row(w).start + k, int(x), MPI.REPLACE) for k, x in enumerate(header)]
            self.words.update_many(me, items)

    def _send_snapshot(self, root: int) -> None:
        n, v = self.n, self.version
        self.words.sync()
        self.comm.Send(self.params.local[(v % 2) * n : (v % 2 + 1) * n], dest=root, tag=TAG_STATE)
        self.comm.Send(self.state if self.state is not None else np.zeros(n, np.float32), dest=root, tag=TAG_STATE)
        self.comm.Send(np.ascontiguousarray(self.layout.rows_of(self.words.local)), dest=root, tag=TAG_STATE)

    def free(self) -> None:
        """Collective over roles.comm: the final teardown."""
        for w in (self.params, self.inbox, self.words):
            w.free()


@trace.traced("serve", "comm", "comm")
def serve_all(servers: list[ParamServer], busy: float = 0.002, poll_active: float = 0.00025, poll_max: float = 0.002,
              active: float = 1.0) -> None:  # fmt: skip
    """A server rank's loop over its shards of one or more parameter servers (one per partition with --mp), until each
    got END from its root worker.

    Idle policy: spin (yielding the core) for `busy` seconds after a push, then sleep with exponential backoff up to
    `poll_active` seconds while pushes came within the last `active` seconds, else up to `poll_max`. Why so short
    while training: over TCP a worker's RMA operation on this server completes only when the server next enters
    MPI (measured across two namespaces: a 16-word atomic read took 17 ms with 2 ms naps, 2.5 ms with 0.2 ms naps,
    0.6 ms spinning), and a push + fetch is ~6 such operations. Each wake-up costs ~10 us.

    Every pass restarts the stall clock (hpcdnn/watchdog.py): a server waiting for pushes is not stalled; a server
    stuck inside MPI stops passing, and the workers waiting on it name it in their own stall reports."""
    live, idle_since, wait = list(servers), time.monotonic(), Backoff(poll_max)
    while live:
        watchdog.progress()
        applied = 0
        for ps in list(live):
            n, ended = ps.poll()
            applied += n
            if n:
                trace.counter("shard version", ps.version)
            if ended:
                live.remove(ps)
        now = time.monotonic()
        if applied:
            idle_since, wait.sleep = now, 0.0
        elif now - idle_since < busy:
            os.sched_yield()
        else:
            wait.cap = poll_active if now - idle_since < active else poll_max
            wait()
