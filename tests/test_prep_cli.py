"""data-prep's command line: both spellings of every flag, help in the dashed form; the shared progress bar."""

import sys

import pytest
from conftest import prep, shard_bytes
from fakes import make_idx_dataset

from data_prep.cli import build_parser, dashed
from hpcdnn.progress import Bar


def test_underscore_flags_give_the_same_bytes_as_dashed(tmp_path):
    make_idx_dataset(tmp_path / "in", n_train=30, n_test=10)
    common = ["idx", "--dir", tmp_path / "in", "--encoding", "jpeg"]
    flags = {"shard-size": 8, "max-reject-fraction": 0, "task-index": 0, "num-tasks": 1, "max-pixels": 1000}
    assert prep(*common, "--out", tmp_path / "dash", *[x for k, v in flags.items() for x in (f"--{k}", v)]) == 0
    under = [f"--{k.replace('-', '_')}={v}" for k, v in flags.items()]  # the --flag=value form too
    assert prep(*common, "--out", tmp_path / "under", *under) == 0
    assert len(shard_bytes(tmp_path / "dash")) == 4 + 2 + 2  # 4 train and 2 test shards, manifest.json, mean.npy
    assert shard_bytes(tmp_path / "under") == shard_bytes(tmp_path / "dash")


def test_every_multi_word_flag_takes_both_spellings_and_help_shows_dashes():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    for name, sub in subparsers.items():
        for action in sub._actions:
            for flag in action.option_strings:
                if "-" in flag[2:]:
                    under = flag[:2] + flag[2:].replace("-", "_")
                    assert dashed([under]) == [flag]
                    assert under not in sub.format_help(), f"data-prep {name} --help shows {under}"
    args = parser.parse_args(["imagenet", "--root", "r", "--out", "o", "--val_labels", "v_l.txt", "--task_index", "2", "--num_tasks", "3"])
    assert (str(args.val_labels), args.task_index, args.num_tasks) == ("v_l.txt", 2, 3)


def test_values_and_everything_after_a_bare_double_dash_keep_underscores():
    assert dashed(["--out", "my_dir", "--val_labels=a_b.txt", "-h", "--", "--x_y"]) == [
        "--out",
        "my_dir",
        "--val-labels=a_b.txt",
        "-h",
        "--",
        "--x_y",
    ]


def test_unknown_underscore_flag_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        prep("idx", "--dir", tmp_path, "--out", tmp_path / "o", "--shard_sise", "8")
    assert "--shard-sise" in capsys.readouterr().err


@pytest.mark.parametrize("unit,initial", [("image", 0), ("step", 40)])
def test_bar_plain_lines_off_a_terminal(capsys, unit, initial):
    with Bar(100, initial, enabled=True, every=0.0, unit=unit, desc="t") as bar:
        bar.update()
        bar.update(9, loss="0.5")
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith(f"[t] {initial + 1}/100 {unit}, ") and lines[0].endswith(f" {unit}/s")
    assert lines[1].startswith(f"[t] {initial + 10}/100 {unit}, ") and lines[1].endswith(f" {unit}/s loss=0.5")
    with Bar(100, enabled=False, every=0.0) as quiet:
        quiet.update()
    assert capsys.readouterr().err == ""


def test_bar_is_tqdm_on_a_terminal(capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    with Bar(10, 2, enabled=True, unit="image", desc="data-prep") as bar:
        bar.update(3, n="postfix may be called n")
        assert bar.bar is not None and bar.bar.n == 5
    err = capsys.readouterr().err
    assert "data-prep" in err and "5/10" in err
