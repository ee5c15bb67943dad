"""The ImageNet converter: layouts, the three val label files, devkit id mapping, odd files, CLI."""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image
from scipy.io import savemat

from kdkit.cli import main
from kdkit.errors import KdkitError
from kdkit.shards import contract
from kdkit.shards.sources.imagenet import list_imagenet
from kdkit.shards.writer import write_dataset

from conftest import jpeg_bytes, read_with_webdataset, shard_cfg

WNIDS = ["n01440764", "n01443537", "n01484850"]  # sorted: class indices 0, 1, 2
WORDS = {"n01440764": "tench, Tinca tinca", "n01443537": "goldfish, Carassius auratus",
         "n01484850": "great white shark"}
# The devkit numbers classes in its own order; with these ids `id - 1` is wrong for every class.
DEVKIT_ID = {"n01484850": 1, "n01440764": 2, "n01443537": 3}
# True class of ILSVRC2012_val_00000001.JPEG, ..._00000006.JPEG.
VAL_WNIDS = ["n01484850", "n01440764", "n01443537", "n01440764", "n01484850", "n01443537"]
GT = "ILSVRC2012_validation_ground_truth.txt"


def cfg(**kw):
    return shard_cfg(**{"samples_per_shard": 4, **kw})


def make_train(split_root: Path, per_class: int = 3, seed: int = 0) -> dict[str, tuple[bytes, int]]:
    """split_root/<wnid>/<wnid>_<n>.JPEG; returns {key: (bytes, label)}."""
    rng = np.random.default_rng(seed)
    made = {}
    for label, wnid in enumerate(WNIDS):
        (split_root / wnid).mkdir(parents=True)
        for i in range(per_class):
            data = jpeg_bytes(rng, 32, 40)
            name = f"{wnid}_{1000 + i}.JPEG"
            (split_root / wnid / name).write_bytes(data)
            made[contract.key_from_relpath(f"{wnid}/{name}")] = (data, label)
    return made


def make_flat_val(val_dir: Path, seed: int = 1) -> dict[str, tuple[bytes, int]]:
    """val_dir/ILSVRC2012_val_0000000N.JPEG with the classes of VAL_WNIDS; {key: (bytes, true label)}."""
    rng = np.random.default_rng(seed)
    val_dir.mkdir(parents=True)
    made = {}
    for n, wnid in enumerate(VAL_WNIDS, 1):
        data = jpeg_bytes(rng, 32, 40)
        (val_dir / f"ILSVRC2012_val_{n:08d}.JPEG").write_bytes(data)
        made[f"ILSVRC2012_val_{n:08d}"] = (data, WNIDS.index(wnid))
    return made


def make_devkit(devkit: Path) -> Path:
    """ILSVRC2012_devkit_t12 with data/meta.mat (3 leaves + 1 inner node) and the val ground truth."""
    rows = [(i, w, WORDS[w], 0) for w, i in sorted(DEVKIT_ID.items(), key=lambda kv: kv[1])]
    rows.append((1001, "n02512053", "fish", 3))  # an inner WordNet node: not a class
    synsets = np.empty((len(rows), 1), dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"),
                                              ("num_children", "O")])
    for i, row in enumerate(rows):
        synsets[i, 0] = row
    (devkit / "data").mkdir(parents=True)
    savemat(devkit / "data" / "meta.mat", {"synsets": synsets})
    (devkit / "data" / GT).write_text("".join(f"{DEVKIT_ID[w]}\n" for w in VAL_WNIDS))
    return devkit


def write_synset_labels(path: Path, wnids=VAL_WNIDS) -> Path:
    path.write_text("".join(f"{w}\n" for w in wnids))
    return path


def write_kaggle_csv(path: Path, wnids=VAL_WNIDS) -> Path:
    rows = [f"ILSVRC2012_val_{n:08d},{w} 10 20 30 40 {w} 1 2 3 4" for n, w in enumerate(wnids, 1)]
    path.write_text("ImageId,PredictionString\n" + "\n".join(reversed(rows)) + "\n")  # row order must not matter
    return path


def val_labels_of(ds) -> dict[str, int]:
    (val,) = [s for s in ds.splits if s.name == "val"]
    return {s.key: s.label for s in val.samples}


# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("val_name", ["val", "validation"])
def test_class_folders_round_trip(tmp_path, val_name):
    root = tmp_path / "imagenet"
    made = {"train": make_train(root / "train"), "val": make_train(root / val_name, per_class=2, seed=5)}
    (root / "train" / WNIDS[0] / "notes.txt").write_text("not an image")
    out = tmp_path / "shards"
    manifests = write_dataset(list_imagenet(root), out, cfg())
    assert set(manifests) == {"train", "val"}
    for split in ("train", "val"):
        assert read_with_webdataset(out / split) == made[split]  # each image once, same bytes, right label
        man = json.loads((out / split / contract.MANIFEST).read_text())
        assert [c["id"] for c in man["classes"]] == WNIDS
    assert "notes.txt" in (out / "train" / contract.SKIP_REPORT).read_text()


@pytest.mark.parametrize("fmt", ["devkit", "synset", "kaggle"])
def test_flat_val_label_files(tmp_path, fmt):
    root = tmp_path / "imagenet"
    make_train(root / "train", per_class=1)
    made = make_flat_val(root / "val")
    kw = {}
    if fmt == "devkit":
        kw["devkit"] = make_devkit(tmp_path / "ILSVRC2012_devkit_t12")  # outside ROOT: found via --devkit
    elif fmt == "synset":
        write_synset_labels(root / "imagenet_2012_validation_synset_labels.txt")
    else:
        write_kaggle_csv(root / "LOC_val_solution.csv")
    ds = list_imagenet(root, **kw)
    want = {k: label for k, (_, label) in made.items()}
    assert val_labels_of(ds) == want
    if fmt == "devkit":
        assert all(DEVKIT_ID[w] - 1 != WNIDS.index(w) for w in VAL_WNIDS)  # so `id - 1` would fail this test
        assert ds.info["val_labels"] == "devkit ground truth via meta.mat"
        assert [c.name for c in ds.classes] == [WORDS[w] for w in WNIDS]
    assert ds.info["val_labels_file"].endswith({"devkit": GT, "synset": "synset_labels.txt",
                                                "kaggle": "LOC_val_solution.csv"}[fmt])
    out = tmp_path / "shards"
    write_dataset(ds, out, cfg())
    assert read_with_webdataset(out / "val") == made


def test_explicit_label_file_and_devkit_gt_in_place(tmp_path):
    root = tmp_path / "imagenet"
    make_train(root / "train", per_class=1)
    made = make_flat_val(root / "val")
    want = {k: label for k, (_, label) in made.items()}
    labels = write_synset_labels(tmp_path / "elsewhere.txt")
    assert val_labels_of(list_imagenet(root, val_labels=labels)) == want
    # the ground truth still inside its devkit's data/ finds meta.mat next to it
    devkit = make_devkit(tmp_path / "dk")
    assert val_labels_of(list_imagenet(root, val_labels=devkit / "data" / GT)) == want


def test_val_only_takes_leaf_classes_from_meta(tmp_path):
    root = tmp_path / "imagenet"
    made = make_flat_val(root / "val")
    make_devkit(root / "ILSVRC2012_devkit_t12")  # auto-detected under ROOT
    ds = list_imagenet(root)
    assert [c.id for c in ds.classes] == WNIDS  # the inner node n02512053 is not a class
    assert [s.name for s in ds.splits] == ["val"]
    assert val_labels_of(ds) == {k: label for k, (_, label) in made.items()}


def test_splits_keep_train_class_order(tmp_path):
    root = tmp_path / "imagenet"
    make_train(root / "train")
    make_train(root / "val", per_class=1)
    shutil.rmtree(root / "val" / WNIDS[0])  # val's own folders alone would number its classes 0, 1
    ds = list_imagenet(root, splits=["validation"])
    assert [s.name for s in ds.splits] == ["val"]
    assert sorted(val_labels_of(ds).values()) == [1, 2]
    with pytest.raises(KdkitError, match="test"):
        list_imagenet(root, splits=["test"])


