"""`kdkit shard imagenet`: ILSVRC2012 as image-net.org or Kaggle ship it.

    ROOT/train/<wnid>/*.JPEG
    ROOT/val/<wnid>/*.JPEG              val already sorted into class folders (val/ or validation/), or
    ROOT/val/ILSVRC2012_val_*.JPEG      flat, labelled by one of
        ILSVRC2012_validation_ground_truth.txt   devkit ILSVRC2012_IDs, one per line (needs data/meta.mat)
        imagenet_2012_validation_synset_labels.txt   one wnid per line
        LOC_val_solution.csv                     Kaggle: ImageId,PredictionString ("wnid x1 y1 x2 y2 ...")
    ROOT/ILSVRC/Data/CLS-LOC/{train,val}  the Kaggle tree (LOC_* files next to ILSVRC/)

Class index = position of the wnid in sorted order (torchvision ImageFolder / timm). The devkit
numbers its 1000 classes in a different (WordNet-tree) order, so its ids must go through meta.mat:
`id - 1` would silently mislabel almost every validation image.
"""
from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

from kdkit.errors import KdkitError
from kdkit.shards.contract import ClassInfo, key_from_relpath
from kdkit.shards.sources.base import IMAGE_SUFFIXES, SourceDataset, SourceSample, SourceSplit, read_lines
from kdkit.shards.sources.folder import class_dirs, list_class_tree, require_dir

DEVKIT_GT = "ILSVRC2012_validation_ground_truth.txt"
SYNSET_LABELS = "imagenet_2012_validation_synset_labels.txt"
KAGGLE_VAL = "LOC_val_solution.csv"
DEVKIT_DIR = "ILSVRC2012_devkit_t12"
NAME_FILES = ("LOC_synset_mapping.txt", "synset_words.txt")  # "wnid words..." per line (Kaggle, Caffe)
KAGGLE_TREE = ("ILSVRC/Data/CLS-LOC", "Data/CLS-LOC")  # from the download root, or from ILSVRC/
SPLIT_ALIASES = {"train": "train", "val": "val", "validation": "val"}
WNID = re.compile(r"n\d{8}")


@dataclass
class _Meta:
    path: Path
    wnid_of_id: dict[int, str]  # devkit ILSVRC2012_ID -> wnid, leaf classes only
    words: dict[str, str]


def _load_meta(path: Path) -> _Meta:
    """The devkit's data/meta.mat, read as torchvision's parse_meta_mat does."""
    from scipy.io import loadmat

    try:
        synsets = loadmat(str(path), squeeze_me=True)["synsets"]
        rows = list(zip(synsets["ILSVRC2012_ID"].ravel(), synsets["WNID"].ravel(),
                        synsets["words"].ravel(), synsets["num_children"].ravel()))
    except (KeyError, ValueError, IndexError) as e:
        # synsets without a field shows up as ValueError ("no field of name ..."), not KeyError
        raise KdkitError(f"{path}: not the devkit's meta.mat (expected a 'synsets' struct with fields "
                         f"ILSVRC2012_ID, WNID, words, num_children): {e}") from None
    except Exception as e:  # scipy raises assorted types for files that are not MATLAB v5
        raise KdkitError(f"{path}: cannot read as a MATLAB file: {type(e).__name__}: {e}") from None
    # Entries with children are WordNet inner nodes (1860 synsets in all); only the leaves are classes.
    leaves = [(int(i), str(w), str(words)) for i, w, words, kids in rows if int(kids) == 0]
    return _Meta(path, {i: w for i, w, _ in leaves}, {w: words for _, w, words in leaves})


def _read_names(path: Path) -> dict[str, str]:
    names = {}
    for line in read_lines(path, "class-name file"):
        wnid, _, words = line.partition(" ")
        if wnid:
            names[wnid] = words.strip()
    return names


