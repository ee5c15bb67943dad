"""`kdkit shard list`: list-file datasets, as the TF2 ImageNet seed reads them (`data/train_labels.txt`,
`valid_labels.txt`): one `relative/path label` per line, the paths relative to an image root.

    # comments and blank lines are skipped
    n01440764/n01440764_10026.JPEG 0
    my photos/cat 1.jpg cat              <- the label is the last field, so paths may hold spaces

Labels are class indices or class names, one kind per dataset:
  --classes NAMES_FILE    one class name per line, class index = line position; a label is one of its
                          names, or an index into it
  integers, no --classes  the class count is the largest label + 1 (a class no line uses cannot be
                          known; said on stderr and recorded in the manifest)
  names, no --classes     the classes are the names in sorted order (ImageFolder's convention)
Several list files (train and valid) in one command share one class list, so their indices agree.

A line that cannot become a sample (malformed, naming a missing file, a label out of range, a class
not in NAMES_FILE, a file already listed) is left out and listed in the skip report as LIST:LINE;
--strict stops at it instead. A path outside --root (absolute, or leading out with `..`) refuses the
whole list: the list was written for another root, and reading files outside the root is not wanted.
"""
from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath

from kdkit.errors import KdkitError
from kdkit.shards.contract import ClassInfo, unique_keys
from kdkit.shards.sources.base import SourceDataset, SourceSample, SourceSplit, read_lines, split_from_name
from kdkit.shards.sources.folder import require_dir

INTEGER = re.compile(r"[+-]?\d+")
MAX_PLUS_ONE = "integer labels, class count = largest label + 1"


@dataclass
class _Entry:
    list_file: Path
    line: int
    rel: str  # normalised, "/"-separated, inside the root
    label: str  # as written: a class index or a class name

    @property
    def where(self) -> str:
        return f"{self.list_file}:{self.line}"


def _inside(rel: str) -> str | None:
    """rel normalised to a "/" path inside the root, or None where it is absolute or leads out."""
    if os.path.isabs(rel) or rel.startswith(("/", "\\")) or PureWindowsPath(rel).drive:
        return None
    norm = os.path.normpath(rel.replace("\\", "/")).replace(os.sep, "/")
    return None if norm == ".." or norm.startswith("../") else norm


def _parse(list_file: Path, root: Path, problems: list) -> list[_Entry]:
    entries = []
    for n, line in enumerate(read_lines(list_file, "list file"), 1):
        if not line or line.startswith("#"):
            continue
        fields = line.rsplit(None, 1)  # the last field is the label: a path may hold spaces
        if len(fields) < 2:
            problems.append((list_file, n, f"malformed line {line[:80]!r}: expected 'PATH LABEL'"))
            continue
        rel = _inside(fields[0])
        if rel is None:
            raise KdkitError(f"{list_file}:{n}: path {fields[0]!r} is outside --root {root} (absolute, or leading "
                             "out with '..'); list paths relative to --root, or pass the root the list was "
                             "written for")
        entries.append(_Entry(list_file, n, rel, fields[1]))
    return entries


def _classes(entries: list[_Entry], classes_file: Path | None, problems: list) -> tuple[list[str], dict, str]:
    """(class names, {entry line: class index}, how the classes were found); bad labels go to problems."""
    labels = {}
    if classes_file is not None:
        names = [n for n in read_lines(classes_file, "class-name file") if n and not n.startswith("#")]
        seen: dict[str, int] = {}
        for i, name in enumerate(names):
            if seen.setdefault(name, i) != i:
                raise KdkitError(f"{classes_file}: class '{name}' is named twice; one name per class")
        for e in entries:
            if e.label in seen:  # a name first: names made of digits stay names
                labels[e.where] = seen[e.label]
            elif INTEGER.fullmatch(e.label) and 0 <= int(e.label) < len(names):
                labels[e.where] = int(e.label)
            elif INTEGER.fullmatch(e.label):
                problems.append((e.list_file, e.line, f"label {e.label} out of range: {classes_file} names "
                                 f"{len(names)} classes (0..{len(names) - 1})"))
            else:
                problems.append((e.list_file, e.line, f"class '{e.label}' is not in {classes_file}"))
        return names, labels, f"--classes {classes_file} (line order)"
    ints = [e for e in entries if INTEGER.fullmatch(e.label)]
    words = [e for e in entries if not INTEGER.fullmatch(e.label)]
    if ints and words:
        raise KdkitError(f"{ints[0].where}: integer label {ints[0].label}, but {words[0].where}: class name "
                         f"'{words[0].label}'; labels must be all class indices or all class names (pass --classes "
                         "NAMES_FILE to give both a meaning)")
    if words:
        names = sorted({e.label for e in words})
        index = {name: i for i, name in enumerate(names)}
        return names, {e.where: index[e.label] for e in words}, "sorted class names"
    for e in ints:
        if int(e.label) < 0:
            problems.append((e.list_file, e.line, f"label {e.label} out of range: class indices start at 0"))
        else:
            labels[e.where] = int(e.label)
    count = max(labels.values(), default=-1) + 1
    return [str(i) for i in range(count)], labels, MAX_PLUS_ONE


