"""`hpcdnn simulate`: the emulator against `hpcdnn train`, Downpour's staleness on the simulated clock, and the cost
model recomputed from this machine's stored calibration (no timing here: every time is simulated or stored)."""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

import h5py
import numpy as np
import pytest

from hpcdnn.config import load_config
from hpcdnn.sim import cli as sim_cli
from hpcdnn.sim.cost import HEADER_BYTES, Cluster, model_cost, predict
from hpcdnn.sim.emulate import SimOptions, emulate
from hpcdnn.sim.plan import plan
from hpcdnn.sim.profiles import CALIBRATION, dataset

COMMON = ["--batch_size=16", "--threads=1", "--lr_schedule=constant", "--lr=0.02", "--log_every=1"]


def params(run) -> np.ndarray:
    with h5py.File(run / "checkpoint.h5", "r") as f:
        return f["params"][...]


def losses(run) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_one_replica_is_train_local_step_for_step(fashion_tiny, tmp_path):
    """One emulated replica == `hpcdnn train --topology=local`: every step's loss and the final parameters, bitwise."""
    from hpcdnn.train import train

    args = [*COMMON, f"--data={fashion_tiny}", "--max_steps=6", "--optimizer=sgd", "--momentum=0.9"]
    train(load_config("fashion_small", [*args, f"--run_dir={tmp_path / 'train'}"]))
    s = emulate(load_config("fashion_small", [*args, f"--run_dir={tmp_path / 'sim'}"]), SimOptions(workers=1))
    assert s["simulated"] and s["steps"] == 6
    assert losses(tmp_path / "sim") == losses(tmp_path / "train") and len(losses(tmp_path / "train")) == 6
    np.testing.assert_array_equal(params(tmp_path / "sim"), params(tmp_path / "train"))


@pytest.mark.parametrize("device", ["cpu", "v100"])  # compute-bound (measured here) and server-bound (10 Gbit/s)
def test_downpour_staleness_is_w_minus_1_in_steady_state(fashion_tiny, tmp_path, device):
    """W equal workers (no compute variance): after the first round every push is applied W-1 updates after its
    fetch; the first round's are 0, 1, ..., W-2 (workers that fetched the same version push one after another)."""
    W, steps = 3, 5
    cfg = load_config("fashion_downpour", [*COMMON, f"--data={fashion_tiny}", f"--max_steps={steps}", "--warmstart_steps=0",
                                           f"--run_dir={tmp_path}"])  # fmt: skip
    s = emulate(cfg, SimOptions(workers=W, servers=1, device=device, link_gbit=10))
    counts = {int(k): v for k, v in s["staleness_applied_counts"].items()}
    assert counts == {**{k: 1 for k in range(W - 1)}, W - 1: W * steps - (W - 1)}
    assert s["pushes_applied"] == s["pushes_sent"] == W * steps and s["worker_steps"] == [steps] * W
    assert sum(s["staleness_hist"]) == W * steps and s["staleness_max"] <= W - 1  # as the real workers count it
    assert np.isfinite(params(tmp_path)).all()


def test_downpour_one_worker_is_server_side_sgd(fashion_tiny, tmp_path):
    """One emulated Downpour worker: every push has staleness 0, and SGD applied by the server's kernel equals the
    local run within float rounding (the server's update is the same kernel on the same gradients)."""
    from hpcdnn.train import train

    args = [*COMMON, f"--data={fashion_tiny}", "--max_steps=5", "--optimizer=sgd", "--momentum=0.9", "--warmstart_steps=0"]
    train(load_config("fashion_small", [*args, f"--run_dir={tmp_path / 'train'}"]))
    s = emulate(load_config("fashion_downpour", [*args, f"--run_dir={tmp_path / 'dp'}"]), SimOptions(workers=1))
    assert s["staleness_applied_counts"] == {"0": 5} and s["staleness_max"] == 0
    assert np.abs(params(tmp_path / "dp") - params(tmp_path / "train")).max() < 1e-6


