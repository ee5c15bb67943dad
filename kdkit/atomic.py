"""Writing a file whole or not at all: the one write-to-temp-then-rename of every file kdkit writes
(shard tars and their indexes, manifests and job records, checkpoints, configs, exports).

    with atomic.writing(path) as f:         # a binary file object
        torch.save(obj, f)
    with atomic.replacing(path) as tmp:     # a path, for libraries that open the file themselves
        onnx.save(model, str(tmp))
    atomic.write_bytes(path, data); atomic.write_text(path, text); atomic.write_json(path, obj)
    atomic.save_figure(fig, path, dpi=...)  # matplotlib
    atomic.append(path, line)               # a whole line or none (metrics.jsonl)

The temporary file lies beside the target (a rename within one file system is atomic) under a name
no user would choose and that says who made it, `.NAME.<pid>.kdkit-tmp` (the pid: two processes
never share one). It is fsynced before the rename, so after a crash or a power cut the real name
holds the old file or the whole new one. Any failure (Ctrl-C, a full disk, the writing library's own
error) removes the temporary file: a failed write leaves only what was there before.

A target in a bucket (kdkit.shards.location.BucketPath) is written the same way in this machine's
scratch folder for its prefix, then uploaded in one put (its sha256 kept as object metadata): an object
appears whole or not at all.

A full disk (ENOSPC), an exceeded quota (EDQUOT) or file-size limit (EFBIG) surfaces as an OSError
naming the target file, whatever the writing library made of it (torch.save reports a failed write
as "enforce fail at inline_container.cc ... unexpected pos"); the CLI prints disk_full_message.
"""
from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import shutil
from pathlib import Path

TMP_TAG = ".kdkit-tmp"
DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def _local_folder(path) -> Path:
    """The local folder of `path`'s temporary files: its own folder, or the scratch of a bucket prefix."""
    from kdkit.shards.location import local_side, location

    return local_side(location(path).parent)


def temp_path(path) -> Path:
    """Where `path` is written before it is renamed into place (this process's own name)."""
    from kdkit.shards.location import location

    return _local_folder(path) / f".{location(path).name}.{os.getpid()}{TMP_TAG}"


def leftovers(path) -> list[Path]:
    """Temporary files of `path` left by killed writers (any process's): only a caller that holds the
    folder's lock (kdkit.locks) may remove them."""
    from kdkit.shards.location import location

    return sorted(_local_folder(path).glob(f".{glob.escape(location(path).name)}.*{TMP_TAG}"))


def named(e: BaseException, path: Path) -> BaseException:
    """A disk-full OSError re-made to name `path` (the file being written, not its temporary twin)."""
    if isinstance(e, OSError) and e.errno in DISK_FULL:
        return OSError(e.errno, e.strerror or os.strerror(e.errno), str(path))
    return e


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def replacing(path, fsync: bool = True, sha256=None):
    """Yields the temporary path to write; renamed over `path` when the block ends (uploaded, for a
    bucket, with its sha256 as object metadata: `sha256()` where the caller has hashed the file
    already, else hashed here), removed if it fails."""
    from kdkit.shards.location import BucketPath, location, replace
    from kdkit.shards.tario import sha256_file

    path = location(path)
    tmp = temp_path(path)
    try:
        yield tmp
        if isinstance(path, BucketPath):
            replace(tmp, path, sha256=sha256() if sha256 else sha256_file(tmp))  # one put: the object appears whole or not at all
        else:
            if fsync:
                _fsync(tmp)
            os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        renamed = named(e, path)
        if renamed is e:
            raise
        raise renamed from None


class _Recording:
    """A file object that remembers the OSError of a failed write, for libraries that report it as
    something else (torch.save's RuntimeError); everything else goes to the file."""

    def __init__(self, f):
        self._f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name):
        return getattr(self._f, name)


@contextlib.contextmanager
def writing(path: Path):
    """Yields a binary file object; its bytes replace `path` when the block ends (see the module doc)."""
    with replacing(path, fsync=False) as tmp:
        with open(tmp, "wb") as f:
            rec = _Recording(f)
            try:
                yield rec
            except BaseException:
                if rec.error is not None:
                    raise rec.error from None
                raise
            f.flush()
            os.fsync(f.fileno())


def write_bytes(path: Path, data: bytes) -> None:
    with writing(path) as f:
        f.write(data)


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=1, sort_keys=False) + "\n")


def save_figure(fig, path: Path, **kwargs) -> None:
    """matplotlib's fig.savefig, whole or not at all (the format from the file's suffix)."""
    with writing(Path(path)) as f:
        fig.savefig(f, format=Path(path).suffix.lstrip(".") or "png", **kwargs)


def append(path: Path, text: str) -> None:
    """Append `text` whole, or leave the file as it was (a full disk never leaves half a line)."""
    data = text.encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        start = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        except BaseException as e:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)
            renamed = named(e, path)
            if renamed is e:
                raise
            raise renamed from None
    finally:
        os.close(fd)


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def disk_full_message(e: OSError) -> str:
    """One line for an OSError of DISK_FULL: the file, why, what to free, and that nothing was lost."""
    where = Path(e.filename) if e.filename else None
    folder = where.parent if where is not None else Path.cwd()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        free = f"{_size(shutil.disk_usage(folder).free)} free there now"
    except OSError:
        free = "free space unknown"
    if e.errno == errno.EFBIG:
        why = ("file too large: it passed this shell's file-size limit (`ulimit -f`; raise it, e.g. `ulimit -f "
               "unlimited`) or the largest file its file system holds")
    elif e.errno == errno.EDQUOT:
        why = f"disk quota exceeded on the file system holding {folder} ({free}): free space within your quota"
    else:
        why = f"no space left on the device holding {folder} ({free}): free space there"
    return (f"{where or 'a file being written'}: {why}, then run the same command again; files finished before "
            "are intact and no partial file was left")
