"""What every converter hands to the shard writer.

A converter only *lists* a dataset: classes, and per split the samples with a stable key, a class
index and a `ref` saying how to read its image. Reading happens later, in worker processes, through
`read_ref`, so refs are plain picklable tuples and the listing stays cheap for a million images.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from kdkit.shards.contract import ClassInfo

# Pillow opens these; anything else in a class folder is listed as ignored, not read.
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


@dataclass(frozen=True)
class SourceSample:
    key: str  # unique within the split, stable across runs (contract.key_from_relpath)
    label: int
    ref: tuple  # ("file", path) | ("tfrecord", path, offset, length) | ("hdf5", path, dataset, index)
    origin: str  # what a person should look at when this sample is bad (a path, file@offset)


@dataclass
class SourceSplit:
    name: str
    samples: list[SourceSample]
    ignored: list[tuple[str, str]] = field(default_factory=list)  # (path, why) never read


@dataclass
class SourceDataset:
    converter: str  # "imagenet", "folder", "tfrecord", "hdf5"
    root: str
    classes: list[ClassInfo]
    splits: list[SourceSplit]
    info: dict = field(default_factory=dict)  # converter-specific facts for the manifest (label mapping, ...)


def read_ref(ref: tuple) -> bytes | np.ndarray:
    """Encoded image bytes, or a uint8 pixel array (HDF5 arrays), for one sample ref."""
    kind = ref[0]
    if kind == "file":
        with open(ref[1], "rb") as f:
            return f.read()
    if kind == "tfrecord":
        from kdkit.shards.sources import tfrecord

        return tfrecord.read_image(ref)
    if kind == "hdf5":
        from kdkit.shards.sources import hdf5

        return hdf5.read_image(ref)
    raise ValueError(f"unknown sample ref kind {kind!r}")