def fashion_cfg(*overrides: str):
    return load_config("fashion_downpour", ["--data=fashion-mnist-not-read", *overrides])


def test_cost_model_recomputed_from_calibration():
    """The predictions for the configurations measured here (local 2 threads; allreduce 2 ranks x 1 thread; Downpour 1
    server + 2 workers x 1 thread), recomputed by hand from CALIBRATION and the model's parameter count."""
    cfg = fashion_cfg("--batch_size=128", "--optimizer=adagrad")
    model = model_cost("alexnet_small", dataset("fashion-mnist"))
    N, c, B = model.params, CALIBRATION, 128
    assert N == 771_210
    local = predict(model, Cluster.here(1, 1, threads=2), cfg)["local"]
    assert local.images_per_s == pytest.approx(c["images_per_s"][("alexnet_small", 2)], rel=1e-12)
    two = predict(model, Cluster.here(2, 1, threads=1), cfg)
    compute = B / c["images_per_s"][("alexnet_small", 1)]
    ring = 4 * N / (c["allreduce_gbs"] * 1e9) + math.ceil(4 * N / 2**20) * 2 * c["latency_us"] * 1e-6
    assert two["allreduce"].images_per_s == pytest.approx(2 * B / (compute + ring), rel=1e-12)
    push = c["latency_us"] * 1e-6 + (4 * N + HEADER_BYTES) / (c["rma_put_gbs"] * 1e9)
    fetch = c["latency_us"] * 1e-6 + 4 * N / (c["rma_get_gbs"] * 1e9)
    apply = 20 * N / (c["apply_gbs"] * 1e9)
    assert two["downpour"].images_per_s == pytest.approx(2 * B / (compute + push + fetch + apply), rel=1e-12)
    assert two["downpour"].bound == "compute_s"
    measured = predict(model, Cluster.here(2, 1, threads=1, images_per_s=500.0), cfg)  # bench/sim_validate.py's rates
    assert measured["downpour"].terms["compute_s"] == B / 500.0
    assert measured["allreduce"].images_per_s == pytest.approx(2 * B / (B / 500.0 + ring), rel=1e-12)


