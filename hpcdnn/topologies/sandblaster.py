"""Sandblaster L-BFGS (DistBelief, Dean et al. 2012) with allreduce: `hpcdnn train --topology=sandblaster`.

    mpirun -n 3 python -m mpi4py -m hpcdnn train --config fashion_sandblaster --data=DIR --run_dir=runs/sandblaster-fm --threads=1
    mpirun -n 3 python -m mpi4py -m hpcdnn train --config fashion_sandblaster --data=DIR --run_dir=runs/sandblaster-fm --resume
    mpirun -n 3 python -m mpi4py -m hpcdnn train ... --slow_rank=1 --slow_factor=3      # one straggler: backup tasks at work

A step is one L-BFGS iteration: the gradient of the batch (portions claimed from rank 0's counter and summed by
mpi/portions.py), a direction from the sharded history (mpi/lbfgs.py), a line search on the same batch, and the new
(s, y) pair. `batch_size` is the global batch (all ranks together); a new batch is drawn every `sb_batch_iters`
iterations and may grow every epoch (`sb_batch_growth`, progressive batching), so an epoch has
batches(epoch) x sb_batch_iters steps. Each rank reads and augments only the samples of the portions it computes
(sandblaster_data.py: the batch's samples and augmentation are a function of the seed and the batch, so any rank
computing a portion sees the same input), and the gradient sum arrives at each rank as its shard of the L-BFGS
vectors (Reduce_scatter). Within a batch the objective is a fixed function: no dropout unless --sb_dropout (then the
masks are seeded by batch and portion), augmentation drawn once per batch. Rank 0 coordinates;
the driver's root evaluates, logs and checkpoints (the history is gathered to it); `lr`, `momentum` and `optimizer`
are not used (see sb_step).

With --mp=K a replica is K ranks, each holding its partition of every layer and of every L-BFGS vector: the
replica's rank 0 claims portions and its partners follow (mpi/portions.py), the gradient is summed and sharded among
the ranks holding the same partition, the dot products over all ranks (mpi/lbfgs.py). --slow_rank names a worker
rank and slows its replica. A checkpoint holds the K partitions concatenated (state "mp_sizes"; the L-BFGS history
by columns); resume with the same --mp.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator

import numpy as np

from hpcdnn import checkpoint as ck
from hpcdnn import trace
from hpcdnn.topologies.base import Run, StepResult, Topology, my_part, part_sizes
from hpcdnn.topologies.sandblaster_data import ModelPortions, PortionData, auto_portions

COUNTERS = ("lbfgs_iterations", "gradient_evals", "line_search_evals", "line_search_failures", "samples_counted")


class Sandblaster(Topology):
    name = "sandblaster"
    same_world = True  # a position counts batches of the global batch split over the replicas
    # the timing knobs change only which rank computes which portion, not the trajectory
    resumable = frozenset({"slow_rank", "slow_factor", "sb_backup_after", "sb_dynamic"})

    def __init__(self, run: Run) -> None:
        from hpcdnn.mpi.lbfgs import ShardedLBFGS
        from hpcdnn.mpi.portions import Objective, Portions, PortionStats

        super().__init__(run)
        cfg, comm, saved, mp = run.cfg, run.roles.comm, run.saved, run.replica
        self.comm, self.world = comm, run.world  # world: replicas, the claimers of portions
        across = mp.across if mp is not None else None  # --mp: the ranks holding this partition, one per replica
        run.model.train(cfg.sb_dropout)  # LRN and pooling act the same either way; dropout only if asked for
        self.n_train = run.manifest["splits"]["train"]["count"]
        self.count = cfg.sb_portions or auto_portions(cfg.batch_size, self.world)
        slow = cfg.slow_rank // mp.size if mp is not None and cfg.slow_rank >= 0 else cfg.slow_rank  # its replica
        self.portions = Portions(self.count, comm=across or comm, dynamic=cfg.sb_dynamic, backup_after=cfg.sb_backup_after,
                                 slow_rank=slow, slow_factor=cfg.slow_factor, follow=mp.comm if mp is not None else None)  # fmt: skip
        self.data = PortionData(
            cfg.data, "train", seed=cfg.seed, flip=cfg.flip, pca_std=cfg.pca_std, workers=run.threads, **run.loader_args()
        )
        self.fn = ModelPortions(run.model, run.flat, self.count, cfg.sb_chunk, dropout=cfg.sb_dropout, seed=cfg.seed, data=self.data)
        self.x = self.fn.x
        self.objective = Objective(self.fn, self.portions, self.x, comm=comm, weight_decay=cfg.weight_decay, shard_comm=across)
        self.opt = ShardedLBFGS(run.flat.numel, cfg.sb_history, comm=comm, dtype=np.float32, shard_comm=across)
        self.sizes = part_sizes(run) if mp is not None else None  # the partitions' lengths (checkpoints)
        self.f, self.g = 0.0, None  # loss and gradient at x on the current batch (None: evaluate first)
        self.batch_loss = float("nan")  # the loss of the current batch before any step on it
        self.base = dict.fromkeys(COUNTERS, 0)  # counts of earlier processes of this run (resume)
        self.portion_base = np.zeros(len(PortionStats().as_array()), np.int64)
        self.ls_evals = self.ls_failures = 0
        if saved and "inner" in saved.state:  # written before positions counted steps in the epoch
            raise ValueError(
                f"{run.run_dir}: this Sandblaster checkpoint was written by an older hpcdnn (it keeps batch and inner step apart) "
                "and cannot be resumed by this one; start a new --run_dir"
            )
        if saved:
            st = saved.state
            self.x[:] = my_part(run, saved.params, st.get("mp_sizes"))  # checks the partitions
            mine = self.columns(st.get("mp_sizes"))
            self.opt.load_state(saved.optim["lbfgs_basis"][:, mine], st["lbfgs"])
            self.f, self.g = (st["f"], self.opt.shard(saved.optim["grad"][mine]).copy()) if "grad" in saved.optim else (0.0, None)
            self.batch_loss = st["batch_loss"]
            self.base, self.portion_base = st["counters"], np.array(st["portion_stats"], np.int64)
            self.ls_evals, self.ls_failures = self.base["line_search_evals"], self.base["line_search_failures"]
        self.iterations = saved.step if saved else 0
        self.last_epoch = saved.epoch if saved else 0

    def columns(self, sizes: list[int] | None) -> slice:
        """This rank's partition of a checkpointed vector (every column without --mp)."""
        if self.run.replica is None:
            return slice(None)
        lo = sum(sizes[: self.run.replica.part])
        return slice(lo, lo + sizes[self.run.replica.part])

    # ---- the shape of an epoch
    def batch_size(self, epoch: int) -> int:
        return min(self.n_train, round(self.cfg.batch_size * self.cfg.sb_batch_growth ** min(epoch, self.cfg.epochs - 1)))

    def steps_in_epoch(self, epoch: int) -> int:
        return self.n_train // self.batch_size(epoch) * self.cfg.sb_batch_iters

    def epoch(self, epoch: int, start: int) -> Iterator[StepResult]:
        from hpcdnn.mpi.lbfgs import line_search

        cfg, obj, opt, fn = self.cfg, self.objective, self.opt, self.fn
        iters, size = cfg.sb_batch_iters, self.batch_size(epoch)
        obj.expected = size
        first, inner = divmod(start, iters)
        for batch in range(first, self.data.batches(epoch, size)):
            fn.set_batch(epoch, batch, size)
            if self.g is None:  # a new batch: its gradient at the current point (its loss estimates the training loss)
                self.f, self.g = obj()
                self.batch_loss = self.f
                if obj.stop_agreed:
                    return
            self.last_epoch = epoch
            for i in range(inner, iters):
                samples = obj.samples
                with trace.span("L-BFGS iteration", "sandblaster", iteration=self.iterations, batch=batch):
                    d, gtd = opt.direction(self.g)
                    with trace.span("line search", "sandblaster") as span:
                        ls = line_search(obj, self.x, d, self.f, gtd, opt.first_step(cfg.sb_step), mode=cfg.sb_line_search,
                                         max_evals=cfg.sb_ls_max, slope=lambda g_new, d=d: opt.dot(g_new, d))  # fmt: skip
                        span.set(evals=ls.evals, t=ls.t, ok=ls.ok)
                    if ls.ok:
                        opt.propose(ls.t, d, ls.g)
                        self.f, self.g = ls.f, ls.g
                    else:
                        opt.reset()  # x is back where it was; steepest descent with a short first step next
                self.iterations += 1
                if i == iters - 1:
                    self.g = None  # the batch is done: the next one starts with its own evaluation
                self.ls_evals, self.ls_failures = self.ls_evals + ls.evals, self.ls_failures + (not ls.ok)
                yield StepResult(self.f, obj.samples - samples, bar={"t": f"{ls.t:.2g}"},
                                 log={"new_batch_loss": self.batch_loss, "step_length": ls.t, "line_search_evals": ls.evals,
                                      "batch_size": size})  # fmt: skip
            inner = 0

    # ---- stopping, evaluation, state
    def stop_requested(self, signalled: bool) -> bool:
        self.objective.stop_vote = signalled  # voted in the next evaluation's allreduce
        return self.objective.stop_agreed

    def refresh(self) -> None:
        self.fn.load_params()

    def share(self, value):
        return self.comm.bcast(value, root=0)

    def counters(self) -> dict:
        obj, base = self.objective, self.base
        return {"lbfgs_iterations": self.iterations, "gradient_evals": base["gradient_evals"] + obj.evaluations,
                "line_search_evals": self.ls_evals, "line_search_failures": self.ls_failures,
                "samples_counted": base["samples_counted"] + obj.samples}  # fmt: skip

    def portion_totals(self) -> np.ndarray:  # collective
        from mpi4py import MPI

        return self.portion_base + self.comm.allreduce(self.portions.stats.as_array(), op=MPI.SUM)

    def state(self):
        """Collective: checks the replicas are bitwise equal and gathers the sharded history on the root."""
        mp = self.run.replica
        crcs, k = self.comm.allgather(zlib.crc32(self.x.view(np.uint8))), mp.size if mp is not None else 1
        if any(len(set(crcs[p::k])) > 1 for p in range(k)):  # every replica applies the same steps: they must stay bitwise equal
            raise RuntimeError(f"replicas diverged by step {self.iterations}: parameter CRC32 per rank {crcs} (a bug, please report)")
        basis, meta = self.opt.state()  # on the first replica (the root of each partition's ranks)
        totals = self.portion_totals()
        grad = self.opt.gather(self.g) if self.g is not None else None  # the gradient travels in shards
        x = self.x.copy()
        if mp is not None and mp.index == 0:  # --mp: the root replica's partitions, concatenated (the basis by columns)
            got = mp.comm.gather((x, basis, grad), root=0)
            if got is not None:
                x, basis = np.concatenate([p[0] for p in got]), np.concatenate([p[1] for p in got], axis=1)
                grad = np.concatenate([p[2] for p in got]) if grad is not None else None
        if self.comm.Get_rank() != 0:
            return None
        optim = {"lbfgs_basis": basis} | ({"grad": grad} if grad is not None else {})
        extra = {"f": self.f, "batch_loss": self.batch_loss, "lbfgs": meta, "counters": self.counters(),
                 "portion_stats": totals.tolist()} | ({"mp_sizes": self.sizes} if mp is not None else {})  # fmt: skip
        return x, optim, extra, ck.capture_rng()

    def images(self, step: int) -> int:
        return self.counters()["samples_counted"]

    def summary(self) -> dict:
        won, backup, backup_won, discarded, abandoned = self.portion_totals().tolist()
        replicas = {"replicas": self.world} if self.run.replica is not None else {}  # --mp: replicas of mp ranks
        return {"ranks": self.comm.Get_size(), **replicas, "train_loss": self.f, "batch_size": self.batch_size(self.last_epoch), "portions": self.count,
                "portions_total": won, "portions_backup": backup, "portions_backup_won": backup_won, "portions_discarded": discarded,
                "portions_abandoned": abandoned, **self.counters(), "pairs_rejected": self.opt.pairs_rejected}  # fmt: skip

    def close(self) -> None:
        self.portions.free()
        self.data.close()
