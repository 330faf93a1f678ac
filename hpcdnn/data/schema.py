"""The one definition of an hpcdnn shard and manifest: data_prep writes both through here, the loader reads them.

A shard is one HDF5 file of N samples:
  images  raw:  uint8 (N, H, W, C), one image per chunk, optional lzf/gzip
          jpeg: vlen uint8 (N,), quality-90 JPEG bytes of an (H, W, C) image
  labels  int32 (N,)            class index in [0, num_classes)
  keys    utf-8 str (N,)        source name of each sample (relative path, or IDX file[index])
  attrs   schema_version, encoding, image_shape, num_classes, source, split, shard_index
The manifest (`manifest.json` beside the shards, with the per-pixel mean image in `mean.npy`) lists splits, shards
with sha256, classes, pixel statistics and rejects; `write_manifest` writes it and `load_manifest` reads it.
The JPEG codec itself is `hpcdnn.data.jpeg`.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np

from hpcdnn.atomic import atomic_path, write_bytes, write_json
from hpcdnn.data.jpeg import decode_jpeg  # also what hpcdnn.data.loader imports from here

if TYPE_CHECKING:
    from hpcdnn.kernels.stats import ImageStats

SCHEMA_VERSION = 1
ENCODINGS = ("raw", "jpeg")
COMPRESSIONS = ("none", "lzf", "gzip")
MANIFEST = "manifest.json"
MEAN_FILE = "mean.npy"  # per-pixel float32 mean image of the statistics split, beside the manifest
SPLITS = ("train", "val", "test")  # every split name, in this order (the order seeds each split's shuffle)
SHARD_FIELDS = ("file", "count", "sha256", "bytes")  # what the manifest keeps of each shard


def shard_name(split: str, index: int, total: int) -> str:
    """File name of shard `index` of `total` in `split`, e.g. train-00003-of-01252.h5."""
    return f"{split}-{index:05d}-of-{total:05d}.h5"


def sha256_file(path: str | Path, block: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class ShardSchema:
    """Layout of every shard in one data set: image shape, encoding and compression."""

    image_shape: tuple[int, int, int]  # (H, W, C) of every stored image
    encoding: str = "raw"  # "raw" uint8 pixels or "jpeg" bytes
    compression: str = "none"  # raw only: "none" (fastest reads), "lzf" or "gzip"

    def __post_init__(self) -> None:
        if self.encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {ENCODINGS}, not {self.encoding!r}")
        if self.compression not in COMPRESSIONS:
            raise ValueError(f"compression must be one of {COMPRESSIONS}, not {self.compression!r}")
        if self.encoding == "jpeg" and self.compression != "none":
            raise ValueError("compression applies to --encoding raw only; JPEG bytes do not compress further")

    def write(self, path: str | Path, images, labels: np.ndarray, keys: list[str], attrs: dict, sync_dir: bool = True) -> None:
        """Atomically write one shard. `images` is uint8 (N,H,W,C) for raw, a list of JPEG bytes for jpeg.

        Datasets are created without timestamps so the same input gives byte-identical files.
        """
        n = len(labels)
        if len(images) != n or len(keys) != n:
            raise ValueError(f"shard {path}: {len(images)} images, {n} labels, {len(keys)} keys must agree")
        with atomic_path(path, sync_dir) as tmp, h5py.File(tmp, "w") as f:
            if self.encoding == "raw":
                images = np.asarray(images, dtype=np.uint8).reshape((n, *self.image_shape))
                ds = f.create_dataset(
                    "images",
                    shape=images.shape,
                    dtype=np.uint8,
                    chunks=(1, *self.image_shape) if n else None,
                    compression=None if self.compression == "none" else self.compression,
                    track_times=False,
                )
                if n:
                    ds.write_direct(np.ascontiguousarray(images))
            else:
                ds = f.create_dataset("images", shape=(n,), dtype=h5py.vlen_dtype(np.uint8), track_times=False)
                for i, data in enumerate(images):
                    ds[i] = np.frombuffer(data, dtype=np.uint8)
            f.create_dataset("labels", data=np.asarray(labels, dtype=np.int32), track_times=False)
            f.create_dataset("keys", data=np.array(keys, dtype=object), dtype=h5py.string_dtype(), track_times=False)
            f.attrs["schema_version"] = SCHEMA_VERSION
            f.attrs["encoding"] = self.encoding
            f.attrs["image_shape"] = np.asarray(self.image_shape, dtype=np.int64)
            for k, v in sorted(attrs.items()):
                f.attrs[k] = v


class ShardReader:
    """Read one shard through the schema; images come back as uint8 (H, W, C) whatever the encoding."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.file = h5py.File(self.path, "r")
        self.encoding = str(self.file.attrs["encoding"])
        self.image_shape = tuple(int(x) for x in self.file.attrs["image_shape"])
        self.images = self.file["images"]
        self.labels = self.file["labels"][...]
        self.keys = [k.decode() if isinstance(k, bytes) else k for k in self.file["keys"][...]]

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, i: int) -> np.ndarray:
        """Image `i` as uint8 (H, W, C). Reads one chunk: never index a batch with a list (h5py is far slower then)."""
        if self.encoding == "raw":
            return self.images[i]
        return decode_jpeg(self.images[i])

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def check_shard(path: str | Path, *, count: int, num_classes: int, image_shape, encoding: str) -> list[str]:
    """Problems with one shard's schema, counts and labels (an empty list when it is sound)."""
    problems = []
    try:
        with h5py.File(path, "r") as f:
            version = f.attrs.get("schema_version")
            if version != SCHEMA_VERSION:
                problems.append(f"schema_version {version!r}, expected {SCHEMA_VERSION}")
            if f.attrs.get("encoding") != encoding:
                problems.append(f"encoding {f.attrs.get('encoding')!r}, manifest says {encoding!r}")
            for name in ("images", "labels", "keys"):
                if name not in f:
                    problems.append(f"dataset {name!r} missing")
            if problems:
                return problems
            images, labels, keys = f["images"], f["labels"], f["keys"]
            if labels.dtype != np.int32:
                problems.append(f"labels dtype {labels.dtype}, expected int32")
            lengths = {len(images), len(labels), len(keys)}
            if lengths != {count}:
                problems.append(f"images/labels/keys have {len(images)}/{len(labels)}/{len(keys)} rows, manifest says {count}")
            if encoding == "raw" and images.shape[1:] != tuple(image_shape):
                problems.append(f"image shape {images.shape[1:]}, manifest says {tuple(image_shape)}")
            lab = labels[...]
            if lab.size and (lab.min() < 0 or lab.max() >= num_classes):
                problems.append(f"labels span [{lab.min()}, {lab.max()}], outside [0, {num_classes})")
    except OSError as e:
        problems.append(f"cannot read as HDF5: {e}")
    return problems


