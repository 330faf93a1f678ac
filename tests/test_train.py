"""The local trainer end to end on tiny real shards: learns, resumes bitwise, evaluates, plots."""

import json

import numpy as np

from hpcdnn import checkpoint as ck
from hpcdnn.cli import main as hpcdnn
from hpcdnn.config import load_config
from hpcdnn.train import train


def config(data, run_dir, *extra):
    base = [f"--data={data}", f"--run_dir={run_dir}", "--batch_size=16", "--epochs=2", "--log_every=2", "--threads=1", "--lr=0.02"]
    return load_config("fashion_small", [*base, *extra])


def test_resumed_run_equals_uninterrupted_bitwise(tiny, tmp_path):
    train(config(tiny, tmp_path / "a"))
    a = ck.load(tmp_path / "a" / ck.LATEST)
    assert a.step == 2 * (120 // 16)

    train(config(tiny, tmp_path / "b", "--max_steps=5"))  # stops mid-epoch 0
    assert ck.load(tmp_path / "b" / ck.LATEST).step == 5
    train(config(tiny, tmp_path / "b"), resume=True)
    b = ck.load(tmp_path / "b" / ck.LATEST)
    assert b.step == a.step
    np.testing.assert_array_equal(b.params, a.params)  # bitwise
    np.testing.assert_array_equal(b.optim["momentum_buffer"], a.optim["momentum_buffer"])
    steps = [r["step"] for r in map(json.loads, (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps == sorted(set(steps)), "metrics of the resumed run continue without duplicates"


def test_run_directory_contents_and_summary(tiny, tmp_path):
    run = tmp_path / "run"
    summary = train(config(tiny, run, "--optimizer=adagrad", "--lr=0.01", "--eval_ten_crop=true"))
    for key in ("topology", "model", "epochs", "steps", "images_per_s", "train_time_s", "val_top1", "val_top5"):
        assert key in summary
    assert summary["model"] == "alexnet_small" and summary["topology"] == "local"
    assert 0.0 <= summary["val_top1"] <= summary["val_top5"] <= 1.0
    assert "val_top1_10crop" in summary
    assert json.loads((run / "summary.json").read_text()) == summary
    assert (run / "config.toml").read_text().startswith("data = ")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("val_top1" in r for r in records) and any("images_per_s" in r for r in records)


def test_resume_refuses_changed_settings(tiny, tmp_path, capsys):
    train(config(tiny, tmp_path / "r", "--max_steps=2"))
    args = [
        "train",
        "--config",
        "fashion_small",
        f"--data={tiny}",
        f"--run_dir={tmp_path / 'r'}",
        "--batch_size=16",
        "--lr=0.5",
        "--resume",
    ]
    assert hpcdnn(args) == 2
    assert "lr: 0.02 -> 0.5" in capsys.readouterr().err


def test_eval_and_plot_commands(tiny, tmp_path, capsys):
    run = tmp_path / "run"
    train(config(tiny, run, "--max_steps=4"))
    capsys.readouterr()
    assert hpcdnn(["eval", "--run_dir", str(run), "--ten_crop"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["count"] == 40 and {"top1", "top5", "top1_10crop", "top5_10crop"} <= set(result)
    assert hpcdnn(["plot", str(run), str(run), "-o", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sigusr1_stops_with_checkpoint_and_resume_is_bitwise(tiny, tmp_path):
    """SIGUSR1 mid-run (Slurm's --signal=B:USR1): checkpoint + preempted.json, no summary; --resume == uninterrupted."""
    import os
    import signal
    import threading
    import time

    train(config(tiny, tmp_path / "a"))
    run = tmp_path / "b"
    metrics = run / "metrics.jsonl"

    def signal_after_first_log():
        deadline = time.time() + 60
        while time.time() < deadline and not (metrics.exists() and metrics.read_text()):
            time.sleep(0.005)
        os.kill(os.getpid(), signal.SIGUSR1)

    watcher = threading.Thread(target=signal_after_first_log)
    watcher.start()
    first = train(config(tiny, run))
    watcher.join()
    assert first["preempted"] and (run / "preempted.json").exists() and not (run / "summary.json").exists()
    assert 0 < ck.load(run / ck.LATEST).step < 14
    train(config(tiny, run), resume=True)
    a, b = ck.load(tmp_path / "a" / ck.LATEST), ck.load(run / ck.LATEST)
    assert b.step == a.step == 14
    np.testing.assert_array_equal(b.params, a.params)
    assert not (run / "preempted.json").exists() and (run / "summary.json").exists()


def test_divergence_stops_the_run_and_keeps_the_last_good_checkpoint(tiny, tmp_path, capsys):
    """--lr=1e6: the loss goes non-finite within a few steps. The run exits 2 naming the step and the fix, the
    last finite checkpoint stays (a diverged one is never written over it), and every JSON line is strict."""
    run = tmp_path / "run"
    args = ["train", "--config", "fashion_small", f"--data={tiny}", f"--run_dir={run}", "--batch_size=16", "--threads=1",
            "--lr=1e6", "--checkpoint_every=1", "--log_every=1"]  # fmt: skip
    assert hpcdnn(args) == 2
    err = capsys.readouterr().err
    kept = ck.load(run / ck.LATEST)
    assert kept.step >= 1 and np.isfinite(kept.params).all()
    assert "training diverged" in err and "at step" in err and "--lr" in err and f"(step {kept.step}) is kept" in err, err
    for line in (run / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: (_ for _ in ()).throw(AssertionError(f"{c} in metrics.jsonl")))


def test_non_finite_options_are_refused(tiny, tmp_path, capsys):
    for bad in ("--lr=nan", "--momentum=nan", "--pca_std=inf", "--bucket_mb=nan", "--rank_memory_gb=inf"):
        assert hpcdnn(["train", "--config", "fashion_small", f"--data={tiny}", f"--run_dir={tmp_path / 'r'}", bad]) == 2
        assert "must be a finite number" in capsys.readouterr().err, bad
    assert not (tmp_path / "r").exists()
