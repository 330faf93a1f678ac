"""data-prep imagenet on fake ILSVRC-2012/2010 trees: labels, manifest contract, odd inputs and refusals."""

import json
import os
import shutil

import numpy as np
import pytest
from conftest import prep, read_split
from fakes import INVALID_BAD_KINDS, VALID_BAD_KINDS, make_bad_inputs, make_imagenet_2010

from data_prep.manifest import verify
from hpcdnn.data.schema import load_manifest


def test_ilsvrc2012_labels_and_manifest_contract(imagenet2012, tmp_path):
    out = tmp_path / "out"
    assert prep("imagenet", "--root", imagenet2012["root"], "--out", out, "--size", "32", "--shard-size", "7") == 0
    m = load_manifest(out)
    wnids = imagenet2012["wnids"]
    assert [c["wnid"] for c in m["classes"]] == sorted(wnids)  # indices in sorted-WNID order
    assert [c["index"] for c in m["classes"]] == list(range(len(wnids)))
    assert m["classes"][0]["name"] == imagenet2012["words"][sorted(wnids)[0]]
    # the devkit's IDs are not in sorted-WNID order: the mapping must go through meta.mat
    assert [imagenet2012["ids"][w] for w in sorted(wnids)] != sorted(imagenet2012["ids"].values())
    train, val = read_split(out, m, "train"), read_split(out, m, "val")
    index = {w: i for i, w in enumerate(sorted(wnids))}
    assert {k: lab for k, (lab, _) in train.items()} == {k: index[w] for k, w in imagenet2012["train"].items()}
    assert {k: lab for k, (lab, _) in val.items()} == {f"val/{f}": index[w] for f, w in imagenet2012["val"].items()}
    assert all(img.shape == (32, 32, 3) for _, img in train.values())
    # contract fields other issues rely on
    assert m["schema_version"] == 1 and m["image_shape"] == [32, 32, 3] and m["encoding"] == "raw"
    assert m["splits"]["train"]["count"] == len(imagenet2012["train"]) == sum(s["count"] for s in m["splits"]["train"]["shards"])
    assert all(set(s) >= {"file", "count", "sha256"} for s in m["splits"]["train"]["shards"])
    assert len(m["pca"]["eigval"]) == 3 and np.array(m["pca"]["eigvec"]).shape == (3, 3)
    mean = np.load(out / m["mean"])
    assert mean.shape == (32, 32, 3)
    np.testing.assert_allclose(mean, np.mean([img for _, img in train.values()], axis=0), atol=1e-4)
    assert m["rejected"] == []
    # the shuffle mixes classes: the first shard is not one class
    first = read_split(out, {"splits": {"train": {"shards": m["splits"]["train"]["shards"][:1]}}}, "train")
    assert len({lab for lab, _ in first.values()}) > 1
    assert verify(out) == []


def test_ilsvrc2010_with_test_split_and_jpeg_encoding(tmp_path):
    info = make_imagenet_2010(tmp_path / "in", n_train_per_class=3, n_val=5, n_test=4)
    out = tmp_path / "out"
    assert prep("imagenet", "--root", info["root"], "--out", out, "--size", "24", "--encoding", "jpeg") == 0
    m = load_manifest(out)
    assert m["source"] == "imagenet-2010" and set(m["splits"]) == {"train", "val", "test"}
    index = {w: i for i, w in enumerate(info["wnids"])}
    test = read_split(out, m, "test")
    assert {k: lab for k, (lab, _) in test.items()} == {f"test/{f}": index[w] for f, w in info["test"].items()}
    assert all(img.shape == (24, 24, 3) and img.dtype == np.uint8 for _, img in test.values())
    assert verify(out) == []


def test_plain_labels_file_instead_of_devkit(imagenet2012, tmp_path):
    root = tmp_path / "in"
    shutil.copytree(imagenet2012["root"], root, ignore=shutil.ignore_patterns("ILSVRC2012_devkit_t12"))
    labels = tmp_path / "val.txt"
    labels.write_text("".join(f"{f} {w}\n" for f, w in sorted(imagenet2012["val"].items())))
    out = tmp_path / "out"
    assert prep("imagenet", "--root", root, "--val-labels", labels, "--out", out, "--size", "16") == 0
    m = load_manifest(out)
    assert m["splits"]["val"]["count"] == len(imagenet2012["val"])
    assert m["classes"][1]["name"] == m["classes"][1]["wnid"]  # no devkit: names are the WNIDs


