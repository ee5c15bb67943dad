"""Opening a shard set, the one reader every stage shares (the trainer, the teacher pass, eval,
verify, the writers): which files, checked before DALI sees them, and turning DALI's failures
into errors that name the shard and the sample key. No DALI here: a shard set opens without it
(DALI itself reads the tars, kdkit.pipelines). A set is a local folder or a bucket prefix
(kdkit.shards.location): the same code reads both, and DALI gets the same URLs.

DALI's own errors for bad shards are correct but unhelpful ("Malformed index file ... line 8",
"nvImageCodec failure: '#3'"), and a missing `.idx` makes it silently re-scan every tar at start.
Everything that can be checked from the index files alone (present, offsets inside the tar,
requested members present, label width) is checked here first, in one pass over the indexes; a
shard whose bytes differ from its manifest's checksum is refused before DALI reads it
(check_checksums); what only decoding can reveal (a corrupt JPEG in a set without a manifest, or
one written that way) is diagnosed after DALI fails, by decoding the rank's samples in reading order
with Pillow until the bad one is found.
"""
from __future__ import annotations

import re
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from kdkit.errors import KdkitError
from kdkit.shards import checksums, contract
from kdkit.shards.location import BucketPath, location, open_read
from kdkit.shards.tario import parse_dali_index
from kdkit.shards.verify import find_sets, load_manifest


class ShardError(KdkitError):
    """A shard set DALI cannot read as asked; the message names the shard file and sample key."""


@dataclass
class ShardSet:
    """The tars (with their DALI indexes) one pipeline reads, in the order it reads them."""

    tars: list[Path | BucketPath]
    folder: Path | BucketPath | None = None
    manifest: contract.Manifest | None = None
    checksums: dict[Path | BucketPath, str] = field(default_factory=dict)  # tar -> its manifest's sha256
    # what the indexes say, read once (_sample_table): a run's checks and its loader each scan the set. A
    # ShardSet is the set as first read: resolve it again after rewriting the set's indexes
    _samples: list | None = field(default=None, repr=False, compare=False)

    @property
    def indexes(self) -> list[Path | BucketPath]:
        return [t.with_suffix(".idx") for t in self.tars]


def resolve_shards(source, split: str = "train") -> ShardSet:
    """A ShardSet from a shard-set folder, a dataset root (+ split), a tar, or a list of tars; each a
    local path or a bucket URL.

    With a manifest the shards are read in the manifest's order; a folder without one (e.g. tars
    written by hand with `tario.write_shard`) is read in sorted file-name order.
    """
    if isinstance(source, ShardSet):
        return source
    if isinstance(source, (list, tuple)):
        tars = [location(p) for p in source]
        if not tars:
            raise ShardError("no shards given")
        return ShardSet(tars=tars)
    path = location(source)
    if path.suffix == ".tar":
        return ShardSet(tars=[path])
    if not path.exists():
        raise ShardError(f"{path}: does not exist")
    if not (path / contract.MANIFEST).exists() and not any(path.glob("*.tar")):
        sub = path / split
        if sub.is_dir() and not (sub / contract.MANIFEST).exists():
            if any(sub.glob("*.tar")) or (sub / contract.STATE_DIR).exists():
                raise ShardError(f"{sub}: holds shards but no {contract.MANIFEST} (its writing did not finish, or the "
                                 "manifest was lost): run the command that wrote it again to finish it")
            raise ShardError(f"{sub}: holds no shard set (no {contract.MANIFEST}, no shards)")
        found = find_sets(path)
        sets = [s for s in found if s.name == split]
        if not sets:
            raise ShardError(f"{path}: no shard set for split {split!r}; it holds "
                             f"{', '.join(s.name for s in found)}")
        path = sets[0]
    if (path / contract.MANIFEST).exists():
        man = load_manifest(path)
        return ShardSet(tars=[path / s.tar for s in man.shards], folder=path, manifest=man,
                        checksums={path / s.tar: s.sha256 for s in man.shards})
    return ShardSet(tars=sorted(path.glob("*.tar")), folder=path)


@dataclass
class ShardScan:
    """What the indexes say: per shard, the sample keys and which of the requested members each has."""

    keys: list[list[str]] = field(default_factory=list)  # per shard, in tar order
    usable: list[list[bool]] = field(default_factory=list)  # per shard: has every requested member
    skipped: int = 0  # samples DALI will skip (missing="skip")
    present: dict[str, int] = field(default_factory=dict)  # samples holding each probed member

    @property
    def num_samples(self) -> int:
        return sum(sum(u) for u in self.usable)


def _parse_index(idx: Path) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """tario.parse_dali_index, its errors as ShardError with the fix."""
    try:
        return parse_dali_index(idx)
    except ValueError as e:
        raise ShardError(f"{e} (rewrite it with `kdkit verify --fix-index`)") from None


