"""`hpcdnn train --topology=allreduce` end to end under mpirun: identical replicas, exact resume."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
from test_downpour import COMMON, hpcdnn

pytestmark = pytest.mark.mpi


def params(run) -> np.ndarray:
    with h5py.File(run / "checkpoint.h5", "r") as f:
        return f["params"][...]


def test_allreduce_resume_is_bitwise_and_summary(fashion_tiny, tmp_path):
    """3 ranks, 2 epochs; the same run stopped after 7 steps and resumed ends with the same parameters, bit for bit
    (dropout RNG of every rank restored from the checkpoint)."""
    args = [*COMMON, f"--data={fashion_tiny}", "--topology=allreduce", "--batch_size=16", "--epochs=2"]
    hpcdnn(3, *args, f"--run_dir={tmp_path / 'a'}")
    hpcdnn(3, *args, f"--run_dir={tmp_path / 'b'}", "--max_steps=7")
    hpcdnn(3, *args, f"--run_dir={tmp_path / 'b'}", "--resume")
    np.testing.assert_array_equal(params(tmp_path / "b"), params(tmp_path / "a"))
    s = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert s["topology"] == "allreduce" and s["workers"] == 3 and s["steps"] == 2 * (640 // 3 // 16)
