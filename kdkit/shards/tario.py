"""Writing and reading single shards: atomic tar + DALI index, checksums.

The tar itself is written by webdataset's own TarWriter (so the format is exactly what stock
webdataset writes). What webdataset does not do, and this module adds: write to a temporary name
and rename only when complete (a killed run never leaves a half tar under a real name), fixed
member metadata (so a rerun reproduces the same bytes and checksums), and the DALI index beside
the tar, computed from the finished file's member offsets (DALI's `wds2idx` format v1.2).

A path here is a local one or a bucket URL (kdkit.shards.location): a shard for a bucket is built in
local scratch and uploaded whole, index first, so an object under a shard's name is always complete.
"""
from __future__ import annotations

import hashlib
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from kdkit import atomic
from kdkit.shards import contract
from kdkit.shards.location import BucketPath, open_read

TMP_SUFFIX = ".tmp"  # kdkit's own files take temp names from kdkit.atomic; this one is for sources' caches

# the write-to-temp-then-rename of every file kdkit writes (kdkit.atomic), under the names shard code uses
atomic_write_bytes = atomic.write_bytes
atomic_write_json = atomic.write_json


def sha256_file(path: Path | BucketPath, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open_read(path) as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def dali_index_lines(tar_path: Path) -> list[str]:
    """Index lines for DALI's fn.readers.webdataset: per sample `ext offset size name ...`."""
    groups: dict[str, list[str]] = {}
    with open_read(tar_path) as f, tarfile.open(fileobj=f, mode="r:") as tf:
        for m in tf:
            if not m.isfile():
                continue
            key, ext = contract.split_member_name(m.name)
            if not key or key.endswith("/"):
                continue  # hidden files, as DALI's wds2idx skips them
            groups.setdefault(key, []).append(f"{ext} {m.offset_data} {m.size} {m.name}")
    return [" ".join(parts) for parts in groups.values()]


def write_dali_index(tar_path: Path, idx_path: Path) -> int:
    lines = dali_index_lines(tar_path)
    text = f"{contract.DALI_INDEX_VERSION} {len(lines)}\n" + "".join(line + "\n" for line in lines)
    atomic_write_bytes(idx_path, text.encode("ascii"))
    return len(lines)


def parse_dali_index(idx_path: Path) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """[(key, {ext: (offset, size)})] per sample, in tar order. Raises ValueError on a malformed index.

    kdkit writes v1.2 lines (ext offset size member-name); lines without the member name, as DALI's
    wds2idx may write them, are read too, with "#<n>" standing in for the key.
    """
    with open_read(idx_path, "ascii") as f:
        header = f.readline().split()
        if len(header) != 2 or header[0] != contract.DALI_INDEX_VERSION:
            raise ValueError(f"{idx_path}: not a DALI {contract.DALI_INDEX_VERSION} index")
        out = []
        for n, line in enumerate(f, start=2):
            tok = line.split()
            width = 4 if len(tok) % 4 == 0 else 3
            if not tok or len(tok) % width:
                raise ValueError(f"{idx_path}: malformed line {n}")
            comps = {tok[i]: (int(tok[i + 1]), int(tok[i + 2])) for i in range(0, len(tok), width)}
            out.append((contract.split_member_name(tok[3])[0] if width == 4 else f"#{n - 2}", comps))
        if len(out) != int(header[1]):
            raise ValueError(f"{idx_path}: header says {header[1]} samples, {len(out)} listed")
        return out


def read_dali_index(idx_path: Path) -> list[dict[str, tuple[int, int]]]:
    """[{ext: (offset, size)}] per sample, in tar order (parse_dali_index without the keys)."""
    return [comps for _, comps in parse_dali_index(idx_path)]


def write_shard(tar_path: Path, samples: Iterable[dict[str, bytes]]) -> dict:
    """Write samples ({"__key__": str, ext: bytes, ...}) to tar_path + its DALI index, atomically.

    Returns the shard record fields (num_samples, bytes, sha256). The tar is renamed into place last,
    after its index, so a present tar always has its index beside it; a failure (Ctrl-C, a full disk)
    leaves no temporary file behind (kdkit.atomic).
    """
    record = {}
    with atomic.replacing(tar_path, sha256=lambda: record["sha256"]) as tmp:  # hashed once, kept in a bucket too
        record["num_samples"] = _write_tar(tmp, samples)
        write_dali_index(tmp, tar_path.with_suffix(".idx"))
        record["sha256"] = sha256_file(tmp)
        record["bytes"] = tmp.stat().st_size
    return record


def _write_tar(path: Path, samples: Iterable[dict[str, bytes]]) -> int:
    import webdataset as wds  # imported here: it pulls in torch, which readers of shards don't need

    count = 0
    with open(path, "wb") as f:
        # mtime fixed and owner neutral: the same samples give byte-identical tars on every run. An int
        # mtime: tarfile gives a float one (0.0) a PAX header of its own, 1 KB more for every member
        writer = wds.TarWriter(f, user="kdkit", group="kdkit", mode=0o444, mtime=0, encoder=False)
        try:
            for sample in samples:
                writer.write(sample)
                count += 1
        except BaseException:
            # abandon the temp file: mark tarfile's stream closed so it never flushes into it later
            writer.tarstream.closed = True
            getattr(writer.tarstream.fileobj, "__dict__", {})["closed"] = True
            raise
        writer.close()
    return count


def iter_tar_samples(tar_path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) in tar order; raises tarfile.ReadError / EOFError on a damaged tar."""
    key, members = None, {}
    with open_read(tar_path) as f, tarfile.open(fileobj=f, mode="r:") as tf:
        for m in tf:
            if not m.isfile():
                continue
            k, ext = contract.split_member_name(m.name)
            if k != key:
                if key is not None:
                    yield key, members
                key, members = k, {}
            data = tf.extractfile(m).read()
            if len(data) != m.size:
                raise EOFError(f"member {m.name} is truncated")
            members[ext] = data
        if key is not None:
            yield key, members
