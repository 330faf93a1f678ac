"""Sandblaster L-BFGS on a simulated clock: the real optimizer and objective, portions scheduled over W replicas.

    hpcdnn simulate --config fashion_sandblaster --workers=16 --device=v100 --link-gbit=10 --straggler-cv=0.3

The math is the real driver's (topologies/sandblaster.py): ShardedLBFGS and Objective (mpi/lbfgs.py, mpi/portions.py)
on MPI.COMM_SELF, where every reduction of one process is the identity, and ModelPortions computes each portion's
loss and gradient for real. Only *who* computes a portion and *when* is simulated (SimPortions, below, in place of
mpi/portions.Portions): replicas claim portions first free, first served; a replica without claims waits
sb_backup_after x its mean portion time, then backs up an unfinished portion (pending[replica % pending]) as
Portions.run does; the first copy to finish wins, the others stop at their next chunk boundary (the abandon check,
asked after every chunk).
A portion's result does not depend on who computes it (its input and dropout masks are functions of the seed, batch
and portion), so each winner is computed once, here, and for a given portion count the trajectory is the real run's
for any W, straggler or clock seed. A portion takes portion_s (cost.py, at the batch's size) times a lognormal draw of mean 1 and coefficient
of variation --straggler-cv, times slow_factor on replica slow_rank. An evaluation costs its portions' span plus
coordinator_s and allreduce_s; an L-BFGS direction costs lbfgs_s.
"""

from __future__ import annotations

import heapq
import itertools
import math
from dataclasses import dataclass

import numpy as np

from hpcdnn.mpi.portions import PortionStats
from hpcdnn.sim.cost import compute_s, sandblaster_cost
from hpcdnn.topologies.sandblaster_data import ModelPortions, PortionData, auto_portions


@dataclass
class Copy:
    """One replica's run of one portion: from start to end (simulated s), a backup or a claim, stopped early or not."""

    k: int
    replica: int
    start: float
    end: float
    backup: bool
    abandoned: bool = False


