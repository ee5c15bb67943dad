"""`kdkit shard tfrecord`: TF-slim/Inception ImageNet TFRecords, read without TensorFlow.

A TFRecord file is a sequence of records framed as
    uint64 length (little-endian) | uint32 masked crc32c(length) | data | uint32 masked crc32c(data)
and each record's data is a serialized tf.train.Example:
    Example{1: Features{1: map<string, Feature>}},  Feature = oneof {1: BytesList, 2: FloatList, 3: Int64List}.
The few protobuf rules needed (varints, length-delimited fields) are decoded by hand below: pulling in
TensorFlow (or even the protobuf package plus generated classes) for a format this small would make a
multi-hundred-MB dependency of a converter that only needs five feature values.

Labels: TF-slim's build_imagenet_data.py writes image/class/label as 1..1000 (0 = background), so the
class index is label - label_offset with the offset stated explicitly (default 1) and recorded in the
manifest. Classes are the synsets (image/class/synset) where present, which must follow sorted-wnid
order, the same order the imagenet and folder converters use.
"""
from __future__ import annotations

import os
import re
import struct
import sys
from pathlib import Path

from kdkit.errors import BadImage, KdkitError
from kdkit.shards.contract import ClassInfo, key_from_relpath
from kdkit.shards.sources.base import SourceDataset, SourceSample, SourceSplit, split_from_name

SHARD_NAME = re.compile(r"^.+-\d+-of-\d+$")  # TF-slim shards: train-00000-of-01024, validation-00000-of-00128
SUFFIXES = (".tfrecord", ".tfrecords")
WANTED = ("image/class/label", "image/class/synset", "image/class/text", "image/filename")
SMALL_ENTRY = 64 * 1024  # feature entries above this (the encoded image) are seeked over while listing

# --- crc32c ------------------------------------------------------------------------------------
# Pure Python with a table: it only ever runs on the 8-byte length of each record while listing
# (and in tests when writing), so speed does not matter and no crc32c package is needed.


def _crc_entry(c: int) -> int:
    for _ in range(8):
        c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1  # Castagnoli polynomial, bit-reflected
    return c


_TABLE = [_crc_entry(i) for i in range(256)]


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc = _TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


# --- protobuf wire format ----------------------------------------------------------------------

