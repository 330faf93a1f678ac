"""`hpcdnn simulate` for Sandblaster L-BFGS: the emulated trajectory against the real mpirun run and one replica,
backup tasks for a straggler on the simulated clock, and the cost terms recomputed from the stored calibration (no
timing here: every time is simulated or stored)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import mpirun
from test_sim import losses, params

from hpcdnn.config import load_config
from hpcdnn.sim.cost import Cluster, allreduce_s, model_cost, predict
from hpcdnn.sim.emulate import SimOptions, emulate
from hpcdnn.sim.profiles import CALIBRATION, DEVICES, dataset
from hpcdnn.sim.sandblaster import SimPortions

REPO = Path(__file__).resolve().parents[1]
# a global batch of 64 in 8 portions, 4 L-BFGS iterations per batch: 5 steps cross into the second batch
ARGS = ["--batch_size=64", "--sb_portions=8", "--threads=1", "--max_steps=5", "--log_every=1"]


def sandblaster(data, run, *extra: str):
    return load_config("fashion_sandblaster", [f"--data={data}", *ARGS, *extra, f"--run_dir={run}"])


def test_portions_schedule_backs_up_a_straggler():
    """3 replicas, 6 portions, replica 2 ten times slower: every portion wins once, in the order the copies finish;
    idle replicas back up its portion and win, the straggler's copy is abandoned between chunks, so the evaluation
    ends long before the straggler would have; the claims are the real protocol's P + W."""
    sp = SimPortions(6, 3, dynamic=True, backup_after=0.5, chunk=64, draw=lambda: 1.0, slow_replica=2, slow_factor=10.0)
    sp.portion_s, sp.samples = 1.0, 256  # 4 chunks per portion
    done = []
    claims = sp.run(lambda k, keep_going: True, done.append)
    assert sorted(done) == list(range(6)) and claims == 6 + 3 == sp.expected_claims()
    st = sp.stats
    assert st.won == 6 and st.backup >= 1 and st.backup_won == 1 and st.abandoned >= 1
    assert done[-1] == 2 and sp.span < 10.0  # portion 2 (the straggler's) wins last, by a backup, before t = 10
    sp.slow_replica = -1  # no straggler: nothing is backed up, every replica ends at 2 portion times
    before = st.backup
    sp.run(lambda k, keep_going: True, lambda k: None)
    assert st.backup == before and sp.span == 2.0


def test_replicas_and_stragglers_leave_the_trajectory_unchanged(fashion_tiny, tmp_path):
    """One replica, 3 equal replicas, and 3 with a straggler 20x slower plus portion-time variance: the same losses at
    every step and the same parameters (portions are deterministic: only who computes them and when changes); the
    straggler's portions are backed up and the backups win; every evaluation counts every portion once."""
    one = emulate(sandblaster(fashion_tiny, tmp_path / "one"), SimOptions(workers=1, device="v100"))
    three = emulate(sandblaster(fashion_tiny, tmp_path / "three"), SimOptions(workers=3, device="v100"))
    slow = emulate(sandblaster(fashion_tiny, tmp_path / "slow", "--slow_rank=1", "--slow_factor=20"),
                   SimOptions(workers=3, device="v100", straggler_cv=0.3, clock_seed=7))  # fmt: skip
    assert one["steps"] == three["steps"] == slow["steps"] == 5 == slow["lbfgs_iterations"]
    for name, s in (("three", three), ("slow", slow)):
        np.testing.assert_allclose(losses(tmp_path / name), losses(tmp_path / "one"), rtol=1e-6)
        np.testing.assert_allclose(params(tmp_path / name), params(tmp_path / "one"), rtol=0, atol=1e-6)
        assert s["gradient_evals"] == one["gradient_evals"] and s["samples_counted"] == one["samples_counted"]
        assert s["portions_total"] == 8 * s["gradient_evals"] and s["samples_counted"] == 64 * s["gradient_evals"]
    assert three["portions_backup_won"] == 0  # 8 portions on 3: an idle replica backs one up after half a portion, too late
    assert slow["portions_backup"] > 0 and slow["portions_backup_won"] > 0
    assert slow["train_time_s"] < 2 * three["train_time_s"]  # backups keep the straggler (20x) from setting the pace
    assert one["evaluations_per_iteration"] == pytest.approx(one["gradient_evals"] / 5)
    assert one["evaluations_per_iteration"] >= 1 + 1 / 4  # the plan's least: one per line search, each batch's first


