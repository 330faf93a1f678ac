"""The one definition of an hpcdnn shard and manifest: data_prep writes both through here, the loader reads them.

A shard is one HDF5 file of N samples:
  images  raw:  uint8 (N, H, W, C), one image per chunk, optional lzf/gzip
          jpeg: vlen uint8 (N,), quality-90 JPEG bytes of an (H, W, C) image
  labels  int32 (N,)            class index in [0, num_classes)
  keys    utf-8 str (N,)        source name of each sample (relative path, or IDX file[index])
  attrs   schema_version, encoding, image_shape, num_classes, source, split, shard_index
The manifest (`manifest.json` beside the shards, with the per-pixel mean image in `mean.npy`) lists splits, shards
with sha256, classes, pixel statistics and rejects; `write_manifest` writes it and `load_manifest` reads it.
The JPEG codec itself is `hpcdnn.data.jpeg`; what a reader must check before trusting a manifest is `hpcdnn.data.trust`.

Reads open HDF5 files without file locking (`open_readonly`): shards are immutable and hashed, and on Lustre/GPFS
mounted without flock a locking open fails (h5py #1804). A user who sets HDF5_USE_FILE_LOCKING gets that instead.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
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


def open_readonly(path: str | Path, fix: str = "") -> h5py.File:
    """Open an HDF5 file read-only without locking (unless HDF5_USE_FILE_LOCKING is set); errors name the file.

    For files nobody writes while we read (shards, finished checkpoints): a locking open fails on parallel file systems
    mounted without flock and against any process that holds the file open for writing. h5py's `locking=` overrides
    the environment variable, so it is passed only when the user has not chosen. A missing file raises
    FileNotFoundError, any other failure to open (garbled, truncated, not HDF5) ValueError; both end with `fix`.
    """
    locking = None if "HDF5_USE_FILE_LOCKING" in os.environ else False
    try:
        return h5py.File(path, "r", locking=locking)
    except OSError as e:
        if not Path(path).exists():
            raise FileNotFoundError(f"{path}: no such file{'; ' + fix if fix else ''}") from None
        raise ValueError(
            f"{path}: cannot be read as HDF5 ({e}): the file is truncated, corrupt or not HDF5{'; ' + fix if fix else ''}"
        ) from e


def foreign_storage(f: h5py.File, name: str) -> str:
    """Why dataset `name` of an open file would not be read from that file alone ("" when it is a plain dataset).

    HDF5 lets a dataset live in raw external files, be a virtual view of other files, or be a soft or external link:
    a shard or checkpoint built so would feed any file the user can read into training (and into the next checkpoint).
    Only link and property metadata are read, never another file.
    """
    link = f.get(name, getlink=True)
    if link is None:
        return "missing"
    if not isinstance(link, h5py.HardLink):
        return f"is a {type(link).__name__} (to {getattr(link, 'filename', '')}{link.path}), not a dataset stored in the file"
    ds = f[name]
    if not isinstance(ds, h5py.Dataset):
        return f"is a {type(ds).__name__}, not a dataset"
    if ds.external:
        return f"keeps its data in external file(s) {[e[0] for e in ds.external]}, not in the file"
    return "is a virtual dataset mapping other files" if ds.is_virtual else ""


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
        fix = f"re-run data-prep into a new --out (`data-prep verify {self.path.parent}` lists every damaged file)"
        self.file = open_readonly(self.path, fix)
        try:
            foreign = [f"{n!r} {why}" for n in ("images", "labels", "keys") if (why := foreign_storage(self.file, n))]
            if foreign:
                raise ValueError(f"dataset {'; '.join(foreign)}")
            self.encoding = str(self.file.attrs["encoding"])
            self.image_shape = tuple(int(x) for x in self.file.attrs["image_shape"])
            self.images = self.file["images"]
            self.labels = self.file["labels"][...]
            self.keys = [k.decode() if isinstance(k, bytes) else k for k in self.file["keys"][...]]
        except (KeyError, OSError, ValueError) as e:
            self.file.close()
            raise ValueError(f"{self.path}: not an hpcdnn shard ({e}); {fix}") from e

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
    """Problems with one shard's schema, counts and labels (an empty list when it is sound). Cheap: reads the labels and
    keys, never the images; the loader runs it on every shard it will read, `data-prep verify` adds the sha256."""
    problems = []
    try:
        with open_readonly(path) as f:
            version = f.attrs.get("schema_version")
            if version != SCHEMA_VERSION:
                problems.append(f"schema_version {version!r}, expected {SCHEMA_VERSION}")
            if f.attrs.get("encoding") != encoding:
                problems.append(f"encoding {f.attrs.get('encoding')!r}, manifest says {encoding!r}")
            for name in ("images", "labels", "keys"):
                if why := foreign_storage(f, name):
                    problems.append(f"dataset {name!r} {why}")
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
            bad = np.flatnonzero((lab < 0) | (lab >= num_classes))
            if bad.size:
                i = int(bad[0])
                key = keys[i] if i < len(keys) else b"?"
                key = key.decode(errors="replace") if isinstance(key, bytes) else str(key)
                problems.append(
                    f"{bad.size} labels outside [0, {num_classes}) (the manifest's classes), the first label {int(lab[i])} "
                    f"at index {i} (key {key!r}); labels span [{lab.min()}, {lab.max()}]"
                )
    except FileNotFoundError:
        problems.append("missing")
    except (OSError, ValueError) as e:  # open_readonly names the file; the caller prefixes it, so keep only the cause
        problems.append(f"cannot read as HDF5: {str(e).removeprefix(f'{path}: ')}")
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


def read_json_object(path: Path, fix: str, error: type[Exception] = ValueError) -> dict:
    """A JSON object from `path`; a damaged file (truncated, not JSON, not an object) raises `error` naming it and `fix`."""
    try:
        value = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{path} is not valid JSON ({e}); {fix}") from None
    if not isinstance(value, dict):
        raise error(f"{path}: a JSON {type(value).__name__}, expected an object; {fix}")
    return value


def load_manifest(directory: str | Path) -> dict:
    """Read DIR/manifest.json; a missing, unparsable or incomplete one raises an error naming the file and the fix.

    This checks the manifest's structure (keys and types), so readers never meet a KeyError; whether its values can
    be trusted (finite statistics, shard paths inside DIR, counts) is `hpcdnn.data.trust.manifest_problems`.
    """
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `data-prep ... --out {directory}` (and `data-prep finalize` after a job array)")
    fix = f"it is damaged: run `data-prep finalize {directory}` to write it again, or re-run data-prep into a new --out"
    manifest = read_json_object(path, fix)
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"{path}: schema_version {manifest.get('schema_version')!r}, this hpcdnn reads {SCHEMA_VERSION}")
    problems = structure_problems(manifest)
    if problems:
        raise ValueError(f"{path}: {'; '.join(problems)}; {fix}")
    return manifest


MANIFEST_TYPES = {"encoding": str, "image_shape": list, "classes": list, "splits": dict, "mean": str,
                  "channel_mean": list, "channel_std": list, "pca": dict}  # fmt: skip


def structure_problems(manifest: dict) -> list[str]:
    """Keys missing from a manifest or of the wrong JSON type (an empty list when write_manifest could have written it)."""
    problems = [
        f"{k!r} {'missing' if k not in manifest else f'is a {type(manifest[k]).__name__}'}, expected a {t.__name__}"
        for k, t in MANIFEST_TYPES.items()
        if not isinstance(manifest.get(k), t)
    ]
    if problems:
        return problems
    if manifest["encoding"] not in ENCODINGS:
        problems.append(f"encoding {manifest['encoding']!r}, expected one of {ENCODINGS}")
    if len(manifest["image_shape"]) != 3 or not all(_is_int(v) and v > 0 for v in manifest["image_shape"]):
        problems.append(f"image_shape {manifest['image_shape']!r}, expected [H, W, C] of positive integers")
    if not all(isinstance(c, dict) and _is_int(c.get("index")) for c in manifest["classes"]):
        problems.append("a class is not an object with an integer 'index'")
    if not all(isinstance(manifest["pca"].get(k), list) for k in ("eigval", "eigvec")):
        problems.append("'pca' needs the lists 'eigval' and 'eigvec'")
    for split, info in manifest["splits"].items():
        shards = info.get("shards") if isinstance(info, dict) else None
        if not (isinstance(shards, list) and _is_int(info.get("count")) and all(_shard_record(s) for s in shards)):
            problems.append(
                f"split {split!r} is malformed, expected {{'count': int, 'shards': [{{'file': str, 'count': int, 'sha256': str, 'bytes': int}}]}}"
            )
    return problems


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _shard_record(s) -> bool:
    types = {"file": str, "count": int, "sha256": str, "bytes": int}
    return isinstance(s, dict) and all(isinstance(s.get(k), t) and not isinstance(s.get(k), bool) for k, t in types.items())
