"""The emulator's synchronous replicas against `hpcdnn train --topology=allreduce` on as many real ranks."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_downpour import hpcdnn, params

from hpcdnn.config import load_config
from hpcdnn.sim.emulate import SimOptions, emulate

pytestmark = pytest.mark.mpi


def test_sync_emulation_equals_allreduce_on_two_ranks(fashion_tiny, tmp_path):
    """2 emulated replicas (rank r's batches and dropout stream, gradients averaged) == mpirun -n 2 allreduce: the
    final parameters within float tolerance, rank 0's loss at every step."""
    args = [f"--data={fashion_tiny}", "--batch_size=16", "--threads=1", "--lr_schedule=constant", "--lr=0.02", "--log_every=1",
            "--max_steps=6", "--topology=allreduce", "--optimizer=sgd", "--momentum=0.9"]  # fmt: skip
    hpcdnn(2, "--config=fashion_small", *args, f"--run_dir={tmp_path / 'real'}")
    s = emulate(load_config("fashion_small", [*args, f"--run_dir={tmp_path / 'sim'}"]), SimOptions(workers=2))
    assert s["workers"] == 2 and s["steps"] == 6
    np.testing.assert_allclose(params(tmp_path / "sim"), params(tmp_path / "real"), rtol=0, atol=1e-6)
    loss = [[r["loss"] for r in map(json.loads, (tmp_path / d / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
            for d in ("sim", "real")]  # fmt: skip
    np.testing.assert_allclose(loss[0], loss[1], rtol=1e-6)


def test_downpour_bf16_pushes_equal_the_real_wire(fashion_tiny, tmp_path):
    """One emulated Downpour worker pushing bf16 == `mpirun -n 2` Downpour (1 server + 1 worker) with
    --push_dtype=bf16: the same rounding of every push, so the same parameters within float tolerance; fp32 pushes
    end elsewhere (the rounding is really applied)."""
    args = [f"--data={fashion_tiny}", "--batch_size=16", "--threads=1", "--lr_schedule=constant", "--log_every=1", "--max_steps=6",
            "--warmstart_steps=0", "--optimizer=adagrad", "--lr=0.01"]  # fmt: skip
    hpcdnn(2, "--config=fashion_downpour", *args, "--push_dtype=bf16", f"--run_dir={tmp_path / 'real'}")
    emulate(load_config("fashion_downpour", [*args, "--push_dtype=bf16", f"--run_dir={tmp_path / 'bf16'}"]), SimOptions(workers=1))
    emulate(load_config("fashion_downpour", [*args, f"--run_dir={tmp_path / 'fp32'}"]), SimOptions(workers=1))
    real, bf16, fp32 = (params(tmp_path / d) for d in ("real", "bf16", "fp32"))
    np.testing.assert_allclose(bf16, real, rtol=0, atol=1e-6)
    assert np.abs(fp32 - real).max() > 1e-5