def _val_labels(path: Path, images: list[Path], meta: _Meta | None) -> tuple[list[tuple[str, str]], str]:
    """(wnid, where-in-the-file) for each image (sorted by name), and how the file was read."""
    lines = read_lines(path, "val label file")
    if path.suffix.lower() == ".csv" or lines[0].lower().startswith("imageid"):
        return _kaggle_labels(path, images), "LOC_val_solution.csv (first wnid of PredictionString)"
    if len(lines) != len(images):
        raise KdkitError(f"{path}: {len(lines)} labels for {len(images)} images in {images[0].parent} "
                         f"({'more' if len(lines) > len(images) else 'fewer'} labels than images); the file needs one "
                         "line per image, in sorted file-name order")
    if WNID.fullmatch(lines[0]):
        for n, line in enumerate(lines, 1):
            if not WNID.fullmatch(line):
                raise KdkitError(f"{path}, line {n}: {line!r} is not a wnid (nXXXXXXXX) like the lines before it")
        return [(w, f"line {n}") for n, w in enumerate(lines, 1)], "synset label file (one wnid per line)"
    if not lines[0].isdigit():
        raise KdkitError(f"{path}: not a known val label file (expected the devkit's {DEVKIT_GT}, one wnid per "
                         f"line, or {KAGGLE_VAL}); first line is {lines[0][:60]!r}")
    if meta is None and (path.parent / "meta.mat").is_file():
        meta = _load_meta(path.parent / "meta.mat")  # the file still sits in its devkit's data/
    if meta is None:
        raise KdkitError(f"{path}: holds devkit ILSVRC2012_IDs, which number classes in the devkit's own order, "
                         "not the sorted-wnid class index; mapping them needs the devkit's data/meta.mat: "
                         f"pass --devkit path/to/{DEVKIT_DIR}")
    out = []
    for n, line in enumerate(lines, 1):
        if not line.isdigit():
            raise KdkitError(f"{path}, line {n}: {line!r} is not an integer ILSVRC2012_ID")
        if int(line) not in meta.wnid_of_id:
            raise KdkitError(f"{path}, line {n}: ILSVRC2012_ID {line} is not a leaf class in {meta.path}")
        out.append((meta.wnid_of_id[int(line)], f"line {n}"))
    return out, "devkit ground truth via meta.mat"


