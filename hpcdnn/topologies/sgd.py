"""Stochastic gradient descent on one replica (`--topology=local`), and the step every SGD topology shares.

    hpcdnn train --config fashion_small --run_dir runs/fm

A step: the next batch of this replica's shards, forward, cross-entropy, backward, then `apply(lr)` - here the
optimizer on the replica's flat vector; allreduce.py averages the gradient first, downpour.py pushes it to the servers.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from hpcdnn import trace
from hpcdnn.data.loader import ShardLoader
from hpcdnn.optim import FlatOptimizer
from hpcdnn.placement import keep_threads
from hpcdnn.topologies.base import Run, StepResult, Topology, my_part, restore_rng


class SGD(Topology):
    """The SGD step loop over this replica's batches; subclasses decide what a gradient does (`apply`)."""

    def __init__(self, run: Run) -> None:
        super().__init__(run)
        cfg = self.cfg
        # same initial model everywhere, different dropout per replica; the ranks of a replica (--mp) share their seed,
        # so replicated activations draw the same mask, unless each rank masks its own units (the towers)
        seed = cfg.seed + run.rank + (7919 * run.replica.part if run.replica and getattr(run.model, "own_dropout", False) else 0)
        if seed != cfg.seed:
            torch.manual_seed(seed)
        self.data = ShardLoader(cfg.data, "train", cfg.batch_size, rank=run.rank, world=run.world, seed=cfg.seed, train=True,
                                flip=cfg.flip, pca_std=cfg.pca_std, **run.loader_args())  # fmt: skip
        self.lr = run.sched.lr(0.0)

    def steps_in_epoch(self, epoch: int) -> int:
        return len(self.data)

    def epoch(self, epoch: int, start: int) -> Iterator[StepResult]:
        run, model, flat = self.run, self.run.model, self.run.flat
        n = len(self.data)
        model.train()
        for batch, (x, y) in enumerate(trace.iterate(self.data.iter_epoch(epoch, start_batch=start)), start=start):  # data wait
            self.lr = run.sched.lr(epoch + batch / n)
            flat.zero_grad()
            with trace.span("forward"):
                loss = F.cross_entropy(model(x), y)
            with trace.span("backward"):
                loss.backward()
            with trace.span("apply", step=batch):  # the optimizer; allreduce and Downpour communicate inside
                self.apply(self.lr, epoch, batch + 1)
            keep_threads(run.threads)  # a first parallel Numba kernel resets the OpenMP pool torch shares
            yield StepResult(loss.item(), len(y), bar={"lr": f"{self.lr:.2g}"}, log={"lr": self.lr})

    def apply(self, lr: float, epoch: int, next_batch: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.data.close()


class Local(SGD):
    """One process: the optimizer (hpcdnn/optim.py, Numba kernels) runs on this replica's flat vector."""

    name = "local"
    per_rank_rng = False  # a checkpoint keeps one RNG state (True: every rank's, gathered)

    @classmethod
    def n_servers(cls, cfg) -> int | None:
        return None

    def __init__(self, run: Run) -> None:
        super().__init__(run)
        cfg, flat, saved = self.cfg, run.flat, run.saved
        self.opt = FlatOptimizer(cfg.optimizer, flat.data, flat.grad, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                                 eps=cfg.adagrad_eps)  # fmt: skip
        if saved:
            sizes = saved.state.get("mp_sizes")
            flat.load_flat(my_part(run, saved.params, sizes))
            self.opt.load_state({k: my_part(run, v, sizes) for k, v in saved.optim.items()}, saved.state["optimizer_steps"])
            restore_rng(saved, run.worker, per_rank=self.per_rank_rng)

    def apply(self, lr: float, epoch: int, next_batch: int) -> None:
        self.opt.step(lr)

    def state(self) -> tuple[np.ndarray, dict, dict, dict]:
        from hpcdnn import checkpoint as ck

        params = self.run.flat.state_dict_flat().cpu().numpy()
        return params, self.opt.state_arrays(), {"optimizer_steps": self.opt.steps}, ck.capture_rng()

    def images(self, step: int) -> int:
        return step * self.cfg.batch_size