def _varint(buf, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = buf[pos]  # IndexError past the end: the caller reports a malformed record
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def _fields(buf):
    """(field number, wire type, value) of one message: varints as int, the rest as memoryview slices."""
    pos, end = 0, len(buf)
    while pos < end:
        tag, pos = _varint(buf, pos)
        wire = tag & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire in (1, 2, 5):  # fixed64, length-delimited, fixed32
            n, pos = _varint(buf, pos) if wire == 2 else (8 if wire == 1 else 4, pos)
            value, pos = buf[pos:pos + n], pos + n
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if pos > end:
            raise ValueError("a field runs past the end of its message")
        yield tag >> 3, wire, value


def _signed64(x: int) -> int:  # int64 varints hold negatives as 64-bit two's complement
    return x - (1 << 64) if x >= 1 << 63 else x


def feature_values(feature) -> list:
    """The values of one serialized tf.train.Feature: bytes, floats or ints."""
    for kind, _, lst in _fields(memoryview(feature)):
        out: list = []
        for f, wire, v in _fields(lst):
            if f == 1 and kind == 1:
                out.append(bytes(v))
            elif f == 1 and kind == 2:  # floats: packed (wire 2) or one per field (wire 5)
                out.extend(struct.unpack(f"<{len(v) // 4}f", v))
            elif f == 1 and kind == 3 and wire == 0:  # int64 written one per field
                out.append(_signed64(v))
            elif f == 1 and kind == 3:  # packed int64 (what TensorFlow writes)
                p = 0
                while p < len(v):
                    x, p = _varint(v, p)
                    out.append(_signed64(x))
        return out
    return []


def _entry(buf) -> tuple[str, memoryview]:
    """A map<string, Feature> entry: {1: key, 2: Feature}."""
    key, value = "", memoryview(b"")
    for f, wire, v in _fields(buf):
        if f == 1 and wire == 2:
            key = bytes(v).decode("utf-8", "replace")
        elif f == 2 and wire == 2:
            value = v
    return key, value


def parse_example(data: bytes) -> dict[str, list]:
    """Every feature of a serialized tf.train.Example."""
    out = {}
    for f, wire, features in _fields(memoryview(data)):
        if f == 1 and wire == 2:
            for g, w, entry in _fields(features):
                if g == 1 and w == 2:
                    key, value = _entry(entry)
                    out[key] = feature_values(value)
    return out


class _Stream:
    """A record read from a buffered file, position counted here: BufferedReader.tell() is a syscall."""

    def __init__(self, f, pos: int):
        self.f, self.pos = f, pos

    def read(self, n: int) -> bytes:
        b = self.f.read(n)
        if len(b) != n:
            raise ValueError("record ends early")
        self.pos += n
        return b

    def varint(self) -> int:
        value = shift = 0
        while True:
            b = self.read(1)[0]
            value |= (b & 0x7F) << shift
            if b < 0x80:
                return value
            shift += 7

    def skip_to(self, pos: int) -> None:
        self.f.seek(pos)
        self.pos = pos


def _scan_example(s: _Stream, end: int) -> tuple[dict[str, list], set[str]]:
    """(wanted feature values, every feature key) of the Example from s.pos to end.

    Streams the two outer levels (Example, Features) from the file so a big entry, the encoded image,
    is skipped with a seek after reading only its key: listing a million images stays cheap in I/O and
    memory. Small entries are read whole and parsed in memory.
    """
    values, keys = {}, set()
    while s.pos < end:
        tag, n = s.varint(), s.varint()
        if tag != (1 << 3 | 2):
            raise ValueError("unexpected top-level field")
        features_end = s.pos + n
        while s.pos < features_end:
            tag, n = s.varint(), s.varint()
            start = s.pos
            if tag != (1 << 3 | 2) or start + n > features_end:
                raise ValueError("malformed Features map")
            if n <= SMALL_ENTRY:
                key, value = _entry(memoryview(s.read(n)))
                if key in WANTED:
                    values[key] = feature_values(value)
            else:  # map entries are written key first: read just the key, seek over the value
                has_key = s.varint() == (1 << 3 | 2)
                key = s.read(min(s.varint(), 1024)).decode("utf-8", "replace") if has_key else ""
                s.skip_to(start + n)
            keys.add(key)
    if s.pos != end:
        raise ValueError("the Example runs past the end of its record")
    return values, keys


# --- records -------------------------------------------------------------------------------------

def iter_records(path: Path):
    """(stream, record number, data offset, data length) per record, checking framing and length CRCs.

    Only the length CRC is checked: the data CRC would mean reading and hashing every image in pure
    Python, and a corrupt image is caught anyway when the writer decodes it (and is skipped and reported).
    """
    try:
        f, size = open(path, "rb"), os.path.getsize(path)
    except OSError as e:
        raise KdkitError(f"{path}: cannot read TFRecord file: {e.strerror or e}") from None
    with f:
        pos, n = 0, 0
        while pos < size:
            head = f.read(12)
            if len(head) < 12:
                raise KdkitError(f"{path}: truncated: record {n} at offset {pos} has an incomplete header "
                                 f"({len(head)} of 12 bytes); the file was cut short, copy it again")
            length, crc = struct.unpack("<QI", head)
            if masked_crc(head[:8]) != crc:
                raise KdkitError(f"{path}: record {n} at offset {pos}: length CRC mismatch; the file is "
                                 "corrupt or not a TFRecord")
            if pos + 12 + length + 4 > size:
                raise KdkitError(f"{path}: truncated: record {n} at offset {pos} needs {length + 16} bytes, "
                                 f"only {size - pos} left; the file was cut short, copy it again")
            yield _Stream(f, pos + 12), n, pos + 12, length
            pos += 12 + length + 4
            f.seek(pos)
            n += 1


def read_image(ref: tuple) -> bytes:
    """The image/encoded bytes of the record at ref = ("tfrecord", path, data_offset, data_length)."""
    _, path, offset, length = ref
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(length)
    try:
        if len(data) != length:
            raise ValueError(f"record cut short ({len(data)} of {length} bytes)")
        image = parse_example(data).get("image/encoded")
    except (ValueError, IndexError, struct.error) as e:
        raise BadImage(f"malformed tf.train.Example: {e}") from None
    if not image:
        raise BadImage("record has no image/encoded feature")
    return image[0]


def find_files(inputs: list[Path]) -> list[Path]:
    files = []
    for p in map(Path, inputs):
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.is_file()
                           and (SHARD_NAME.match(q.name) or q.name.endswith(SUFFIXES)))
            if not found:
                raise KdkitError(f"{p}: no TFRecord files (expected names like train-00000-of-01024 or *.tfrecord)")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise KdkitError(f"{p}: TFRecord file or folder does not exist; check the path")
    return files