def teacher_format(shards: ShardSet) -> str | None:
    """Which teacher outputs a set holds, from its first sample: "packed" (the .teacher member), "legacy"
    (one .npy member per array: kdkit before 2026-12) or None. `kdkit add-teacher-logits` writes one kind
    for a whole set; whether every sample has it is scan_shards' job."""
    table = _sample_table(shards) if shards.tars else []  # read once for this and the scans that follow
    comps = table[0][2][0][0] if table and table[0][2] else frozenset()
    if contract.TEACHER_EXT in comps:
        return "packed"
    return "legacy" if set(comps) & set(contract.LEGACY_TEACHER_EXTS) else None


def teacher_block(shards: ShardSet) -> dict | None:
    """The teacher block of the set's manifest (of the manifest beside the tars, for a set given as tars)."""
    if shards.manifest is not None:
        return shards.manifest.teacher
    beside = shards.tars[0].parent if shards.tars else None
    if beside is not None and (beside / contract.MANIFEST).exists():
        return load_manifest(beside).teacher
    return None


def teacher_layout(shards: ShardSet) -> tuple[contract.TeacherPart, ...]:
    """The packed teacher member's layout (contract.teacher_layout), from the set's teacher block; a set
    in the layout before it, or without the manifest that says it, is refused with what to do."""
    where = shards.folder or (shards.tars[0].parent if shards.tars else "the shard set")
    block = teacher_block(shards)
    if teacher_format(shards) == "legacy" or contract.is_legacy_teacher(block):
        raise ShardError(contract.legacy_teacher_problem(where))
    if not block:
        raise ShardError(f"{where}: no teacher block in a manifest.json beside the tars, and the packed .teacher "
                         "member's layout is written there; read the set through its folder")
    return contract.block_layout(block, int(block.get("num_classes") or 0))


def scan_shards(shards: ShardSet, required: list[str], probe: list[str] = (),
                missing: str = "error") -> ShardScan:
    """Check the indexes before building a pipeline; raise ShardError naming shard and key.

    `required` members must be in every sample; with missing="skip" a sample lacking one is
    counted in `skipped` instead (DALI's missing_component_behavior="skip" then leaves it out).
    `probe` members are only counted (scan.present). The indexes are read once per ShardSet
    (sample_keys), however many scans ask: ~8 s for ImageNet's 1.28M samples in 1,000 shards on a 2-core
    box, and a scan of what was read well under 1 s (a resumed KD run read them three times before, 40 s:
    scripts/bench_index_scan.py); in a bucket a request per shard.
    """
    if missing not in ("error", "skip"):
        raise ValueError(f"missing={missing!r}: expected 'error' or 'skip'")
    scan = ShardScan(present={e: 0 for e in probe})
    verdicts, kinds = {}, Counter()  # per kind of sample (a set holds a handful): worked out once, counted
    for tar, keys, members in _sample_table(shards):
        usable = []
        for key, kind in zip(keys, members):
            lacking, bad_label = verdicts.get(kind) or verdicts.setdefault(
                kind, ([e for e in required if e not in kind[0]], kind[1] not in (None, contract.LABEL_WIDTH)))
            if lacking and missing == "error":
                raise ShardError(f"{tar}: sample {key} has no .{lacking[0]} member "
                                 f"(members: {', '.join(sorted(kind[0]))}); pass missing='skip' to leave "
                                 "such samples out")
            if bad_label:
                raise ShardError(f"{tar}: sample {key}: .{contract.LABEL_EXT} is {kind[1]} bytes, "
                                 f"the contract wants {contract.LABEL_WIDTH} zero-padded digits")
            usable.append(not lacking)
            scan.skipped += bool(lacking)
        kinds.update(members)
        scan.keys.append(keys)
        scan.usable.append(usable)
    for (exts, _), n in kinds.items():
        for ext in probe:
            scan.present[ext] += n * (ext in exts)
    if scan.num_samples == 0:
        raise ShardError(f"{shards.tars[0].parent}: no readable samples with members {', '.join(required)}")
    return scan


def sample_keys(shards: ShardSet) -> list[list[str]]:
    """Every shard's sample keys, in reading order (what ShardScan.keys holds), from the indexes."""
    return [keys for _, keys, _ in _sample_table(shards)]