def write_manifest(
    directory: str | Path,
    *,
    source: str,
    settings: dict,
    image_shape,
    classes: list[dict],
    splits: dict[str, dict],
    stats: ImageStats,
    stats_split: str,
    rejected: list[dict],
    converted: list[dict],
) -> dict:
    """Write DIR/mean.npy and DIR/manifest.json (atomically, same input -> same bytes); returns the manifest.

    `splits` maps each split to {"planned": inputs listed, "shards": [records with at least SHARD_FIELDS]}; `stats`
    holds the exact pixel statistics of `stats_split`. This is the only writer of what `load_manifest` reads.
    """
    directory = Path(directory)
    write_bytes(directory / MEAN_FILE, npy_bytes(stats.mean_image()))
    listed = {}
    for split, info in splits.items():
        shards = [{k: s[k] for k in SHARD_FIELDS} for s in info["shards"]]
        listed[split] = {"count": sum(s["count"] for s in shards), "planned": info["planned"], "shards": shards}
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "source": source,
        "encoding": settings["encoding"],
        "compression": settings["compression"],
        "image_shape": list(image_shape),
        "settings": settings,
        "classes": classes,
        "splits": listed,
        "mean": MEAN_FILE,
        "stats_split": stats_split,
        "stats_units": "uint8 pixel values (0..255)",
        **stats.summary(),
        "rejected": rejected,
        "converted": converted,
    }
    write_json(directory / MANIFEST, manifest)
    return manifest


def npy_bytes(array: np.ndarray) -> bytes:
    """The .npy encoding of `array` (no timestamps: deterministic)."""
    b = io.BytesIO()
    np.save(b, array)
    return b.getvalue()


def load_manifest(directory: str | Path) -> dict:
    """Read DIR/manifest.json with a clear error when it is missing or not a manifest."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `data-prep ... --out {directory}` (and `data-prep finalize` after a job array)")
    manifest = json.loads(path.read_text())
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"{path}: schema_version {manifest.get('schema_version')!r}, this hpcdnn reads {SCHEMA_VERSION}")
    return manifest
