"""ShardLoader on real shards made by data-prep: rank split, stored pixels and labels, JPEG, resume, errors, threads."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, prep
from fakes import make_folder_tree

from hpcdnn.data.loader import ShardLoader
from hpcdnn.data.schema import ShardReader, load_manifest
from hpcdnn.kernels.augment import augment_reference, center_offsets


@pytest.fixture(scope="module", params=["raw", "jpeg"])
def rgb_data(request, tmp_path_factory):
    """A folder data set (4 classes x 6 images, 32x32x3), stored raw or as JPEG, in shards of 7."""
    root = tmp_path_factory.mktemp(f"rgb-{request.param}")
    make_folder_tree(root / "train", classes=("a", "b", "c", "d"), n_per_class=6, size=(40, 36), seed=1)
    args = ("folder", "--train", root / "train", "--out", root / "out", "--size", "32", "--shard-size", "7")
    assert prep(*args, "--encoding", request.param) == 0
    return root / "out"


def stored(directory, split):
    """Every image (uint8 N,H,W,C, decoded) and label of a split, in global index order."""
    images, labels = [], []
    for shard in load_manifest(directory)["splits"][split]["shards"]:
        with ShardReader(directory / shard["file"]) as r:
            images += [r.image(i) for i in range(len(r))]
            labels.append(r.labels)
    return np.stack(images), np.concatenate(labels)


def test_ranks_partition_every_epoch(idx_data):
    images, labels = stored(idx_data, "train")
    for epoch in (0, 1):
        seen = []
        for rank in range(3):
            loader = ShardLoader(idx_data, "train", 8, rank=rank, world=3, seed=5, pad=2, drop_last=False)
            assert len(loader) == 7  # 50 samples per rank: 6 full batches and one of 2
            batches = list(loader.iter_epoch(epoch))
            assert len(batches) == len(loader)
            idx = [loader.batch_indices(epoch, b) for b in range(len(loader))]
            for (x, y), i in zip(batches, idx):
                assert x.shape == (len(i), 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
                np.testing.assert_array_equal(y.numpy(), labels[i])
            seen.append(np.concatenate(idx))
        assert [len(s) for s in seen] == [50, 50, 50]
        assert sorted(np.concatenate(seen).tolist()) == list(range(150))  # union = all, pairwise disjoint
    loader = ShardLoader(idx_data, "train", 8, rank=0, world=3, seed=5)
    assert len(loader) == 6  # train drops the partial batch by default


def test_batches_hold_the_indexed_images(idx_data):
    """Shuffled, uncropped, unscaled evaluation batches are exactly image - mean of the samples batch_indices names."""
    images, labels = stored(idx_data, "train")
    loader = ShardLoader(idx_data, "train", 16, train=False, shuffle=True, scale=1.0, world=2, rank=1)
    batches = samples = 0
    for b, (x, y) in enumerate(loader.iter_epoch(3)):
        i = loader.batch_indices(3, b)
        np.testing.assert_array_equal(np.rint(x.numpy() + loader.mean.transpose(2, 0, 1)), images[i].transpose(0, 3, 1, 2))
        np.testing.assert_array_equal(y.numpy(), labels[i])
        batches, samples = batches + 1, samples + len(y)
    assert (batches, samples) == (len(loader), 75) == (5, 75)  # rank 1's half of 150; evaluation keeps the partial batch


def test_eval_centre_crop_equals_reference(rgb_data):
    images, labels = stored(rgb_data, "train")
    loader = ShardLoader(rgb_data, "train", 5, train=False, crop=24)
    assert loader.num_classes == 4 and loader.image_shape == (32, 32, 3) and loader.manifest["encoding"] in ("raw", "jpeg")
    xs, ys = zip(*loader)
    x, y = torch.cat(xs).numpy(), torch.cat(ys).numpy()
    assert len(y) == 24  # evaluation keeps the partial batch and reads in storage order
    np.testing.assert_array_equal(y, labels)
    scale = 1 / np.array(loader.manifest["channel_std"], np.float32)
    want = augment_reference(
        images, center_offsets(24, (32, 32), 24), np.zeros(24, bool), loader.mean, np.zeros((24, 3), np.float32), scale, 24
    )
    np.testing.assert_allclose(x, want, rtol=1e-5, atol=1e-5)


def test_train_batches_rgb(rgb_data):
    loader = ShardLoader(rgb_data, "train", 6, crop=28, pad=0, seed=1)
    batches = list(loader)
    assert len(batches) == 4 and all(x.shape == (6, 3, 28, 28) for x, _ in batches)
    assert all(torch.isfinite(x).all() for x, _ in batches)
    ten = ShardLoader(rgb_data, "train", 5, train=False, crop=24, ten_crop=True)
    x, y = next(iter(ten))
    assert x.shape == (50, 3, 24, 24) and len(y) == 5
    ten.close()


def test_resume_mid_epoch_is_bitwise(idx_data):
    def loader():
        return ShardLoader(idx_data, "train", 10, rank=1, world=2, seed=11, crop=24, pad=2, pca_std=0.5, prefetch=3)

    full = list(loader().iter_epoch(4))
    resumed = list(loader().iter_epoch(4, start_batch=3))
    assert len(full) == 7 and len(resumed) == 4
    for (xa, ya), (xb, yb) in zip(full[3:], resumed):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert list(loader().iter_epoch(4, start_batch=7)) == []
    with pytest.raises(ValueError, match="start_batch"):
        loader().iter_epoch(4, start_batch=8)


def test_orders_differ_by_epoch_not_by_run(idx_data):
    a, b = ShardLoader(idx_data, "train", 10, seed=2), ShardLoader(idx_data, "train", 10, seed=2)
    assert np.array_equal(a.rank_indices(0), b.rank_indices(0))
    assert not np.array_equal(a.rank_indices(0), a.rank_indices(1))
    assert not np.array_equal(a.rank_indices(0), ShardLoader(idx_data, "train", 10, seed=3).rank_indices(0))
    first, again = list(a.iter_epoch(1)), list(b.iter_epoch(1))  # iterating twice, and twice the same
    assert len(first) == len(again) == len(a) == 15  # 150 samples in batches of 10
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(first, again))
    a.set_epoch(1)
    after_set = list(a)
    assert len(after_set) == len(first)
    assert all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(first, after_set))


@pytest.mark.timeout(60)
def test_thread_errors_reach_the_consumer(idx_data, monkeypatch):
    loader = ShardLoader(idx_data, "train", 10)
    real = ShardLoader._make_batch

    def failing(self, readers, part, epoch, batch, *args):
        if batch == 2:
            raise RuntimeError("boom in batch 2")
        return real(self, readers, part, epoch, batch, *args)

    monkeypatch.setattr(ShardLoader, "_make_batch", failing)
    it = iter(loader)
    next(it), next(it)
    with pytest.raises(RuntimeError, match="boom in batch 2"):
        next(it)
    assert not it.thread.is_alive()
    monkeypatch.undo()
    assert len(list(loader)) == len(loader)


@pytest.mark.timeout(60)
def test_missing_shard_file_raises(idx_data, tmp_path):
    for f in idx_data.iterdir():
        if f.is_file():
            (tmp_path / f.name).write_bytes(f.read_bytes())
    loader = ShardLoader(tmp_path, "train", 150, train=False)
    (tmp_path / load_manifest(tmp_path)["splits"]["train"]["shards"][2]["file"]).unlink()
    with pytest.raises(OSError):
        list(loader)


def test_close_stops_the_thread(idx_data):
    loader = ShardLoader(idx_data, "train", 4, prefetch=1)
    it = iter(loader)
    next(it)
    assert it.thread.is_alive() and it.thread.name.startswith("hpcdnn-loader")
    loader.close()
    assert not it.thread.is_alive()
    with pytest.raises(StopIteration):
        next(it)
    assert len(list(loader)) == len(loader)  # a fresh iteration works after close


def test_dropped_iterator_is_joined_by_close_and_at_exit(idx_data):
    """A run that stops mid-epoch (--max_steps) drops its iterator while the producer is busy. loader.close() must
    still join that thread, and a process that exits without closing must exit cleanly: a daemon thread left inside
    torch or HDF5 at finalization aborted (rc 134) or hung the exit of most such runs before the producers were joined.
    """
    loader = ShardLoader(idx_data, "train", 4, prefetch=2)
    it = iter(loader)
    next(it)
    thread = it.thread
    del it
    loader.close()
    assert not thread.is_alive()
    script = (f"from hpcdnn.data.loader import ShardLoader\n"
              f"it = ShardLoader({str(idx_data)!r}, 'train', 4, train=True, pad=2, prefetch=4).iter_epoch(0)\n"
              f"next(it)\ndel it\n")  # fmt: skip
    for _ in range(3):
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=REPO)
        assert proc.returncode == 0, proc.stderr[-3000:]


def test_clear_errors(idx_data):
    with pytest.raises(ValueError, match=r"split 'val' not in .*present: test, train"):
        ShardLoader(idx_data, "val", 8)
    with pytest.raises(ValueError, match="rank 3 outside"):
        ShardLoader(idx_data, "train", 8, rank=3, world=3)
    with pytest.raises(ValueError, match="does not fit"):
        ShardLoader(idx_data, "train", 8, crop=33, pad=2)
    with pytest.raises(ValueError, match="no full batch"):
        ShardLoader(idx_data, "test", 31)


def test_output_buffers_recycled_only_when_dropped(idx_data):
    """Batches the consumer keeps stay intact (test_resume keeps them all); dropped ones are reused, not reallocated."""
    loader = ShardLoader(idx_data, "train", 10, prefetch=1, crop=24)
    pointers, first, batches = set(), None, 0
    for x, _ in loader:
        pointers.add(x.data_ptr())
        if first is None:
            first = x.clone(), x  # held: must never change
        batches += 1
    assert batches == len(loader) == 15
    assert len(pointers) <= loader.prefetch + 3 < len(loader)
    assert torch.equal(first[0], first[1])
