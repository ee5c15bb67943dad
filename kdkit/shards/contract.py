"""The shard contract: the one place that says what a kdkit shard set is.

Writers (converters, the teacher pass), readers (DALI pipelines, stock webdataset, timm) and
`kdkit verify` all import these names instead of repeating string literals. `shards/FORMAT.md`
documents the same facts for people; a test checks the two agree.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

FORMAT_NAME = "kdkit-shards"
FORMAT_VERSION = 1

# --- sample members (one tar member per field, all sharing the sample key) ---------------------
IMAGE_EXT = "jpg"  # encoded image bytes: JPEG (source bytes where possible, else re-encoded RGB)
LABEL_EXT = "cls"  # class index as ASCII decimal, zero-padded to LABEL_WIDTH digits
# The class index is zero-padded so DALI can turn it into an int inside the graph with plain
# arithmetic (fixed-length digit vector . powers of ten): DALI reads members as raw bytes and has
# no ASCII-to-int operator (DALI #4839, #3658). `int(b"000042") == 42`, so stock webdataset and
# timm read it unchanged.
LABEL_WIDTH = 6
MAX_CLASSES = 10**LABEL_WIDTH

# --- teacher outputs (added by `kdkit add-teacher-logits`; absent until then) ----------------------
# One member per sample, KEY.teacher: the sample's arrays as raw little-endian bytes, back to back, in
# the order and shapes teacher_layout gives for the set's (class count, top-k, views), which the
# manifest's teacher block records ("layout"). No header: the layout is the same for every sample of
# a set, so DALI splits the member in-graph (byte slices + fn.reinterpret) and numpy with
# np.frombuffer(raw, dtype, count, offset); one member pays one tar header and one 512-byte padding.
TEACHER_EXT = "teacher"
VIEW_FIELDS = ("x", "y", "w", "h", "flip")  # a box row: pixels of the decoded image (EXIF orientation
#                                            applied, as decoders apply it), x, y its top-left corner,
#                                            w, h its size; flip 1 = mirrored
INDEX_DTYPES = ("<u2", "<i4")  # class indices: uint16 where the class count allows (<= 65536), else int32
# Sets written before 2026-12 hold one .npy member per array, with float32 view boxes relative to the
# image: readers refuse them, naming `kdkit add-teacher-logits SET --repack` (the one conversion).
LEGACY_LOGITS_EXT = "logits.npy"  # float16 (C,) or (K, C)
LEGACY_TOPK_VALUES_EXT = "topk_logits.npy"  # float16 (k,) or (K, k)
LEGACY_TOPK_INDICES_EXT = "topk_idx.npy"  # int32 (k,) or (K, k)
LEGACY_VIEWS_EXT = "views.npy"  # float32 (K, 5): x, y, w, h relative to the decoded image, flip
LEGACY_TEACHER_EXTS = (LEGACY_LOGITS_EXT, LEGACY_TOPK_VALUES_EXT, LEGACY_TOPK_INDICES_EXT, LEGACY_VIEWS_EXT)


@dataclass(frozen=True)
class TeacherPart:
    """One array of the packed teacher member."""

    name: str  # values | indices | boxes
    dtype: str  # numpy's name, little-endian: <f2, <u2, <i4
    shape: tuple[int, ...]
    offset: int  # in bytes from the member's start

    @property
    def count(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.count * int(self.dtype[-1])

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape), "offset": self.offset}


def teacher_layout(num_classes: int, topk: int | None, views: int | None) -> tuple[TeacherPart, ...]:
    """The packed member's arrays, in order: values float16 (W,) or (K, W), W = k (top-k log-probabilities)
    or C (logits); with top-k, indices (W,) / (K, W), uint16 or int32 (INDEX_DTYPES); with K stored views,
    boxes uint16 (K, 5) rows VIEW_FIELDS in pixels (a JPEG's sides are 16-bit numbers, so they always fit)."""
    lead = (int(views),) if views else ()
    width = int(topk) if topk else int(num_classes)
    parts = [("values", "<f2", lead + (width,))]
    if topk:
        parts.append(("indices", INDEX_DTYPES[0] if num_classes <= 65536 else INDEX_DTYPES[1], lead + (width,)))
    if views:
        parts.append(("boxes", "<u2", (int(views), len(VIEW_FIELDS))))
    out, offset = [], 0
    for name, dtype, shape in parts:
        out.append(TeacherPart(name, dtype, shape, offset))
        offset += out[-1].nbytes
    return tuple(out)


def block_layout(teacher: dict, num_classes: int) -> tuple[TeacherPart, ...]:
    """The packed layout a manifest's teacher block describes (its class count, top-k and views)."""
    return teacher_layout(int(teacher.get("num_classes") or num_classes), teacher.get("topk"), teacher.get("views"))


def is_legacy_teacher(teacher: dict | None) -> bool:
    """A teacher block of a set written before the packed member (one .npy member per array)."""
    return bool(teacher) and "layout" not in teacher


def legacy_teacher_problem(folder) -> str:
    """What to say of a set whose teacher outputs are in the layout before the packed member."""
    return (f"{folder}: teacher outputs written by kdkit before 2026-12 (one .npy member per array); convert them "
            f"once with `kdkit add-teacher-logits {folder} --repack --in-place` (or --out NEW)")


# --- files of a shard set (one folder per split) ----------------------------------------------
MANIFEST = "manifest.json"
SKIP_REPORT = "skipped.tsv"  # source path <TAB> reason, for every sample left out
STATE_DIR = ".kdkit-state"  # per-shard completion records and the plan; what resume reads
PLAN_FILE = "plan.json"
TIMM_INFO = "_info.json"  # at the dataset root, aggregating every split (timm's reader_wds)
DALI_INDEX_VERSION = "v1.2"  # first token of a DALI webdataset index (tools/wds2idx.py)


def is_member_file(name, suffix: str) -> bool:
    """A bare file name of a set's own folder: no folder part, no "..", not absolute, the right suffix.
    Paths read from manifests must resolve inside the set (a crafted one must not reach other files)."""
    return (isinstance(name, str) and name.endswith(suffix) and "/" not in name and "\\" not in name
            and name not in (".", "..") and not name.startswith(".") and "\0" not in name)


def shard_stem(split: str, index: int) -> str:
    return f"{split}-{index:06d}"


def tar_name(split: str, index: int) -> str:
    return shard_stem(split, index) + ".tar"


def index_name(split: str, index: int) -> str:
    return shard_stem(split, index) + ".idx"


def encode_label(label: int) -> bytes:
    if not 0 <= int(label) < MAX_CLASSES:
        raise ValueError(f"class index {label} outside [0, {MAX_CLASSES})")
    return f"{int(label):0{LABEL_WIDTH}d}".encode("ascii")


def decode_label(raw: bytes) -> int:
    return int(raw)


_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def key_from_relpath(relpath: str) -> str:
    """Stable sample key from a source-relative path.

    WebDataset splits a member name at the first dot of its basename, and DALI's index is
    space-separated, so keys hold only [A-Za-z0-9_-]: folders are joined with "__", the extension
    dropped. Where that loses information (dots, spaces, non-ASCII), a short hash of the original
    path keeps the key unique and still stable across runs.
    """
    rel = relpath.replace("\\", "/")
    stem = rel.rsplit(".", 1)[0] if "." in rel.rsplit("/", 1)[-1] else rel
    joined = "__".join(part for part in stem.split("/") if part)
    safe = _UNSAFE.sub("_", joined)
    if safe != joined:
        safe += "-" + _path_hash(rel)
    return safe


def _path_hash(rel: str) -> str:
    # surrogateescape: a file name that is not valid UTF-8 (Latin-1 'café' from an old archive) reaches
    # Python as lone surrogates; its original bytes give the hash
    return hashlib.sha1(rel.encode("utf-8", "surrogateescape")).hexdigest()[:8]


def unique_keys(relpaths: list[str]) -> list[str]:
    """key_from_relpath of each path, where paths that would share a key (photo.jpg beside photo.png: keys
    drop the extension) each get the hash of their whole path appended, so both are kept, each under its
    own stable key."""
    keys = [key_from_relpath(r) for r in relpaths]
    count: dict[str, int] = {}
    for k in keys:
        count[k] = count.get(k, 0) + 1
    return [k + "-" + _path_hash(r.replace("\\", "/")) if count[k] > 1 else k for k, r in zip(keys, relpaths)]


def split_member_name(name: str) -> tuple[str, str]:
    """(key, ext) the way webdataset and DALI split a member name: at the first dot of the basename."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1:]


@dataclass
class ClassInfo:
    index: int
    id: str  # wnid, folder name or numeric id as the source names it
    name: str = ""  # human-readable name where the source has one

    def to_json(self) -> dict:
        return {"index": self.index, "id": self.id, "name": self.name}


@dataclass
class ShardRecord:
    tar: str
    idx: str
    num_samples: int
    bytes: int
    sha256: str
    skipped: int = 0

    def to_json(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Manifest:
    split: str
    classes: list[ClassInfo]
    shards: list[ShardRecord]
    source: dict
    options: dict
    command: str
    kdkit_version: str
    skipped: int = 0
    ignored_files: int = 0
    converted: dict = field(default_factory=dict)  # images changed to be stored as a viewer shows them, by change
    teacher: dict | None = None
    members: dict = field(default_factory=lambda: {"image": IMAGE_EXT, "label": LABEL_EXT})
    label_width: int = LABEL_WIDTH

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)

    def to_json(self) -> dict:
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "split": self.split,
            "num_samples": self.num_samples,
            "num_classes": len(self.classes),
            "num_shards": len(self.shards),
            "members": self.members,
            "label_width": self.label_width,
            "skipped": self.skipped,
            "skip_report": SKIP_REPORT,
            "ignored_files": self.ignored_files,
            "converted": self.converted,
            "classes": [c.to_json() for c in self.classes],
            "shards": [s.to_json() for s in self.shards],
            "source": self.source,
            "options": self.options,
            "command": self.command,
            "kdkit_version": self.kdkit_version,
            "teacher": self.teacher,
        }

    @classmethod
    def from_json(cls, d: dict) -> "Manifest":
        if d.get("format") != FORMAT_NAME:
            raise ValueError(f"not a kdkit manifest (format={d.get('format')!r})")
        if int(d.get("format_version", -1)) > FORMAT_VERSION:
            raise ValueError(
                f"manifest format_version {d['format_version']} is newer than this kdkit "
                f"understands ({FORMAT_VERSION}); upgrade kdkit")
        shards = [ShardRecord(**s) for s in d["shards"]]
        for s in shards:
            for name, suffix in ((s.tar, ".tar"), (s.idx, ".idx")):
                if not is_member_file(name, suffix):
                    raise ValueError(f"shard entry {name!r} is not a {suffix} file name inside the set's folder "
                                     "(a manifest names its shards by bare file name)")
        return cls(
            split=d["split"],
            classes=[ClassInfo(**c) for c in d["classes"]],
            shards=shards,
            source=d.get("source", {}),
            options=d.get("options", {}),
            command=d.get("command", ""),
            kdkit_version=d.get("kdkit_version", ""),
            skipped=d.get("skipped", 0),
            ignored_files=d.get("ignored_files", 0),
            converted=d.get("converted", {}),
            teacher=d.get("teacher"),
            members=d.get("members", {"image": IMAGE_EXT, "label": LABEL_EXT}),
            label_width=d.get("label_width", LABEL_WIDTH),
        )
