"""The per-image work of the shard writer, run in worker processes.

Kept apart from writer.py so spawned workers import only Pillow and numpy (not webdataset, which
pulls in torch and costs seconds per process).
"""
from __future__ import annotations

import os
import stat

from kdkit.errors import BadImage
from kdkit.shards.images import ImageOptions, prepare_image
from kdkit.shards.sources.base import SourceSample


def read_ref(ref: tuple):
    """Encoded image bytes, or a uint8 numpy pixel array (HDF5 arrays), for one sample ref (the converters'
    sources list refs; reading them here keeps the sources free of each other)."""
    kind = ref[0]
    if kind == "file":
        return read_file(ref[1])
    if kind == "tfrecord":
        from kdkit.shards.sources import tfrecord  # only where a set comes from TFRecords / HDF5

        return tfrecord.read_image(ref)
    if kind == "hdf5":
        from kdkit.shards.sources import hdf5

        return hdf5.read_image(ref)
    raise ValueError(f"unknown sample ref kind {kind!r}")


def read_file(path: str) -> bytes:
    """A regular file's bytes. Anything else named like an image is refused (BadImage) without waiting:
    opening a named pipe (FIFO) blocks until a writer appears, which may be never, and a device may
    never end (O_NONBLOCK makes the open return at once; it changes nothing for a regular file)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a named pipe (FIFO)" if stat.S_ISFIFO(mode) else "a device or socket"
            raise BadImage(f"not a regular file but {kind}: only files are read as images")
        return f.read()


def process_sample(args: tuple[SourceSample, ImageOptions]) -> tuple[SourceSample, bytes | None, str | None, list]:
    """(sample, jpeg bytes, None, what was changed: images.to_rgb's words) or (sample, None, reason it was
    left out, [])."""
    sample, opts = args
    try:
        raw = read_ref(sample.ref)
    except OSError as e:
        return sample, None, f"unreadable: {e.strerror or e}", []
    except BadImage as e:
        return sample, None, str(e), []
    try:
        jpg, changed = prepare_image(raw, opts)
    except BadImage as e:
        return sample, None, str(e), []
    return sample, jpg, None, changed
