"""`kdkit shard list`: list files of `relative/path label` lines (the TF2 seed's train_labels.txt)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kdkit.cli import main
from kdkit.errors import KdkitError
from kdkit.shards import contract, tario
from kdkit.shards.sources.listfile import list_listfile
from kdkit.shards.writer import write_dataset

from conftest import jpeg_bytes, read_with_webdataset
from conftest import shard_cfg as cfg

SHARD = ["--samples-per-shard", "3", "--workers", "1", "--quiet"]


def images(root: Path, rels: list[str], seed: int = 0) -> dict[str, bytes]:
    rng = np.random.default_rng(seed)
    made = {}
    for rel in rels:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        made[rel] = jpeg_bytes(rng, 24, 32)
        (root / rel).write_bytes(made[rel])
    return made


def test_integer_labels_round_trip_with_bad_lines_reported_by_line(tmp_path, capsys):
    root = tmp_path / "images"
    made = images(root, ["a/0.jpg", "a/1.jpg", "b/x y.jpg", "c/2.jpg", "v/0.jpg", "v/1.jpg"])
    train = tmp_path / "train_labels.txt"
    train.write_text("# path label\n"          # 1
                     "a/0.jpg 0\n"             # 2
                     "\n"                      # 3
                     "b/x y.jpg\t2\n"          # 4  a space in the path: the label is the last field
                     "a/missing.jpg 1\n"       # 5  no such file
                     "justonefield\n"          # 6  malformed
                     "c/2.jpg -1\n"            # 7  negative label
                     "a/1.jpg 3\n"             # 8
                     "./a/0.jpg 1\n")          # 9  the file of line 2 again
    valid = tmp_path / "valid_labels.txt"
    valid.write_text("v/0.jpg 1\nv/1.jpg 4\n")
    out = tmp_path / "out"
    assert main(["shard", "list", str(train), str(valid), str(out), "--root", str(root), *SHARD]) == 0
    assert "5 classes = largest label 4 + 1" in capsys.readouterr().err  # taken over both files

    assert read_with_webdataset(out / "train") == {
        "a__0": (made["a/0.jpg"], 0), contract.key_from_relpath("b/x y.jpg"): (made["b/x y.jpg"], 2),
        "a__1": (made["a/1.jpg"], 3)}
    assert read_with_webdataset(out / "val") == {"v__0": (made["v/0.jpg"], 1), "v__1": (made["v/1.jpg"], 4)}
    rows = (out / "train" / contract.SKIP_REPORT).read_text().splitlines()[1:]
    assert [r.split("\t")[0] for r in rows] == [f"{train}:{n}" for n in (5, 6, 7, 9)]
    assert "no such file a/missing.jpg" in rows[0] and "expected 'PATH LABEL'" in rows[1]
    assert "label -1 out of range" in rows[2] and f"already listed at {train}:2" in rows[3]
    man = json.loads((out / "train" / contract.MANIFEST).read_text())
    assert man["num_classes"] == 5 and man["ignored_files"] == 4 and man["source"]["converter"] == "list"
    assert man["source"]["class_order"] == "integer labels, class count = largest label + 1"
    assert json.loads((out / "val" / contract.MANIFEST).read_text())["num_classes"] == 5


def test_class_names_with_and_without_a_classes_file(tmp_path):
    root = tmp_path / "images"
    images(root, ["1.jpg", "2.jpg", "3.jpg", "4.jpg", "5.jpg"])
    lst = tmp_path / "train.txt"
    lst.write_text("1.jpg dog\n2.jpg cat\n3.jpg 2\n4.jpg eel\n5.jpg 7\n")
    names = tmp_path / "names.txt"
    names.write_text("dog\ncat\nowl\n")
    ds = list_listfile([lst], root, classes_file=names)
    assert [c.id for c in ds.classes] == ["dog", "cat", "owl"]  # the file's order, not sorted
    assert {s.key: s.label for s in ds.splits[0].samples} == {"1": 0, "2": 1, "3": 2}  # a name, or an index
    assert ds.splits[0].ignored == [(f"{lst}:4", f"class 'eel' is not in {names}"),
                                    (f"{lst}:5", f"label 7 out of range: {names} names 3 classes (0..2)")]

    lst.write_text("1.jpg dog\n2.jpg cat\n4.jpg eel\n")
    ds = list_listfile([lst], root)
    assert [c.id for c in ds.classes] == ["cat", "dog", "eel"]  # sorted, as a class-folder tree
    assert {s.key: s.label for s in ds.splits[0].samples} == {"1": 1, "2": 0, "4": 2}

    lst.write_text("1.jpg dog\n2.jpg 3\n")
    with pytest.raises(KdkitError, match=r"train.txt:2: integer label 3, but .*train.txt:1: class name 'dog'"):
        list_listfile([lst], root)


def test_strict_stops_at_the_first_bad_line_with_nothing_written(tmp_path, capsys):
    root = tmp_path / "images"
    images(root, ["a.jpg", "b.jpg"])
    lst = tmp_path / "train_labels.txt"
    lst.write_text("a.jpg 0\nb.jpg 1\ngone.jpg 1\nb.jpg\n")
    out = tmp_path / "out"
    assert main(["shard", "list", str(lst), str(out), "--root", str(root), "--strict", *SHARD]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{lst}:3: no such file gone.jpg" in err and "--strict; 2 bad lines" in err and "\n" not in err
    assert not out.exists()


@pytest.mark.parametrize("path", ["/etc/passwd", "../outside.jpg", "a/../../outside.jpg"])
def test_a_path_outside_the_root_refuses_the_list(tmp_path, capsys, path):
    root = tmp_path / "images"
    images(root, ["a/b.jpg"])
    (tmp_path / "outside.jpg").write_bytes((root / "a/b.jpg").read_bytes())
    lst = tmp_path / "val.txt"
    lst.write_text(f"a/../a/b.jpg 0\n{path} 0\n")  # ".." that stays inside is fine
    assert main(["shard", "list", str(lst), str(tmp_path / "out"), "--root", str(root), *SHARD]) == 2
    assert f"val.txt:2: path '{path}' is outside --root" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_split_name_and_missing_inputs(tmp_path):
    root = tmp_path / "images"
    images(root, ["a.jpg"])
    lst = tmp_path / "labels.txt"
    lst.write_text("a.jpg 0\n")
    with pytest.raises(KdkitError, match=r"labels.txt: cannot tell the split.*pass --split"):
        list_listfile([lst], root)
    assert [s.name for s in list_listfile([lst], root, split="test").splits] == ["test"]
    with pytest.raises(KdkitError, match=r"nope.txt: list file does not exist"):
        list_listfile([tmp_path / "nope.txt"], root, split="train")
    with pytest.raises(KdkitError, match=r"no-root: image root \(--root\) does not exist"):
        list_listfile([lst], tmp_path / "no-root", split="train")
    lst.write_text("b.jpg 0\n")
    with pytest.raises(KdkitError, match=r"labels.txt: no usable line \(1 bad; the first, line 1: no such file b.jpg"):
        list_listfile([lst], root, split="train")


def test_an_interrupted_list_conversion_resumes_to_the_same_set(tmp_path, monkeypatch):
    root = tmp_path / "images"
    rels = [f"{c}/{i}.jpg" for c in "ab" for i in range(5)]
    images(root, rels)
    lst = tmp_path / "train_labels.txt"
    lst.write_text("".join(f"{r} {r[0] == 'b':d}\n" for r in rels) + "a/none.jpg 0\n")
    ref = tmp_path / "ref"
    write_dataset(list_listfile([lst], root), ref, cfg(samples_per_shard=3))

    out, real, calls = tmp_path / "out", tario.atomic_write_json, []

    def killed_after_two_shards(path, obj):
        if path.parent.name == contract.STATE_DIR and path.name.startswith("train-"):
            calls.append(path.name)
            if len(calls) == 3:
                raise KeyboardInterrupt
        return real(path, obj)

    monkeypatch.setattr(tario, "atomic_write_json", killed_after_two_shards)
    with pytest.raises(KeyboardInterrupt):
        write_dataset(list_listfile([lst], root), out, cfg(samples_per_shard=3))
    monkeypatch.setattr(tario, "atomic_write_json", real)
    assert not (out / "train" / contract.MANIFEST).exists()
    kept = {p.name: p.stat().st_mtime_ns for p in (out / "train").glob("*.tar")}
    assert {"train-000000.tar", "train-000001.tar"} <= set(kept)
    write_dataset(list_listfile([lst], root), out, cfg(samples_per_shard=3))
    assert all((out / "train" / name).stat().st_mtime_ns == t for name, t in kept.items() if name < "train-000002")
    for name in ("manifest.json", contract.SKIP_REPORT):
        assert (out / "train" / name).read_text().replace(str(out), "") == \
            (ref / "train" / name).read_text().replace(str(ref), "")
