"""Downpour SGD (Dean et al. 2012): model replicas train asynchronously against the sharded parameter server.

    mpirun -n 4 python -m mpi4py -m hpcdnn train --config fashion_small --topology=downpour --servers=1 \\
        --optimizer=adagrad --lr=0.05 --n_fetch=1 --n_push=1 --warmstart_steps=100

A worker sums its gradients locally and pushes the sum every `n_push` steps; every `n_fetch` steps it fetches the
parameters. The servers apply the update (param_server.py: SGD with momentum, or Adagrad). Each worker visits the
shards in its own order (worker w starts at shard w mod P), so workers do not queue behind each other shard by shard.

Staleness of a push = the updates the servers applied between this worker's fetch and this push (per shard: its
version now minus the version fetched; the push's staleness is the largest over shards). It includes the worker's
own pushes since its fetch (n_fetch > 1). It is not SSP's clock difference. Bounds:
  --max_staleness=s with --staleness_policy=drop: a staler push is not sent (counted REJ_STALE) and the worker
    fetches at once, so a slow worker is told and catches up instead of having every push dropped;
  ... --staleness_policy=scale: the push is sent with its learning rate scaled by 1/staleness;
  --max_delay=s: bounded delay (SSP-like): a worker more than s steps ahead of the slowest unfinished worker waits
    before its next step; the wait is counted (WAIT_US, summary "delay_wait_s").
Non-finite pushes are never sent (counted REJ_NONFINITE). Warmstart: worker 0 trains alone for `warmstart_steps`,
then the others fetch its parameters and start. Every count lives in the worker's row, carried by each push
(control.py), so a shard's words say exactly which pushes it holds.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from hpcdnn import trace
from hpcdnn.kernels import precision, update
from hpcdnn.models.flat import FlatParams
from hpcdnn.mpi import control as ctl
from hpcdnn.mpi.param_server import Backoff, ParamServer


class DownpourWorker:
    """The Downpour side of one replica: call `step(lr, epoch, batch)` after every `loss.backward()`."""

    def __init__(self, ps: ParamServer, flat: FlatParams, cfg, worker: int, row=None) -> None:
        self.ps, self.flat, self.cfg, self.worker = ps, flat, cfg, worker
        n, P = flat.numel, len(ps.shards)
        self.order = [(worker + i) % P for i in range(P)]  # staggered: no convoy of workers on shard 0
        self.on_cpu = flat.device.type == "cpu"
        self.host = flat.to_numpy() if self.on_cpu else np.zeros(n, np.float32)  # parameters as last fetched
        self.acc = np.zeros(n, np.float32) if cfg.n_push > 1 or not self.on_cpu else None  # gradient sum since the last push
        self.wire = np.empty(max(ps.n_of(s) for s in range(P)), ps.wire) if ps.push_dtype != "fp32" else None
        self.row = np.zeros(ctl.ROW, np.int64) if row is None else np.array(row, np.int64)  # this worker's accounting
        self.seq, self.fetched = [0] * P, [0] * P
        self.steps, self.pending, self.clock_base = int(self.row[ctl.STEPS]), 0, int(self.row[ctl.STEPS])
        self.torn_retries = 0
        # --overlap: push and fetch on a communication thread while the next step computes (DistBelief's clients)
        self.overlap, self.job, self.track, self.fresh = cfg.overlap, None, "comm", False
        if self.overlap:
            from mpi4py import MPI

            if MPI.Query_thread() < MPI.THREAD_MULTIPLE:
                raise RuntimeError(
                    f"--overlap=true needs MPI_THREAD_MULTIPLE, this MPI gave level {MPI.Query_thread()}: use --overlap=false "
                    "or an MPI built with thread support"
                )
            self.pool = ThreadPoolExecutor(1, thread_name_prefix="downpour-comm")
            self.send, self.staged, self.track = np.zeros(n, np.float32), np.zeros(n, np.float32), "comm thread"
            self.staged_versions = [0] * P  # the shard versions in `staged`, installed with it

    # ---- the cadence
    def start(self, resumed: bool) -> None:
        """Wait for the warmstart (workers other than 0), then fetch the parameters."""
        if self.worker != 0 and self.cfg.warmstart_steps and not resumed:
            with trace.span("warmstart wait", "comm", "comm"):
                wait = Backoff(0.02)
                while not self.ps.head(0)[ctl.WARM]:
                    wait()
        self.fetch()

    def step(self, lr: float, epoch: int, batch: int) -> None:
        """After backward: fold the gradient in, push every n_push steps, fetch every n_fetch steps; in bounded-delay
        mode, wait while this worker is more than max_delay steps ahead of the slowest. With --overlap the push and
        fetch run on the communication thread and the next step computes meanwhile: its gradient comes from the
        parameters fetched one step earlier (the previous step's fetch is installed here)."""
        self.steps += 1
        grad = self.flat.to_numpy(grad=True) if self.on_cpu else self.flat.grad.detach().cpu().numpy()
        if self.acc is None:
            self.acc_view = grad  # n_push == 1 on CPU: push the gradient buffer itself, no copy
        else:
            update.axpy(self.acc, grad, 1.0)
            self.acc_view = self.acc
        self.pending += 1
        push, fetch = self.steps % self.cfg.n_push == 0, self.steps % self.cfg.n_fetch == 0
        if self.overlap and (push or fetch):
            versions = list(self.fetched)  # what this gradient was computed on: installed before this step began
            self.wait_comm()
            if push:
                np.copyto(self.send, self.acc_view)
                self.pending = 0
                if self.acc is not None:
                    self.acc[:] = 0
            self.job = self.pool.submit(self._communicate, push, fetch, lr, (self.steps, epoch, batch), versions)
        else:
            if push:
                self.push(lr, epoch, batch)
            if fetch:
                self.fetch()
        if self.worker == 0 and self.steps == self.cfg.warmstart_steps:
            self.wait_comm()
            self.ps.set_everywhere(ctl.WARM, 1)
        if self.cfg.max_delay:
            self.bound_delay()

    def _communicate(self, push: bool, fetch: bool, lr: float, position, versions: list[int]) -> None:
        """The communication thread's job: push `self.send`, then fetch into `self.staged`."""
        if push:
            self._push(self.send, lr, position, versions)
        if fetch:
            self._fetch(self.staged, self.staged_versions)
            self.fresh = True

    def wait_comm(self) -> None:
        """--overlap: wait for the communication thread's job; install the parameters it fetched."""
        if self.job is None:
            return
        with trace.span("wait for comm thread", "comm", "comm"):
            self.job.result()  # re-raises the thread's exception here
        self.job = None
        if self.fresh:
            self.fresh = False
            np.copyto(self.host, self.staged)
            self.fetched = list(self.staged_versions)
            self._to_device()

    def _to_device(self) -> None:
        if not self.on_cpu:
            self.flat.data.copy_(torch.from_numpy(self.host))

    def finish(self, lr: float, epoch: int, batch: int) -> None:
        """Push what is left, wait until every shard has applied it, publish this worker's row and report done."""
        self.wait_comm()
        if self.overlap:
            self.pool.shutdown()
        if self.pending:
            self.push(lr, epoch, batch)
        for s in self.order:
            self.ps.wait_applied(s, self.worker, self.seq[s])
        if self.worker == 0:
            self.ps.set_everywhere(ctl.WARM, 1)  # a run shorter than the warmstart must not strand the others
        self.row[[ctl.STEPS, ctl.EPOCH, ctl.BATCH]] = self.steps, epoch, batch
        self.ps.report(self.worker, self.row)

    # ---- communication
    def fetch(self) -> None:
        """Every shard's published parameters into the model, after this worker's own pushes have been applied."""
        self.wait_comm()
        self._fetch(self.host, self.fetched)
        self._to_device()

    def _fetch(self, out: np.ndarray, versions: list[int]) -> None:
        """Every shard into `out`, their versions into `versions`."""
        with trace.span("fetch", "comm", self.track):
            for s in self.order:
                lo, hi = self.ps.shards[s]
                head = self.ps.wait_applied(s, self.worker, self.seq[s])
                with trace.span(f"fetch shard {s}", "comm", self.track, n=hi - lo):
                    versions[s], retries = self.ps.fetch_shard(s, out[lo:hi], int(head[ctl.VERSION]))
                self.torn_retries += retries

    def push(self, lr: float, epoch: int, batch: int) -> None:
        """Send the accumulated gradient to every shard (or reject it), then start a new sum. The row sent with it
        says where this worker's next step starts (epoch, batch) and counts this push."""
        self.wait_comm()
        self.pending = 0
        try:
            self._push(self.acc_view, lr, (self.steps, epoch, batch), self.fetched)
        finally:
            if self.acc is not None:
                self.acc[:] = 0

    def _push(self, g: np.ndarray, lr: float, position: tuple[int, int, int], versions: list[int]) -> None:
        """Push g, computed on parameters at shard `versions`; position = (steps, epoch, batch) after it."""
        row = self.row
        with trace.span("push", "comm", self.track):
            row[[ctl.SENT, ctl.STEPS, ctl.EPOCH, ctl.BATCH]] = row[ctl.SENT] + 1, *position
            if not update.grad_is_finite(g):
                row[ctl.REJ_NONFINITE] += 1
                trace.instant("push rejected", "comm", self.track, reason="non-finite")
                return
            heads = {s: self.ps.wait_applied(s, self.worker, self.seq[s]) for s in self.order}  # credits
            tau = max(int(heads[s][ctl.VERSION]) - versions[s] for s in self.order)
            scale, bound = 1.0, self.cfg.max_staleness
            if bound and tau > bound:
                if self.cfg.staleness_policy == "drop":
                    row[ctl.REJ_STALE] += 1
                    trace.instant("push rejected", "comm", self.track, reason="stale", staleness=tau)
                    if self.overlap:  # told: catch up instead of being dropped again
                        self._fetch(self.staged, self.staged_versions)
                        self.fresh = True
                    else:
                        self._fetch(self.host, self.fetched)
                        self._to_device()
                    return
                scale = 1.0 / tau
                row[ctl.SCALED] += 1
            row[ctl.APPLIED] += 1
            row[ctl.STALE_SUM] += tau
            row[ctl.STALE_MAX] = max(int(row[ctl.STALE_MAX]), tau)
            row[ctl.HIST + ctl.staleness_bin(tau)] += 1
            row[ctl.LR] = ctl.lr_bits(-lr * scale)
            clock = position[0] - self.clock_base - (self.cfg.warmstart_steps if self.worker == 0 else 0)
            for s in self.order:
                lo, hi = self.ps.shards[s]
                with trace.span(f"push shard {s}", "comm", self.track, n=hi - lo):
                    wire = precision.encode(g[lo:hi], self.wire[: hi - lo] if self.wire is not None else None, self.ps.push_dtype)
                    self.seq[s] += 1
                    self.ps.post(s, self.worker, wire, row, self.seq[s], clock)

    def bound_delay(self) -> None:
        """Bounded delay: wait while this worker is more than max_delay steps ahead of the slowest unfinished one."""
        W, L = self.ps.layout.workers, self.ps.layout
        if W < 2:
            return
        mine = self.steps - self.clock_base - (self.cfg.warmstart_steps if self.worker == 0 else 0)
        wait, t0 = Backoff(0.005), time.monotonic()
        while True:
            clocks = self.ps.head(self.order[0])[L.clock : L.clock + W]
            slowest = int(min(c for u, c in enumerate(clocks) if u != self.worker))
            if mine - slowest <= self.cfg.max_delay:
                break
            wait()
        waited = time.monotonic() - t0
        if waited > 1e-3:
            self.row[ctl.WAIT_US] += int(waited * 1e6)
            trace.instant("bounded-delay wait", "comm", "comm", seconds=round(waited, 6))

    # ---- stopping and bookkeeping
    def request_stop(self) -> None:
        self.ps.set_everywhere(ctl.STOP, 1)

    def stop_requested(self) -> bool:
        return bool(self.ps.words.read(self.ps.roles.servers[self.order[0]], ctl.STOP, 1)[0])