def _sample_table(shards: ShardSet) -> list[tuple]:
    """(tar, keys, members) per shard, members per sample as (its member extensions, the byte count of its
    label member or None): what the scans need of the indexes, read on first use by a few threads at once.
    A member past the end of its tar is refused here, naming the first such shard and sample. The member
    sets are shared between samples (a set holds a handful of kinds), so this costs a pointer per sample
    beside the keys that every scan holds anyway."""
    if shards._samples is not None:
        return shards._samples
    pairs, kinds = list(zip(shards.tars, shards.indexes)), {}
    # a bucket's indexes are requests of some milliseconds each: 16 at once; a local disk's are read faster
    # than Python parses them, and parsing threads only contend for the GIL (12 s -> 8 s for ImageNet on 2 cores)
    workers = min(16, len(pairs)) if pairs and isinstance(pairs[0][0], BucketPath) else 1
    with ThreadPoolExecutor(workers) as pool:  # in order: the first bad shard is named
        # each shard made compact where it is read: its parsed lines (a dict and tuples a sample) are freed
        # at once, not left to pile up for the garbage collector to walk
        table = [(tar, *rows) for tar, rows in zip(shards.tars, pool.map(lambda pair: _shard_rows(*pair, kinds), pairs))]
    shards._samples = table
    return table


def _shard_rows(tar, idx, kinds: dict) -> tuple[list[str], list[tuple]]:
    """One shard's keys and members (_sample_table), its index checked against the tar's size."""
    size, entries = _read_shard_index(tar, idx)
    keys, members = [], []
    for key, comps in entries:
        for ext, (off, n) in comps.items():
            if off + n > size:
                raise ShardError(f"{tar}: sample {key}: member .{ext} ends at byte {off + n} but the "
                                 f"tar has {size} bytes (truncated shard? compare with the manifest "
                                 "via `kdkit verify`)")
        label = comps.get(contract.LABEL_EXT)
        kind = (frozenset(comps), label[1] if label else None)
        keys.append(key)
        members.append(kinds.setdefault(kind, kind))
    return keys, members


def _read_shard_index(tar, idx) -> tuple[int, list]:
    """A shard's size and its index entries; ShardError when either file is missing."""
    if not tar.exists():
        raise ShardError(f"{tar}: shard missing")
    if not idx.exists():
        raise ShardError(f"{idx}: DALI index missing for shard {tar.name} "
                         "(recreate it with `kdkit verify --fix-index`)")
    return tar.stat().st_size, _parse_index(idx)


def shard_range(num_samples: int, shard_id: int, num_shards: int) -> tuple[int, int]:
    """[begin, end) of the samples rank `shard_id` reads: DALI's contiguous split of the set."""
    return num_samples * shard_id // num_shards, num_samples * (shard_id + 1) // num_shards


def reading_order(shards: ShardSet, scan: ShardScan, shard_id: int = 0, num_shards: int = 1) -> list[tuple[Path, str]]:
    """(tar, key) in the order an unshuffled reader for `shard_id` yields samples in its first epoch.

    A teacher pass joins its outputs back to samples by key through this order.
    """
    flat = [(tar, k) for tar, keys, ok in zip(shards.tars, scan.keys, scan.usable)
            for k, u in zip(keys, ok) if u]
    begin, end = shard_range(len(flat), shard_id, num_shards)
    return flat[begin:end]


def check_checksums(shards: ShardSet, tars: list[Path], progress: bool = True) -> list[Path]:
    """Refuse a shard whose bytes differ from the sha256 its manifest recorded, before DALI reads it.
    Returns the tars of `tars` that no checksum vouched for (none recorded, or KDKIT_CHECKSUMS=0): the
    loader checks their image headers instead (kdkit.shards.headers says why).

    Why here and not after DALI fails: DALI cannot skip a damaged image inside a pipeline; its decoders
    report most damage as an error (explain_failure then names the sample), but a JPEG damaged after
    its shard was written can crash DALI 2.4's CPU decoder with a segfault, and no error handler runs
    after a segfault. A shard changed since kdkit wrote it is caught by its checksum, whatever the
    damage (the others' image headers are checked: kdkit.shards.headers). Cost and what the cache of
    verified shards promises: kdkit.shards.checksums (one read of
    each shard the first time, then a stat, plus 2% of the bytes re-hashed per check against silent
    damage; KDKIT_CHECKSUMS=full re-hashes all, KDKIT_CHECKSUMS=0 skips the check).
    """
    expected = {t: shards.checksums[t] for t in dict.fromkeys(tars) if t in shards.checksums}
    differ = checksums.changed(expected, progress, "checking shard checksums")
    if differ:
        raise ShardError(checksums.refusal(shards.manifest, differ))
    return [t for t in dict.fromkeys(tars) if t not in expected or checksums.mode() == "0"]


# ---------------------------------------------------------------------------------------------
# after DALI has failed

_INDEX_LINE = re.compile(r'index file at "([^"]+)" line (\d+)')
# DALI's messages when its S3/GCS client fails (the store down or slow, an object gone, access refused)
_STORE_FAILURE = re.compile(r"curlCode|S3 Object|S3 error|GCS|Access Denied|Could not connect", re.IGNORECASE)


