"""Config: presets load, overrides are type-checked, unknown keys are refused listing the valid ones; train --help lists
every key with its type, default and comment; flags take dashes or underscores."""

import inspect
import re
import subprocess
import sys
import tomllib
from dataclasses import dataclass, fields

import pytest

import hpcdnn.config
from hpcdnn.cli import build_parser
from hpcdnn.config import PRESETS, Config, apply, describe_fields, load_config, parse_overrides


@pytest.mark.parametrize("preset", sorted(p.stem for p in PRESETS.glob("*.toml")))
def test_presets_load_and_round_trip(preset):
    cfg = load_config(preset)
    assert apply(Config(), tomllib.loads(cfg.to_toml()), "round trip") == cfg


def test_imagenet_preset_is_the_papers_recipe():
    cfg = load_config("imagenet_alexnet")
    assert (cfg.model, cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay, cfg.batch_size) == ("alexnet", "sgd", 0.01, 0.9, 5e-4, 128)
    assert (cfg.lr_schedule, cfg.lr_factor, cfg.crop, cfg.pca_std) == ("plateau", 0.1, 227, 0.1)


def test_overrides_are_typed():
    cfg = load_config(None, ["--epochs=3", "--lr", "0.5", "--flip=false", "--run-dir=/tmp/x"])
    assert (cfg.epochs, cfg.lr, cfg.flip, cfg.run_dir) == (3, 0.5, False, "/tmp/x")
    assert parse_overrides(["--a-b=1"]) == {"a_b": "1"}


@pytest.mark.parametrize(
    "args,message",
    [
        (["--epoch=3"], "unknown key(s) epoch; valid keys: adagrad_eps"),
        (["--epochs=3.5"], "--epochs='3.5': expected int"),
        (["--flip=maybe"], "expected bool"),
        (["--optimizer=adam"], "is not one of sgd, adagrad"),
        (["--lr=0"], "must be positive"),
        (["--lr"], "needs a value"),
        (["epochs=3"], "overrides look like --key=value"),
        (["--device=tpu"], "--device='tpu' is not one of auto, cpu, cuda, cuda:N"),
        (["--device=cuda:x"], "is not one of auto, cpu, cuda, cuda:N"),
        (["--seed=-1"], "--seed=-1 is outside [0, 2**32 - 1 = 4294967295]"),
        ([f"--seed={2**64}"], f"--seed={2**64} is outside [0, 2**32 - 1"),
    ],
)
def test_bad_overrides_refused(args, message):
    with pytest.raises(ValueError, match=None) as err:
        load_config(None, args)
    assert message in str(err.value)


def test_malformed_toml_names_the_file(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text("lr = 0.1\nepochs = [\n")
    with pytest.raises(ValueError, match=f"{path}: not valid TOML"):
        load_config(str(path))


def test_unknown_preset_lists_presets():
    with pytest.raises(ValueError, match="fashion_small"):
        load_config("nope")


def train_help(capsys) -> str:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    return capsys.readouterr().out


def test_train_help_lists_every_key_with_default_and_comment(capsys):
    text = train_help(capsys)
    source = inspect.getsource(hpcdnn.config)
    for f in fields(Config):
        # read independently of describe_fields: the field's line in config.py must carry a comment (document new keys)
        line = re.search(rf"^    {f.name}: {f.type} = (?:\(\n\s+)?.+?  # (.+)$", source, re.M)  # ruff wraps long ones in ( )
        assert line, f"Config.{f.name} has no comment on its line in hpcdnn/config.py: add one (`{f.name}: ... = ...  # what and why`)"
        default = getattr(Config(), f.name)
        shown = ("true" if default else "false") if isinstance(default, bool) else default if isinstance(default, str) else repr(default)
        shown = shown or '""'  # an empty string default, as describe_fields spells it (--trace)
        row = re.search(rf"^  --{f.name}=(\S+) +(\w+) +(.+)$", text, re.M)
        assert row, f"--{f.name} missing from hpcdnn train --help"
        assert row.groups() == (shown, f.type, line.group(1).strip())
    for heading in ("# data and model", "# optimisation", "# runtime", "# sandblaster"):
        assert heading in text


def test_describe_fields_reports_an_undocumented_field():
    @dataclass
    class Example:
        # first group
        a: int = 1  # documented
        b: str = "x"
        # second group
        c: float = 0.5  # also documented

    docs = describe_fields(Example)
    assert [(d.group, d.name, d.type, d.default, d.comment) for d in docs] == [
        ("first group", "a", "int", "1", "documented"),
        ("first group", "b", "str", "x", ""),
        ("second group", "c", "float", "0.5", "also documented"),
    ]


@pytest.mark.parametrize(
    "args",
    [
        "--show-config --run-dir=/tmp/rd",
        "--show_config --run_dir /tmp/rd",
        "--show-config --run-dir /tmp/rd",
        "--show_config --run_dir=/tmp/rd",
    ],
)
def test_train_flags_take_dashes_or_underscores(args):
    done = subprocess.run([sys.executable, "-m", "hpcdnn", "train", *args.split()], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert 'run_dir = "/tmp/rd"' in done.stdout.splitlines()


@pytest.mark.parametrize("run_dir,ten_crop", [("--run-dir", "--ten-crop"), ("--run_dir", "--ten_crop")])
def test_eval_flags_take_dashes_or_underscores(run_dir, ten_crop):
    args = build_parser().parse_args(["eval", run_dir, "runs/x", ten_crop])
    assert (args.run_dir, args.ten_crop) == ("runs/x", True)
