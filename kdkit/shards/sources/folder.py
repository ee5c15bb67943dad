"""`kdkit shard folder`: one sub-folder per class, optionally under split folders.

    ROOT/<class>/<image>                  -> one split (named by --name, default "train")
    ROOT/{train,val,test}/<class>/<image> -> one shard set per split folder found

Class index = position of the folder name in sorted order (torchvision's ImageFolder convention),
taken from the first split (train where present); other splits may not have classes it lacks.

A class folder holding no image at all is not a class: it is left out (and listed in the skip report),
so the indices are those timm's folder reader gives the same tree, which ignores such folders
(torchvision's ImageFolder refuses the tree instead). Counting it would shift every later label by
one against timm.
"""
from __future__ import annotations

import os
from pathlib import Path

from kdkit.errors import KdkitError
from kdkit.shards.contract import ClassInfo, key_from_relpath
from kdkit.shards.sources.base import IMAGE_SUFFIXES, SourceDataset, SourceSample, SourceSplit

SPLIT_NAMES = ("train", "val", "valid", "validation", "test")


def require_dir(path: Path, what: str = "dataset folder") -> Path:
    path = Path(path)
    if not path.exists():
        raise KdkitError(f"{path}: {what} does not exist; check the path")
    if not path.is_dir():
        if path.name.endswith((".tar.gz", ".tgz", ".tar", ".zip")):
            raise KdkitError(f"{path}: {what} is an archive; extract it first (e.g. `tar xf {path.name}`) and "
                             "pass the extracted folder")
        raise KdkitError(f"{path}: {what} is not a folder")
    if not os.access(path, os.R_OK | os.X_OK):
        raise KdkitError(f"{path}: {what} is not readable; check its permissions")
    return path


def class_dirs(split_root: Path) -> list[str]:
    return sorted(p.name for p in split_root.iterdir() if p.is_dir() and not p.name.startswith("."))


def holds_images(folder: Path) -> bool:
    return any(Path(f).suffix.lower() in IMAGE_SUFFIXES and not f.startswith(".")
               for _, _, files in os.walk(folder) for f in files)


EMPTY = "empty class folder: not a class (no image in it; timm's folder reader ignores it too)"


def list_class_tree(split_root: Path, classes: dict[str, int], split: str) -> SourceSplit:
    """Every image under split_root/<class>/ (recursively), sorted; non-images listed as ignored."""
    samples, ignored = [], []
    for name in class_dirs(split_root):
        if not holds_images(split_root / name):
            ignored.append((f"{split_root / name}/", EMPTY))
            continue
        if name not in classes:
            raise KdkitError(f"{split_root / name}: class '{name}' of split '{split}' is not among the "
                             f"{len(classes)} classes of the first split; fix the folder or shard the splits separately")
        for dirpath, dirnames, filenames in os.walk(split_root / name):
            dirnames.sort()
            for fn in sorted(filenames):
                path = Path(dirpath) / fn
                rel = path.relative_to(split_root).as_posix()
                if fn.startswith("."):
                    ignored.append((str(path), "hidden file"))
                elif path.suffix.lower() not in IMAGE_SUFFIXES:
                    ignored.append((str(path), f"not an image file ({path.suffix or 'no suffix'})"))
                else:
                    samples.append(SourceSample(key_from_relpath(rel), classes[name], ("file", str(path)), str(path)))
    return SourceSplit(split, samples, ignored)


def list_folder(root: Path | str, splits: list[str] | None = None, name: str = "train") -> SourceDataset:
    root = require_dir(Path(root))
    found = [s for s in SPLIT_NAMES if (root / s).is_dir()]
    if splits:
        missing = [s for s in splits if not (root / s).is_dir()]
        if missing:
            raise KdkitError(f"{root}: split folder(s) {', '.join(missing)} not found (found: {', '.join(found) or 'none'})")
        found = list(splits)
    split_roots = [(s, root / s) for s in found] if found else [(name, root)]
    folders = class_dirs(split_roots[0][1])
    if not folders:
        raise KdkitError(f"{split_roots[0][1]}: no class folders found; expected ROOT/<class>/<image> "
                         "or ROOT/<split>/<class>/<image>")
    first = [c for c in folders if holds_images(split_roots[0][1] / c)]
    if not first:
        raise KdkitError(f"{split_roots[0][1]}: no images in its class folders ({', '.join(folders[:3])}); "
                         f"kdkit reads {', '.join(sorted(IMAGE_SUFFIXES))}")
    classes = {c: i for i, c in enumerate(first)}
    out = [list_class_tree(r, classes, s) for s, r in split_roots]
    return SourceDataset("folder", str(root), [ClassInfo(i, c, c) for c, i in classes.items()], out,
                         info={"class_order": "sorted folder names"})
