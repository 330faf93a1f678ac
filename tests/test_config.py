"""Config: presets load, overrides are type-checked, unknown keys are refused listing the valid ones."""

import tomllib

import pytest

from hpcdnn.config import PRESETS, Config, apply, load_config, parse_overrides


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
    ],
)
def test_bad_overrides_refused(args, message):
    with pytest.raises(ValueError, match=None) as err:
        load_config(None, args)
    assert message in str(err.value)


def test_unknown_preset_lists_presets():
    with pytest.raises(ValueError, match="fashion_small"):
        load_config("nope")
