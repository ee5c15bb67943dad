"""`kdkit shard tfrecord`: ImageNet TFRecords of TF-slim or tensorflow-datasets, read without TensorFlow.

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

Layouts (the feature names; `--layout`, else recognised from the first record's features):
  slim  image/encoded, image/class/label (1-based), image/class/synset, image/filename (TF-slim)
  tfds  image, label (0-based), file_name: tensorflow-datasets' imagenet2012 builder, files
        imagenet2012-train.tfrecord-00000-of-01024, with label.labels.txt beside them (one class name,
        for ImageNet a wnid, per line in label order), which names the classes.

GZIP-compressed files (TFRecordWriter with compression "GZIP") are recognised by their magic bytes.
Records are read by offset, later and in shuffled order, and a GZIP stream cannot seek: each is
decompressed once into a plain copy under a scratch folder, which the records are then read from.
"""
from __future__ import annotations

import gzip
import os
import re
import shutil
import struct
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

from kdkit.errors import BadImage, KdkitError, OptionError
from kdkit.shards import tario
from kdkit.shards.contract import ClassInfo, key_from_relpath
from kdkit.shards.resume import fingerprint
from kdkit.shards.sources.base import SourceDataset, SourceSample, SourceSplit, read_lines, split_from_name
from kdkit.shards.sources.imagenet import WNID

SHARD_NAME = re.compile(r"^.+-\d+-of-\d+$")  # TF-slim shards: train-00000-of-01024, validation-00000-of-00128
TFDS_NAME = re.compile(r"^[^-]+-(?P<split>[^.]+)\.tfrecord-\d+-of-\d+$")  # imagenet2012-validation.tfrecord-...
TFDS_LABELS = "label.labels.txt"
SUFFIXES = (".tfrecord", ".tfrecords")
GZIP_MAGIC = b"\x1f\x8b"
COMPRESSIONS = ("auto", "none", "gzip")


@dataclass(frozen=True)
class Layout:
    name: str
    image: str
    label: str
    filename: str
    label_offset: int  # what is subtracted from a label to get the class index
    synset: str = ""
    text: str = ""


LAYOUTS = {
    "slim": Layout("slim", "image/encoded", "image/class/label", "image/filename", 1,
                   "image/class/synset", "image/class/text"),
    "tfds": Layout("tfds", "image", "label", "file_name", 0),
}
WANTED = {k for lay in LAYOUTS.values() for k in (lay.label, lay.filename, lay.synset, lay.text) if k}
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

def iter_records(path: Path, shown: Path | None = None):
    """(stream, record number, data offset, data length) per record, checking framing and length CRCs.
    Errors name `shown` (the compressed file a plain copy was made from), else path.

    Only the length CRC is checked: the data CRC would mean reading and hashing every image in pure
    Python, and a corrupt image is caught anyway when the writer decodes it (and is skipped and reported).
    """
    shown = shown or path
    try:
        f, size = open(path, "rb"), os.path.getsize(path)
    except OSError as e:
        raise KdkitError(f"{shown}: cannot read TFRecord file: {e.strerror or e}") from None
    with f:
        pos, n = 0, 0
        while pos < size:
            head = f.read(12)
            if len(head) < 12:
                raise KdkitError(f"{shown}: truncated: record {n} at offset {pos} has an incomplete header "
                                 f"({len(head)} of 12 bytes); the file was cut short, copy it again")
            length, crc = struct.unpack("<QI", head)
            if masked_crc(head[:8]) != crc:
                raise KdkitError(f"{shown}: record {n} at offset {pos}: length CRC mismatch; the file is "
                                 "corrupt or not a TFRecord")
            if pos + 12 + length + 4 > size:
                raise KdkitError(f"{shown}: truncated: record {n} at offset {pos} needs {length + 16} bytes, "
                                 f"only {size - pos} left; the file was cut short, copy it again")
            yield _Stream(f, pos + 12), n, pos + 12, length
            pos += 12 + length + 4
            f.seek(pos)
            n += 1


def read_image(ref: tuple) -> bytes:
    """The image bytes of the record at ref = ("tfrecord", path, data_offset, data_length, image feature)."""
    _, path, offset, length, feature = ref
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(length)
    try:
        if len(data) != length:
            raise ValueError(f"record cut short ({len(data)} of {length} bytes)")
        image = parse_example(data).get(feature)
    except (ValueError, IndexError, struct.error) as e:
        raise BadImage(f"malformed tf.train.Example: {e}") from None
    if not image:
        raise BadImage(f"record has no {feature} feature")
    return image[0]


