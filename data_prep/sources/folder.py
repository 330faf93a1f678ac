"""An image-folder tree (`data-prep folder`): TRAIN/<class>/<image>, optionally VAL/<class>/… and TEST/<class>/….

Classes are the sorted subdirectory names of the train tree; val/test may only use those classes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from data_prep.sources.base import PrepError, Source, class_dirs, list_files, missing_error
from hpcdnn.data.schema import SPLITS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--train", required=True, type=Path, help="training tree: DIR/<class>/<image>")
    p.add_argument("--val", type=Path, help="validation tree with the same class directories")
    p.add_argument("--test", type=Path, help="test tree with the same class directories")


def open_source(args: argparse.Namespace) -> Source:
    trees = {s: getattr(args, s) for s in SPLITS if getattr(args, s) is not None}
    missing = [f"{d} (--{s})" for s, d in trees.items() if not d.is_dir()]
    if missing:
        raise missing_error(missing, "Fix: pass existing directories laid out as DIR/<class>/<image>.")
    roots = {s: d.resolve() for s, d in trees.items()}
    names = class_dirs(roots["train"], roots["train"])
    if not names:
        raise PrepError(f"--train {args.train} has no class subdirectories (expected DIR/<class>/<image>)")
    index = {n: i for i, n in enumerate(names)}
    splits = {}
    for split, root in roots.items():
        here = class_dirs(root, root)
        unknown = [n for n in here if n not in index]
        if unknown:
            raise PrepError(
                f"--{split} {trees[split]} has classes not in --train: {unknown[:10]}; add them to the training tree or remove them"
            )
        splits[split] = [it for n in here for it in list_files(root / n, root, index[n], f"{n}/")]
    classes = [{"index": i, "wnid": n, "name": n} for i, n in enumerate(names)]
    return Source("folder", (args.size, args.size, 3), classes, splits)
