"""Sandblaster's per-portion data path (ShardLoader.read_samples, PortionData, ModelPortions) on real shards: a portion
is bitwise the rows of the whole batch the former path gave every rank, whoever reads it and in whatever order; reads
are slices or single samples, never an h5py list index; each portion is read once per batch."""

import h5py
import numpy as np
import pytest
import torch
from conftest import prep
from fakes import make_folder_tree

from hpcdnn.data.loader import ShardLoader
from hpcdnn.models.flat import FlatParams
from hpcdnn.topologies.sandblaster_data import ModelPortions, PortionData

ARGS = dict(seed=7, crop=24, pad=2, flip=True, pca_std=0.5)  # every augmentation on: crops, flips, lighting


@pytest.fixture(scope="module")
def jpeg_data(tmp_path_factory):
    """24 RGB 32x32 images stored as JPEG, in shards of 7."""
    root = tmp_path_factory.mktemp("jpeg")
    make_folder_tree(root / "train", classes=("a", "b", "c", "d"), n_per_class=6, size=(40, 36), seed=1)
    assert prep("folder", "--train", root / "train", "--out", root / "out", "--size", "32", "--shard-size", "7", "--encoding", "jpeg") == 0
    return root / "out"


def whole_batches(directory, epoch: int, batch_size: int, **kw) -> list:
    """The former path: the batches of a one-rank ShardLoader of that batch size (what every rank read in full)."""
    loader = ShardLoader(directory, "train", batch_size, train=True, prefetch=1, **kw)
    try:
        return list(loader.iter_epoch(epoch))
    finally:
        loader.close()


@pytest.mark.parametrize("epoch, batch_size, count", [(0, 48, 5), (3, 64, 7), (1, 150, 4)])
def test_portions_are_the_rows_of_the_whole_batch(idx_data, epoch, batch_size, count):
    old = whole_batches(idx_data, epoch, batch_size, **ARGS)
    with PortionData(idx_data, **ARGS, workers=1) as data:
        assert data.batches(epoch, batch_size) == len(old) == 150 // batch_size
        for b, (x, y) in enumerate(old):
            bounds = [k * batch_size // count for k in range(count + 1)]
            for k in reversed(range(count)):  # any order: rows depend on positions, not on what was read before
                xk, yk = data.portion(epoch, b, batch_size, bounds[k], bounds[k + 1])
                assert torch.equal(xk, x[bounds[k] : bounds[k + 1]]) and torch.equal(yk, y[bounds[k] : bounds[k + 1]])


def test_two_ranks_read_the_same_portion(jpeg_data):
    """Two PortionData (two ranks, one a backup of the other) give bitwise the same portion; JPEG decodes on a pool."""
    a, b = PortionData(jpeg_data, seed=1, crop=28, workers=2), PortionData(jpeg_data, seed=1, crop=28, workers=1)
    old = whole_batches(jpeg_data, 2, 12, seed=1, crop=28)
    a.portion(2, 0, 12, 0, 3)  # rank a read another batch and another portion first
    xa, ya = a.portion(2, 1, 12, 3, 9)
    xb, yb = b.portion(2, 1, 12, 3, 9)
    assert torch.equal(xa, xb) and torch.equal(ya, yb) and xa.shape == (6, 3, 28, 28)
    assert torch.equal(xa, old[1][0][3:9])
    a.close(), b.close()


def test_order_is_a_function_of_the_seed(idx_data):
    def indices(seed: int, epoch: int) -> np.ndarray:
        with PortionData(idx_data, seed=seed, crop=28) as d:
            return d.batch(epoch, 1, 30)[0]

    assert np.array_equal(indices(5, 0), indices(5, 0))
    assert not np.array_equal(indices(5, 0), indices(6, 0)) and not np.array_equal(indices(5, 0), indices(5, 1))
    assert np.all(np.diff(indices(5, 0)) > 0)  # sorted: neighbours read as one slice


def test_reads_never_use_a_list_index(idx_data, monkeypatch):
    """h5py point selection (ds[list]) is orders of magnitude slower than slices: read_samples must not use it."""
    keys = []
    real = h5py.Dataset.__getitem__

    def spy(self, key, *args, **kw):
        keys.append(key)
        assert not isinstance(key, (list, np.ndarray)), f"list index {key!r}"
        return real(self, key, *args, **kw)

    monkeypatch.setattr(h5py.Dataset, "__getitem__", spy)
    with PortionData(idx_data, **ARGS) as data:
        x, y = data.portion(0, 0, 100, 0, 100)
    assert len(y) == 100 and any(isinstance(k, slice) for k in keys)


class CountingData:
    """PortionData's interface over a fixed batch, counting reads."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y, self.reads = x, y, []

    def batches(self, epoch: int, batch_size: int) -> int:
        return 2

    def portion(self, epoch: int, batch: int, batch_size: int, lo: int, hi: int):
        self.reads.append((batch, lo, hi))
        return self.x[lo:hi], self.y[lo:hi]


def test_model_portions_read_once_per_batch_and_sum_to_the_batch_gradient():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 5))
    flat = FlatParams(model)
    x, y = torch.randn(20, 1, 4, 4), torch.randint(0, 5, (20,))
    data = CountingData(x, y)
    fn = ModelPortions(model, flat, 3, 4, dropout=False, seed=0, data=data)
    with pytest.raises(RuntimeError, match="set_batch"):
        fn(0, lambda: True)
    fn.set_batch(0, 0, 20)
    total, grad = 0, np.zeros(flat.numel)
    for _ in range(2):  # two evaluations of the same batch (a line search): no second read
        for k in range(3):
            loss, g, n = fn(k, lambda: True)
            total, grad = total + n, grad + g
    assert data.reads == [(0, 0, 6), (0, 6, 13), (0, 13, 20)] and total == 40
    flat.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y, reduction="sum").backward()
    np.testing.assert_allclose(grad / 2, flat.grad.numpy(), rtol=1e-5, atol=1e-6)
    fn.set_batch(0, 0, 20)  # the same batch again: still cached
    fn(1, lambda: True)
    fn.set_batch(0, 1, 20)  # a new batch: read again
    assert fn(1, lambda: False) is None  # keep_going() said stop after the first chunk
    assert data.reads[-1] == (1, 6, 13) and len(data.reads) == 4
    with pytest.raises(ValueError, match="sb_portions <= batch_size"):
        fn.set_batch(0, 0, 2)
    with pytest.raises(ValueError, match=r"give 0\.\.1"):
        fn.set_batch(0, 2, 20)


def test_clear_errors(idx_data):
    with PortionData(idx_data, seed=0) as data:
        with pytest.raises(ValueError, match="use 1..150"):
            data.batches(0, 151)
        with pytest.raises(ValueError, match=r"give 0\.\.2"):
            data.batch(0, 3, 50)
        loader = data.loader
        draws = loader.batch_draws(0, 0, 3)
        with pytest.raises(ValueError, match="pass 2 rows"):
            loader.read_samples([1, 2], *draws)
        with pytest.raises(ValueError, match="outside the 150 samples"):
            loader.read_samples([149, 150, 151], *draws)