def _is_record_name(name: str) -> bool:
    return bool(SHARD_NAME.match(name)) or name.endswith(SUFFIXES)


def find_files(inputs: list[Path]) -> list[Path]:
    files = []
    for p in map(Path, inputs):
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.is_file() and _is_record_name(q.name.removesuffix(".gz")))
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


# --- compression, layout, class list ------------------------------------------------------------

def is_gzip(path: Path) -> bool:
    """GZIP magic bytes first, and not a plain TFRecord whose first length happens to begin with them."""
    with open(path, "rb") as f:
        head = f.read(12)
    return head[:2] == GZIP_MAGIC and (len(head) < 12 or masked_crc(head[:8]) != struct.unpack_from("<I", head, 8)[0])


def gunzip_copy(path: Path, scratch: Path | None) -> Path:
    """The plain copy of a GZIP-compressed file under scratch: made once, reused by a resumed run."""
    if scratch is None:
        raise KdkitError(f"{path}: GZIP-compressed; its records are read from a decompressed copy, so pass "
                         "scratch= (a folder for it)")
    st = path.stat()
    source = {"file": str(path.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
    plain = Path(scratch) / f"{path.name.removesuffix('.gz')}-{fingerprint(source)}"
    if plain.exists():
        return plain
    plain.parent.mkdir(parents=True, exist_ok=True)
    tmp = plain.with_name(f"{plain.name}.{os.getpid()}{tario.TMP_SUFFIX}")  # --part machines may share OUT
    print(f"kdkit: {path}: GZIP-compressed, decompressing it once into {plain} ({st.st_size / 2**20:.0f} MB "
          "compressed; a resumed run reuses the copy)", file=sys.stderr, flush=True)
    try:
        with gzip.open(path, "rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        tmp.unlink(missing_ok=True)
        raise KdkitError(f"{path}: GZIP-compressed TFRecord does not decompress ({e}); the file is corrupt or cut "
                         "short, copy it again") from None
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise KdkitError(f"{tmp}: cannot write the decompressed copy of {path}: {e.strerror or e}") from None
    os.replace(tmp, plain)
    return plain


def _detect(keys: set[str], where: str) -> Layout:
    for lay in LAYOUTS.values():
        if lay.image in keys and lay.label in keys:
            return lay
    raise KdkitError(f"{where}: unknown TFRecord layout, features: {', '.join(sorted(keys)) or 'none'}; kdkit reads "
                     + ", ".join(f"--layout {lay.name} ({lay.image}, {lay.label})" for lay in LAYOUTS.values()))


def _split_of(path: Path) -> str | None:
    m = TFDS_NAME.match(path.name.removesuffix(".gz"))
    return split_from_name(m["split"] if m else path.name)


def _tfds_names(files: list[Path]) -> tuple[list[str], Path] | tuple[None, None]:
    """TFDS's class list (label.labels.txt beside the records): one name per line, in label order."""
    found = sorted({p.parent / TFDS_LABELS for p in files if (p.parent / TFDS_LABELS).is_file()})
    if not found:
        print(f"kdkit: warning: no {TFDS_LABELS} beside the TFDS records: classes are numbered by label, without "
              "names (it is in the TFDS data folder, e.g. imagenet2012/5.1.0/)", file=sys.stderr)
        return None, None
    names = read_lines(found[0], "TFDS class list")
    for other in found[1:]:
        if read_lines(other, "TFDS class list") != names:
            raise KdkitError(f"{found[0]} and {other} differ: the records come from different datasets; shard them "
                             "separately")
    return names, found[0]


def list_tfrecords(inputs: list[Path], label_offset: int | None = None, split: str | None = None,
                   remap_labels: bool = False, layout: str = "auto", compression: str = "auto",
                   scratch: Path | None = None) -> SourceDataset:
    """label_offset None: the layout's (1 for slim, 0 for tfds). scratch: where GZIP files are decompressed."""
    if layout != "auto" and layout not in LAYOUTS:
        raise OptionError(f"--layout {layout}: expected auto or {', '.join(LAYOUTS)}")
    if compression not in COMPRESSIONS:
        raise OptionError(f"--compression {compression}: expected {', '.join(COMPRESSIONS)}")
    files = find_files(inputs)
    lay = LAYOUTS.get(layout)
    offset_used = names = names_file = None
    splits: dict[str, list[SourceSample]] = {}
    synsets: dict[int, str] = {}
    texts: dict[int, str] = {}
    max_index = -1
    gzipped = 0
    for path in files:
        name = split or _split_of(path)
        if name is None:
            raise KdkitError(f"{path}: cannot tell the split from the file name (expected train-* or "
                             "validation-*); pass --split")
        samples = splits.setdefault(name, [])
        gz = compression == "gzip" or (compression == "auto" and is_gzip(path))
        plain = gunzip_copy(path, scratch) if gz else path
        gzipped += gz
        for stream, n, offset, length in iter_records(plain, shown=path):
            where = f"{path}: record {n}" + (f" at offset {offset - 12}" if not gz else "")
            try:
                values, keys = _scan_example(stream, offset + length)
            except (ValueError, IndexError, struct.error) as e:
                raise KdkitError(f"{where}: not a valid tf.train.Example ({e})") from None
            if lay is None:
                lay = _detect(keys, where)
            if offset_used is None:
                offset_used = lay.label_offset if label_offset is None else label_offset
                if lay.name == "tfds":
                    names, names_file = _tfds_names(files)
            if lay.image not in keys:
                raise KdkitError(f"{where}: no {lay.image} feature (features: {', '.join(sorted(keys))}); is "
                                 f"--layout {lay.name} right?")
            label = values.get(lay.label)
            if not label:
                raise KdkitError(f"{where}: no {lay.label} feature")
            index = label[0] - offset_used
            if index < 0:
                raise KdkitError(f"{where}: {lay.label} {label[0]} - label offset {offset_used} = {index} < 0; "
                                 "TF-slim labels start at 1 (use --label-offset 0 for 0-based labels)")
            if names is not None and index >= len(names):
                raise KdkitError(f"{where}: {lay.label} {label[0]}, but {names_file} names {len(names)} classes")
            max_index = max(max_index, index)
            if lay.synset and values.get(lay.synset):
                wnid = values[lay.synset][0].decode("utf-8", "replace")
                if synsets.setdefault(index, wnid) != wnid:
                    raise KdkitError(f"{where}: {lay.label} {label[0]} has synset {wnid}, but earlier records "
                                     f"gave {synsets[index]}; one label must mean one synset")
                if values.get(lay.text):
                    texts.setdefault(index, values[lay.text][0].decode("utf-8", "replace"))
            fname = values.get(lay.filename)
            key = key_from_relpath(fname[0].decode("utf-8", "replace") if fname else
                                   f"{path.stem.replace('.', '_')}-{n:07d}")
            samples.append(SourceSample(key, index, ("tfrecord", str(plain), offset, length, lay.image),
                                        f"{path}: record {n}" if gz else f"{path}@{offset - 12}"))
    if offset_used == 0 and lay.name == "slim" and splits and min(s.label for ss in splits.values() for s in ss) > 0:
        print("kdkit: warning: --label-offset 0, but no record has label 0: the labels look 1-based (TF-slim's); "
              "class 0 would stay empty and every index be one too high. Use --label-offset 1 unless that is "
              "intended", file=sys.stderr)
    if names is not None:  # TFDS's class list: every class, also those no listed record uses
        synsets, max_index = dict(enumerate(names)), len(names) - 1
    if remap_labels:
        synsets, texts, max_index = _remap(splits, synsets, texts)
    if names is not None and not remap_labels and not all(WNID.fullmatch(n) for n in names):
        # not ImageNet: the dataset's own label order is the one its users know, nothing to line up with
        classes, order = [ClassInfo(i, n, n) for i, n in enumerate(names)], f"{TFDS_LABELS} order"
    else:
        classes, order = _classes(synsets, texts, max_index)
    root = str(files[0]) if len(files) == 1 else os.path.commonpath([str(p.parent) for p in files])
    ordered = sorted(splits, key=lambda s: (s != "train", s != "val", s))
    return SourceDataset("tfrecord", root, classes, [SourceSplit(s, splits[s]) for s in ordered],
                         info={"layout": lay.name if lay else layout, "label_offset": offset_used, "class_order": order,
                               "files": len(files), "gzip_files": gzipped, "remapped_labels": remap_labels,
                               **({"class_list": str(names_file)} if names_file else {})})
