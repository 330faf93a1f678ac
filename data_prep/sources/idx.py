"""MNIST-format IDX files (`data-prep idx`), gzipped or not, e.g. Debian's dataset-fashion-mnist.

Reads DIR/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]; t10k becomes the `test` split. Images stay 28x28x1.
"""

from __future__ import annotations

import argparse
import gzip
from pathlib import Path

import numpy as np

from data_prep.sources.base import Item, PrepError, Source, missing_error

FASHION = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
PREFIXES = {"train": "train", "test": "t10k"}
DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", required=True, type=Path, help=f"directory of IDX files (Fashion-MNIST from Debian: {DEBIAN_DIR})")
    p.add_argument(
        "--names",
        choices=["auto", "fashion-mnist", "digits"],
        default="auto",
        help="class names (auto: fashion-mnist when the path says so)",
    )


def find(directory: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (directory / name).is_file():
            return directory / name
    return None


def read_idx(path: Path) -> np.ndarray:
    """Parse an unsigned-byte IDX file (magic 0x0000 08 ndim, big-endian int32 dims, data)."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise PrepError(f"{path}: cannot read ({e}); re-download the file") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise PrepError(f"{path}: not an unsigned-byte IDX file (magic {raw[:4].hex()}, expected 000008NN)")
    ndim = raw[3]
    dims = tuple(int(d) for d in np.frombuffer(raw, ">i4", count=ndim, offset=4))
    expected = 4 + 4 * ndim + int(np.prod(dims))
    if len(raw) != expected:
        raise PrepError(f"{path}: {len(raw)} bytes, dims {dims} need {expected}; the file is truncated or corrupt")
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def open_source(args: argparse.Namespace) -> Source:
    d = args.dir
    wanted = {s: {kind: find(d, f"{pre}-{kind}-ubyte") for kind in ("images-idx3", "labels-idx1")} for s, pre in PREFIXES.items()}
    missing = [f"{d / f'{PREFIXES[s]}-{kind}-ubyte'}[.gz]" for s, files in wanted.items() for kind, p in files.items() if p is None]
    if len(missing) == 4 or (missing and wanted["train"]["images-idx3"] is None):
        raise missing_error(
            missing, f"Fix: point --dir at the IDX files (on Debian: apt-get install dataset-fashion-mnist -> {DEBIAN_DIR})."
        )
    if missing:
        raise missing_error(missing, "Fix: each split needs both its images and its labels file.")
    splits, arrays = {}, {}
    num_classes = 0
    for split, files in wanted.items():
        images, labels = read_idx(files["images-idx3"]), read_idx(files["labels-idx1"])
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise PrepError(
                f"{files['images-idx3']} {images.shape} and {files['labels-idx1']} {labels.shape} do not pair up as N images and N labels"
            )
        arrays[split] = images[:, :, :, None]
        name = files["images-idx3"].name.removesuffix(".gz")
        splits[split] = [Item(f"{name}[{i}]", int(lab), index=i) for i, lab in enumerate(labels)]
        num_classes = max(num_classes, int(labels.max()) + 1)
    fashion = args.names == "fashion-mnist" or (args.names == "auto" and "fashion" in str(d.resolve()).lower())
    if fashion and num_classes > len(FASHION):
        raise PrepError(f"{d}: labels reach {num_classes - 1}, Fashion-MNIST has 10 classes; pass --names digits")
    names = FASHION if fashion else [str(i) for i in range(num_classes)]
    classes = [{"index": i, "wnid": str(i), "name": names[i]} for i in range(len(names) if fashion else num_classes)]
    shape = arrays["train"].shape[1:]
    return Source("fashion-mnist" if fashion else "idx", shape, classes, splits, arrays)