class SimPortions:
    """Portions.run's contract (which portions count, in which order; the claims made) decided on the simulated clock."""

    leads = True  # one replica claims as one (no --mp)

    def __init__(self, count: int, workers: int, *, dynamic: bool, backup_after: float, chunk: int, draw,
                 slow_replica: int = -1, slow_factor: float = 1.0) -> None:  # fmt: skip
        self.count, self.workers, self.dynamic, self.backup_after, self.chunk = count, workers, dynamic, backup_after, chunk
        self.draw, self.slow_replica, self.slow_factor = draw, slow_replica, slow_factor
        self.stats = PortionStats()
        self.evaluation = 0
        self.portion_s = 0.0  # a portion's compute time at the current batch size (set per batch)
        self.samples = 1  # samples per portion at the current batch size (for the chunk boundaries)
        self.portion_time = [0.0] * workers  # each replica's moving average, as Portions keeps it for the backup wait
        self.span = 0.0  # the last evaluation's simulated duration: until every replica has left it

    def expected_claims(self) -> int:
        """Claims per evaluation: every portion once plus one failed claim per replica (dynamic), none (static)."""
        return self.count + self.workers if self.dynamic else 0

    def run(self, compute, commit) -> int:
        """Compute the winners in the order they won (each once: any copy gives the same result) and commit them."""
        self.evaluation += 1
        order, self.span = self.schedule() if self.dynamic else self.static()
        for k in order:
            if not compute(k, lambda: True):
                raise RuntimeError(f"portion {k} stopped though nothing asked it to (a bug, please report)")
            commit(k)
        return self.expected_claims()

    def duration(self, replica: int) -> float:
        """A portion's compute time on `replica`: portion_s x a draw (x slow_factor on the slow replica)."""
        return self.portion_s * self.draw() * (self.slow_factor if replica == self.slow_replica else 1.0)

    def static(self) -> tuple[list[int], float]:
        """--sb_dynamic=false: replica r computes portions r, r+W, ... one after another; no claims, no backups."""
        ends, done = [0.0] * self.workers, []
        for r in range(self.workers):
            for k in range(r, self.count, self.workers):
                ends[r] += self.duration(r)
                done.append((ends[r], k))
        self.stats.won += self.count
        return [k for _, k in sorted(done)], max(ends)

    def schedule(self) -> tuple[list[int], float]:
        """The dynamic protocol of one evaluation as events; returns the winners in winning order and the span."""
        P, W = self.count, self.workers
        heap, tie = [], itertools.count()
        won_at: list[float | None] = [None] * P
        live: list[list[Copy]] = [[] for _ in range(P)]
        order, claimed, span = [], 0, 0.0

        def start(r: int, k: int, t: float, backup: bool) -> None:
            c = Copy(k, r, t, t + self.duration(r), backup)
            live[k].append(c)
            heapq.heappush(heap, (c.end, next(tie), "end", c))

        def idle(r: int, t: float) -> None:  # no claims left: back up a straggler after the wait (never if inf)
            if self.backup_after != math.inf:
                heapq.heappush(heap, (t + self.backup_after * self.portion_time[r], next(tie), "backup", r))

        def next_work(c: Copy, t: float) -> None:  # after a claimed portion: claim again; after a backup: idle again
            heapq.heappush(heap, (t, next(tie), "claim", c.replica)) if not c.backup else idle(c.replica, t)

        for r in range(W):
            heapq.heappush(heap, (0.0, next(tie), "claim", r))
        while heap:
            t, _, what, arg = heapq.heappop(heap)
            if what == "claim":
                if claimed < P:
                    start(arg, claimed, t, False)
                    claimed += 1
                else:
                    idle(arg, t)
            elif what == "backup":
                pending = [k for k in range(P) if won_at[k] is None]
                if pending:
                    self.stats.backup += 1
                    start(arg, pending[arg % len(pending)], t, True)
            elif what == "stop":  # abandoned between chunks: another copy won
                span = max(span, t)
                self.stats.discarded, self.stats.abandoned = self.stats.discarded + 1, self.stats.abandoned + 1
                next_work(arg, t)
            elif not arg.abandoned:  # "end": the copy finished; the first of its portion wins the commit
                c, span = arg, max(span, t)
                took = c.end - c.start
                pt = self.portion_time[c.replica]
                self.portion_time[c.replica] = took if not pt else 0.8 * pt + 0.2 * took
                live[c.k].remove(c)
                if won_at[c.k] is None:
                    won_at[c.k] = t
                    order.append(c.k)
                    self.stats.won, self.stats.backup_won = self.stats.won + 1, self.stats.backup_won + c.backup
                    self.abandon(live[c.k], t, heap, tie)
                else:
                    self.stats.discarded += 1
                next_work(c, t)
        return order, span

    def abandon(self, copies: list[Copy], t: float, heap: list, tie) -> None:
        """Other copies of a portion won at t stop at their next chunk boundary: ModelPortions asks keep_going after
        every chunk, the last one too, so a copy never finishes a portion already won (it is abandoned, not a lost commit)."""
        chunks = max(1, -(-self.samples // self.chunk))
        for c in list(copies):
            step = (c.end - c.start) / chunks
            stop = c.start + math.ceil((t - c.start) / step - 1e-9) * step
            c.abandoned = True
            copies.remove(c)
            heapq.heappush(heap, (min(stop, c.end), next(tie), "stop", c))


class Clock:
    """Simulated seconds of the Sandblaster run, and the objective's evaluations counted as they advance it."""

    def __init__(self, objective, portions: SimPortions, terms: dict) -> None:
        self.objective, self.portions, self.terms = objective, portions, terms
        self.now, self.evals = 0.0, 0

    def evaluate(self) -> tuple[float, np.ndarray]:
        """One real evaluation of the objective; the clock advances by its portions, the claims and the reduction."""
        f, g = self.objective()
        self.now += self.portions.span + self.terms["coordinator_s"] + self.terms["allreduce_s"]
        self.evals += 1
        return f, g


class Emulation:
    """The real driver's Sandblaster loop (topologies/sandblaster.py's epoch and train.py's loop) on the simulated clock."""

    def __init__(self, em) -> None:
        from mpi4py import MPI

        from hpcdnn.mpi.lbfgs import ShardedLBFGS
        from hpcdnn.mpi.portions import Objective

        cfg, run, W = em.cfg, em.run, em.sim.workers
        self.em, self.cfg = em, cfg
        run.model.train(cfg.sb_dropout)  # as Sandblaster.__init__: dropout only if asked for
        self.count = cfg.sb_portions or auto_portions(cfg.batch_size, W)
        self.data = PortionData(cfg.data, "train", seed=cfg.seed, flip=cfg.flip, pca_std=cfg.pca_std, workers=run.threads,
                                **run.loader_args())  # fmt: skip
        self.fn = ModelPortions(run.model, run.flat, self.count, cfg.sb_chunk, dropout=cfg.sb_dropout, seed=cfg.seed, data=self.data)
        self.portions = SimPortions(self.count, W, dynamic=cfg.sb_dynamic, backup_after=cfg.sb_backup_after, chunk=cfg.sb_chunk,
                                    draw=em.straggler_draw, slow_replica=cfg.slow_rank, slow_factor=cfg.slow_factor)  # fmt: skip
        self.obj = Objective(self.fn, self.portions, self.fn.x, comm=MPI.COMM_SELF, weight_decay=cfg.weight_decay)
        self.opt = ShardedLBFGS(run.flat.numel, cfg.sb_history, comm=MPI.COMM_SELF, dtype=np.float32)
        self.clock = Clock(self.obj, self.portions, em.cost.terms)
        n = self.data.total
        self.sizes = [min(n, round(cfg.batch_size * cfg.sb_batch_growth ** min(e, cfg.epochs - 1))) for e in range(cfg.epochs)]
        self.per_epoch = [n // s * cfg.sb_batch_iters for s in self.sizes]  # Sandblaster.steps_in_epoch
        self.total = min(sum(self.per_epoch), cfg.max_steps) if cfg.max_steps else sum(self.per_epoch)
        self.step = self.pos = self.epoch = self.batch = self.ls_evals = self.failures = 0
        self.f, self.batch_loss = 0.0, float("nan")
        self.batch_images = 0.0  # training images as the plan counts them: a batch once per sb_batch_iters iterations
        self.window = {"t": 0.0, "samples": 0, "losses": []}

    def run(self) -> dict:
        """Epoch after epoch until the step count; each full epoch evaluated as the driver's root does."""
        cfg, em, fn, obj, portions = self.cfg, self.em, self.fn, self.obj, self.portions
        for epoch, size in enumerate(self.sizes):
            self.epoch, self.pos, obj.expected = epoch, 0, size
            portions.portion_s = compute_s(em.model_cost, em.cluster, size) / self.count
            portions.samples = -(-size // self.count)
            for batch in range(self.data.batches(epoch, size)):
                self.batch = batch
                fn.set_batch(epoch, batch, size)
                self.f, g = self.clock.evaluate()  # a new batch: its gradient at the current point
                self.batch_loss = self.f
                for _ in range(cfg.sb_batch_iters):
                    g = self.iteration(g, size)
                    if self.step >= self.total:
                        break
                if self.step >= self.total:
                    break
            if self.pos < self.per_epoch[self.epoch]:
                break
            em.end_epoch(fn.x.copy(), self.step, self.epoch + 1, self.clock.now)
            if self.step >= self.total:
                break
        return self.finish()

    def iteration(self, g: np.ndarray, size: int) -> np.ndarray:
        """One L-BFGS iteration as Sandblaster.epoch runs it: direction, line search, the new pair; logs the step."""
        from hpcdnn.mpi.lbfgs import line_search

        cfg, opt, clock = self.cfg, self.opt, self.clock
        d, gtd = opt.direction(g)
        clock.now += clock.terms["lbfgs_s"]
        ls = line_search(clock.evaluate, self.fn.x, d, self.f, gtd, opt.first_step(cfg.sb_step), mode=cfg.sb_line_search,
                         max_evals=cfg.sb_ls_max, slope=lambda g_new, d=d: opt.dot(g_new, d))  # fmt: skip
        if ls.ok:
            opt.propose(ls.t, d, ls.g)
            self.f, g = ls.f, ls.g
        else:
            opt.reset()  # x is back where it was
        self.step, self.pos, self.batch_images = self.step + 1, self.pos + 1, self.batch_images + size / cfg.sb_batch_iters
        self.ls_evals, self.failures = self.ls_evals + ls.evals, self.failures + (not ls.ok)
        win = self.window
        win["losses"].append(self.f)
        if self.step % cfg.log_every == 0 or self.step == self.total:
            images_per_s = (self.obj.samples - win["samples"]) / max(clock.now - win["t"], 1e-12)
            self.em.log.log(step=self.step, epoch=round(self.epoch + self.pos / self.per_epoch[self.epoch], 4), time=round(clock.now, 9),
                            loss=float(np.mean(win["losses"])), images_per_s=round(images_per_s, 1), new_batch_loss=self.batch_loss,
                            step_length=ls.t, line_search_evals=ls.evals, batch_size=size, evaluations=clock.evals)  # fmt: skip
            self.window = {"t": clock.now, "samples": self.obj.samples, "losses": []}
        if self.em.watch(None, self.obj.samples, clock.now, self.step, self.epoch + self.pos / self.per_epoch[self.epoch]):
            self.total = self.step  # the target is reached: the loops end here
        return g

    def finish(self) -> dict:
        """summary.json: the real driver's Sandblaster fields, evaluations per iteration, and the plan with that count."""
        em, cfg, clock = self.em, self.cfg, self.clock
        per_iteration = clock.evals / max(self.step, 1)
        em.cost = sandblaster_cost(em.model_cost, em.cluster, cfg, evals=per_iteration)  # the plan with the measured count
        won, backup, backup_won, discarded, abandoned = self.portions.stats.as_array().tolist()
        extra = {"servers": 0, "epochs": round(self.epoch + self.pos / self.per_epoch[self.epoch], 3), "train_loss": self.f,
                 "batch_size": self.sizes[self.epoch], "portions": self.count, "portions_total": won, "portions_backup": backup, "portions_backup_won": backup_won,
                 "portions_discarded": discarded, "portions_abandoned": abandoned, "lbfgs_iterations": self.step,
                 "gradient_evals": clock.evals, "line_search_evals": self.ls_evals, "line_search_failures": self.failures,
                 "samples_counted": self.obj.samples, "pairs_rejected": self.opt.pairs_rejected,
                 "evaluations_per_iteration": round(per_iteration, 4),
                 "training_images_per_s": round(self.batch_images / max(clock.now, 1e-12), 1),
                 "straggler_cv": em.sim.straggler_cv, "slow_replica": cfg.slow_rank, "slow_factor": cfg.slow_factor}  # fmt: skip
        optim = {"lbfgs_basis": self.opt.V.copy()}
        return em.finish(self.fn.x.copy(), optim, self.step, clock.now, self.obj.samples, extra, position=(self.epoch, self.batch))


def run_sandblaster(em) -> dict:
    """Emulate `hpcdnn train --topology=sandblaster` on W replicas; the run directory as Emulator.finish writes it."""
    sb = Emulation(em)
    try:
        return sb.run()
    finally:
        sb.data.close()
