"""What every converter hands to the shard writer.

A converter only *lists* a dataset: classes, and per split the samples with a stable key, a class
index and a `ref` saying how to read its image. Reading happens later, in worker processes, through
kdkit.shards.prepare.read_ref, so refs are plain picklable tuples and the listing stays cheap for a
million images.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


from kdkit.errors import KdkitError
from kdkit.shards.contract import ClassInfo

# Pillow opens these; anything else in a class folder is listed as ignored, not read.
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


@dataclass(frozen=True)
class SourceSample:
    key: str  # unique within the split, stable across runs (contract.key_from_relpath)
    label: int
    ref: tuple  # ("file", path) | ("tfrecord", path, offset, length, feature) | ("hdf5", path, dataset, index)
    origin: str  # what a person should look at when this sample is bad (a path, file@offset)


@dataclass
class SourceSplit:
    name: str
    samples: list[SourceSample]
    ignored: list[tuple[str, str]] = field(default_factory=list)  # (path or LIST:LINE, why) never read


@dataclass
class SourceDataset:
    converter: str  # "imagenet", "folder", "list", "tfrecord", "hdf5"
    root: str
    classes: list[ClassInfo]
    splits: list[SourceSplit]
    info: dict = field(default_factory=dict)  # converter-specific facts for the manifest (label mapping, ...)


def read_lines(path: Path, what: str) -> list[str]:
    """The stripped lines of a text file (label, list or class-name file); line n is lines[n - 1]."""
    try:
        lines = [line.strip() for line in Path(path).read_text(encoding="utf-8-sig").splitlines()]
    except OSError as e:
        raise KdkitError(f"{path}: cannot read {what}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise KdkitError(f"{path}: {what} is not a text file") from None
    while lines and not lines[-1]:
        lines.pop()  # a trailing newline is not an entry; blank lines inside stay, so line numbers hold
    if not lines:
        raise KdkitError(f"{path}: {what} is empty")
    return lines


def split_from_name(name: str) -> str | None:
    """The split a file name starts with: train*, val* (valid, validation) -> val, test*; else None."""
    name = name.lower()
    return next((split for prefix, split in (("train", "train"), ("val", "val"), ("test", "test"))
                 if name.startswith(prefix)), None)
