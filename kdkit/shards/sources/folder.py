"""`kdkit shard folder`: class folders, with or without split folders, as datasets are downloaded.

    ROOT/<class>/<image>                        -> one split (named by --name, default "train")
    ROOT/<split>/<class>/<image>                -> one shard set per split folder
    ROOT/seg_train/seg_train/<class>/<image>    a split folder wrapped in one more of the same name
                                                (Intel scenes as unzipped)
    ROOT/images/<class>/ + ROOT/meta/train.txt, meta/test.txt    Food-101 as downloaded: its split lists

Split folders are recognised by name in any case: train/training -> train, val/valid/validation/eval/
evaluation -> val, test/testing -> test, pred/predict/prediction -> pred, also as one word of a longer
name (seg_train, seg_test). A split folder of loose images without class folders (Intel's seg_pred) is
unlabelled: left out, with a note. ROOT's folders are split folders when every one holding images has a split name;
when only some have, the tree is ambiguous (a class named "train"? a stray folder beside the splits?)
and refused, naming the options: --layout classes or --splits. A ROOT whose only folder with images
holds class folders (Food-101's images/ without its meta lists) is read from that folder.

Class index = position of the folder name in sorted order (torchvision's ImageFolder convention),
taken from the first split (train where present); other splits may not have classes it lacks. timm's
folder reader labels an image by its leaf folder, so it finds the same classes for these trees; it
orders names "naturally" (class2 before class10) where sorted order puts class10 first.

A class folder holding no image at all is not a class: it is left out (and listed in the skip report),
as timm's folder reader ignores it (torchvision's ImageFolder refuses the tree instead). Counting it
would shift every later label by one against timm.
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from kdkit.errors import KdkitError
from kdkit.shards.contract import ClassInfo, unique_keys
from kdkit.shards.sources.base import IMAGE_SUFFIXES, SourceDataset, SourceSample, SourceSplit, read_lines

# split folder names, lowercased -> the split written
SPLITS = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val", "eval": "val",
          "evaluation": "val", "test": "test", "testing": "test", "pred": "pred", "predict": "pred",
          "prediction": "pred"}  # timm's train.py knows train/training and val/valid/validation/eval/evaluation
SPLIT_ORDER = ("train", "val", "test", "pred")
LAYOUTS = ("auto", "splits", "classes")


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


def is_image(name: str) -> bool:
    return not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES


def holds_images(folder: Path) -> bool:
    return any(is_image(f) for _, _, files in os.walk(folder) for f in files)


def loose_images(folder: Path) -> list[Path]:
    """Image files directly in `folder` (not in a sub-folder)."""
    return sorted(p for p in folder.iterdir() if p.is_file() and is_image(p.name))


def split_name(folder: str) -> str | None:
    """The split a folder name says, in any case: the whole name (Train, validation) or one word of it
    (seg_train); None where it says none, or two (train_test)."""
    name = folder.lower()
    if name in SPLITS:
        return SPLITS[name]
    words = {SPLITS[w] for w in re.split(r"[\s_.-]+", name) if w in SPLITS}
    return words.pop() if len(words) == 1 else None


def unwrap(folder: Path) -> Path:
    """seg_train/seg_train/ -> the inner folder: a folder whose only entry is a folder of the same name
    (an archive of that folder unpacked into a folder named after it)."""
    entries = [p for p in folder.iterdir() if not p.name.startswith(".")]
    if len(entries) == 1 and entries[0].is_dir() and entries[0].name.lower() == folder.name.lower():
        return unwrap(entries[0])
    return folder


EMPTY = "empty class folder: not a class (no image in it; timm's folder reader ignores it too)"


def list_class_tree(split_root: Path, classes: dict[str, int], split: str) -> SourceSplit:
    """Every image under split_root/<class>/ (recursively), sorted; non-images listed as ignored, and so
    are images lying loose in split_root (they have no class)."""
    found, ignored = [], [(str(p), "image outside any class folder (no class to give it)")
                          for p in loose_images(split_root)]
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
                if fn.startswith("."):
                    ignored.append((str(path), "hidden file"))
                elif not is_image(fn):
                    ignored.append((str(path), f"not an image file ({path.suffix or 'no suffix'})"))
                else:
                    found.append((path.relative_to(split_root).as_posix(), path, classes[name]))
    keys = unique_keys([rel for rel, _, _ in found])
    return SourceSplit(split, [SourceSample(k, label, ("file", str(p)), str(p))
                               for k, (_, p, label) in zip(keys, found)], ignored)


def _note(text: str) -> None:
    print(f"kdkit: {text}", file=sys.stderr)


def _split_folders(root: Path, folders: list[Path], splits: list[str] | None, layout: str) -> list[tuple[str, Path]]:
    """[(split, folder)] where ROOT's folders are split folders; [] where ROOT's folders are classes."""
    named = {f: split_name(f.name) for f in folders}
    if splits:
        out = []
        for s in splits:
            match = [f for f in folders if f.name == s] or [f for f in folders if named[f] == split_name(s)]
            if not match:
                raise KdkitError(f"{root}: split folder {s} not found (found: "
                                 f"{', '.join(f.name for f in folders) or 'none'})")
            out.append((split_name(s) or s, match[0]))
        return out
    if layout == "classes" or not any(named.values()):
        return []
    if layout == "auto" and not all(named.values()):
        seen = ", ".join(f.name for f in folders if named[f])
        other = ", ".join(f.name for f in folders if not named[f])
        raise KdkitError(f"{root}: ambiguous layout: split folders ({seen}) beside other folders ({other}); pass "
                         f"--layout classes to read every folder of it as a class, or --splits "
                         f"{','.join(f.name for f in folders if named[f])} to write only the split folders")
    by_split: dict[str, list[Path]] = {}
    for f in folders:
        by_split.setdefault(named[f] or f.name, []).append(f)
    twice = [(s, fs) for s, fs in by_split.items() if len(fs) > 1]
    if twice:
        s, fs = twice[0]
        raise KdkitError(f"{root}: {' and '.join(f.name for f in fs)} both look like the {s} split; pass --splits "
                         f"{fs[0].name} (or {fs[1].name}) to choose")
    return sorted(((s, fs[0]) for s, fs in by_split.items()),
                  key=lambda p: (SPLIT_ORDER.index(p[0]) if p[0] in SPLIT_ORDER else len(SPLIT_ORDER), p[0]))


def list_folder(root: Path | str, splits: list[str] | None = None, name: str = "train",
                layout: str = "auto") -> SourceDataset:
    root = require_dir(Path(root))
    if layout not in LAYOUTS:
        raise KdkitError(f"--layout {layout}: expected one of {', '.join(LAYOUTS)}")
    if layout == "auto" and not splits and is_food101(root):
        return list_food101(root)
    folders = [root / c for c in class_dirs(root) if holds_images(root / c)]
    split_roots = _split_folders(root, folders, splits, layout)
    if not split_roots and layout == "auto" and len(folders) == 1 and not loose_images(root) \
            and not loose_images(folders[0]) and any(holds_images(f) for f in folders[0].iterdir() if f.is_dir()):
        # one class would be no classifier: ROOT only wraps the class folders (Food-101's images/)
        _note(f"{root}: its only folder with images, {folders[0].name}/, holds the class folders: reading them")
        return list_folder(folders[0], name=name)
    if split_roots:
        labelled = []
        for split, folder in split_roots:
            inner = unwrap(folder)
            if not any(holds_images(inner / c) for c in class_dirs(inner)):
                if splits:
                    raise KdkitError(f"{inner}: images without class folders (unlabelled); expected "
                                     f"{inner}/<class>/<image>")
                _note(f"{inner}: images without class folders (unlabelled): split {split} left out")
                continue
            labelled.append((split, inner))
        if not labelled:
            raise KdkitError(f"{root}: no split folder holds class folders with images; expected "
                             "ROOT/<split>/<class>/<image>, or pass --layout classes to read ROOT/<class>/<image>")
        split_roots = labelled
        if any(f.relative_to(root).as_posix() != s for s, f in split_roots):  # say how names were read
            _note(f"{root}: split folders " + ", ".join(
                f"{f.relative_to(root).as_posix()} -> {s}" for s, f in split_roots))
    else:
        split_roots = [(name, root)]
    first_root = split_roots[0][1]
    folders = class_dirs(first_root)
    if not folders:
        raise KdkitError(f"{first_root}: no class folders found; expected ROOT/<class>/<image> "
                         "or ROOT/<split>/<class>/<image>")
    first = [c for c in folders if holds_images(first_root / c)]
    if not first:
        raise KdkitError(f"{first_root}: no images in its class folders ({', '.join(folders[:3])}); "
                         f"kdkit reads {', '.join(sorted(IMAGE_SUFFIXES))}")
    classes = {c: i for i, c in enumerate(first)}
    out = [list_class_tree(r, classes, s) for s, r in split_roots]
    return SourceDataset("folder", str(root), [ClassInfo(i, c, c) for c, i in classes.items()], out,
                         info={"class_order": "sorted folder names",
                               "split_folders": {s: str(r.relative_to(root)) for s, r in split_roots}})


# --- Food-101 as downloaded: images/<class>/<id>.jpg, meta/{train,test}.txt ("<class>/<id>" per line),
# meta/classes.txt (class folder names) and meta/labels.txt (their readable names, line by line)

def is_food101(root: Path) -> bool:
    return (root / "images").is_dir() and (root / "meta" / "train.txt").is_file()


def list_food101(root: Path) -> SourceDataset:
    images, meta = root / "images", root / "meta"
    ids = [c for c in class_dirs(images) if holds_images(images / c)]
    names = dict(zip(ids, ids))
    if (meta / "classes.txt").is_file() and (meta / "labels.txt").is_file():
        listed, labels = read_lines(meta / "classes.txt", "class list"), read_lines(meta / "labels.txt", "label list")
        if len(listed) == len(labels):
            names.update({c: n for c, n in zip(listed, labels) if c in names})
    index = {c: i for i, c in enumerate(ids)}
    splits, lists = [], []
    for lst in sorted(meta.glob("*.txt")):
        split = split_name(lst.stem)
        if split is None:
            continue  # classes.txt, labels.txt
        found, ignored = [], []
        for n, line in enumerate(read_lines(lst, "split list"), 1):
            if not line:
                continue
            cls = line.split("/", 1)[0]
            path = images / (line if Path(line).suffix else line + ".jpg")
            if cls not in index:
                ignored.append((f"{lst}:{n}", f"class {cls!r} has no image folder in {images}"))
            elif not path.is_file():
                ignored.append((f"{lst}:{n}", f"no such file {path}"))
            else:
                found.append((path.relative_to(images).as_posix(), path, index[cls]))
        keys = unique_keys([rel for rel, _, _ in found])
        lists.append(f"meta/{lst.name} -> {split}")
        splits.append(SourceSplit(split, [SourceSample(k, label, ("file", str(p)), str(p))
                                          for k, (_, p, label) in zip(keys, found)], ignored))
    splits.sort(key=lambda s: SPLIT_ORDER.index(s.name) if s.name in SPLIT_ORDER else len(SPLIT_ORDER))
    _note(f"{root}: Food-101 layout: images/<class>/ split by {', '.join(lists)}")
    return SourceDataset("folder", str(root), [ClassInfo(i, c, names[c]) for c, i in index.items()], splits,
                         info={"class_order": "sorted folder names", "layout": "food-101 (meta/*.txt split lists)"})
