"""data-prep idx (real Fashion-MNIST and generated IDX files) and data-prep folder."""

import gzip

import numpy as np
import pytest
from conftest import FASHION, prep, read_split
from fakes import make_folder_tree, make_idx_dataset, write_idx

from data_prep.manifest import verify
from data_prep.sources.idx import read_idx
from hpcdnn.data.schema import ShardReader, load_manifest


@pytest.mark.skipif(not FASHION.is_dir(), reason="apt-get install dataset-fashion-mnist (CI installs it)")
def test_fashion_mnist_end_to_end_equals_idx_source(tmp_path):
    out = tmp_path / "fm"
    assert prep("idx", "--dir", FASHION, "--out", out, "--shard-size", "8192") == 0
    m = load_manifest(out)
    assert m["source"] == "fashion-mnist" and m["image_shape"] == [28, 28, 1]
    assert [c["name"] for c in m["classes"]][:2] == ["T-shirt/top", "Trouser"]
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = read_idx(FASHION / f"{prefix}-images-idx3-ubyte.gz")
        labels = read_idx(FASHION / f"{prefix}-labels-idx1-ubyte.gz")
        assert m["splits"][split]["count"] == len(labels)
        got = np.empty_like(images)
        got_labels = np.full(len(labels), -1)
        for s in m["splits"][split]["shards"]:
            with ShardReader(out / s["file"]) as r:
                idx = np.array([int(k.rsplit("[", 1)[1][:-1]) for k in r.keys])
                got[idx] = r.images[...][:, :, :, 0]
                got_labels[idx] = r.labels
        np.testing.assert_array_equal(got, images)
        np.testing.assert_array_equal(got_labels, labels)
    # Fashion-MNIST's published pixel statistics: mean 0.2860, std 0.3530 (x 255)
    assert m["channel_mean"][0] == pytest.approx(0.2860 * 255, abs=0.05)
    assert m["channel_std"][0] == pytest.approx(0.3530 * 255, abs=0.05)
    assert verify(out) == []


@pytest.mark.parametrize("gz", [True, False])
def test_generated_idx_plain_and_gzipped(tmp_path, gz):
    data = make_idx_dataset(tmp_path / "in", n_train=30, n_test=10, gz=gz)
    out = tmp_path / "out"
    assert prep("idx", "--dir", tmp_path / "in", "--out", out, "--shard-size", "8") == 0
    m = load_manifest(out)
    assert m["source"] == "idx" and [c["name"] for c in m["classes"]] == [str(i) for i in range(10)]
    train = read_split(out, m, "train")
    for key, (label, image) in train.items():
        i = int(key.rsplit("[", 1)[1][:-1])
        assert label == data["train_labels"][i]
        np.testing.assert_array_equal(image[:, :, 0], data["train_images"][i])


def test_corrupt_and_missing_idx_files_named(tmp_path, capsys):
    make_idx_dataset(tmp_path, n_train=10, n_test=5, gz=True)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-7]))
    assert prep("idx", "--dir", tmp_path, "--out", tmp_path / "o") == 2
    assert "train-images-idx3-ubyte.gz: " in capsys.readouterr().err
    write_idx(path, np.zeros((3, 28, 28), np.uint8), gz=True)  # 3 images, 10 labels
    assert prep("idx", "--dir", tmp_path, "--out", tmp_path / "o") == 2
    assert "do not pair up" in capsys.readouterr().err
    assert prep("idx", "--dir", tmp_path / "empty", "--out", tmp_path / "o") == 2
    assert "4 required input(s) missing" in capsys.readouterr().err


def test_folder_tree_with_val(tmp_path):
    train = make_folder_tree(tmp_path / "train", n_per_class=5)
    make_folder_tree(tmp_path / "val", classes=("dog", "fish"), n_per_class=2, seed=1)
    out = tmp_path / "out"
    assert prep("folder", "--train", tmp_path / "train", "--val", tmp_path / "val", "--out", out, "--size", "20") == 0
    m = load_manifest(out)
    assert [c["name"] for c in m["classes"]] == ["cat", "dog", "fish"]
    got = read_split(out, m, "train")
    assert {k: lab for k, (lab, _) in got.items()} == {k: ["cat", "dog", "fish"].index(c) for k, c in train["files"].items()}
    assert {lab for lab, _ in read_split(out, m, "val").values()} == {1, 2}


def test_folder_val_class_not_in_train_refused(tmp_path, capsys):
    make_folder_tree(tmp_path / "train", classes=("cat",), n_per_class=1)
    make_folder_tree(tmp_path / "val", classes=("cow",), n_per_class=1)
    assert prep("folder", "--train", tmp_path / "train", "--val", tmp_path / "val", "--out", tmp_path / "o") == 2
    assert "cow" in capsys.readouterr().err
