"""`kdkit shard folder` on trees as people download them: each gives the classes and labels timm's folder
reader gives the same split folder, or a one-line refusal naming the options."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from timm.data.readers.reader_image_folder import find_images_and_targets

from kdkit.cli import main
from kdkit.errors import KdkitError
from kdkit.shards import contract
from kdkit.shards.sources.folder import list_folder
from kdkit.shards.writer import write_dataset

from conftest import read_with_webdataset
from conftest import shard_cfg as cfg


def put(folder: Path, n: int = 2) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (8, 8), (i * 60, 0, 0)).save(folder / f"{i}.jpg")


def caps(root):  # Kaggle / Windows habit: capitalised split folders
    for s in ("Train", "Val"):
        for c in "abc":
            put(root / s / c)


def training_validation(root):
    for s in ("training", "validation"):
        for c in "abc":
            put(root / s / c)


def intel(root):  # Intel image classification as unzipped: each split wrapped in a folder of its own name
    for s in ("seg_train", "seg_test"):
        for c in ("buildings", "forest"):
            put(root / s / s / c)
    put(root / "seg_pred" / "seg_pred")  # unlabelled


def food_without_lists(root):
    for c in ("apple_pie", "ramen"):
        put(root / "images" / c)
    (root / "meta").mkdir()
    (root / "meta" / "classes.txt").write_text("apple_pie\nramen\n")


def food101(root):  # as downloaded: images/<class>/<id>.jpg, meta/{train,test}.txt list "<class>/<id>"
    for c in ("apple_pie", "ramen"):
        put(root / "images" / c, 4)
    (root / "meta").mkdir()
    (root / "meta" / "classes.txt").write_text("apple_pie\nramen\n")
    (root / "meta" / "labels.txt").write_text("Apple pie\nRamen\n")
    (root / "meta" / "train.txt").write_text("apple_pie/0\napple_pie/1\napple_pie/2\nramen/0\nramen/1\nramen/2\n")
    (root / "meta" / "test.txt").write_text("apple_pie/3\nramen/3\n")


TREES = {"caps": (caps, {"train": "Train", "val": "Val"}),
         "training-validation": (training_validation, {"train": "training", "val": "validation"}),
         "intel": (intel, {"train": "seg_train/seg_train", "test": "seg_test/seg_test"}),
         "food-without-lists": (food_without_lists, {"train": "images"}),
         "food-101": (food101, {"train": "images", "test": "images"})}


@pytest.mark.parametrize("tree", TREES)
def test_tree_gives_timms_classes_and_labels(tree, tmp_path):
    make, folders = TREES[tree]
    root = tmp_path / tree
    make(root)
    out = tmp_path / "out"
    write_dataset(list_folder(root), out, cfg())
    assert sorted(p.parent.name for p in out.glob(f"*/{contract.MANIFEST}")) == sorted(folders)
    for split, folder in folders.items():
        man = json.loads((out / split / contract.MANIFEST).read_text())
        timm_samples, class_to_idx = find_images_and_targets(str(root / folder))
        assert [c["id"] for c in man["classes"]] == sorted(class_to_idx, key=class_to_idx.get)
        ours = {label for _, label in read_with_webdataset(out / split).values()}
        assert ours == set(class_to_idx.values())
        if tree != "food-101":  # Food-101's lists split images/ in two; the others take the whole folder
            assert man["num_samples"] == len(timm_samples)


def test_food101_lists_decide_the_splits_and_labels_names_the_classes(tmp_path):
    food101(tmp_path / "food")
    ds = list_folder(tmp_path / "food")
    assert {s.name: len(s.samples) for s in ds.splits} == {"train": 6, "test": 2}
    assert [(c.id, c.name) for c in ds.classes] == [("apple_pie", "Apple pie"), ("ramen", "Ramen")]
    assert {s.key: s.label for s in ds.splits[1].samples} == {"apple_pie__3": 0, "ramen__3": 1}


def test_ambiguous_tree_is_refused_naming_the_options(tmp_path, capsys):
    root = tmp_path / "mixed"  # a class called "train" among others, or a stray folder beside a split?
    for c in ("train", "bus", "car"):
        put(root / c)
    assert main(["shard", "folder", str(root), str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ambiguous layout" in err and "train" in err
    assert "--layout classes" in err and "--splits train" in err
    assert not (tmp_path / "o").exists()

    ds = list_folder(root, layout="classes")
    assert [c.id for c in ds.classes] == ["bus", "car", "train"] and [s.name for s in ds.splits] == ["train"]
    with pytest.raises(KdkitError, match="without class folders"):  # train/ holds no class folders
        list_folder(root, splits=["train"])


def test_split_named_twice_is_refused(tmp_path, capsys):
    for s in ("train", "Training"):
        for c in "ab":
            put(tmp_path / "t" / s / c)
    assert main(["shard", "folder", str(tmp_path / "t"), str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "both look like the train split" in err and "--splits" in err


def test_summary_line_names_the_classes(tmp_path, capsys):
    intel(tmp_path / "intel")
    assert main(["shard", "folder", str(tmp_path / "intel"), str(tmp_path / "o"), "--quiet", "--workers", "1"]) == 0
    err = capsys.readouterr().err
    assert "train: 4 samples of 2 classes (buildings, forest)" in err
    assert "seg_pred" in err and "unlabelled" in err
