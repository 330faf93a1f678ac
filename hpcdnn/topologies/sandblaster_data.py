"""Sandblaster's data side: the loss and gradient sums of the model on one portion of the current batch.

    fn = ModelPortions(model, flat, count=48, chunk=64, dropout=False, seed=0)
    fn.set_batch(images, labels, key=(epoch, batch))
    loss_sum, grad_sum, samples = fn(k, keep_going)      # portion k; None when keep_going() turned false
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from hpcdnn.models.flat import FlatParams


def auto_portions(batch: int, world: int) -> int:
    """Portions per batch when --sb_portions=0: at least 4 per rank (fast ranks take more), about 256 samples each."""
    return max(4 * world, -(-batch // 256))


class ModelPortions:
    """Loss and gradient sums of the model on portion k of the current batch, `chunk` samples per forward/backward."""

    def __init__(self, model, flat: FlatParams, count: int, chunk: int, *, dropout: bool, seed: int) -> None:
        self.model, self.flat, self.count, self.chunk, self.dropout, self.seed = model, flat, count, chunk, dropout, seed
        self.on_cpu = flat.device.type == "cpu"
        self.x = flat.to_numpy() if self.on_cpu else flat.data.detach().cpu().numpy()  # L-BFGS moves this vector
        self.images = self.labels = None

    def set_batch(self, images: torch.Tensor, labels: torch.Tensor, key: tuple[int, int]) -> None:
        self.images, self.labels, self.key = images, labels, key
        self.bounds = [k * len(labels) // self.count for k in range(self.count + 1)]

    def load_params(self) -> None:
        """Copy x into the model (on CPU the model's parameters already are x)."""
        if not self.on_cpu:
            self.flat.load_flat(self.x)

    def __call__(self, k: int, keep_going):
        self.load_params()
        self.flat.zero_grad()
        if self.dropout:  # the same masks whoever computes the portion, in every evaluation of this batch
            torch.manual_seed(int(np.random.SeedSequence([self.seed, *self.key, k]).generate_state(1)[0]))
        lo, hi, loss_sum = self.bounds[k], self.bounds[k + 1], 0.0
        for a in range(lo, hi, self.chunk):
            b = min(a + self.chunk, hi)
            loss = F.cross_entropy(self.model(self.images[a:b]), self.labels[a:b], reduction="sum")
            loss.backward()
            loss_sum += loss.item()
            if not keep_going():
                return None
        return loss_sum, self.flat.grad.detach().cpu().numpy(), hi - lo
