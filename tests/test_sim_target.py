"""`hpcdnn simulate --target-top1`: the emulator stops at the first evaluation reaching the target, for every
topology, and reports the simulated time and images at that evaluation; hpcdnn.sim.figure4 builds its table from
such runs (every run here is real: real data, real model, the real emulator in a subprocess for the figure)."""

from __future__ import annotations

import json

import pytest

from hpcdnn.config import load_config
from hpcdnn.sim import figure4
from hpcdnn.sim.emulate import SimOptions, emulate

COMMON = ["--batch_size=16", "--threads=1", "--lr_schedule=constant", "--log_every=1"]
PRESETS = {"allreduce": ("fashion_small", ["--topology=allreduce"]), "downpour": ("fashion_downpour", ["--warmstart_steps=0"]),
           "sandblaster": ("fashion_sandblaster", ["--sb_portions=4", "--batch_size=64"])}  # fmt: skip


def val_lines(run) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "images" in r and "val_top1" in r]


@pytest.mark.parametrize("topology", sorted(PRESETS))
def test_target_reached_stops_at_that_evaluation(fashion_tiny, tmp_path, topology):
    """A target any model reaches (top-1 >= 0) stops the run at the first evaluation: summary.json's time and images
    to target are that evaluation's, and no step runs after it."""
    preset, extra = PRESETS[topology]
    cfg = load_config(preset, [*COMMON, *extra, f"--data={fashion_tiny}", "--max_steps=40", f"--run_dir={tmp_path}"])
    s = emulate(cfg, SimOptions(workers=2, device="k40", target_top1=1e-9, eval_images=32))
    lines = val_lines(tmp_path)
    assert len(lines) == 1 and lines[0]["images"] >= 32
    assert s["time_to_target_s"] == lines[0]["time"] == s["train_time_s"] > 0
    assert s["images_to_target"] == lines[0]["images"] and s["step_at_target"] == s["steps"] < 40
    assert s["target_top1"] == 1e-9 and s["top1_at_target"] == lines[0]["val_top1"]


def test_target_not_reached_trains_to_the_budget(fashion_tiny, tmp_path):
    """An unreachable target: the run goes to --max_steps, evaluating every eval_images images at simulated times that
    increase, and reports no time to target."""
    cfg = load_config(
        "fashion_downpour", [*COMMON, f"--data={fashion_tiny}", "--max_steps=6", "--warmstart_steps=0", f"--run_dir={tmp_path}"]
    )
    s = emulate(cfg, SimOptions(workers=2, device="k40", target_top1=1.0, eval_images=64))
    lines = val_lines(tmp_path)
    if any(r["val_top1"] >= 1.0 for r in lines):
        pytest.skip("the tiny model classified every validation image")
    assert s["time_to_target_s"] is None and s["images_to_target"] is None and s["steps"] == 6
    assert [r["images"] for r in lines] == [64, 128, 192]  # 2 workers x 16 images per step: every 2nd step
    times = [r["time"] for r in lines]
    assert times == sorted(times) and times[-1] <= s["train_time_s"]


def test_figure4_table_from_real_runs(fashion_tiny, tmp_path, capsys):
    """The figure script runs each point as `hpcdnn simulate`, writes results, table and figure, and reads a point back
    instead of re-running it when its command is unchanged."""
    argv = ["--data", str(fashion_tiny), "--replicas", "1,2", "--methods", "downpour_adagrad", "--target", "1e-9",
            "--eval-images", "128", "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out")]  # fmt: skip
    assert figure4.main(argv) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert sorted((r["method"], r["workers"]) for r in results) == [("downpour_adagrad", 1), ("downpour_adagrad", 2)]
    assert all(r["exit"] == 0 and r["time_to_target_s"] > 0 and r["images_to_target"] >= 128 for r in results)
    assert [r["servers"] for r in results if r["method"] == "downpour_adagrad"] == [1, 1]
    table = (tmp_path / "out" / "table.md").read_text()
    assert "| Downpour SGD + Adagrad |" in table and "W=2" in table
    assert (tmp_path / "out" / "figure4.png").stat().st_size > 0
    assert "--lr=0.00707107" in results[1]["command"]  # the recipe's 0.01 / sqrt(2)
    record = tmp_path / "runs" / "downpour_adagrad_w2" / "figure4.json"
    before = record.stat().st_mtime_ns
    capsys.readouterr()
    assert figure4.main(argv) == 0
    assert record.stat().st_mtime_ns == before and "simulate --config" not in capsys.readouterr().out


@pytest.mark.parametrize("data_set", sorted(figure4.METHODS))
def test_figure4_recipes_are_valid_configs(data_set):
    """Every recipe of the figure, ImageNet's included, is a Config `hpcdnn simulate` accepts (no data is read)."""
    for preset, overrides in figure4.METHODS[data_set].values():
        cfg = load_config(preset, overrides)
        assert cfg.topology in ("downpour", "allreduce", "sandblaster")
        assert cfg.lr_schedule == "constant" or cfg.topology == "sandblaster"  # L-BFGS takes no learning rate


@pytest.mark.parametrize("policy", ["drop", "scale"])
def test_downpour_max_staleness_decided_as_the_real_worker(fashion_tiny, tmp_path, policy):
    """--max_staleness=1 with 3 equal workers, compute-bound (this machine's profile): pushes posted 2 updates after
    their fetch exceed the bound; 'drop' sends none of them (every applied push within the bound, sent = applied +
    rejected), 'scale' applies them all at lr / staleness (counted as scaled)."""
    W, steps = 3, 5
    cfg = load_config("fashion_downpour", [*COMMON, f"--data={fashion_tiny}", f"--max_steps={steps}", "--warmstart_steps=0", "--max_staleness=1",
                                           f"--staleness_policy={policy}", f"--run_dir={tmp_path}"])  # fmt: skip
    s = emulate(cfg, SimOptions(workers=W, servers=1, device="cpu"))
    assert s["pushes_sent"] == W * steps
    if policy == "drop":
        assert s["rejected_stale"] > 0 and s["scaled_stale"] == 0 and s["staleness_max"] <= 1
        assert s["pushes_applied"] + s["rejected_stale"] == W * steps
    else:
        assert s["scaled_stale"] > 0 and s["rejected_stale"] == 0 and s["staleness_max"] >= 2
        assert s["pushes_applied"] == W * steps
