"""The per-image work of the shard writer, run in worker processes.

Kept apart from writer.py so spawned workers import only Pillow and numpy (not webdataset, which
pulls in torch and costs seconds per process).
"""
from __future__ import annotations

import signal

from kdkit.errors import BadImage
from kdkit.shards.images import ImageOptions, prepare_image
from kdkit.shards.sources.base import SourceSample


def read_ref(ref: tuple):
    """Encoded image bytes, or a uint8 numpy pixel array (HDF5 arrays), for one sample ref (the converters'
    sources list refs; reading them here keeps the sources free of each other)."""
    kind = ref[0]
    if kind == "file":
        with open(ref[1], "rb") as f:
            return f.read()
    if kind == "tfrecord":
        from kdkit.shards.sources import tfrecord  # only where a set comes from TFRecords / HDF5

        return tfrecord.read_image(ref)
    if kind == "hdf5":
        from kdkit.shards.sources import hdf5

        return hdf5.read_image(ref)
    raise ValueError(f"unknown sample ref kind {kind!r}")


def init_worker() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is handled once, by the main process


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