def _classes(synsets: dict[int, str], texts: dict[int, str], max_index: int) -> tuple[list[ClassInfo], str]:
    if not synsets:
        return [ClassInfo(i, str(i)) for i in range(max_index + 1)], "image/class/label - label_offset"
    by_index = sorted(synsets.items())
    for (i, a), (j, b) in zip(by_index, by_index[1:]):
        if a >= b:
            raise KdkitError(f"synset {a} has class index {i} but {b} has {j}: the labels do not follow sorted-wnid "
                             "order, so the class indices would not match other ImageNet shard sets; pass "
                             "--remap-labels to index the classes by sorted synset instead")
    # an index never seen (only some files listed) keeps an empty id rather than a guessed wnid
    return [ClassInfo(i, synsets.get(i, ""), texts.get(i, "")) for i in range(max_index + 1)], "sorted synsets"


def _remap(splits: dict[str, list[SourceSample]], synsets: dict[int, str], texts: dict[int, str]):
    """Class indices re-assigned by sorted synset (the records' own labels ordered them otherwise)."""
    if len(set(synsets.values())) != len(synsets):
        raise KdkitError("--remap-labels: two labels share a synset; the records cannot be re-indexed by synset")
    new = {old: i for i, (old, _) in enumerate(sorted(synsets.items(), key=lambda kv: kv[1]))}
    missing = sorted({s.label for samples in splits.values() for s in samples} - set(new))
    if missing:
        raise KdkitError(f"--remap-labels: labels {missing[:5]} come without image/class/synset; nothing to sort by")
    for name, samples in splits.items():
        splits[name] = [SourceSample(s.key, new[s.label], s.ref, s.origin) for s in samples]
    return {new[i]: w for i, w in synsets.items()}, {new[i]: t for i, t in texts.items()}, len(new) - 1


def list_tfrecords(inputs: list[Path], label_offset: int = 1, split: str | None = None,
                   remap_labels: bool = False) -> SourceDataset:
    files = find_files(inputs)
    splits: dict[str, list[SourceSample]] = {}
    synsets: dict[int, str] = {}
    texts: dict[int, str] = {}
    max_index = -1
    for path in files:
        name = split or split_from_name(path.name)
        if name is None:
            raise KdkitError(f"{path}: cannot tell the split from the file name (expected train-* or "
                             "validation-*); pass --split")
        samples = splits.setdefault(name, [])
        for stream, n, offset, length in iter_records(path):
            where = f"{path}: record {n} at offset {offset - 12}"
            try:
                values, keys = _scan_example(stream, offset + length)
            except (ValueError, IndexError, struct.error) as e:
                raise KdkitError(f"{where}: not a valid tf.train.Example ({e})") from None
            if "image/encoded" not in keys:
                raise KdkitError(f"{where}: no image/encoded feature (features: {', '.join(sorted(keys))})")
            label = values.get("image/class/label")
            if not label:
                raise KdkitError(f"{where}: no image/class/label feature")
            index = label[0] - label_offset
            if index < 0:
                raise KdkitError(f"{where}: image/class/label {label[0]} - label offset {label_offset} = {index} < 0; "
                                 "TF-slim labels start at 1 (use --label-offset 0 for 0-based labels)")
            max_index = max(max_index, index)
            if values.get("image/class/synset"):
                wnid = values["image/class/synset"][0].decode("utf-8", "replace")
                if synsets.setdefault(index, wnid) != wnid:
                    raise KdkitError(f"{where}: image/class/label {label[0]} has synset {wnid}, but earlier records "
                                     f"gave {synsets[index]}; one label must mean one synset")
                if values.get("image/class/text"):
                    texts.setdefault(index, values["image/class/text"][0].decode("utf-8", "replace"))
            fname = values.get("image/filename")
            key = key_from_relpath(fname[0].decode("utf-8", "replace") if fname else
                                   f"{path.stem.replace('.', '_')}-{n:07d}")
            samples.append(SourceSample(key, index, ("tfrecord", str(path), offset, length), f"{path}@{offset - 12}"))
    if label_offset == 0 and splits and min(s.label for samples in splits.values() for s in samples) > 0:
        print("kdkit: warning: --label-offset 0, but no record has label 0: the labels look 1-based (TF-slim's); "
              "class 0 would stay empty and every index be one too high. Use --label-offset 1 unless that is "
              "intended", file=sys.stderr)
    if remap_labels:
        synsets, texts, max_index = _remap(splits, synsets, texts)
    classes, order = _classes(synsets, texts, max_index)
    root = str(files[0]) if len(files) == 1 else os.path.commonpath([str(p.parent) for p in files])
    ordered = sorted(splits, key=lambda s: (s != "train", s != "val", s))
    return SourceDataset("tfrecord", root, classes, [SourceSplit(s, splits[s]) for s in ordered],
                         info={"label_offset": label_offset, "class_order": order, "files": len(files),
                               "remapped_labels": remap_labels})

