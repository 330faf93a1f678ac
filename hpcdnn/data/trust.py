"""What must hold of a data directory before anything reads it: `data-prep verify` and ShardLoader both ask here.

A manifest is input like any other: a hand edit, a bad copy or another tool can leave NaN statistics (every batch
then becomes NaN), a shard path such as `../outside.h5` (training would read, and a checkpoint keep, bytes from
outside the data directory), or counts that drop samples silently. `manifest_problems` lists each such problem naming
the file; `schema.load_manifest` has already checked the structure (keys and types), `schema.check_shard` checks one
shard's rows and labels, and only `data-prep verify` re-hashes the shards.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hpcdnn.data.schema import MANIFEST, check_shard

PIXEL_MAX = 255.0  # statistics are in uint8 pixel units
STD_MAX = PIXEL_MAX / 2  # the largest standard deviation values in [0, 255] can have (half 0, half 255)


def manifest_problems(directory: str | Path, manifest: dict) -> list[str]:
    """Every reason not to trust DIR's manifest and mean image (an empty list when there is none), each naming its file."""
    directory = Path(directory)
    path = directory / MANIFEST
    problems = [f"{path}: {p}" for p in _class_problems(manifest["classes"])]
    problems += [f"{path}: {p}" for p in _statistic_problems(manifest)]
    problems += _mean_problems(directory, manifest)
    seen: dict[str, str] = {}
    for split, info in manifest["splits"].items():
        for s in info["shards"]:
            where = outside(directory, s["file"])
            if where:
                problems.append(f"{path}: split {split!r} lists the shard {s['file']!r}, {where}")
            if s["file"] in seen:
                problems.append(f"{path}: the shard {s['file']!r} is listed twice (splits {seen[s['file']]!r} and {split!r})")
            seen[s["file"]] = split
            if s["count"] < 0:
                problems.append(f"{path}: split {split!r} shard {s['file']!r} has count {s['count']}, expected >= 0")
        total = sum(s["count"] for s in info["shards"])
        if info["count"] != total:
            problems.append(f"{path}: split {split!r} has count {info['count']} but its shards hold {total} samples")
    return problems


def outside(directory: Path, name: str) -> str:
    """Why the shard file `name` would be read from outside `directory` ("" when it stays inside)."""
    if Path(name).is_absolute():
        return "an absolute path: shards must be plain file names inside the data directory"
    if ".." in Path(name).parts:
        return "a path with '..': shards must be plain file names inside the data directory"
    target, home = (directory / name).resolve(), directory.resolve()
    if not target.is_relative_to(home):
        return f"which resolves (through a symlink) to {target}, outside {home}"
    return ""


def shards_problems(directory: str | Path, manifest: dict, split: str) -> list[str]:
    """check_shard on every shard of `split` (row counts, schema, labels against the classes; not the sha256)."""
    directory, problems = Path(directory), []
    for s in manifest["splits"][split]["shards"]:
        args = dict(count=s["count"], num_classes=len(manifest["classes"]), image_shape=manifest["image_shape"])
        problems += [f"{directory / s['file']}: {p}" for p in check_shard(directory / s["file"], **args, encoding=manifest["encoding"])]
    return problems


def _class_problems(classes: list[dict]) -> list[str]:
    if not classes:
        return ["'classes' is empty: a data set needs at least one class"]
    indices = [c["index"] for c in classes]
    if indices != list(range(len(classes))):
        wrong = next(k for k, i in enumerate(indices) if i != k)
        return [f"class {wrong} of {len(classes)} has index {indices[wrong]}: labels index the classes, so class k must have index k"]
    return []


def _statistic_problems(manifest: dict) -> list[str]:
    """channel_mean in [0, 255], channel_std in (0, 127.5], PCA eigenvalues >= 0, orthonormal eigenvectors; all finite."""
    c = manifest["image_shape"][2]
    pca = manifest["pca"]
    checks = {
        "channel_mean": (manifest["channel_mean"], (c,), lambda a: (a >= 0) & (a <= PIXEL_MAX), "every value in [0, 255]"),
        "channel_std": (manifest["channel_std"], (c,), lambda a: (a > 0) & (a <= STD_MAX), f"every value in (0, {STD_MAX}]"),
        "pca eigval": (pca["eigval"], (c,), lambda a: a >= 0, "every value >= 0"),
        "pca eigvec": (pca["eigvec"], (c, c), lambda a: np.allclose(a.T @ a, np.eye(c), atol=1e-6), "orthonormal columns"),
    }
    problems = []
    for name, (value, shape, ok, want) in checks.items():
        a = _floats(value)
        if a is None or a.shape != shape:
            problems.append(f"{name} {_short(value)}: expected {shape} numbers")
        elif not np.isfinite(a).all():
            problems.append(f"{name} {_short(value)} is not finite")
        elif not np.all(ok(a)):
            problems.append(f"{name} {_short(value)}: expected {want}")
    return problems


def _mean_problems(directory: Path, manifest: dict) -> list[str]:
    """The per-pixel mean image: inside DIR, a plain .npy of the image shape, finite, in [0, 255]."""
    path = directory / manifest["mean"]
    where = outside(directory, manifest["mean"])
    if where:
        return [f"{directory / MANIFEST}: the mean image {manifest['mean']!r} is {where}"]
    if not path.is_file():
        return [f"{path}: missing (mean image)"]
    try:
        mean = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        return [f"{path}: not a .npy array ({e})"]
    shape = tuple(manifest["image_shape"])
    if mean.shape != shape or mean.dtype.kind != "f":
        return [f"{path}: {mean.dtype} array of shape {mean.shape}, expected floats of the image shape {shape}"]
    if not np.isfinite(mean).all():
        return [f"{path}: {np.count_nonzero(~np.isfinite(mean))} values are not finite (NaN or Inf)"]
    if mean.min() < 0 or mean.max() > PIXEL_MAX:
        return [f"{path}: values span [{mean.min()}, {mean.max()}], outside the pixel range [0, 255]"]
    return []


def _floats(value) -> np.ndarray | None:
    """`value` as a float64 array, or None when it is not numbers (strings, ragged lists, booleans)."""
    try:
        a = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        return None
    flat = np.asarray(value, dtype=object).ravel() if a.size else []
    return None if any(isinstance(v, bool) for v in flat) else a


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