def _key_at(idx: Path, sample: int) -> str:
    try:
        entries = _parse_index(idx)
        return entries[sample][0] if 0 <= sample < len(entries) else f"#{sample}"
    except (OSError, ShardError, ValueError):
        return f"#{sample}"


def find_undecodable(shards: ShardSet, scan: ShardScan, image_ext: str, shard_id: int, num_shards: int,
                     budget_s: float = 60.0) -> tuple[Path, str, str] | None:
    """The first image in the rank's reading order that Pillow cannot decode: (tar, key, reason).

    A decode failure happens within the first samples the reader reached, so scanning from the
    rank's first sample finds it early; the time budget keeps a huge set from looking like a hang.
    """
    from kdkit.errors import BadImage
    from kdkit.shards.images import check_decodes

    order = reading_order(shards, scan, shard_id, num_shards)
    offsets: dict[Path, dict[str, tuple[int, int]]] = {}
    deadline = time.monotonic() + budget_s
    handles: dict[Path, object] = {}
    try:
        for tar, key in order:
            if time.monotonic() > deadline:
                return None
            if tar not in offsets:
                offsets[tar] = {k: c[image_ext] for k, c in _parse_index(tar.with_suffix(".idx")) if image_ext in c}
                handles[tar] = open_read(tar)
            off, n = offsets[tar][key]
            f = handles[tar]
            f.seek(off)
            try:
                check_decodes(f.read(n))
            except BadImage as e:
                return tar, key, str(e)
    finally:
        for f in handles.values():
            f.close()
    return None


def _dali_reason(msg: str) -> str:
    """The one line of a DALI error that says what went wrong (after its operator traceback)."""
    tail = msg.rsplit("encountered:", 1)[-1]
    lines = [ln.strip() for ln in tail.splitlines()
             if ln.strip() and "no longer valid" not in ln and not ln.strip().startswith("C++ context")]
    return lines[0] if lines else msg.strip()


# failures of the machine, not of the data: the GPU's memory (a decoder's too), CUDA itself, the host's memory
_NOT_THE_DATA = re.compile(
    r"out of memory|cuda(error|_error| error| runtime| driver| allocation| failure)|bad_alloc|cannot allocate|"
    r"can't allocate|allocation fail|allocator_failure|illegal memory access|device-side assert|"
    r"nvjpeg_status_(execution_failed|internal_error|arch_mismatch)", re.IGNORECASE)


def not_the_data(err: BaseException) -> bool:
    """Whether a pipeline's error is the machine's (CUDA, GPU or host memory), which no shard explains: such
    an error is raised as it is, without a scan of the rank's shards for a bad image (a decoder that runs
    out of GPU memory says "decode" too)."""
    return isinstance(err, MemoryError) or bool(_NOT_THE_DATA.search(str(err)))


def explain_failure(err: RuntimeError, shards: ShardSet, scan: ShardScan | None, image_ext: str,
                    shard_id: int, num_shards: int) -> ShardError:
    """A ShardError for a RuntimeError raised by a DALI pipeline over `shards`, with shard and key."""
    msg = str(err)
    first = _dali_reason(msg)
    if isinstance(shards.tars[0], BucketPath) and _STORE_FAILURE.search(msg):
        from kdkit.shards.location import endpoint

        where = shards.folder or shards.tars[0].parent
        return ShardError(f"{where}: reading from {endpoint(where.scheme)} failed ({first}); nothing written is lost: "
                          "run the same command again once the store answers (a training run: with --resume, from "
                          "its last checkpoint)")
    m = _INDEX_LINE.search(msg)
    if m:
        idx, line = location(m.group(1)), int(m.group(2))
        # DALI 2.4 counts the lines it names differently per message: a missing member's "line n" is
        # sample n - 1, an offset's "line n" sample n - 2 (the header line counted as well)
        sample = line - 1 if "Underful" in msg else line - 2
        return ShardError(f"{idx.with_suffix('.tar')}: sample {_key_at(idx, sample)}: {first}")
    if "reinterpret" in msg.lower():
        return ShardError(f"a packed .{contract.TEACHER_EXT} member in {shards.tars[0].parent} is not as long as its "
                          f"manifest's layout says (`kdkit verify` names it): {first}")
    if "decode" in msg.lower() or "nvimagecodec" in msg.lower():
        found = find_undecodable(shards, scan, image_ext, shard_id, num_shards) if scan else None
        if found:
            tar, key, why = found
            return ShardError(f"{tar}: sample {key}: image does not decode ({why}). DALI cannot skip "
                              "bad images inside a pipeline; rewrite the shard without it, and check "
                              "the whole set with `kdkit verify --decode`")
        return ShardError(f"an image in {shards.tars[0].parent} does not decode ({first}); "
                          "`kdkit verify --decode` names it")
    return ShardError(f"DALI pipeline over {shards.tars[0].parent} failed: {first}")
