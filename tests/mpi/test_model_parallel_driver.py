"""Model-parallel replicas (--mp=K) through the training driver under real mpirun: composed with allreduce and
Downpour, checkpoints holding every partition, resume with the same K, the memory-budget refusal.

A checkpoint of a K-way run holds the K partitions' flat vectors one after another (state "mp_sizes"); partition k
holds rows split(n, K)[k] of every layer's weight and bias (hpcdnn/mpi/exchange.py), in the whole model's
parameter order, each tensor starting on a 16-float boundary (models/flat.py). `whole()` reassembles the model's
tensors from that, independently of the code under test.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from test_downpour import hpcdnn

from hpcdnn.models import build_model
from hpcdnn.models.flat import ALIGN
from hpcdnn.mpi.exchange import split

pytestmark = pytest.mark.mpi
COMMON = ["--config=fashion_small", "--batch_size=32", "--log_every=1", "--threads=1", "--lr_schedule=constant", "--lr=0.005",
          "--optimizer=sgd", "--momentum=0.9", "--checkpoint_every=0"]  # fmt: skip


def losses(run: Path) -> np.ndarray:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return np.array([x["loss"] for x in lines if "loss" in x])


def whole(run: Path, k: int) -> dict[str, np.ndarray]:
    """The alexnet_small tensors (28x28x1, 10 classes) of a run's checkpoint written with --mp=k, reassembled."""
    names = [(n, tuple(p.shape)) for n, p in build_model("alexnet_small", 10, (28, 28, 1)).named_parameters()]
    with h5py.File(run / "checkpoint.h5", "r") as f:
        params, state = f["params"][...], json.loads(f.attrs["state"])
    sizes = state.get("mp_sizes", [params.size])
    assert len(sizes) == k and sum(sizes) == params.size, (sizes, params.size)
    parts, start = [], 0
    for size in sizes:
        parts.append(params[start : start + size])
        start += size
    out = {name: [] for name, _ in names}
    for p, vec in enumerate(parts):
        offset = 0
        for name, shape in names:
            lo, hi = split(shape[0], k)[p]
            rows = (hi - lo, *shape[1:])
            offset = -(-offset // ALIGN) * ALIGN
            n = int(np.prod(rows))
            out[name].append(vec[offset : offset + n].reshape(rows))
            offset += n
        assert -(-offset // ALIGN) * ALIGN >= vec.size >= offset, (p, offset, vec.size)
    return {name: np.concatenate(chunks) for name, chunks in out.items()}


def test_mp_allreduce_equals_data_parallel(fashion_tiny, tmp_path):
    """2 replicas x 2 ranks (--mp=2) == 2 data-parallel replicas of the whole model: every step's loss and every
    parameter after 10 momentum-SGD steps (the dropout masks are the same: one seed per replica)."""
    args = [*COMMON, f"--data={fashion_tiny}", "--max_steps=10", "--topology=allreduce"]
    hpcdnn(4, *args, "--mp=2", f"--run_dir={tmp_path / 'mp'}")
    hpcdnn(2, *args, f"--run_dir={tmp_path / 'dp'}")
    np.testing.assert_allclose(losses(tmp_path / "mp"), losses(tmp_path / "dp"), rtol=1e-4, atol=1e-5)
    got, want = whole(tmp_path / "mp", 2), whole(tmp_path / "dp", 1)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-4, err_msg=name)
    summary = json.loads((tmp_path / "mp" / "summary.json").read_text())
    assert summary["parameters"] == json.loads((tmp_path / "dp" / "summary.json").read_text())["parameters"]


def test_mp_downpour_one_replica_equals_local(fashion_tiny, tmp_path):
    """1 server + one replica of 2 ranks, n_fetch = n_push = 1: each rank pushes its partition to its own server
    windows, and the run == `--topology=local` step by step (the degenerate case)."""
    args = [*COMMON, f"--data={fashion_tiny}", "--max_steps=8"]
    hpcdnn(3, *args, "--topology=downpour", "--servers=1", "--mp=2", f"--run_dir={tmp_path / 'mp'}")
    hpcdnn(0, *args, f"--run_dir={tmp_path / 'local'}")
    np.testing.assert_allclose(losses(tmp_path / "mp"), losses(tmp_path / "local"), rtol=1e-4, atol=1e-5)
    got, want = whole(tmp_path / "mp", 2), whole(tmp_path / "local", 1)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-4, err_msg=name)


def test_mp_downpour_accounts_for_every_push(fashion_tiny, tmp_path):
    """1 server + 2 replicas x 2 ranks: every partition's server saw every push of its two workers, none lost."""
    run = tmp_path / "run"
    hpcdnn(5, *COMMON, f"--data={fashion_tiny}", "--max_steps=12", "--topology=downpour", "--servers=1", "--mp=2",
           "--optimizer=adagrad", "--lr=0.01", f"--run_dir={run}")  # fmt: skip
    s = json.loads((run / "summary.json").read_text())
    assert s["workers"] == 2 and len(s["partition_pushes"]) == 2, s
    for p in s["partition_pushes"]:
        assert p["pushes_sent"] == p["pushes_applied"] + p["pushes_rejected"] == 2 * 12, s
    assert s["pushes_sent"] == 4 * 12 and s["pushes_applied"] + s["pushes_rejected"] == s["pushes_sent"]


def test_resume_with_the_same_mp_and_refuse_another(fashion_tiny, tmp_path):
    """A 2-way allreduce run stopped at step 6 resumes to step 12 == 12 steps straight; --mp=1 on it is refused."""
    args = [*COMMON, f"--data={fashion_tiny}", "--topology=allreduce", "--mp=2"]
    hpcdnn(2, *args, "--max_steps=12", f"--run_dir={tmp_path / 'straight'}")
    hpcdnn(2, *args, "--max_steps=6", f"--run_dir={tmp_path / 'split'}")
    hpcdnn(2, *args, "--max_steps=12", f"--run_dir={tmp_path / 'split'}", "--resume")
    got, want = whole(tmp_path / "split", 2), whole(tmp_path / "straight", 2)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6, err_msg=name)
    bad = [*COMMON, f"--data={fashion_tiny}", "--topology=allreduce", "--mp=1", "--max_steps=12", f"--run_dir={tmp_path / 'split'}"]
    r = hpcdnn(2, *bad, "--resume", ok=False)
    assert r.returncode != 0 and "mp: 2 -> 1" in r.stderr + r.stdout


def test_memory_budget_refusal_names_mp(fashion_tiny, tmp_path):
    """The wide model does not fit a 2 GB rank: refused at start, naming --mp=K; split 4 ways it passes the check."""
    r = hpcdnn(0, *COMMON, f"--data={fashion_tiny}", "--model=wide", "--rank_memory_gb=2", "--max_steps=1",
               f"--run_dir={tmp_path / 'one'}", ok=False)  # fmt: skip
    assert r.returncode != 0 and "--mp=" in r.stderr and "rank_memory_gb" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "one" / "checkpoint.h5").exists()
