"""Sandblaster L-BFGS with model-parallel replicas (--mp=K) through the training driver under real mpirun: a replica's
rank 0 claims portions and its partners follow, so R replicas x K ranks follow the trajectory of R ranks holding the
whole model (every step's loss and, reassembled from the partitioned checkpoint, every parameter), each portion
counted once per evaluation even with a straggling replica; a 2-way run stopped mid-batch resumes with the same K.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_downpour import hpcdnn
from test_model_parallel_driver import losses, whole

pytestmark = pytest.mark.mpi
PORTIONS, BATCH = 8, 64
COMMON = ["--config=fashion_sandblaster", "--batch_size=64", f"--sb_portions={PORTIONS}", "--sb_chunk=16", "--sb_batch_iters=2",
          "--sb_batch_growth=1", "--sb_dropout=false", "--log_every=1", "--threads=1", "--checkpoint_every=0"]  # fmt: skip


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def assert_same_run(mp: Path, k: int, ref: Path) -> None:
    np.testing.assert_allclose(losses(mp), losses(ref), rtol=1e-4, atol=1e-4)
    got, want = whole(mp, k), whole(ref, 1)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-4, err_msg=name)


def test_two_replicas_of_two_ranks_equal_two_ranks(fashion_tiny, tmp_path):
    """2 replicas x 2 ranks == 2 ranks of the whole model, with replica 1 (workers 2 and 3) slowed: its portions are
    backed up by replica 0, and every portion and sample still counts exactly once per evaluation."""
    args = [*COMMON, f"--data={fashion_tiny}", "--max_steps=4"]
    hpcdnn(4, *args, "--mp=2", "--slow_rank=3", "--slow_factor=3", f"--run_dir={tmp_path / 'mp'}")
    hpcdnn(2, *args, f"--run_dir={tmp_path / 'dp'}")
    assert len(losses(tmp_path / "mp")) == 4
    assert_same_run(tmp_path / "mp", 2, tmp_path / "dp")
    s, ref = summary(tmp_path / "mp"), summary(tmp_path / "dp")
    assert s["ranks"] == 4 and s["replicas"] == 2 and s["parameters"] == ref["parameters"], s
    assert s["portions_total"] == PORTIONS * s["gradient_evals"] and s["samples_counted"] == BATCH * s["gradient_evals"], s
    assert s["portions_backup"] > 0 and s["portions_discarded"] > 0, s  # the slow replica's portions were re-run


def test_one_replica_of_two_ranks_equals_one_rank_and_resumes(fashion_tiny, tmp_path):
    """1 replica x 2 ranks (pure model parallelism), stopped after 3 iterations (mid-batch: the gradient is in the
    checkpoint) and resumed to 5 == 5 iterations on one rank."""
    args = [*COMMON, f"--data={fashion_tiny}"]
    hpcdnn(2, *args, "--mp=2", "--max_steps=3", f"--run_dir={tmp_path / 'mp'}")
    hpcdnn(2, *args, "--mp=2", "--max_steps=5", f"--run_dir={tmp_path / 'mp'}", "--resume")
    hpcdnn(1, *args, "--max_steps=5", f"--run_dir={tmp_path / 'one'}")
    assert len(losses(tmp_path / "mp")) == 5
    assert_same_run(tmp_path / "mp", 2, tmp_path / "one")
    s = summary(tmp_path / "mp")
    assert s["replicas"] == 1 and s["portions_total"] == PORTIONS * s["gradient_evals"], s
