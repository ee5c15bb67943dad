"""Shared fixtures: tiny generated datasets and shard sets, so every test runs in seconds."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CLASSES = ["cat", "dog", "eel"]


def shard_cfg(**kw):
    """A ShardConfig for tests: one worker, no progress bars, 5 samples per shard unless given."""
    from kdkit.shards.writer import ShardConfig

    return ShardConfig(**{"workers": 1, "progress": False, "samples_per_shard": 5, **kw})


def read_with_webdataset(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Stock webdataset, no kdkit code: {key: (jpg bytes, label)}; a sample seen twice fails."""
    import webdataset as wds

    out = {}
    for s in wds.WebDataset(sorted(str(p) for p in folder.glob("*.tar")), shardshuffle=False, empty_check=False):
        assert s["__key__"] not in out, "a sample appears twice"
        out[s["__key__"]] = (s["jpg"], int(s["cls"]))
    return out


def jpeg_bytes(rng: np.random.Generator, h: int = 40, w: int = 52, quality: int = 90) -> bytes:
    """A random but smooth-ish RGB JPEG (smooth so JPEG round trips are meaningful)."""
    small = rng.integers(0, 255, (max(2, h // 8), max(2, w // 8), 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR)
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def make_class_tree(root: Path, classes=CLASSES, per_class: int = 6, seed: int = 0, size=(40, 52),
                    splits=("train",)) -> dict[str, dict[str, tuple[bytes, int]]]:
    """root/<split>/<class>/<class>_<i>.jpg; returns {split: {relpath: (bytes, label)}}."""
    rng = np.random.default_rng(seed)
    made: dict[str, dict[str, tuple[bytes, int]]] = {}
    for split in splits:
        made[split] = {}
        for label, c in enumerate(classes):
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                data = jpeg_bytes(rng, *size)
                (d / f"{c}_{i}.jpg").write_bytes(data)
                made[split][f"{c}/{c}_{i}.jpg"] = (data, label)
    return made


@pytest.fixture
def class_tree(tmp_path):
    """A train/val class-folder dataset of 3 classes x 6 JPEGs, with the bytes written."""
    root = tmp_path / "raw"
    made = make_class_tree(root, splits=("train", "val"))
    return root, made


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory):
    """A finished shard set (train + val, 3 classes, 24/12 images of 64x80) written by kdkit itself."""
    from kdkit.shards.sources.folder import list_folder
    from kdkit.shards.writer import ShardConfig, write_dataset

    base = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(1)
    for split, n in (("train", 8), ("val", 4)):
        for c in CLASSES:
            d = base / "raw" / split / c
            d.mkdir(parents=True)
            for i in range(n):
                (d / f"{c}_{i}.jpg").write_bytes(jpeg_bytes(rng, 64, 80))
    out = base / "shards"
    write_dataset(list_folder(base / "raw"), out, ShardConfig(samples_per_shard=10, workers=1, progress=False))
    return out


def cuda_only(test):
    """A test of the GPU path: marked `gpu` (`pytest -m gpu`, scripts/gpu_check.sh) and skipped without CUDA."""
    import torch

    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")(test))
