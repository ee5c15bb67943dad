"""TFRecord (no TensorFlow) and HDF5 converters: round trips read back with stock webdataset, and refusals."""
from __future__ import annotations

import gzip
import io
import json
import struct
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from kdkit.cli import main
from kdkit.errors import KdkitError
from kdkit.shards import contract
from kdkit.shards.sources import hdf5, tfrecord
from kdkit.shards.sources.hdf5 import list_hdf5
from kdkit.shards.sources.tfrecord import list_tfrecords
from kdkit.shards.writer import write_dataset

from conftest import jpeg_bytes, read_with_webdataset
from conftest import shard_cfg as cfg

SYNSETS = ["n01440764", "n01443537", "n01484850"]  # sorted, as TF-slim numbers them (label = position + 1)
TEXTS = ["tench", "goldfish", "great white shark"]


# --- a TFRecord writer written from the format description, sharing no code with the reader ------

def crc32c_bitwise(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
    return crc ^ 0xFFFFFFFF


def masked(data: bytes) -> int:
    c = crc32c_bitwise(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def varint(x: int) -> bytes:
    x &= (1 << 64) - 1
    out = bytearray()
    while x >= 0x80:
        out.append(x & 0x7F | 0x80)
        x >>= 7
    return bytes(out + bytes([x]))


def ld(field: int, payload: bytes) -> bytes:  # a length-delimited field
    return varint(field << 3 | 2) + varint(len(payload)) + payload


def encode_example(features: dict, packed: bool = True) -> bytes:
    """bytes/str -> BytesList, int -> Int64List (packed or one field per value), float -> FloatList."""
    entries = b""
    for key, value in features.items():
        vals = value if isinstance(value, list) else [value]
        if isinstance(vals[0], (bytes, str)):
            feature = ld(1, b"".join(ld(1, v.encode() if isinstance(v, str) else v) for v in vals))
        elif isinstance(vals[0], int):
            ints = [varint(v) for v in vals]
            feature = ld(3, ld(1, b"".join(ints)) if packed else b"".join(b"\x08" + i for i in ints))
        else:
            feature = ld(2, ld(1, struct.pack(f"<{len(vals)}f", *vals)))
        entries += ld(1, ld(1, key.encode()) + ld(2, feature))
    return ld(1, entries)


def write_tfrecord(path: Path, examples: list[dict], packed: bool = True) -> None:
    with open(path, "wb") as f:
        for ex in examples:
            data = encode_example(ex, packed)
            head = struct.pack("<Q", len(data))
            f.write(head + struct.pack("<I", masked(head)) + data + struct.pack("<I", masked(data)))


def noisy_jpeg(rng, h=256, w=256) -> bytes:
    """A big (> 64 KiB) JPEG, so listing takes the path that seeks over the image."""
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(out, format="JPEG", quality=98)
    return out.getvalue()


def slim_example(rng, label: int, i: int, image: bytes | None = None) -> dict:
    """A record the way TF-slim's build_imagenet_data.py writes it (label 1-based)."""
    wnid = SYNSETS[label - 1]
    return {"image/height": 32, "image/width": 40, "image/colorspace": "RGB", "image/channels": 3,
            "image/class/label": label, "image/class/synset": wnid, "image/class/text": TEXTS[label - 1],
            "image/object/bbox/xmin": [0.1, 0.2], "image/format": "JPEG",
            "image/filename": f"{wnid}_{i}.JPEG", "image/encoded": image or jpeg_bytes(rng, 32, 40)}


# --- TFRecord ------------------------------------------------------------------------------------

def test_crc32c_known_values():
    assert tfrecord.crc32c(b"123456789") == 0xE3069283  # the standard CRC-32C check value
    for data in (b"", b"\x00" * 8, struct.pack("<Q", 123456)):
        assert tfrecord.masked_crc(data) == masked(data)


def test_tfrecord_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    raw, want = tmp_path / "raw", {"train": {}, "val": {}}
    raw.mkdir()
    n = 0
    for name, split, count, packed in (("train-00000-of-00002", "train", 7, True),
                                       ("train-00001-of-00002", "train", 6, False),
                                       ("validation-00000-of-00001", "val", 5, True)):
        examples = []
        for _ in range(count):
            label = n % 3 + 1
            examples.append(slim_example(rng, label, n, noisy_jpeg(rng) if n in (2, 9, 15) else None))
            want[split][f"{SYNSETS[label - 1]}_{n}"] = (examples[-1]["image/encoded"], label - 1)
            n += 1
        write_tfrecord(raw / name, examples, packed=packed)
    (raw / "README.txt").write_text("not a shard")  # ignored: not a TFRecord name
    big = [k for split in want.values() for k, v in split.items() if len(v[0]) > tfrecord.SMALL_ENTRY]
    assert len(big) == 3  # listing seeks over these images instead of reading them

    ds = list_tfrecords([raw])
    assert [s.name for s in ds.splits] == ["train", "val"]
    assert all(s.ref[0] == "tfrecord" and isinstance(s.ref[2], int) for s in ds.splits[0].samples)
    write_dataset(ds, tmp_path / "out", cfg(workers=2, samples_per_shard=4))
    for split in ("train", "val"):
        assert read_with_webdataset(tmp_path / "out" / split) == want[split]  # once each, same bytes, label - 1
    man = json.loads((tmp_path / "out" / "train" / contract.MANIFEST).read_text())
    assert [c["id"] for c in man["classes"]] == sorted(SYNSETS)
    assert [c["name"] for c in man["classes"]] == TEXTS
    assert man["source"]["converter"] == "tfrecord" and man["source"]["label_offset"] == 1


def test_tfrecord_label_offset_zero_via_cli(tmp_path):
    rng = np.random.default_rng(1)
    images = [jpeg_bytes(rng, 32, 40) for _ in range(6)]
    f = tmp_path / "records.tfrecord"  # no split in the name, no synsets, no file names
    labels = [3, 1, 2, 1, 0, 2]
    write_tfrecord(f, [{"image/encoded": im, "image/class/label": lb} for im, lb in zip(images, labels)])
    out = tmp_path / "out"
    assert main(["shard", "tfrecord", str(f), str(out), "--label-offset", "0", "--split", "train",
                 "--samples-per-shard", "4", "--workers", "1", "--quiet"]) == 0
    got = read_with_webdataset(out / "train")
    assert got == {f"records-{i:07d}": (im, lb) for i, (im, lb) in enumerate(zip(images, labels))}
    man = json.loads((out / "train" / contract.MANIFEST).read_text())
    assert [c["id"] for c in man["classes"]] == ["0", "1", "2", "3"]
    assert man["source"]["label_offset"] == 0

    with pytest.raises(KdkitError, match=r"records\.tfrecord: record 4 .*label 0 - label offset 1 = -1"):
        list_tfrecords([f], split="train")  # record 4 has label 0: background under TF-slim's numbering
    with pytest.raises(KdkitError, match="cannot tell the split.*--split"):
        list_tfrecords([f], label_offset=0)


def three_records(path: Path) -> list[int]:
    """Writes three records; returns the offset of each."""
    rng = np.random.default_rng(2)
    write_tfrecord(path, [slim_example(rng, i + 1, i) for i in range(3)])
    offsets, pos, data = [], 0, path.read_bytes()
    while pos < len(data):
        offsets.append(pos)
        pos += 16 + struct.unpack_from("<Q", data, pos)[0]
    return offsets


@pytest.mark.parametrize("cut", ["mid_data", "mid_header"])
def test_truncated_tfrecord(tmp_path, cut):
    f = tmp_path / "train-00000-of-00001"
    offsets = three_records(f)
    data = f.read_bytes()
    f.write_bytes(data[:offsets[2] + (5 if cut == "mid_header" else 100)])
    with pytest.raises(KdkitError, match=r"train-00000-of-00001: truncated: record 2 at offset"):
        list_tfrecords([f])


@pytest.mark.parametrize("byte", [0, 8])  # a flipped bit in the length, or in its CRC
def test_corrupt_length_crc(tmp_path, byte):
    f = tmp_path / "train-00000-of-00001"
    offsets = three_records(f)
    data = bytearray(f.read_bytes())
    data[offsets[1] + byte] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(KdkitError, match=r"train-00000-of-00001: record 1 at offset \d+: length CRC mismatch"):
        list_tfrecords([f])


def test_synsets_must_be_consistent_and_sorted(tmp_path):
    rng = np.random.default_rng(3)
    f = tmp_path / "train-00000-of-00001"
    write_tfrecord(f, [slim_example(rng, 1, 0), {**slim_example(rng, 1, 1), "image/class/synset": SYNSETS[2]}])
    with pytest.raises(KdkitError, match="record 1 .*label 1 has synset n01484850, but earlier records gave n01440764"):
        list_tfrecords([f])
    write_tfrecord(f, [{**slim_example(rng, 1, 0), "image/class/synset": "n09999999"}, slim_example(rng, 2, 1)])
    with pytest.raises(KdkitError, match="sorted-wnid order"):
        list_tfrecords([f])


def test_tfrecord_bad_image_is_skipped_and_reported(tmp_path):
    rng = np.random.default_rng(4)
    f = tmp_path / "validation-00000-of-00001"
    write_tfrecord(f, [slim_example(rng, 1, 0), slim_example(rng, 2, 1, image=b"\xff\xd8 not a jpeg")])
    out = tmp_path / "out"
    write_dataset(list_tfrecords([f]), out, cfg())
    assert set(read_with_webdataset(out / "val")) == {"n01440764_0"}
    assert f"{f}@" in (out / "val" / contract.SKIP_REPORT).read_text()


def test_tfrecord_missing_input_cli(tmp_path):
    assert main(["shard", "tfrecord", str(tmp_path / "missing"), str(tmp_path / "out"), "--quiet"]) == 2
    (tmp_path / "empty").mkdir()
    with pytest.raises(KdkitError, match="no TFRecord files"):
        list_tfrecords([tmp_path / "empty"])


# --- HDF5 ------------------------------------------------------------------------------------------

def smooth_pixels(rng, n: int, shape: tuple) -> np.ndarray:
    """Random but smooth uint8 images, so JPEG's error stays small."""
    h, w = shape[:2]
    out = []
    for _ in range(n):
        small = rng.integers(0, 255, (h // 8, w // 8) + shape[2:], dtype=np.uint8)
        img = Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR)
        out.append(np.asarray(img))
    return np.stack(out)


@pytest.mark.parametrize("shape,workers", [((28, 28), 1), ((32, 40, 3), 2)])
def test_hdf5_pixels_round_trip(tmp_path, shape, workers):
    rng = np.random.default_rng(5)
    pixels = smooth_pixels(rng, 11, shape)
    labels = rng.integers(0, 4, 11)
    labels[0] = 4  # C = max label + 1 = 5
    f = tmp_path / "data.h5"
    with h5py.File(f, "w") as h:
        h["images"], h["labels"] = pixels, labels
    out = tmp_path / "out"
    write_dataset(list_hdf5(f), out, cfg(workers=workers))
    got = read_with_webdataset(out / "train")
    assert sorted(got) == [f"train-{i:08d}" for i in range(11)]
    for i in range(11):
        jpg, label = got[f"train-{i:08d}"]
        assert label == labels[i]
        decoded = np.asarray(Image.open(io.BytesIO(jpg)))
        want = pixels[i] if pixels[i].ndim == 3 else np.repeat(pixels[i][..., None], 3, axis=-1)
        assert decoded.shape == want.shape  # stored as RGB: readers always get 3 channels
        assert np.abs(decoded.astype(int) - want).mean() < 3  # JPEG at quality 95
    man = json.loads((out / "train" / contract.MANIFEST).read_text())
    assert [c["id"] for c in man["classes"]] == ["0", "1", "2", "3", "4"]


@pytest.mark.parametrize("storage", ["vlen_uint8", "opaque"])  # (vlen strings cannot hold NUL bytes)
def test_hdf5_encoded_bytes_pass_through(tmp_path, storage):
    rng = np.random.default_rng(6)
    images = [jpeg_bytes(rng, 32, 40) for _ in range(6)]
    f = tmp_path / "enc.h5"
    with h5py.File(f, "w") as h:
        if storage == "vlen_uint8":
            d = h.create_dataset("x", (6,), dtype=h5py.vlen_dtype(np.uint8))
            for i, im in enumerate(images):
                d[i] = np.frombuffer(im, np.uint8)
        else:  # fixed-size opaque blobs: shorter images are padded with zeros, which JPEG decoders ignore
            h.create_dataset("x", data=np.array([np.void(im.ljust(max(map(len, images)), b"\0")) for im in images]))
        h["y"] = np.array([0, 1, 2, 0, 1, 2], np.int64)
        h["names"] = np.array([b"cat", b"dog", b"eel"])
    out = tmp_path / "out"
    write_dataset(list_hdf5(f, images_key="x", labels_key="y", split="val", class_names="names"), out, cfg())
    got = read_with_webdataset(out / "val")
    for i, im in enumerate(images):
        jpg, label = got[f"val-{i:08d}"]
        assert (jpg.rstrip(b"\0") if storage == "opaque" else jpg) == im and label == i % 3
    man = json.loads((out / "val" / contract.MANIFEST).read_text())
    assert [(c["id"], c["name"]) for c in man["classes"]] == [("cat", "cat"), ("dog", "dog"), ("eel", "eel")]


def test_hdf5_worker_cache_opens_once(tmp_path):
    f = tmp_path / "d.h5"
    with h5py.File(f, "w") as h:
        h["images"], h["labels"] = np.zeros((3, 8, 8), np.uint8), np.zeros(3, np.int64)
    refs = [s.ref for s in list_hdf5(f).splits[0].samples]
    assert all(isinstance(r, tuple) and r[0] == "hdf5" for r in refs)
    assert hdf5.read_image(refs[0]).shape == (8, 8)
    handle = hdf5._FILES[str(f)]
    assert hdf5.read_image(refs[2]).dtype == np.uint8 and hdf5._FILES[str(f)] is handle


def write_h5(path: Path, **datasets) -> Path:
    with h5py.File(path, "w") as h:
        for k, v in datasets.items():
            h[k.replace("__", "/")] = v
    return path


@pytest.mark.parametrize("datasets,kwargs,message", [
    ({"imgs": np.zeros((4, 8, 8), np.uint8), "meta__labels": np.zeros(4, np.int64)}, {},
     r"dataset 'images' not found; datasets in the file: imgs, meta/labels"),
    ({"images": np.zeros((4, 8, 8), np.uint8), "labels": np.zeros(3, np.int64)}, {},
     r"4 images in 'images' but 3 labels in 'labels'"),
    ({"images": np.zeros((4, 8, 8), np.uint8), "labels": np.array([0, 1, -1, 2])}, {},
     r"label -1 of image 2 is negative"),
    ({"images": np.zeros((4, 8, 8), np.uint8), "labels": np.array([0, 1, 2, 2]), "names": np.array([b"a", b"b"])},
     {"class_names": "names"}, r"label 2 of image 2 has no class name \(2 names in names\)"),
    ({"images": np.zeros((4, 8, 8), np.float32), "labels": np.zeros(4, np.int64)}, {},
     r"'images' has dtype float32 and shape \(4, 8, 8\); expected uint8"),
    ({"images": np.zeros((4, 64), np.uint8), "labels": np.zeros(4, np.int64)}, {}, r"shape \(4, 64\); expected"),
    ({"images": np.zeros((4, 8, 8), np.uint8), "labels": np.zeros(4, np.float32)}, {},
     r"'labels' has dtype float32 .*expected \(N,\) integers"),
])
def test_hdf5_refusals(tmp_path, datasets, kwargs, message):
    f = write_h5(tmp_path / "bad.h5", **datasets)
    with pytest.raises(KdkitError, match=message) as e:
        list_hdf5(f, **kwargs)
    assert str(f) in str(e.value) and "\n" not in str(e.value)


def test_hdf5_not_a_file_or_not_hdf5(tmp_path):
    with pytest.raises(KdkitError, match="missing.h5: HDF5 file does not exist"):
        list_hdf5(tmp_path / "missing.h5")
    (tmp_path / "fake.h5").write_bytes(b"definitely not hdf5")
    with pytest.raises(KdkitError, match="fake.h5: not an HDF5 file"):
        list_hdf5(tmp_path / "fake.h5")


def test_hdf5_class_names_from_text_file_and_cli(tmp_path):
    rng = np.random.default_rng(7)
    f = write_h5(tmp_path / "d.h5", images=smooth_pixels(rng, 10, (28, 28)), labels=np.arange(10) % 3)
    names = tmp_path / "names.txt"
    names.write_text("zero\none\ntwo\nthree\n")
    ds = list_hdf5(f, class_names=str(names))
    assert [c.name for c in ds.classes] == ["zero", "one", "two", "three"]  # more names than labels used is fine
    with pytest.raises(KdkitError, match="neither a dataset in .*d.h5 nor a text file"):
        list_hdf5(f, class_names=str(tmp_path / "nope.txt"))
    out = tmp_path / "out"
    assert main(["shard", "hdf5", str(f), str(out), "--samples-per-shard", "8", "--workers", "1", "--quiet"]) == 0
    man = json.loads((out / "train" / contract.MANIFEST).read_text())
    assert man["num_samples"] == 10 and man["num_shards"] == 2 and man["source"]["converter"] == "hdf5"


def test_labels_out_of_sorted_wnid_order_can_be_remapped(tmp_path):
    """The refusal names the way forward; --remap-labels indexes classes by sorted synset."""
    rng = np.random.default_rng(3)
    f = tmp_path / "train-00000-of-00001"
    write_tfrecord(f, [{**slim_example(rng, 1, 0), "image/class/synset": "n09999999"}, slim_example(rng, 2, 1),
                       {**slim_example(rng, 1, 2), "image/class/synset": "n09999999"}])
    with pytest.raises(KdkitError, match="sorted-wnid order.*pass --remap-labels"):
        list_tfrecords([f])
    ds = list_tfrecords([f], remap_labels=True)
    assert [c.id for c in ds.classes] == [SYNSETS[1], "n09999999"]
    assert [s.label for s in ds.splits[0].samples] == [1, 0, 1]  # label 1 (n09999999) now sorts last


def test_label_offset_zero_on_one_based_records_warns(tmp_path, capsys):
    rng = np.random.default_rng(4)
    f = tmp_path / "train-00000-of-00001"
    write_tfrecord(f, [slim_example(rng, 1, 0), slim_example(rng, 2, 1)])  # TF-slim: 1-based
    list_tfrecords([f], label_offset=0)
    assert "no record has label 0: the labels look 1-based" in capsys.readouterr().err


def test_an_archive_given_as_devkit_folder_says_extract_it(tmp_path):
    from kdkit.shards.sources.imagenet import list_imagenet
    from test_imagenet import make_train

    make_train(tmp_path / "in" / "train")
    archive = tmp_path / "ILSVRC2012_devkit_t12.tar.gz"
    archive.write_bytes(b"\x1f\x8b")
    with pytest.raises(KdkitError, match=r"devkit_t12\.tar\.gz: devkit folder is an archive; extract it first"):
        list_imagenet(tmp_path / "in", devkit=archive)


# --- tensorflow-datasets records, GZIP -------------------------------------------------------------

TFDS_WNIDS = SYNSETS + ["n01491361", "n01494475"]  # label.labels.txt: every class, in label order


def tfds_example(rng, label: int, name: str, image: bytes | None = None) -> dict:
    """A record the way tensorflow-datasets' imagenet2012 builder writes it (label 0-based)."""
    return {"image": image or jpeg_bytes(rng, 32, 40), "label": label, "file_name": name}


def tfds_folder(folder: Path, files: dict[str, list[dict]]) -> Path:
    folder.mkdir(parents=True)
    for name, examples in files.items():
        write_tfrecord(folder / name, examples)
    (folder / tfrecord.TFDS_LABELS).write_text("\n".join(TFDS_WNIDS) + "\n")
    (folder / "dataset_info.json").write_text(json.dumps({"name": "imagenet2012", "version": "5.1.0"}))
    return folder


def test_tfds_records_round_trip_with_labels_mapped_to_wnids(tmp_path, capsys):
    rng = np.random.default_rng(8)
    want: dict[str, dict] = {"train": {}, "val": {}}
    files = {}
    for name, split, labels in (("imagenet2012-train.tfrecord-00000-of-00002", "train", [0, 2, 4]),
                                ("imagenet2012-train.tfrecord-00001-of-00002", "train", [2, 0]),
                                ("imagenet2012-validation.tfrecord-00000-of-00001", "val", [4, 1])):
        files[name] = []
        for lb in labels:
            file_name = (f"{TFDS_WNIDS[lb]}_{len(want[split])}.JPEG" if split == "train"
                         else f"ILSVRC2012_val_{len(want[split]):08d}.JPEG")
            files[name].append(tfds_example(rng, lb, file_name, noisy_jpeg(rng) if lb == 4 else None))
            want[split][file_name.removesuffix(".JPEG")] = (files[name][-1]["image"], lb)
    data = tfds_folder(tmp_path / "imagenet2012" / "5.1.0", files)
    out = tmp_path / "out"
    assert main(["shard", "tfrecord", str(data), str(out), "--samples-per-shard", "2", "--workers", "1",
                 "--quiet"]) == 0
    for split in ("train", "val"):
        assert read_with_webdataset(out / split) == want[split]  # TFDS's 0-based label is the class index
    man = json.loads((out / "val" / contract.MANIFEST).read_text())
    assert [c["id"] for c in man["classes"]] == TFDS_WNIDS  # every class of the list, also n01443537 (unused)
    assert man["source"]["layout"] == "tfds" and man["source"]["label_offset"] == 0
    assert man["source"]["class_list"] == str(data / tfrecord.TFDS_LABELS)

    (data / tfrecord.TFDS_LABELS).write_text("\n".join(TFDS_WNIDS[:4]) + "\n")  # label 4 has no class now
    with pytest.raises(KdkitError, match=r"record 2 at offset \d+: label 4, but .*label.labels.txt names 4 classes"):
        list_tfrecords([data])


def test_tfds_class_names_keep_their_order_and_layout_can_be_forced(tmp_path, capsys):
    rng = np.random.default_rng(9)
    f = tmp_path / "pets-train.tfrecord-00000-of-00001"
    write_tfrecord(f, [tfds_example(rng, 0, "a.jpg"), tfds_example(rng, 1, "b.jpg")])
    (tmp_path / tfrecord.TFDS_LABELS).write_text("dog\ncat\n")  # not wnids: the dataset's order stands
    ds = list_tfrecords([f], layout="tfds")
    assert [(c.index, c.id) for c in ds.classes] == [(0, "dog"), (1, "cat")]
    assert {s.key: s.label for s in ds.splits[0].samples} == {"a": 0, "b": 1}
    with pytest.raises(KdkitError, match=r"record 0 at offset 0: no image/encoded feature \(features: file_name, "
                                         r"image, label\); is --layout slim right\?"):
        list_tfrecords([f], layout="slim")

    (tmp_path / tfrecord.TFDS_LABELS).unlink()
    assert [c.id for c in list_tfrecords([f]).classes] == ["0", "1"]  # numbered by label, and said so
    assert f"no {tfrecord.TFDS_LABELS} beside the TFDS records" in capsys.readouterr().err


def test_an_unknown_layout_names_its_features_and_the_layouts(tmp_path, capsys):
    f = tmp_path / "train-00000-of-00001"
    write_tfrecord(f, [{"jpeg": b"\xff\xd8", "y": 1}])
    assert main(["shard", "tfrecord", str(f), str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "record 0 at offset 0: unknown TFRecord layout, features: jpeg, y" in err
    assert "--layout slim (image/encoded, image/class/label)" in err and "--layout tfds (image, label)" in err
    assert "\n" not in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["train-00000-of-00001", "train-00000-of-00001.gz"])
def test_gzip_records_are_recognised_and_read(tmp_path, name):
    rng = np.random.default_rng(10)
    raw = tmp_path / "raw"
    raw.mkdir()
    examples = [slim_example(rng, i % 3 + 1, i) for i in range(5)]
    examples[3]["image/encoded"] = b"\xff\xd8 not a jpeg"
    write_tfrecord(tmp_path / "plain", examples)
    (raw / name).write_bytes(gzip.compress((tmp_path / "plain").read_bytes()))
    assert tfrecord.is_gzip(raw / name) and not tfrecord.is_gzip(tmp_path / "plain")

    out = tmp_path / "out"
    assert main(["shard", "tfrecord", str(raw), str(out), "--samples-per-shard", "2", "--workers", "1",
                 "--quiet"]) == 0
    got = read_with_webdataset(out / "train")
    assert got == {f"{SYNSETS[i % 3]}_{i}": (examples[i]["image/encoded"], i % 3) for i in (0, 1, 2, 4)}
    assert f"{raw / name}: record 3\t" in (out / "train" / contract.SKIP_REPORT).read_text()  # the .gz file named
    man = json.loads((out / "train" / contract.MANIFEST).read_text())
    assert man["source"]["gzip_files"] == 1
    assert not (out / contract.STATE_DIR).exists()  # the decompressed copy is gone once the set is written

    with pytest.raises(KdkitError, match="record 0 at offset 0: length CRC mismatch"):
        list_tfrecords([raw / name], compression="none")
    (raw / name).write_bytes((raw / name).read_bytes()[:-40])
    with pytest.raises(KdkitError, match=r"GZIP-compressed TFRecord does not decompress .*copy it again"):
        list_tfrecords([raw / name], scratch=tmp_path / "scratch")
    assert not list((tmp_path / "scratch").iterdir())  # no half copy left behind


def test_gzip_copy_is_made_once_and_reused(tmp_path):
    rng = np.random.default_rng(11)
    write_tfrecord(tmp_path / "plain", [slim_example(rng, 1, 0)])
    f = tmp_path / "validation-00000-of-00001"
    f.write_bytes(gzip.compress((tmp_path / "plain").read_bytes()))
    first = list_tfrecords([f], scratch=tmp_path / "s").splits[0].samples[0].ref
    copy = Path(first[1])
    assert copy.parent == tmp_path / "s" and copy.read_bytes() == (tmp_path / "plain").read_bytes()
    made = copy.stat().st_mtime_ns
    assert list_tfrecords([f], scratch=tmp_path / "s").splits[0].samples[0].ref == first  # a resumed run's listing
    assert copy.stat().st_mtime_ns == made
    assert tfrecord.read_image(first) == slim_example(np.random.default_rng(11), 1, 0)["image/encoded"]


def test_hdf5_small_pixel_sets_are_read_once_and_large_ones_row_by_row(tmp_path, monkeypatch):
    """A per-row h5py read costs ~3 ms, 30x the encode of an MNIST digit: a set that fits is read into
    memory once per worker; both ways give the same pixels."""
    rng = np.random.default_rng(7)
    f = tmp_path / "d.h5"
    with h5py.File(f, "w") as h:
        h["images"], h["labels"] = rng.integers(0, 255, (5, 8, 8), dtype=np.uint8), np.zeros(5, np.int64)
    refs = [s.ref for s in list_hdf5(f).splits[0].samples]
    small = [hdf5.read_image(r) for r in refs]
    assert isinstance(hdf5._PIXELS[str(f), "images"], np.ndarray)
    hdf5._forget(str(f))
    monkeypatch.setattr(hdf5, "IN_MEMORY_BYTES", 0)
    large = [hdf5.read_image(r) for r in refs]
    assert not isinstance(hdf5._PIXELS[str(f), "images"], np.ndarray)
    assert all(np.array_equal(a, b) for a, b in zip(small, large))
    hdf5._forget(str(f))
