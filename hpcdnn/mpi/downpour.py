"""Downpour SGD (Dean et al. 2012): model replicas train asynchronously against the sharded parameter server.

    mpirun -n 4 python -m mpi4py -m hpcdnn train --config fashion_small --topology=downpour --servers=1 \\
        --optimizer=adagrad --lr=0.05 --n_fetch=1 --n_push=1 --warmstart_steps=100

A worker sums its gradients locally and pushes the sum every `n_push` steps; every `n_fetch` steps it fetches the
parameters. Pushes apply Adagrad (DistBelief's per-parameter rate lr/sqrt(sum g^2)) or SGD (momentum kept on the
worker; the push is the difference the exact local step would make) with atomic RMA accumulates (param_server.py says why the worker computes the update). Each push's staleness
is the number of updates the servers applied between the worker's last fetch and this push; with `max_staleness`
a staler push is dropped or scaled by 1/staleness (Petuum SSP's bound; DistBelief had none). Non-finite pushes are
rejected and counted, never applied. Warmstart: worker 0 trains alone for `warmstart_steps`, then the others fetch
its parameters and start. Workers never wait for each other; the only waits are the warmstart and the end.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from hpcdnn import trace
from hpcdnn.kernels import update
from hpcdnn.models.flat import FlatParams
from hpcdnn.mpi import control as ctl
from hpcdnn.mpi.param_server import ParamServer

# elements per push piece: the squares, the old accumulator and the update of one piece (4 MB each) stay in cache
# between the kernel and the MPI call that reads them (bench/downpour.py measured 1M-element pieces faster than 4M and
# no slower than 256K). The push is memory-bound: an Adagrad push moves >= 5 passes over the vector, and computing the
# next piece's update on a second thread while MPI moves this one measured no faster.
PIECE = 1 << 20


class DownpourWorker:
    """The Downpour side of one replica: call `step(lr, epoch, batch)` after every `loss.backward()`."""

    def __init__(self, ps: ParamServer, flat: FlatParams, cfg, worker: int) -> None:
        self.ps, self.flat, self.cfg, self.worker = ps, flat, cfg, worker
        self.ctl = ps.control
        self.adagrad = cfg.optimizer == "adagrad"
        n = flat.numel
        self.on_cpu = flat.device.type == "cpu"
        self.host = flat.to_numpy() if self.on_cpu else np.zeros(n, np.float32)  # parameters as last fetched
        self.acc = np.zeros(n, np.float32) if cfg.n_push > 1 or not self.on_cpu else None  # gradient sum since the last push
        self.buf = np.zeros(n, np.float32) if not self.adagrad and cfg.momentum else None  # worker-side SGD momentum
        self.scratch = np.empty(min(n, PIECE), np.float32), np.empty(min(n, PIECE), np.float32)
        self.steps = self.sent = self.pending = 0
        self.first_push, self.version = True, 0

    # ---- the cadence
    def start(self, resumed: bool) -> None:
        """Wait for the warmstart (workers other than 0), then fetch the parameters."""
        if self.worker != 0 and self.cfg.warmstart_steps and not resumed:
            with trace.span("warmstart wait", "comm", "comm"):
                while not self.ctl.counter(ctl.WARM):
                    time.sleep(0.02)
        self.fetch()

    def step(self, lr: float, epoch: int, batch: int) -> None:
        """After backward: fold the gradient in, push every n_push steps, fetch every n_fetch steps."""
        self.steps += 1
        grad = self.flat.to_numpy(grad=True) if self.on_cpu else self.flat.grad.detach().cpu().numpy()
        if self.acc is None:
            self.acc_view = grad  # n_push == 1 on CPU: push the gradient buffer itself, no copy
        else:
            update.axpy(self.acc, grad, 1.0)
            self.acc_view = self.acc
        self.pending += 1
        if self.steps % self.cfg.n_push == 0:
            self.push(lr, epoch, batch)
        if self.steps % self.cfg.n_fetch == 0:
            self.fetch()
        if self.worker == 0 and self.steps == self.cfg.warmstart_steps:
            self.ctl.set(ctl.WARM, 1)

    def finish(self, lr: float, epoch: int, batch: int) -> None:
        """Push what is left, publish this worker's position and counts, and report done."""
        if self.pending:
            self.push(lr, epoch, batch)
        if self.worker == 0:
            self.ctl.set(ctl.WARM, 1)  # a run shorter than the warmstart must not strand the others
        self.ctl.report(self.worker, self.sent, self.steps, epoch, batch)
        self.ctl.add(ctl.DONE)

    # ---- communication
    @trace.traced("fetch", "comm", "comm")
    def fetch(self) -> None:
        self.version = self.ps.fetch(self.host)
        if not self.on_cpu:
            self.flat.data.copy_(torch.from_numpy(self.host))

    @trace.traced("push", "comm", "comm")
    def push(self, lr: float, epoch: int, batch: int) -> None:
        """Send the accumulated gradient to every shard (or reject it), then start a new sum. The push is counted
        together with this worker's position (epoch, batch: where its next step starts) in one control epoch."""
        g = self.acc_view
        self.sent += 1
        self.pending = 0
        row = (self.sent, self.steps, epoch, batch)
        try:
            if not update.grad_is_finite(g):
                self.ctl.record_push(self.worker, row, rejected=ctl.REJ_NONFINITE)
                trace.instant("push rejected", "comm", "comm", reason="non-finite")
                return
            tau = self.ctl.counter(ctl.APPLIED) - self.version
            scale, bound = 1.0, self.cfg.max_staleness
            if bound and tau > bound:
                if self.cfg.staleness_policy == "drop":
                    self.ctl.record_push(self.worker, row, rejected=ctl.REJ_STALE)
                    trace.instant("push rejected", "comm", "comm", reason="stale", staleness=tau)
                    return
                scale = 1.0 / tau
            if self.adagrad and self.cfg.weight_decay:
                update.axpy(g, self.host, self.cfg.weight_decay)  # decay toward the parameters the gradient saw
            self._apply(g, np.float32(-lr * scale))
            self.ctl.record_push(self.worker, row, tau, scale != 1.0)
        finally:
            if self.acc is not None:
                self.acc[:] = 0

    def _apply(self, g: np.ndarray, nlr: np.float32) -> None:
        """Shard by shard, in bounded pieces: compute the update and accumulate it into the servers' memory."""
        a, b = self.scratch
        eps = np.float32(self.cfg.adagrad_eps)
        for server, lo, hi, off in self.ps.pieces(a.size):
            n = hi - lo
            with trace.span(f"push shard {self.ps.roles.servers.index(server)}", "comm", "comm", offset=off, n=n):
                if self.adagrad:
                    update.square_kernel(g[lo:hi], a[:n])
                    self.ps.add_sum_sq(a[:n], b[:n], server, off)  # b = the accumulator before this push
                    update.adagrad_delta_kernel(g[lo:hi], b[:n], nlr, eps)
                else:  # the exact local SGD step on the fetched copy, pushed as a difference
                    buf = self.buf[lo:hi] if self.buf is not None else a[:0]
                    mom, wd = np.float32(self.cfg.momentum), np.float32(self.cfg.weight_decay)
                    update.sgd_delta_kernel(self.host[lo:hi], g[lo:hi], buf, b[:n], nlr, mom, wd, self.first_push)
                self.ps.add_params(b[:n], server, off)
        self.first_push = False

    # ---- stopping and bookkeeping
    def request_stop(self) -> None:
        self.ctl.set(ctl.STOP, 1)

    def stop_requested(self) -> bool:
        return bool(self.ctl.counter(ctl.STOP))
