"""What every data source provides: classes, and per split a sorted list of items to decode."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_prep.decode import Decoded, load_image


class PrepError(Exception):
    """Bad arguments or inputs, found before any work starts; the message names the bad value and the fix."""


def missing_error(missing: list[str], hint: str) -> PrepError:
    """One error listing every missing input (so a user fixes them all at once)."""
    lines = "\n".join(f"  - {m}" for m in missing)
    return PrepError(f"{len(missing)} required input(s) missing:\n{lines}\n{hint}")


@dataclass(frozen=True)
class Item:
    """One input sample: `key` is its name in the shard; `path` a file, or `index` into an in-memory array."""

    key: str
    label: int
    path: str | None = None
    index: int = -1
    reject: str | None = None  # known bad before reading (e.g. a symlink out of the root)


@dataclass
class Options:
    """How images are decoded: the target side, pixel limit and resize filter."""

    size: int = 256
    max_pixels: int = 89_478_485  # Pillow's default limit (~ 9459 x 9459)
    resample: str = "bilinear"


@dataclass
class Source:
    """A data set ready to shard: classes [{index, wnid, name}], and split -> items (sorted, unshuffled)."""

    name: str
    image_shape: tuple[int, int, int]
    classes: list[dict]
    splits: dict[str, list[Item]]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)  # in-memory images (IDX), by split
    notes: list[str] = field(default_factory=list)  # what the user should know (e.g. a split left out), printed once

    def load(self, item: Item, split: str, opts: Options) -> Decoded:
        """Pixels of one item, or the reason it is rejected."""
        if item.reject:
            return Decoded(reason=item.reject)
        if item.path is None:
            return Decoded(array=self.arrays[split][item.index])
        return load_image(item.path, opts.size, max_pixels=opts.max_pixels, resample=opts.resample)


def inside(path: Path, root: Path) -> bool:
    """True when `path` (resolved, symlinks followed) lies within `root` (resolved)."""
    try:
        path.resolve().relative_to(root)
        return True
    except ValueError:
        return False


def printable(name: str) -> str:
    """`name` as valid UTF-8 text: bytes that are not UTF-8 (kept by Python as surrogates) become \\xNN escapes."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def list_files(directory: Path, root: Path, label: int, key_prefix: str) -> list[Item]:
    """Items for the non-hidden files in `directory` (sorted; not recursive). Symlinks leaving `root` are rejected, and so
    are names that are not UTF-8: a shard key, the manifest and the rejects list are UTF-8 text, and such a name cannot be
    written there as it is (the reject names it with \\xNN escapes, and it counts against --max-reject-fraction)."""
    items = []
    with os.scandir(directory) as it:
        entries = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
    for e in entries:
        path = Path(e.path)
        if e.is_dir(follow_symlinks=False):
            continue
        key = f"{key_prefix}{printable(e.name)}"
        if key != f"{key_prefix}{e.name}":
            items.append(
                Item(key, label, str(path), reject="file name is not valid UTF-8; rename the file (e.g. convmv -f latin1 -t utf8)")
            )
        elif e.is_symlink() and not inside(path, root):  # plain entries of a directory inside root are inside root
            items.append(Item(key, label, str(path), reject=f"symlink points outside the input root {root}: {os.path.realpath(path)}"))
        elif not path.is_file():
            items.append(Item(key, label, str(path), reject="not a regular file (dangling symlink or special file)"))
        else:
            items.append(Item(key, label, str(path)))
    return items


def class_dirs(directory: Path, root: Path) -> list[str]:
    """Sorted names of the non-hidden subdirectories; a class directory leaving `root` is refused."""
    names = sorted(e.name for e in os.scandir(directory) if not e.name.startswith(".") and e.is_dir())
    garbled = [printable(n) for n in names if printable(n) != n]
    if garbled:
        raise PrepError(
            f"class directories in {directory} have names that are not valid UTF-8: {', '.join(garbled[:10])}; a class name must be text, "
            "rename them (e.g. convmv -f latin1 -t utf8 -r --notest DIR)"
        )
    escaping = [n for n in names if not inside(directory / n, root)]
    if escaping:
        raise PrepError(
            f"class directories in {directory} point outside the input root {root}: {escaping[:10]}; copy or bind-mount them inside the root"
        )
    return names


def safe_relative(name: str, where: str) -> str:
    """Check a path from a labels file stays relative and inside its directory; return it normalised."""
    norm = os.path.normpath(name)
    if os.path.isabs(name) or norm == ".." or norm.startswith(".." + os.sep):
        raise PrepError(f"{where}: path {name!r} escapes the input root; labels files must name files relative to the split directory")
    return norm