def _kaggle_labels(path: Path, images: list[Path]) -> list[tuple[str, str]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            if not {"ImageId", "PredictionString"} <= set(reader.fieldnames or ()):
                raise KdkitError(f"{path}: expected the header ImageId,PredictionString, got {reader.fieldnames}")
            rows: dict[str, tuple[str, str]] = {}
            for row in reader:
                where = f"line {reader.line_num}"
                image_id, tokens = (row["ImageId"] or "").strip(), (row["PredictionString"] or "").split()
                if not image_id or not tokens or not WNID.fullmatch(tokens[0]):
                    raise KdkitError(f"{path}, {where}: expected 'ImageId,wnid x1 y1 x2 y2 ...', got {row}")
                if image_id in rows:
                    raise KdkitError(f"{path}, {where}: ImageId {image_id} appears twice")
                rows[image_id] = (tokens[0], where)
    except (OSError, csv.Error) as e:
        raise KdkitError(f"{path}: cannot read val label file: {getattr(e, 'strerror', None) or e}") from None
    missing = [p.name for p in images if p.stem not in rows]
    if missing:
        raise KdkitError(f"{path}: no row for {len(missing)} of the {len(images)} val images "
                         f"(fewer labels than images), e.g. {missing[0]}")
    extra = sorted(set(rows) - {p.stem for p in images})
    if extra:
        raise KdkitError(f"{path}: {len(extra)} rows name images not in {images[0].parent} "
                         f"(more labels than images), e.g. {extra[0]}")
    return [rows[p.stem] for p in images]


def _flat_files(val_dir: Path) -> tuple[list[Path], list[tuple[str, str]]]:
    images, ignored = [], []
    for p in sorted(val_dir.iterdir(), key=lambda p: p.name):
        if p.is_dir():
            ignored.append((str(p), "folder inside a flat val/ (not read)"))
        elif p.name.startswith("."):
            ignored.append((str(p), "hidden file"))
        elif p.suffix.lower() not in IMAGE_SUFFIXES:
            ignored.append((str(p), f"not an image file ({p.suffix or 'no suffix'})"))
        else:
            images.append(p)
    return images, ignored


def _loose_files(split_root: Path) -> list[tuple[str, str]]:
    return [(str(p), "not in a class folder") for p in sorted(split_root.iterdir()) if p.is_file()]


def _first_file(paths) -> Path | None:
    return next((p for p in paths if p.is_file()), None)


def _split_dirs(root: Path) -> tuple[Path, str, dict[str, Path]]:
    for base, layout in [(root, "image-net.org")] + [(root / t, "kaggle") for t in KAGGLE_TREE]:
        found = {"train": base / "train"} if (base / "train").is_dir() else {}
        val = next((base / n for n in ("val", "validation") if (base / n).is_dir()), None)
        if val is not None:
            found["val"] = val
        if found:
            return base, layout, found
    raise KdkitError(f"{root}: no train/ or val/ folder found; expected ROOT/train/<wnid>/*.JPEG and/or ROOT/val/, "
                     "or the Kaggle tree ROOT/ILSVRC/Data/CLS-LOC/{train,val}")


def _train_classes(train: Path) -> list[str]:
    wnids = class_dirs(train)
    if not wnids:
        tars = sorted(train.glob("*.tar"))
        hint = (f"it holds {len(tars)} .tar files: extract each into a folder named after it (n01440764.tar -> "
                "n01440764/)" if tars else "expected train/<wnid>/*.JPEG")
        raise KdkitError(f"{train}: no class folders; {hint}")
    return wnids


def list_imagenet(root: Path | str, splits: list[str] | None = None, val_labels: Path | str | None = None,
                  devkit: Path | str | None = None, class_names: Path | str | None = None) -> SourceDataset:
    root = require_dir(Path(root), "ImageNet root")
    base, layout, found = _split_dirs(root)
    wanted = list(found)
    if splits:
        unknown = [s for s in splits if s not in SPLIT_ALIASES]
        if unknown:
            raise KdkitError(f"--splits {','.join(unknown)}: ImageNet has the splits train and val")
        wanted = list(dict.fromkeys(SPLIT_ALIASES[s] for s in splits))
        missing = [s for s in wanted if s not in found]
        if missing:
            raise KdkitError(f"{base}: split folder(s) {', '.join(missing)} not found (found: {', '.join(found)})")
    info: dict = {"layout": layout, "class_order": "sorted wnids"}

    if devkit is not None:
        devkit = require_dir(Path(devkit), "devkit folder")
        if not (devkit / "data" / "meta.mat").is_file():
            raise KdkitError(f"{devkit}: no data/meta.mat; --devkit expects the {DEVKIT_DIR} folder")
    elif (root / DEVKIT_DIR / "data" / "meta.mat").is_file():
        devkit = root / DEVKIT_DIR
    meta = _load_meta(devkit / "data" / "meta.mat") if devkit is not None else None
    if meta is not None:
        info["devkit_meta"] = str(meta.path)

    # Flat val labels are read before classes exist: with no train/ they may be the only class list.
    val_dir = found.get("val")
    val_classes = class_dirs(val_dir) if val_dir is not None else []
    flat = None
    if "val" in wanted and not val_classes:
        images, ignored = _flat_files(val_dir)
        if not images:
            raise KdkitError(f"{val_dir}: no images and no class folders")
        label_path = Path(val_labels) if val_labels is not None else _first_file(
            ([devkit / "data" / DEVKIT_GT] if devkit is not None else [])
            + [d / n for d in dict.fromkeys([root, base, val_dir]) for n in (KAGGLE_VAL, SYNSET_LABELS, DEVKIT_GT)])
        if label_path is None:
            raise KdkitError(f"{val_dir}: {len(images)} images not in class folders and no label file found "
                             f"({KAGGLE_VAL}, {SYNSET_LABELS} or {DEVKIT_GT} under {root}); pass --val-labels FILE "
                             f"(and --devkit {DEVKIT_DIR} for the devkit's ground truth)")
        if not label_path.is_file():
            raise KdkitError(f"{label_path}: val label file does not exist")
        labels, how = _val_labels(label_path, images, meta)
        flat = images, ignored, labels, label_path
        info.update(val_labels=how, val_labels_file=str(label_path))
    elif "val" in wanted:
        info["val_labels"] = "val class folders"

    names_path = Path(class_names) if class_names is not None else _first_file(
        d / n for d in dict.fromkeys([root, base]) for n in NAME_FILES)
    names = _read_names(names_path) if names_path is not None else {}

    if "train" in found:
        wnids, source = _train_classes(found["train"]), "train class folders"
    elif val_classes:
        wnids, source = val_classes, "val class folders"
    elif meta is not None:
        wnids, source = sorted(meta.words), "devkit meta.mat leaf synsets"
    elif names:
        wnids, source = sorted(names), f"class-name file {names_path}"
    elif flat is not None:
        wnids, source = sorted({w for w, _ in flat[2]}), f"wnids in {flat[3]}"
    else:
        raise KdkitError(f"{root}: cannot tell the classes: no train/ class folders, no val/ class folders, "
                         "no --devkit and no --class-names")
    info["class_source"] = source
    if names_path is not None:
        if not set(wnids) & set(names):
            raise KdkitError(f"{names_path}: none of the {len(wnids)} wnids (e.g. {wnids[0]}) has a name in this file; "
                             "expected 'wnid name...' per line")
        info["class_names_file"] = str(names_path)
    elif meta is not None:
        names = meta.words
    index = {w: i for i, w in enumerate(wnids)}
    classes = [ClassInfo(i, w, names.get(w) or w) for i, w in enumerate(wnids)]

    out = []
    if "train" in wanted:
        train = list_class_tree(found["train"], index, "train")
        train.ignored[:0] = _loose_files(found["train"])
        out.append(train)
    if flat is not None:
        images, ignored, labels, label_path = flat
        samples = []
        for p, (wnid, where) in zip(images, labels):
            if wnid not in index:
                raise KdkitError(f"{label_path}, {where}: wnid {wnid} (for {p.name}) is not one of the "
                                 f"{len(wnids)} classes taken from the {source}")
            samples.append(SourceSample(key_from_relpath(p.name), index[wnid], ("file", str(p)), str(p)))
        out.append(SourceSplit("val", samples, ignored))
    elif "val" in wanted:
        val = list_class_tree(val_dir, index, "val")
        val.ignored[:0] = _loose_files(val_dir)
        out.append(val)
    return SourceDataset("imagenet", str(root), classes, out, info=info)