def test_odd_inputs_converted_or_rejected_and_fraction_enforced(imagenet2012, tmp_path, capsys):
    root = tmp_path / "in"
    shutil.copytree(imagenet2012["root"], root)
    names = make_bad_inputs(root / "train" / imagenet2012["wnids"][0], np.random.default_rng(5))
    outside = tmp_path / "outside.JPEG"
    shutil.copy(next((root / "val").iterdir()), outside)
    os.symlink(outside, root / "train" / imagenet2012["wnids"][1] / "escape.JPEG")
    out = tmp_path / "out"
    args = ["imagenet", "--root", root, "--out", out, "--size", "16", "--max-pixels", "1000000", "--shard-size", "8"]
    assert prep(*args) == 2  # 5 rejects of ~50 inputs is far above the 0.1% default
    err = capsys.readouterr().err
    assert "above --max-reject-fraction 0.001" in err and "rejected.json" in err
    assert not (out / "manifest.json").exists()
    shards = sorted(out.glob("*.h5"))
    assert shards, "finished shards are kept"
    before = {p.name: p.read_bytes() for p in shards}

    assert prep(*args, "--max-reject-fraction", "0.2") == 0
    assert {p.name: p.read_bytes() for p in sorted(out.glob("*.h5"))} == before  # resumed: nothing redone
    m = load_manifest(out)
    rejected = {r["path"].rsplit("/", 1)[1]: r["reason"] for r in m["rejected"]}
    assert set(rejected) == {names[k] for k in INVALID_BAD_KINDS} | {"escape.JPEG"}
    assert "outside the input root" in rejected["escape.JPEG"]
    converted = {c["path"].rsplit("/", 1)[1] for c in m["converted"]}
    assert converted == {names[k] for k in VALID_BAD_KINDS}
    assert m["splits"]["train"]["count"] == len(imagenet2012["train"]) + len(VALID_BAD_KINDS)


def test_every_missing_input_listed_before_work(tmp_path, capsys):
    root = tmp_path / "in"
    (root / "val").mkdir(parents=True)
    out = tmp_path / "out"
    assert prep("imagenet", "--root", root, "--splits", "train,val", "--out", out) == 2
    err = capsys.readouterr().err
    assert "3 required input(s) missing" in err
    for piece in ("train/ (split directory)", "ILSVRC2012_validation_ground_truth.txt", "meta.mat"):
        assert piece in err
    assert not out.exists() or not any(out.iterdir())


def test_unknown_wnid_and_escaping_paths_refused(imagenet2012, tmp_path, capsys):
    root = imagenet2012["root"]
    bad = tmp_path / "bad.txt"
    bad.write_text(f"{sorted(imagenet2012['val'])[0]} n99999999\n")
    assert prep("imagenet", "--root", root, "--val-labels", bad, "--out", tmp_path / "o1") == 2
    assert "n99999999" in capsys.readouterr().err
    bad.write_text("../train/x.JPEG n01440764\n")
    assert prep("imagenet", "--root", root, "--val-labels", bad, "--out", tmp_path / "o2") == 2
    assert "escapes the input root" in capsys.readouterr().err


def test_other_settings_in_same_dir_refused(imagenet2012, tmp_path, capsys):
    out = tmp_path / "out"
    assert prep("imagenet", "--root", imagenet2012["root"], "--out", out, "--size", "16") == 0
    before = json.loads((out / "manifest.json").read_text())
    assert prep("imagenet", "--root", imagenet2012["root"], "--out", out, "--size", "20") == 2
    assert "different inputs or settings" in capsys.readouterr().err
    assert json.loads((out / "manifest.json").read_text()) == before


@pytest.mark.parametrize("flag", ["--size=0", "--shard-size=0"])
def test_nonsense_numbers_refused(imagenet2012, tmp_path, flag):
    assert prep("imagenet", "--root", imagenet2012["root"], "--out", tmp_path / "o", flag) == 2


def test_unlabelled_test_split_left_out_with_a_note(imagenet2012, tmp_path, capsys):
    root = tmp_path / "in"
    shutil.copytree(imagenet2012["root"], root)
    (root / "test").mkdir()
    shutil.copy(next((root / "val").iterdir()), root / "test" / "ILSVRC2012_test_00000001.JPEG")
    assert prep("imagenet", "--root", root, "--out", tmp_path / "out", "--size", "16") == 0
    assert "test/ left out: no labels" in capsys.readouterr().err
    assert set(load_manifest(tmp_path / "out")["splits"]) == {"train", "val"}