@pytest.mark.parametrize("case, match", [
    ("fewer", r"synset_labels\.txt: 5 labels for 6 images.*fewer"),
    ("more", r"ground_truth\.txt: 7 labels for 6 images.*more"),
    ("csv_missing", r"LOC_val_solution\.csv: no row for 1 of the 6"),
    ("gt_without_meta", r"ground_truth\.txt: .*--devkit"),
    ("not_integer", r"ground_truth\.txt, line 2: 'x2' is not an integer"),
    ("unknown_id", r"ground_truth\.txt, line 1: ILSVRC2012_ID 7 is not a leaf class"),
    ("unknown_wnid", r"synset_labels\.txt, line 3: wnid n09999999"),
    ("no_label_file", r"no label file found.*--val-labels"),
])
def test_val_label_problems_name_the_file(tmp_path, case, match):
    root = tmp_path / "imagenet"
    make_train(root / "train", per_class=1)
    make_flat_val(root / "val")
    kw = {}
    if case in ("fewer", "unknown_wnid"):
        wnids = VAL_WNIDS[:-1] if case == "fewer" else VAL_WNIDS[:2] + ["n09999999"] + VAL_WNIDS[3:]
        write_synset_labels(root / "imagenet_2012_validation_synset_labels.txt", wnids)
    elif case == "csv_missing":
        write_kaggle_csv(root / "LOC_val_solution.csv", VAL_WNIDS[:-1])
    elif case == "gt_without_meta":
        (root / GT).write_text("1\n" * len(VAL_WNIDS))
    elif case != "no_label_file":
        kw["devkit"] = make_devkit(tmp_path / "devkit")
        lines = {"more": ["1"] * 7, "not_integer": ["1", "x2"] + ["1"] * 4, "unknown_id": ["7"] + ["1"] * 5}[case]
        (kw["devkit"] / "data" / GT).write_text("\n".join(lines) + "\n")
    with pytest.raises(KdkitError, match=match) as e:
        list_imagenet(root, **kw)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("layout, match", [("missing", "does not exist"), ("empty", "no train/ or val/"),
                                           ("tars", r"3 \.tar files")])
def test_bad_roots(tmp_path, layout, match):
    root = tmp_path / "imagenet"
    if layout != "missing":
        root.mkdir()
    if layout == "tars":
        (root / "train").mkdir()
        for w in WNIDS:
            (root / "train" / f"{w}.tar").write_bytes(b"")
    with pytest.raises(KdkitError, match=match):
        list_imagenet(root)


def test_cmyk_and_png_named_jpeg_become_rgb_jpeg(tmp_path):
    root = tmp_path / "imagenet"
    make_train(root / "train", per_class=1)
    rgb = Image.open(io.BytesIO(jpeg_bytes(np.random.default_rng(3), 32, 40))).convert("RGB")
    buf = io.BytesIO()
    rgb.convert("CMYK").save(buf, format="JPEG")
    (root / "train" / WNIDS[1] / "n01443537_cmyk.JPEG").write_bytes(buf.getvalue())
    buf = io.BytesIO()
    rgb.save(buf, format="PNG")
    (root / "train" / WNIDS[2] / "n01484850_png.JPEG").write_bytes(buf.getvalue())
    out = tmp_path / "shards"
    write_dataset(list_imagenet(root), out, cfg())
    got = read_with_webdataset(out / "train")
    assert len(got) == 5
    for key, label in [("n01443537__n01443537_cmyk", 1), ("n01484850__n01484850_png", 2)]:
        data, got_label = got[key]
        img = Image.open(io.BytesIO(data))
        img.load()
        assert (img.format, got_label) == ("JPEG", label)
        assert img.mode in ("RGB", "L")
    decoded = next(iter(wds.WebDataset(sorted(str(p) for p in (out / "train").glob("*.tar")),
                                       shardshuffle=False).decode("pil")))
    assert decoded["jpg"].mode in ("RGB", "L")


def test_kaggle_layout(tmp_path):
    root = tmp_path / "imagenet-object-localization-challenge"
    tree = root / "ILSVRC" / "Data" / "CLS-LOC"
    made_train = make_train(tree / "train")
    made_val = make_flat_val(tree / "val")
    write_kaggle_csv(root / "LOC_val_solution.csv")
    (root / "LOC_synset_mapping.txt").write_text(
        "".join(f"{w} {n}\n" for w, n in {**WORDS, "n01491361": "tiger shark"}.items()))  # lists all 1000
    out = tmp_path / "shards"
    write_dataset(list_imagenet(root), out, cfg())
    assert read_with_webdataset(out / "train") == made_train
    assert read_with_webdataset(out / "val") == made_val
    man = json.loads((out / "train" / contract.MANIFEST).read_text())
    assert [(c["id"], c["name"]) for c in man["classes"]] == [(w, WORDS[w]) for w in WNIDS]
    assert man["source"]["layout"] == "kaggle"
    assert man["source"]["converter"] == "imagenet"


def test_cli(tmp_path):
    root = tmp_path / "imagenet"
    made = make_train(root / "train", per_class=2)
    out = tmp_path / "shards"
    args = ["shard", "imagenet", str(root), str(out), "--samples-per-shard", "4", "--workers", "1", "--quiet"]
    assert main(args) == 0
    assert read_with_webdataset(out / "train") == made
    assert main(["shard", "imagenet", str(tmp_path / "nope"), str(tmp_path / "o2"), "--quiet"]) == 2