def test_sim_validate_compares_staleness_histograms(monkeypatch):
    """bench/sim_validate.py's pure parts: the total-variation distance of two staleness histograms, the bins'
    labels (control.staleness_bin's), the +-15 % verdict."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    sv = importlib.import_module("sim_validate")
    assert sv.tv_distance([0, 10], [0, 10]) == 0.0
    assert sv.tv_distance([10], [0, 5]) == 1.0
    assert sv.tv_distance([2, 8], [1, 8, 1]) == pytest.approx(0.1)
    assert [sv.bin_label(k) for k in range(4)] == ["0", "1", "2-3", "4-7"]
    assert sv.ratio_cells(100.0, 86.0) == ("0.86", "yes") and sv.ratio_cells(100.0, 84.0) == ("0.84", "NO")
    assert sv.ratio_cells(100.0, None) == ("", "")


def test_plan_for_the_alexnet_paper():
    """AlexNet's FLOPs counted from the model (conv2/4/5 in two groups, as the paper's towers), and the plan for the
    paper's setting prints the paper's 5-6 days beside the prediction."""
    model = model_cost("alexnet", dataset("imagenet"))
    assert model.params == 60_965_224 and model.fwd_flops == 1_448_813_632
    cfg = load_config("imagenet_alexnet", [])
    text = plan(cfg, Cluster.of_link("gtx580", 2, 1, 64), "imagenet")
    assert "five to six days" in text and "days" in text.splitlines()[4]
    assert "five to six days" not in plan(cfg, Cluster.of_link("v100", 64, 8, 100), "imagenet")


def test_cli_rejects_unknown_device_and_documents_knobs(capsys):
    assert sim_cli.main(["--plan", "--config", "imagenet_alexnet", "--device=gtx990"]) == 2
    err = capsys.readouterr().err
    assert "--device='gtx990'" in err and "gtx580" in err and "v100" in err
    with pytest.raises(SystemExit):
        sim_cli.main(["--help"])
    out = capsys.readouterr().out
    for knob in ("--workers", "--servers", "--device", "--link-gbit", "--latency-us", "--server-mem-gbs", "--compute-cv",
                 "--straggler-cv", "--plan", "--dataset"):  # fmt: skip
        assert knob in out


def test_sync_clock_is_the_prediction_and_runs_from_the_cli(fashion_tiny, tmp_path, capsys):
    """`hpcdnn simulate` (through hpcdnn.cli) with 2 synchronous replicas and no compute variance: every simulated step
    is compute + allreduce + update, so the run's images/s is the cost model's; metrics carry the simulated time."""
    from hpcdnn.cli import main

    run = tmp_path / "ar"
    argv = ["simulate", "--config", "fashion_small", *COMMON, f"--data={fashion_tiny}", "--topology=allreduce", "--max_steps=3",
            "--workers=2", "--device=v100", "--link-gbit=10", f"--run_dir={run}"]  # fmt: skip
    assert main(argv) == 0
    assert "allreduce x 2 on v100" in capsys.readouterr().out
    s = json.loads((run / "summary.json").read_text())
    terms = s["cost_terms_s"]
    step = terms["compute_s"] + terms["allreduce_s"] + terms["update_s"]
    assert s["images_per_s"] == pytest.approx(s["predicted_images_per_s"], abs=0.11) == round(2 * 16 / step, 1)
    times = [r["time"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]
    assert times == pytest.approx([step, 2 * step, 3 * step], rel=1e-5)
    assert main(argv) == 2 and "holds another run" in capsys.readouterr().err  # a run directory is never overwritten silently


def test_emulator_refuses_what_it_does_not_model(fashion_tiny, tmp_path):
    cfg = load_config("fashion_downpour", [f"--data={fashion_tiny}", "--max_delay=2", f"--run_dir={tmp_path}"])
    with pytest.raises(ValueError, match="--max_delay=2: not emulated yet"):
        emulate(cfg, SimOptions(workers=2))
    cfg = load_config("fashion_small", [f"--data={fashion_tiny}", "--topology=sandblaster", "--mp=2", f"--run_dir={tmp_path}"])
    with pytest.raises(ValueError, match="--mp=2: Sandblaster's model-parallel replicas are not emulated yet"):
        emulate(cfg, SimOptions(workers=2))
    cfg = load_config("fashion_small", [f"--data={fashion_tiny}", "--topology=sandblaster", f"--run_dir={tmp_path}"])
    with pytest.raises(ValueError, match="--topology=sandblaster draws its times with --straggler-cv"):
        emulate(cfg, SimOptions(workers=2, compute_cv=0.3))


def test_downpour_cadence_counts_every_push(fashion_tiny, tmp_path):
    """n_push=3, n_fetch=2, a warmstart and compute-time variance: every worker pushes ceil(steps / 3) times (the last
    sum is partial), every push is applied once, and the histogram of the posted staleness sums to them."""
    W, steps = 3, 8
    cfg = load_config("fashion_downpour", [*COMMON, f"--data={fashion_tiny}", f"--max_steps={steps}", "--n_push=3", "--n_fetch=2",
                                           "--warmstart_steps=2", f"--run_dir={tmp_path}"])  # fmt: skip
    s = emulate(cfg, SimOptions(workers=W, device="v100", compute_cv=0.3))
    assert s["worker_pushes"] == [{"sent": 3, "applied": 3, "rejected": 0}] * W and s["worker_steps"] == [steps] * W
    assert sum(s["staleness_hist"]) == sum(s["staleness_applied_hist"]) == s["pushes_applied"] == W * 3