def test_zero_variance_clock_is_the_plan(fashion_tiny, tmp_path):
    """2 equal replicas: each evaluation takes ceil(P/W) portions + coordinator + allreduce, each iteration lbfgs_s,
    so the simulated time and the plan's images/s (with the measured evaluations per iteration) agree exactly."""
    s = emulate(sandblaster(fashion_tiny, tmp_path), SimOptions(workers=2, device="v100", link_gbit=10))
    t = s["cost_terms_s"]
    evaluation = math.ceil(8 / 2) * t["portion_s"] + t["coordinator_s"] + t["allreduce_s"]
    assert s["train_time_s"] == pytest.approx(s["gradient_evals"] * evaluation + 5 * t["lbfgs_s"], abs=1e-9)  # summary rounds to ns
    batches = 5 / 4  # the plan counts a batch's images once per sb_batch_iters iterations
    assert s["predicted_images_per_s"] == pytest.approx(batches * 64 / s["train_time_s"], abs=0.06)
    assert s["training_images_per_s"] == pytest.approx(s["predicted_images_per_s"], abs=0.11)


def test_sandblaster_cost_recomputed_from_calibration():
    """The Sandblaster plan on this machine (2 replicas x 1 thread) by hand from CALIBRATION: 8 portions of the global
    batch of 1024, the claims, the ring allreduce, the two-loop recursion, and at least 1 + 1/sb_batch_iters
    evaluations per iteration (each line search's one, each batch's first shared by its iterations)."""
    cfg = load_config("fashion_sandblaster", ["--data=fashion-mnist-not-read"])
    model = model_cost("alexnet_small", dataset("fashion-mnist"))
    N, c, W, m, Bg = model.params, CALIBRATION, 2, cfg.sb_history, cfg.batch_size
    cluster = Cluster.here(W, 1, threads=1)
    cost = predict(model, cluster, cfg)["sandblaster"]
    latency = c["latency_us"] * 1e-6
    portion = Bg / c["images_per_s"][("alexnet_small", 1)] / 8  # max(4 W, Bg / 256) = 8 portions
    ring = 4 * N / (c["allreduce_gbs"] * 1e9) + math.ceil(4 * N / 2**20) * 2 * latency
    lbfgs = (4 * m + 6) * 4 * N / W / (DEVICES["cpu"].mem_gbs * 1e9) + (2 * m + 4) * 2 * 1 * latency
    evaluation = 4 * portion + 4 * 2 * latency + ring
    assert cost.terms["portion_s"] == pytest.approx(portion, rel=1e-12) and allreduce_s(model, cluster, cfg) == pytest.approx(ring)
    assert cost.images_per_s == pytest.approx(Bg / (((1 + 1 / 4) * evaluation + lbfgs) * 4), rel=1e-12)


@pytest.mark.mpi
def test_emulation_equals_mpirun_sandblaster(fashion_tiny, tmp_path):
    """2 emulated replicas == `mpirun -n 2 hpcdnn train --topology=sandblaster` on the same seed: every step's loss,
    the evaluations made and the final parameters (within float tolerance: the real ranks sum their portions in
    another float64 order)."""
    cmd = [*mpirun(2), sys.executable, "-m", "mpi4py", "-m", "hpcdnn", "train", "--config=fashion_sandblaster", f"--data={fashion_tiny}",
           *ARGS, f"--run_dir={tmp_path / 'real'}"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=REPO)
    assert r.returncode == 0, f"{' '.join(cmd)} exited {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    s = emulate(sandblaster(fashion_tiny, tmp_path / "sim"), SimOptions(workers=2))
    real = json.loads((tmp_path / "real" / "summary.json").read_text())
    assert s["steps"] == real["steps"] == 5
    for key in ("gradient_evals", "line_search_evals", "samples_counted", "portions_total"):
        assert s[key] == real[key], key
    np.testing.assert_allclose(losses(tmp_path / "sim"), losses(tmp_path / "real"), rtol=1e-6)
    np.testing.assert_allclose(params(tmp_path / "sim"), params(tmp_path / "real"), rtol=0, atol=1e-6)
