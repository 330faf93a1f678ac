"""Downpour on a simulated clock: W replicas, each with its own parameter copy, and one server that applies pushes
in the order they arrive; every gradient is real (Emulator.gradient), only the times are the cost model's.

A worker's step, as hpcdnn/mpi/downpour.py does it (no --overlap): compute (compute_s, drawn) on the parameters it
last fetched; add the gradient to its sum; every n_push steps push it (the worker is busy push_s; a push waits for the
previous one's credit, i.e. its apply); every n_fetch steps fetch (first waiting until its own pushes are applied,
then fetch_s). The P shards are modelled as one server (each shard serves its N/P in parallel) that is busy
server_s x n_push per push - its apply, or its link's share of the pushes and fetches, whichever is longer (cost.py);
pushes queue at it first come, first served. The update is the servers' own: update.adagrad / update.sgd
on the server's vector, called as param_server.ParamServer._apply calls them. Warmstart: worker 0 trains alone for
warmstart_steps, then the others fetch.

Staleness is kept twice: `staleness_*` as the real workers measure it (updates applied between the fetch and the
moment the push is posted: control.py's rows and summary, so the histogram compares with a real run's), and
`staleness_applied_*` (updates applied between the fetch and the push's own apply: what the gradient really missed;
W-1 in the steady state of W equal workers, whatever the link).
"""

from __future__ import annotations

import heapq
import itertools

import numpy as np

from hpcdnn.kernels import precision, update
from hpcdnn.mpi import control as ctl


class Worker:
    """A simulated Downpour worker: its replica, parameter copy, gradient sum, pushes in flight and accounting row."""

    def __init__(self, rep, params: np.ndarray) -> None:
        self.rep, self.params = rep, params.copy()
        self.acc = np.zeros_like(params)
        self.fetched, self.in_flight, self.pending, self.done, self.lr = 0, 0, 0, False, 0.0
        self.row = np.zeros(ctl.ROW, np.int64)
        self.after_applied = None  # what the worker does once its pushes are applied (a fetch, or a push's credit)


