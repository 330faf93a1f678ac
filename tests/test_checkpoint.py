"""Checkpoints: exact round trip, atomic replacement, clear errors, no pickle."""

import numpy as np
import pytest
import torch

from hpcdnn import checkpoint as ck


def sample(step=7):
    rng = np.random.default_rng(step)
    return ck.Checkpoint(
        params=rng.standard_normal(1000).astype(np.float32),
        optim={"momentum_buffer": rng.standard_normal(1000).astype(np.float32)},
        step=step,
        epoch=2,
        batch=5,
        config='lr = 0.1\nrun_dir = "x"\n',
        state={"schedule": {"plateau_lr": 0.1, "best": 0.5, "bad": 0}, "elapsed": 1.5},
        rng=ck.capture_rng(),
    )


def test_round_trip_is_exact(tmp_path):
    a = sample()
    ck.save(tmp_path / "c.h5", a)
    b = ck.load(tmp_path / "c.h5")
    np.testing.assert_array_equal(a.params, b.params)
    np.testing.assert_array_equal(a.optim["momentum_buffer"], b.optim["momentum_buffer"])
    assert (a.step, a.epoch, a.batch, a.config, a.state) == (b.step, b.epoch, b.batch, b.config, b.state)
    np.testing.assert_array_equal(a.rng["torch_cpu"], b.rng["torch_cpu"])


def test_rng_restore_replays_dropout():
    state = ck.capture_rng()
    first = torch.rand(5)
    ck.restore_rng(state)
    assert torch.equal(torch.rand(5), first)


def test_replace_is_atomic_and_leaves_no_temporaries(tmp_path):
    path = tmp_path / "c.h5"
    ck.save(path, sample(1))
    ck.save(path, sample(2))
    assert ck.load(path).step == 2
    assert [p.name for p in tmp_path.iterdir()] == ["c.h5"]


def test_failed_write_keeps_previous_checkpoint(tmp_path):
    path = tmp_path / "c.h5"
    ck.save(path, sample(1))
    bad = sample(2)
    bad.optim = {"x": object()}  # cannot be stored: the write fails midway
    with pytest.raises((TypeError, ValueError)):
        ck.save(path, bad)
    assert ck.load(path).step == 1
    assert [p.name for p in tmp_path.iterdir()] == ["c.h5"]


def test_truncated_or_missing_checkpoint_named(tmp_path):
    path = tmp_path / "c.h5"
    ck.save(path, sample())
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(ValueError, match=f"{path}: (cannot be read as HDF5|not a readable HDF5 checkpoint).*truncated"):
        ck.load(path)
    with pytest.raises(FileNotFoundError, match="start without --resume"):
        ck.load(tmp_path / "none.h5")
