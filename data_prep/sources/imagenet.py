"""ILSVRC-2012 and ILSVRC-2010 (`data-prep imagenet`).

Layout: ROOT/train/<wnid>/*.JPEG, ROOT/val/ILSVRC20xx_val_%08d.JPEG, (2010) ROOT/test/ILSVRC2010_test_%08d.JPEG.
Labels of val/test come from the devkit: the ground-truth file holds one ILSVRC20xx_ID per image, and meta.mat
maps ID -> WNID (IDs are *not* in sorted-WNID order). A plain `filename wnid` file may be given instead.
Class indices are 0..K-1 in sorted WNID order (the torchvision/Caffe convention).
A split directory may be a symlink (e.g. to a parallel file system); class directories and files inside it may not
lead out of it (such files are rejected with the reason, such class directories refused).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from data_prep.sources.base import Item, PrepError, Source, class_dirs, list_files, missing_error, safe_relative
from hpcdnn.data.schema import SPLITS

DEVKIT_DIRS = {"2012": "ILSVRC2012_devkit_t12", "2010": "ILSVRC2010_devkit-1.0"}
INDEX_RE = re.compile(r"_(\d{8})\.[A-Za-z]+$")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", required=True, type=Path, help="directory holding train/, val/ (and test/ for 2010)")
    p.add_argument("--devkit", type=Path, help="devkit directory (default: ROOT/ILSVRC2012_devkit_t12 or ROOT/ILSVRC2010_devkit-1.0)")
    p.add_argument("--year", choices=sorted(DEVKIT_DIRS), help="ILSVRC year (default: guessed from the devkit or val/ names)")
    p.add_argument("--splits", help="comma-separated splits to prepare (default: those present, with labels)")
    p.add_argument("--val-labels", type=Path, help="plain 'filename wnid' file for val/, instead of the devkit")
    p.add_argument("--test-labels", type=Path, help="plain 'filename wnid' file for test/, instead of the devkit")


def read_meta(path: Path) -> dict[int, tuple[str, str]]:
    """meta.mat -> {ILSVRC ID: (wnid, words)} for the leaf synsets (num_children == 0)."""
    from scipy.io import loadmat

    try:
        synsets = loadmat(str(path), squeeze_me=True, struct_as_record=False)["synsets"]
    except Exception as e:
        raise PrepError(f"{path}: not a readable devkit meta.mat ({type(e).__name__}: {e}); point --devkit at the unpacked devkit") from e
    out = {}
    for s in synsets.ravel():
        id_field = next((f for f in s._fieldnames if f.endswith("_ID") and f.startswith("ILSVRC")), None)
        if id_field is None:
            raise PrepError(f"{path}: synsets have no ILSVRC20xx_ID field (fields: {s._fieldnames})")
        if int(getattr(s, "num_children", 0)) == 0:
            out[int(getattr(s, id_field))] = (str(s.WNID), str(s.words))
    return out


def read_plain_labels(path: Path) -> dict[str, str]:
    """A 'filename wnid' file -> {filename: wnid}; paths escaping the split directory are refused."""
    labels = {}
    try:
        text = path.read_text()
    except UnicodeDecodeError as e:
        raise PrepError(f"{path}: not UTF-8 text ({e}); a labels file holds 'filename wnid' lines") from None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise PrepError(f"{path}:{n}: expected 'filename wnid', got {line!r}")
        labels[safe_relative(parts[0], f"{path}:{n}")] = parts[1]
    return labels


def guess_year(root: Path, devkit: Path | None) -> str:
    if devkit is not None:
        for year, name in DEVKIT_DIRS.items():
            if name in str(devkit) or (devkit / "data" / f"ILSVRC{year}_validation_ground_truth.txt").exists():
                return year
    for year, name in DEVKIT_DIRS.items():
        if (root / name).is_dir():
            return year
    val = root / "val"
    if val.is_dir() and any(p.name.startswith("ILSVRC2010_") for p in val.iterdir()):
        return "2010"
    return "2012"


def open_source(args: argparse.Namespace) -> Source:
    root = args.root.resolve()
    if not root.is_dir():
        raise PrepError(f"--root {args.root} is not a directory; point it at the folder holding train/ and val/")
    year = args.year or guess_year(root, args.devkit)
    devkit = (args.devkit or root / DEVKIT_DIRS[year]).resolve()
    data = devkit / "data"
    meta_path = data / "meta.mat"
    truth = {"val": data / f"ILSVRC{year}_validation_ground_truth.txt", "test": data / f"ILSVRC{year}_test_ground_truth.txt"}
    plain = {"val": args.val_labels, "test": args.test_labels}

    present = [s for s in SPLITS if (root / s).is_dir()]
    if args.splits:
        wanted = [s.strip() for s in args.splits.split(",") if s.strip()]
        bad = [s for s in wanted if s not in SPLITS]
        if bad:
            raise PrepError(f"--splits {args.splits!r}: unknown split(s) {bad}; choose from train, val, test")
        notes = []
    else:
        wanted = [s for s in present if s == "train" or plain[s] or truth[s].exists()]
        notes = [
            f"{root / s}/ left out: no labels ({truth[s]} missing; pass --{s}-labels FILE to include it)"
            for s in present
            if s not in wanted
        ]
        if not wanted:
            raise PrepError(f"{root} has no train/, val/ or test/ directory (ILSVRC layout: ROOT/train/<wnid>/*.JPEG, ROOT/val/*.JPEG)")

    missing = [f"{root / s}/ (split directory)" for s in wanted if s not in present]
    for s in ("val", "test"):
        if s in wanted:
            if plain[s] is not None:
                missing += [] if plain[s].is_file() else [f"{plain[s]} (--{s}-labels)"]
            else:
                missing += [f"{p} (devkit)" for p in (truth[s], meta_path) if not p.is_file()]
    if missing:
        raise missing_error(
            missing,
            f"Fix: unpack the ILSVRC{year} devkit (or pass --devkit DIR), or give --val-labels/--test-labels 'filename wnid' files.",
        )

    meta = read_meta(meta_path) if meta_path.is_file() else {}
    words = {w: name for w, name in meta.values()}
    if "train" in wanted:
        train = (root / "train").resolve()  # a split directory may be a symlink; nothing may leave it
        wnids = class_dirs(train, train)
        if not wnids:
            raise PrepError(f"{root / 'train'} has no class directories (expected train/<wnid>/*.JPEG)")
        unknown = [w for w in wnids if meta and w not in words]
        if unknown:
            raise PrepError(
                f"train/ has {len(unknown)} WNID(s) not among the devkit's leaf synsets: {unknown[:10]}; remove them or use the matching devkit"
            )
    elif meta:
        wnids = sorted(words)
    else:
        wnids = sorted({w for s in ("val", "test") if s in wanted for w in read_plain_labels(plain[s]).values()})
    index = {w: i for i, w in enumerate(wnids)}
    classes = [{"index": i, "wnid": w, "name": words.get(w, w)} for i, w in enumerate(wnids)]

    splits = {}
    for s in wanted:
        if s == "train":
            splits[s] = [it for w in wnids for it in list_files(train / w, train, index[w], f"train/{w}/")]
        else:
            labels = read_plain_labels(plain[s]) if plain[s] else devkit_labels(root / s, truth[s], meta)
            splits[s] = labelled_items(root, s, labels, index, source=str(plain[s] or truth[s]))
    return Source(f"imagenet-{year}", (args.size, args.size, 3), classes, splits, notes=notes)


def devkit_labels(split_dir: Path, truth: Path, meta: dict[int, tuple[str, str]]) -> dict[str, str]:
    """{filename: wnid} for a val/test directory from the devkit ground truth (line i = image i)."""
    ids = [int(x) for x in truth.read_text().split()]
    labels = {}
    for path in sorted(split_dir.iterdir()):
        m = INDEX_RE.search(path.name)
        if path.name.startswith(".") or not m:
            continue
        i = int(m.group(1))
        if not 1 <= i <= len(ids):
            raise PrepError(f"{path}: image number {i} has no line in {truth} ({len(ids)} lines); is this the devkit of the same year?")
        if ids[i - 1] not in meta:
            raise PrepError(f"{truth}:{i}: ILSVRC ID {ids[i - 1]} is not a leaf synset in meta.mat")
        labels[path.name] = meta[ids[i - 1]][0]
    return labels


def labelled_items(root: Path, split: str, labels: dict[str, str], index: dict[str, int], source: str) -> list[Item]:
    """Items of a val/test split: every label must name a known WNID and an existing file, and every file a label."""
    unknown = sorted({w for w in labels.values() if w not in index})
    if unknown:
        raise PrepError(
            f"{source} names {len(unknown)} WNID(s) that are not training classes: {unknown[:10]}; use the labels file matching this train/"
        )
    split_dir = (root / split).resolve()
    files = {it.key.split("/", 1)[1]: it for it in list_files(split_dir, split_dir, -1, f"{split}/")}
    absent = sorted(set(labels) - set(files))
    unlabelled = sorted(set(files) - set(labels))
    if absent or unlabelled:
        raise PrepError(
            f"{split}/ and its labels {source} disagree: {len(absent)} labelled file(s) missing {absent[:5]}, "
            f"{len(unlabelled)} file(s) without a label {unlabelled[:5]}; restore the files or fix the labels"
        )
    return [Item(it.key, index[labels[name]], it.path, reject=it.reject) for name, it in sorted(files.items())]