class DownpourClock:
    """The event loop: a heap of (time, order, action); actions run in simulated-time order, ties first come first."""

    def __init__(self, em) -> None:
        self.em, self.cfg, self.terms = em, em.cfg, em.cost.terms
        cfg, flat = em.cfg, em.run.flat
        self.server = flat.to_numpy().copy()  # the servers' parameters (one vector; the shards apply in parallel)
        self.state = np.zeros_like(self.server) if cfg.optimizer == "adagrad" or cfg.momentum else None
        self.version, self.server_free, self.now = 0, 0.0, 0.0
        self.workers = [Worker(rep, self.server) for rep in em.replicas]
        self.heap, self.order = [], itertools.count()
        self.applied_hist = np.zeros(ctl.HIST_BINS, np.int64)
        self.applied_counts: dict[int, int] = {}  # exact staleness at apply -> pushes
        self.applied_sum, self.applied_max, self.images = 0, 0, 0
        self.window = {"t": 0.0, "images": 0, "losses": []}
        self.stopped = False  # the target accuracy was reached: no event runs after that
        dtype = cfg.push_dtype  # a push's words on the wire (--push_dtype other than fp32), as the real worker's buffer
        self.wire = np.empty(self.server.size, precision.DTYPES[dtype]) if dtype != "fp32" else None

    def at(self, t: float, action, *args) -> None:
        """Schedule action(*args) at simulated time t."""
        heapq.heappush(self.heap, (t, next(self.order), action, args))

    def run(self) -> None:
        """Start the workers (only worker 0 during a warmstart) and run events until none is left."""
        warm = self.cfg.warmstart_steps
        for w in self.workers if not warm else self.workers[:1]:
            self.at(0.0, self.fetch, w)
        while self.heap and not self.stopped:
            self.now, _, action, args = heapq.heappop(self.heap)
            action(*args)

    # ---- the worker's cadence
    def fetch(self, w: Worker) -> None:
        """The parameters as the server holds them now; the next step starts fetch_s later."""
        if w.in_flight:  # a fetch waits until this worker's own pushes are applied
            w.after_applied = lambda: self.fetch(w)
            return
        np.copyto(w.params, self.server)
        w.fetched = self.version
        self.ready(w, self.now + self.terms["fetch_s"])

    def ready(self, w: Worker, t: float) -> None:
        """Worker w starts its next step at t (or, past the last step, pushes what is left and stops)."""
        em, warm = self.em, self.cfg.warmstart_steps
        if w.rep.index == 0 and warm and w.rep.steps == warm:
            for other in self.workers[1:]:
                self.at(t, self.fetch, other)  # the warmstart is over: the others fetch and start
        if w.rep.steps >= em.total:
            if w.pending:
                self.finish_push(w, t)
            w.done = True
            return
        self.at(t + em.compute_time(), self.step, w)

    def step(self, w: Worker) -> None:
        """A step's compute has finished: the real gradient on w's copy, then push and fetch by the cadence."""
        em, cfg = self.em, self.cfg
        w.lr = em.lr(w.rep)
        em.gradient(w.rep, w.params)
        update.axpy(w.acc, em.run.flat.to_numpy(grad=True), 1.0)
        w.pending += 1
        self.images += cfg.batch_size
        self.progress(w)
        rep = w.rep
        if em.watch(self.server, self.images, self.now, rep.steps, rep.epoch + rep.batch / em.steps_per_epoch):
            self.stopped = True
        fetch = w.rep.steps % cfg.n_fetch == 0
        if w.rep.steps % cfg.n_push != 0:
            self.next(w, self.now, fetch)
        elif w.in_flight:  # the previous push is not applied yet: its credit comes with the apply
            w.after_applied = lambda: self.next(w, self.post(w, self.now), fetch)
        else:
            self.next(w, self.post(w, self.now), fetch)

    def next(self, w: Worker, t: float, fetch: bool) -> None:
        """After a step's push (if any): fetch at t when due, else start the next step."""
        if fetch:
            self.at(t, self.fetch, w)
        else:
            self.ready(w, t)

    def finish_push(self, w: Worker, t: float) -> None:
        """The last, partial gradient sum of a worker past its last step."""
        if w.in_flight:
            w.after_applied = lambda: self.post(w, self.now)
        else:
            self.post(w, t)

    def post(self, w: Worker, t: float) -> float:
        """Post w's gradient sum at t; the worker is free again push_s later (returned), the server has it then.
        With --max_staleness, a push staler than the bound is dropped (the worker fetches instead) or scaled by
        1/staleness, as the real worker decides it (mpi/downpour.py _push)."""
        tau = self.version - w.fetched  # as the real worker computes it: VERSION at the credit minus VERSION fetched
        row = w.row
        row[[ctl.SENT, ctl.STEPS]] = row[ctl.SENT] + 1, w.rep.steps
        w.pending = 0
        scale, bound = 1.0, self.cfg.max_staleness
        if bound and tau > bound:
            if self.cfg.staleness_policy == "drop":
                row[ctl.REJ_STALE] += 1
                w.acc[:] = 0
                np.copyto(w.params, self.server)
                w.fetched = self.version
                return t + self.terms["fetch_s"]
            scale = 1.0 / tau
            row[ctl.SCALED] += 1
        grad = w.acc.copy()
        w.acc[:] = 0
        row[ctl.APPLIED] += 1
        row[ctl.STALE_SUM] += tau
        row[ctl.STALE_MAX] = max(int(row[ctl.STALE_MAX]), tau)
        row[ctl.HIST + ctl.staleness_bin(tau)] += 1
        w.in_flight += 1
        if self.wire is not None:  # the wire's rounding: the real worker encodes (precision.encode), the server decodes
            dtype = self.cfg.push_dtype
            grad = precision.decode(precision.encode(grad, self.wire, dtype), grad, dtype)
        done = t + self.terms["push_s"]
        self.at(done, self.arrive, w, grad, w.fetched, w.lr * scale)
        return done

    # ---- the server
    def arrive(self, w: Worker, grad: np.ndarray, fetched: int, lr: float) -> None:
        """A push reaches the server: it queues behind the pushes before it, then is applied."""
        start = max(self.now, self.server_free)  # first come, first served
        self.server_free = start + self.terms["server_s"] * self.cfg.n_push  # its apply, or its link's share of pushes and fetches
        self.at(self.server_free, self.apply, w, grad, fetched, lr)

    def apply(self, w: Worker, grad: np.ndarray, fetched: int, lr: float) -> None:
        """The server's update, as ParamServer._apply calls it (in place instead of into the other buffer)."""
        cfg = self.cfg
        tau = self.version - fetched
        self.applied_hist[ctl.staleness_bin(tau)] += 1
        self.applied_counts[tau] = self.applied_counts.get(tau, 0) + 1
        self.applied_sum, self.applied_max = self.applied_sum + tau, max(self.applied_max, tau)
        if cfg.optimizer == "adagrad":
            update.adagrad(self.server, grad, self.state, lr, eps=cfg.adagrad_eps, weight_decay=cfg.weight_decay)
        else:
            update.sgd(self.server, grad, self.state, lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        self.version += 1
        w.in_flight -= 1
        if not w.in_flight and w.after_applied is not None:
            then, w.after_applied = w.after_applied, None
            then()

    # ---- what the run directory gets
    def progress(self, w: Worker) -> None:
        """Worker 0 logs as the real root does: every log_every of its steps, and evaluates after each epoch."""
        em, cfg, rep, win = self.em, self.cfg, w.rep, self.window
        win["losses"].append(rep.losses[-1])
        if rep.index != 0:
            return
        if rep.steps % cfg.log_every == 0 or rep.steps == em.total:
            em.log.log(step=rep.steps, epoch=round(rep.epoch + rep.batch / em.steps_per_epoch, 4), time=round(self.now, 9),
                       loss=float(np.mean(win["losses"])), images_per_s=round((self.images - win["images"]) / max(self.now - win["t"], 1e-12), 1),
                       lr=w.lr, pushes_applied=self.version, staleness_mean=round(float(sum(x.row[ctl.STALE_SUM] for x in self.workers))
                       / max(sum(int(x.row[ctl.APPLIED]) for x in self.workers), 1), 3))  # fmt: skip
            win.update(t=self.now, images=self.images, losses=[])
        if rep.batch == 0:
            em.end_epoch(self.server.copy(), rep.steps, rep.epoch, self.now)

    def summary(self) -> dict:
        """control.summary over the workers' rows (the real run's fields), the applied staleness, the server count."""
        hist = [int(x) for x in self.applied_hist]
        while len(hist) > 1 and hist[-1] == 0:
            hist.pop()
        out = ctl.summary(np.stack([w.row for w in self.workers]), len(self.workers))
        return {**out, "servers": self.em.sim.servers, "staleness_applied_mean": round(self.applied_sum / max(self.version, 1), 3),
                "staleness_applied_max": self.applied_max, "staleness_applied_hist": hist,
                "staleness_applied_counts": {str(k): v for k, v in sorted(self.applied_counts.items())}}  # fmt: skip


def run_downpour(em) -> dict:
    """Emulate Downpour to em.total steps per worker; the run directory and summary as emulate.Emulator.finish writes."""
    clock = DownpourClock(em)
    clock.run()
    optim = {} if clock.state is None else {"sum_sq" if em.cfg.optimizer == "adagrad" else "momentum_buffer": clock.state}
    return em.finish(clock.server, optim, em.replicas[0].steps, clock.now, clock.images, clock.summary())
