"""Sandblaster's data side: the loss and gradient sums of the model on one portion of the current batch, each rank
reading and augmenting only the samples of the portions it computes.

    data = PortionData("data/fashion-mnist", seed=0, crop=28, pad=2, flip=True, pca_std=0.1, device="cpu", workers=1)
    fn = ModelPortions(model, flat, count=48, chunk=64, dropout=False, seed=0, data=data)
    for b in range(data.batches(epoch, batch_size)):
        fn.set_batch(epoch, b, batch_size)                # selects the batch; no pixels read
        loss_sum, grad_sum, samples = fn(k, keep_going)   # reads portion k once per batch; None when keep_going() said stop
    data.close()

Batch b of epoch e holds the samples a one-rank ShardLoader of that batch size yields: positions b*B .. (b+1)*B-1 of
the epoch's permutation (a function of the seed only), sorted, and position i is augmented with row i of the draws of
(seed, e, b). Portion k is positions [k*B // P, (k+1)*B // P). So portion k has the same input whichever rank
computes it (a backup copy too) and in every evaluation of the line search, and it equals rows of the batch the
former whole-batch path gave every rank: the trajectory is unchanged, only the reading is divided.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from hpcdnn.data.loader import ShardLoader
from hpcdnn.models.flat import FlatParams


def auto_portions(batch: int, world: int) -> int:
    """Portions per batch when --sb_portions=0: at least 4 per rank (fast ranks take more), about 256 samples each."""
    return max(4 * world, -(-batch // 256))


class PortionData:
    """One split read by positions of a batch: `portion(epoch, batch, batch_size, lo, hi)` reads and augments positions
    lo..hi-1 of that batch in the calling thread (sorted indices: slices of neighbours, never an h5py list index).
    The last batch's indices and draws are kept, so its portions cost only their reads. Also a context manager."""

    def __init__(self, directory, split: str = "train", *, seed: int, crop: int | None = None, pad: int = 0, flip: bool = True,
                 pca_std: float = 0.1, device=None, workers: int | None = None) -> None:  # fmt: skip
        self.loader = ShardLoader(directory, split, 1, seed=seed, train=True, crop=crop, pad=pad, flip=flip, pca_std=pca_std, prefetch=1,
                                  device=device, workers=workers)  # fmt: skip
        self.total = self.loader.total
        self._order: tuple[int, np.ndarray | None] = (-1, None)  # (epoch, its permutation)
        self._batch: tuple[tuple[int, int, int] | None, np.ndarray, tuple] = (None, np.empty(0, np.int64), ())

    def batches(self, epoch: int, batch_size: int) -> int:
        """Full batches of `batch_size` in an epoch (the < batch_size left-over samples sit out, as in ShardLoader)."""
        if not 1 <= batch_size <= self.total:
            raise ValueError(f"batch_size {batch_size}: the {self.loader.split!r} split has {self.total} samples; use 1..{self.total}")
        return self.total // batch_size

    def batch(self, epoch: int, batch: int, batch_size: int) -> tuple[np.ndarray, tuple]:
        """Sorted sample indices of batch `batch` of `epoch` and its per-position draws (offsets, flips, shift); no reads."""
        key = (epoch, batch, batch_size)
        if self._batch[0] != key:
            if not 0 <= batch < self.batches(epoch, batch_size):
                raise ValueError(f"batch {batch} of epoch {epoch}: batches of {batch_size} give 0..{self.batches(epoch, batch_size) - 1}")
            if self._order[0] != epoch:
                self._order = (epoch, self.loader.rank_indices(epoch))  # rank 0 of 1: the whole permutation of (seed, epoch)
            idx = np.sort(self._order[1][batch * batch_size : (batch + 1) * batch_size])
            self._batch = (key, idx, self.loader.batch_draws(epoch, batch, batch_size))
        return self._batch[1], self._batch[2]

    def portion(self, epoch: int, batch: int, batch_size: int, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) of positions lo..hi-1 of batch `batch` of `epoch`, on the loader's device."""
        idx, draws = self.batch(epoch, batch, batch_size)
        return self.loader.read_samples(idx[lo:hi], *(a[lo:hi] for a in draws))

    def close(self) -> None:
        self.loader.close()

    def __enter__(self) -> PortionData:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ModelPortions:
    """Loss and gradient sums of the model on portion k of the current batch, `chunk` samples per forward/backward.

    `data` is a PortionData (or anything with batches(epoch, batch_size) and portion(epoch, batch, batch_size, lo, hi)
    -> (x, y)). The portions this rank has read stay cached until the batch changes: the line search evaluates the same
    batch again.
    """

    def __init__(self, model, flat: FlatParams, count: int, chunk: int, *, dropout: bool, seed: int, data) -> None:
        if count < 1 or chunk < 1:
            raise ValueError(f"{count} portions of chunks of {chunk}: both must be >= 1")
        self.model, self.flat, self.count, self.chunk, self.dropout, self.seed = model, flat, count, chunk, dropout, seed
        self.data = data
        self.on_cpu = flat.device.type == "cpu"
        self.x = flat.to_numpy() if self.on_cpu else flat.data.detach().cpu().numpy()  # L-BFGS moves this vector
        self.batch: tuple[int, int, int] | None = None  # (epoch, batch, batch_size) of the current batch
        self.cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def set_batch(self, epoch: int, batch: int, batch_size: int) -> None:
        """Make batch `batch` of `epoch` (of `batch_size` samples) current; the portions are read when computed."""
        if batch_size < self.count:
            raise ValueError(f"a batch of {batch_size} samples cannot fill {self.count} portions: use sb_portions <= batch_size")
        if not 0 <= batch < self.data.batches(epoch, batch_size):
            raise ValueError(f"batch {batch} of epoch {epoch}: batches of {batch_size} give 0..{self.data.batches(epoch, batch_size) - 1}")
        if (epoch, batch, batch_size) != self.batch:
            self.batch, self.cache = (epoch, batch, batch_size), {}
            self.bounds = [k * batch_size // self.count for k in range(self.count + 1)]

    def inputs(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) of portion k of the current batch: read and augmented on first use, then cached."""
        if k not in self.cache:
            self.cache[k] = self.data.portion(*self.batch, self.bounds[k], self.bounds[k + 1])
        return self.cache[k]

    def load_params(self) -> None:
        """Copy x into the model (on CPU the model's parameters already are x)."""
        if not self.on_cpu:
            self.flat.load_flat(self.x)

    def __call__(self, k: int, keep_going):
        if self.batch is None:
            raise RuntimeError("ModelPortions called before set_batch(epoch, batch, batch_size)")
        images, labels = self.inputs(k)
        self.load_params()
        self.flat.zero_grad()
        if self.dropout:  # the same masks whoever computes the portion, in every evaluation of this batch
            torch.manual_seed(int(np.random.SeedSequence([self.seed, *self.batch[:2], k]).generate_state(1)[0]))
        loss_sum = 0.0
        for a in range(0, len(labels), self.chunk):
            b = min(a + self.chunk, len(labels))
            loss = F.cross_entropy(self.model(images[a:b]), labels[a:b], reduction="sum")
            loss.backward()
            loss_sum += loss.item()
            if not keep_going():
                return None
        return loss_sum, self.flat.grad.detach().cpu().numpy(), len(labels)
