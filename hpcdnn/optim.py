"""The optimizers of a replica on its flat parameter vector, and the learning-rate schedules.

The arithmetic lives in hpcdnn/kernels/update.py (Numba on CPU, torch on GPU); this module only holds the state
vectors and the schedule, so checkpoints and the parameter server can move them as plain arrays.
"""

from __future__ import annotations

import math

import torch

from hpcdnn.kernels import update


class FlatOptimizer:
    """SGD with momentum and weight decay (the AlexNet paper) or Adagrad (DistBelief), over one flat vector."""

    def __init__(self, kind: str, params: torch.Tensor, grads: torch.Tensor, *, momentum: float, weight_decay: float, eps: float):
        self.kind, self.params, self.grads = kind, params, grads
        self.momentum, self.weight_decay, self.eps = momentum, weight_decay, eps
        name = "momentum_buffer" if kind == "sgd" else "sum_sq"
        self.state = {name: torch.zeros_like(params)}
        self.steps = 0

    def step(self, lr: float) -> None:
        """Apply one update with learning rate `lr` using the gradients in `grads`."""
        self.steps += 1
        if self.kind == "sgd":
            update.sgd(self.params, self.grads, self.state["momentum_buffer"], lr, momentum=self.momentum, weight_decay=self.weight_decay)
        else:
            update.adagrad(self.params, self.grads, self.state["sum_sq"], lr, eps=self.eps, weight_decay=self.weight_decay, step=self.steps)

    def state_arrays(self) -> dict:
        return {k: v.detach().cpu().numpy() for k, v in self.state.items()}

    def load_state(self, arrays: dict, steps: int) -> None:
        for k, v in self.state.items():
            if k not in arrays:
                raise ValueError(
                    f"checkpoint has no optimizer state {k!r} (has {sorted(arrays)}): was it written with another --optimizer?"
                )
            v.copy_(torch.from_numpy(arrays[k]))
        self.steps = steps


class Schedule:
    """Learning rate per epoch: plateau (the paper: divide by 10 when val accuracy stalls), step, cosine or constant."""

    def __init__(self, kind: str, base: float, *, factor: float, step_epochs: int, patience: int, epochs: int, warmup: int):
        self.kind, self.base, self.factor, self.step_epochs = kind, base, factor, step_epochs
        self.patience, self.epochs, self.warmup = patience, epochs, warmup
        self.plateau_lr, self.best, self.bad = base, -1.0, 0  # accuracies are >= 0

    def lr(self, epoch_progress: float) -> float:
        """The rate at a (fractional) epoch."""
        if self.warmup and epoch_progress < self.warmup:
            return self.base * (0.1 + 0.9 * epoch_progress / self.warmup)
        if self.kind == "step":
            return self.base * self.factor ** int(epoch_progress // self.step_epochs)
        if self.kind == "cosine":
            return 0.5 * self.base * (1 + math.cos(math.pi * min(epoch_progress / self.epochs, 1.0)))
        if self.kind == "plateau":
            return self.plateau_lr
        return self.base

    def end_epoch(self, val_top1: float) -> None:
        """Plateau bookkeeping after each evaluation."""
        if val_top1 > self.best + 1e-4:
            self.best, self.bad = val_top1, 0
        else:
            self.bad += 1
            if self.kind == "plateau" and self.bad > self.patience:
                self.plateau_lr *= self.factor
                self.bad = 0

    def state(self) -> dict:
        return {"plateau_lr": self.plateau_lr, "best": self.best, "bad": self.bad}

    def load(self, state: dict) -> None:
        self.plateau_lr, self.best, self.bad = state["plateau_lr"], state["best"], state["bad"]
