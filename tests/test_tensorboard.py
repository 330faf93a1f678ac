"""TensorBoard: every number of metrics.jsonl and summary.json reads back from the event files, at the same step, and
a resumed run leaves one value per step (purge_step), as metrics.jsonl does."""

import json
import sys

import numpy as np
import pytest

from hpcdnn.metrics import SUMMARY, MetricsLog, read_metrics
from hpcdnn.tensorboard import TB_DIR, MissingTensorBoard, require, scalar_tags


def train_line(step, loss):
    return dict(step=step, epoch=step / 20, time=0.1 * step, loss=loss, lr=0.01, images_per_s=1234.5, pushes_applied=step * 3)


def val_line(step, top1):
    return dict(step=step, epoch=step // 20, time=0.1 * step, val_top1=top1, val_top5=0.99, val_loss=0.3)


SUMMARY_RECORD = {"topology": "downpour", "steps": 40, "parameters": 60_965_224, "val_top1": 0.875, "images_per_s": 812.4,
                  "preempted": False, "staleness_hist": [3, 5, 1], "worker_steps": [20, 20]}  # fmt: skip


def expected_events(run_dir):
    """What the event files must hold: metrics.jsonl's records and summary.json, mapped to tags (hpcdnn/tensorboard.py)."""
    records = read_metrics(run_dir)
    want = {}
    for record in records:
        for tag, value in scalar_tags(record).items():
            want.setdefault(tag, []).append((record["step"], value))
    summary = json.loads((run_dir / SUMMARY).read_text())
    for tag, value in scalar_tags(summary, group="summary").items():
        want[tag] = [(max(r["step"] for r in records), value)]
    return want


def assert_same(got, want):
    assert sorted(got) == sorted(want)
    for tag in want:
        assert [s for s, _ in got[tag]] == [s for s, _ in want[tag]], tag
        for (step, value), (_, expected) in zip(got[tag], want[tag]):
            assert value == np.float32(expected), f"{tag} at step {step}: {value} != float32({expected})"  # events store float32


def write_run(run_dir, steps, resume_step=None, shift=0.0):
    log = MetricsLog(run_dir, resume_step=resume_step, tensorboard=True)
    for step in steps:
        log.log(**train_line(step, loss=2.0 / step + shift))
        if step % 20 == 0:
            log.log(**val_line(step, top1=step / 100 + shift))
    log.write_summary(SUMMARY_RECORD)
    log.close()


def test_every_number_reads_back_at_its_step(tmp_path, read_events):
    write_run(tmp_path, [10, 20, 30, 40])
    got = read_events(tmp_path)
    assert_same(got, expected_events(tmp_path))
    # the documented tags; the step is the x-axis, and strings, bools and lists are not scalars
    assert {"train/loss", "train/lr", "train/images_per_s", "train/pushes_applied", "val/top1", "val/top5", "val/loss", "val/epoch"} <= set(
        got
    )
    assert {"summary/val_top1", "summary/parameters", "summary/images_per_s"} <= set(got)
    assert not {"train/step", "summary/topology", "summary/preempted", "summary/staleness_hist", "summary/worker_steps"} & set(got)
    assert got["summary/val_top1"] == [(40, 0.875)] and got["val/top1"] == [(20, np.float32(0.2)), (40, np.float32(0.4))]


def test_resume_purges_the_steps_after_the_checkpoint(tmp_path, read_events):
    write_run(tmp_path, [10, 20, 30, 40])
    write_run(tmp_path, [30, 40, 50], resume_step=20, shift=1.0)  # the run died after step 40; the checkpoint was at 20
    got = read_events(tmp_path)
    assert [r["step"] for r in read_metrics(tmp_path)] == [10, 20, 20, 30, 40, 40, 50]
    assert_same(got, expected_events(tmp_path))  # one value per step: the first run's 30 and 40 are gone
    assert got["train/loss"][2:] == [(30, np.float32(2 / 30 + 1)), (40, np.float32(2 / 40 + 1)), (50, np.float32(2 / 50 + 1))]


def test_a_fresh_run_replaces_old_events(tmp_path, read_events):
    write_run(tmp_path, [10, 20, 30, 40])
    write_run(tmp_path, [10, 20], shift=1.0)
    assert_same(read_events(tmp_path), expected_events(tmp_path))


def test_off_and_non_root_write_no_events(tmp_path):
    MetricsLog(tmp_path, tensorboard=False).close()
    MetricsLog(tmp_path / "rank1", enabled=False, tensorboard=True).close()
    assert not (tmp_path / TB_DIR).exists() and not (tmp_path / "rank1").exists()


def test_missing_package_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if tensorboard were not installed
    with pytest.raises(MissingTensorBoard, match=r"pip install 'hpcdnn\[tensorboard\]'.*--tensorboard=false"):
        require()


def test_the_driver_writes_what_metrics_jsonl_and_summary_say(tiny, tmp_path, read_events):
    """A local training run with --tensorboard: the events are metrics.jsonl and summary.json, tag for tag."""
    from hpcdnn.config import load_config
    from hpcdnn.train import train

    args = [
        f"--data={tiny}",
        f"--run_dir={tmp_path}",
        "--batch_size=16",
        "--epochs=1",
        "--log_every=2",
        "--threads=1",
        "--tensorboard=true",
    ]
    train(load_config("fashion_small", args))
    got = read_events(tmp_path)
    assert_same(got, expected_events(tmp_path))
    assert {"train/loss", "train/lr", "train/images_per_s", "val/top1", "summary/val_top1", "summary/images_per_s"} <= set(got)
