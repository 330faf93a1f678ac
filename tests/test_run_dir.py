"""Run directories and resumes are never silently wrong: a fresh run into another run's directory is refused before a
byte changes; --overwrite replaces it; a resume on re-prepared data, or on a checkpoint of another model, is refused."""

import json
import shutil

import h5py
import pytest
from test_train import config

from hpcdnn import checkpoint as ck
from hpcdnn.cli import main as hpcdnn
from hpcdnn.train import train


def snapshot(run_dir) -> dict:
    """Every file of a run directory: bytes and modification time."""
    return {p.relative_to(run_dir): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(run_dir.rglob("*")) if p.is_file()}


def cli(data, run_dir, *extra) -> list[str]:
    return ["train", "--config", "fashion_small", f"--data={data}", f"--run_dir={run_dir}", "--batch_size=16", "--epochs=1",
            "--log_every=2", "--threads=1", "--lr=0.02", "--max_steps=3", *extra]  # fmt: skip


def test_a_fresh_run_into_a_finished_run_is_refused_and_changes_no_byte(tiny, tmp_path, capsys):
    run = tmp_path / "run"
    assert hpcdnn(cli(tiny, run)) == 0
    before = snapshot(run)
    assert {"checkpoint.h5", "summary.json", "metrics.jsonl", "config.toml"} <= {str(p) for p in before}
    capsys.readouterr()
    assert hpcdnn(cli(tiny, run, "--lr=0.01")) == 2
    err = capsys.readouterr().err
    assert f"--run_dir={run} holds another run (checkpoint.h5, summary.json, metrics.jsonl)" in err, err
    assert "--resume" in err and "--overwrite" in err and "a new --run_dir" in err, err
    assert snapshot(run) == before


def test_overwrite_replaces_the_run_and_refuses_resume_with_it(tiny, tmp_path, capsys):
    run = tmp_path / "run"
    assert hpcdnn(cli(tiny, run, "--max_steps=4")) == 0
    assert hpcdnn(cli(tiny, run, "--resume", "--overwrite")) == 2
    assert "--resume continues the run" in capsys.readouterr().err
    assert hpcdnn(cli(tiny, run, "--overwrite")) == 0
    steps = [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps == [2, 3], "the old run's metrics were truncated, the new run's kept"
    assert json.loads((run / "summary.json").read_text())["steps"] == 3 and ck.load(run / ck.LATEST).step == 3


def test_an_interrupted_run_without_a_checkpoint_is_refused_too(tiny, tmp_path):
    """metrics.jsonl with lines is a run's record even before its first checkpoint: a fresh run would truncate it."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 2, "loss": 2.3}\n')
    with pytest.raises(ValueError, match="holds another run .metrics.jsonl."):
        train(config(tiny, run, "--max_steps=2"))
    assert (run / "metrics.jsonl").read_text() == '{"step": 2, "loss": 2.3}\n'


def test_resume_on_re_prepared_data_is_refused(tiny, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny, data)
    run = tmp_path / "run"
    train(config(data, run, "--max_steps=2"))
    manifest = json.loads((data / "manifest.json").read_text())
    (data / "manifest.json").write_text(json.dumps(manifest, indent=2))  # same keys, other bytes: "re-prepared"
    with pytest.raises(ValueError, match=f"{run / ck.LATEST} was trained on data whose manifest.json had sha256 .* re-prepared"):
        train(config(data, run), resume=True)


def test_a_checkpoint_of_another_model_is_refused_naming_the_file(tiny, tmp_path):
    run = tmp_path / "run"
    train(config(tiny, run, "--max_steps=2"))
    saved = ck.load(run / ck.LATEST)
    saved.params, saved.optim = saved.params[:-8], {k: v[:-8] for k, v in saved.optim.items()}
    ck.save(run / ck.LATEST, saved)
    with pytest.raises(ValueError, match=f"{run / ck.LATEST} holds vectors of shape .* another model"):
        train(config(tiny, run), resume=True)
    with h5py.File(run / ck.LATEST, "r") as f:  # the refused checkpoint is left as it was
        assert f["params"].shape == saved.params.shape


def test_an_empty_evaluation_split_is_named(tiny, tmp_path):
    """A split without samples: the error names it and the splits to choose, not a batch size the user never set
    (training: the evaluation loader's batch of 256; eval: its 128); eval without a checkpoint does not talk of --resume."""
    from hpcdnn.evaluate import evaluate_run

    data, run = tmp_path / "data", tmp_path / "run"
    shutil.copytree(tiny, data)
    train(config(data, run, "--max_steps=2"))
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["splits"]["test"] |= {"count": 0, "shards": []}
    (data / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"--val_split=test: .* has no samples in split 'test'; choose another split: train \(120\)"):
        train(config(data, tmp_path / "other", "--max_steps=2", "--val_split=test"))
    with pytest.raises(ValueError, match=r"--split=test: .* has no samples in split 'test'"):
        evaluate_run(run, split="test")
    with pytest.raises(FileNotFoundError, match="must name a run directory with a checkpoint"):
        evaluate_run(tmp_path / "none")