def list_listfile(list_files: list[Path | str], root: Path | str, classes_file: Path | str | None = None,
                  split: str | None = None, strict: bool = False) -> SourceDataset:
    """List files of `PATH LABEL` lines, paths relative to root; each file's split from its name, or `split`."""
    root = require_dir(Path(root), "image root (--root)")
    list_files = [Path(p) for p in list_files]
    problems: list[tuple[Path, int, str]] = []
    entries, split_of = [], {}
    for f in list_files:
        if not f.is_file():
            raise KdkitError(f"{f}: list file does not exist; check the path")
        split_of[f] = split or split_from_name(f.name)
        if split_of[f] is None:
            raise KdkitError(f"{f}: cannot tell the split from the file name (expected train*, val*/valid* or "
                             "test*); pass --split")
        entries += _parse(f, root, problems)
    names, labels, how = _classes(entries, Path(classes_file) if classes_file else None, problems)

    splits: dict[str, list[SourceSample]] = {}
    first: dict[str, _Entry] = {}  # sample key -> the entry that gave it
    rels = list(dict.fromkeys(e.rel for e in entries))
    key_of = dict(zip(rels, unique_keys(rels)))  # photo.jpg and photo.png: each its own key
    for e in entries:
        if e.where not in labels:
            continue  # its label was reported already
        path = root / e.rel
        key = key_of[e.rel]
        if not path.is_file():
            problems.append((e.list_file, e.line, f"no such file {e.rel} under --root {root}"))
        elif key in first:
            problems.append((e.list_file, e.line, f"{e.rel}: already listed at {first[key].where} "
                                                  f"({first[key].rel}); listed once"))
        else:
            first[key] = e
            splits.setdefault(split_of[e.list_file], []).append(
                SourceSample(key, labels[e.where], ("file", str(path)), f"{path} ({e.where})"))
    problems.sort(key=lambda p: (list_files.index(p[0]), p[1]))
    if strict and problems:
        f, n, why = problems[0]
        raise KdkitError(f"{f}:{n}: {why} (--strict; {len(problems)} bad lines in all; drop --strict to skip them "
                         "and list them in the skip report)")
    for f in list_files:
        if split_of[f] not in splits:  # refused before any split is written, not after the first
            bad = [p for p in problems if p[0] == f]
            raise KdkitError(f"{f}: no usable line ({len(bad)} bad" + (f"; the first, line {bad[0][1]}: {bad[0][2]}"
                                                                        if bad else "") + ")")
    if how == MAX_PLUS_ONE:
        print(f"kdkit: note: {len(names)} classes = largest label {len(names) - 1} + 1 (no --classes file); pass "
              "--classes NAMES_FILE if the dataset has classes no listed image uses", file=sys.stderr)
    ignored: dict[str, list[tuple[str, str]]] = {}
    for f, n, why in problems:
        ignored.setdefault(split_of[f], []).append((f"{f}:{n}", why))
    order = sorted(splits, key=lambda s: (s != "train", s != "val", s))
    classes = [ClassInfo(i, n, "" if how == MAX_PLUS_ONE else n) for i, n in enumerate(names)]
    return SourceDataset("list", str(root), classes,
                         [SourceSplit(s, splits[s], ignored.get(s, [])) for s in order],
                         info={"lists": [str(f) for f in list_files], "class_order": how})
