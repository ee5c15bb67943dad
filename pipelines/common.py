"""Graph pieces every role shares: the shard reader, the in-graph label and teacher-output decoding,
the final resize and normalize.

Every function here builds DALI graph nodes and must be called inside a `@pipeline_def`
function; each takes what it needs as explicit (typed) arguments. Nothing in a graph calls back
into Python, so the CPU backend runs on DALI's own threads (`num_threads`) exactly as the GPU one does.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from nvidia.dali import fn, types

from kdkit.shards import contract

if TYPE_CHECKING:
    from kdkit.pipelines.config import Backend, Output, Reading
    from kdkit.shards.reader import ShardSet

# --- sample members the pipelines read: the shard contract's names, re-exported -------------------
IMAGE_EXT = contract.IMAGE_EXT
LABEL_EXT = contract.LABEL_EXT
TEACHER_EXT = contract.TEACHER_EXT  # the packed teacher outputs: values[, class indices][, view boxes]
VIEW_FIELDS = contract.VIEW_FIELDS

READER_NAME = "Reader"  # what the iterator asks for the epoch size (reader_name=)

_POWERS = np.array([10 ** (contract.LABEL_WIDTH - 1 - i) for i in range(contract.LABEL_WIDTH)], np.int32)


def read_shards(shards: ShardSet, exts: list[str], reading: Reading, shard_id: int, num_shards: int,
                shuffle: bool) -> list:
    """One DataNode per member in `exts` (raw bytes), read by fn.readers.webdataset.

    Shuffling, when on, has two levels (see Reading.shuffle_buffer): the order of whole tars is
    reshuffled every epoch (`shuffle_after_epoch`, with one seed shared by every rank so the ranks
    still split the set between them), and samples are drawn at random from a buffer of
    `shuffle_buffer` samples read in sequence (`random_shuffle` + `initial_fill`).
    `pad_last_batch` repeats a rank's last sample up to a full batch so every rank runs the same
    number of iterations; the iterator then trims, drops or keeps the padding per its policy.
    """
    shuffle_args = {}
    if shuffle:
        shuffle_args = dict(random_shuffle=True, initial_fill=reading.shuffle_buffer, shuffle_after_epoch=True,
                            shuffle_after_epoch_seed=reading.seed)
    out = fn.readers.webdataset(
        paths=[str(t) for t in shards.tars], index_paths=[str(i) for i in shards.indexes], ext=list(exts),
        missing_component_behavior=reading.missing, shard_id=shard_id, num_shards=num_shards,
        pad_last_batch=True, seed=reading.seed + shard_id, prefetch_queue_depth=reading.reader_queue_depth,
        name=READER_NAME, **shuffle_args)
    return list(out) if isinstance(out, (list, tuple)) else [out]


def parse_label(cls):
    """Class index from the zero-padded ASCII digits of the `.cls` member, in-graph.

    DALI has no ASCII-to-int operator (DALI #4839, #3658), but fixed-width digits are a dot product
    with powers of ten. int64 so the labels go straight into torch's cross-entropy.
    """
    digits = fn.cast(cls, dtype=types.INT32) - 48
    label = fn.reductions.sum(digits * types.Constant(_POWERS), axes=0)
    return fn.cast(label, dtype=types.INT64)


_DALI_TYPES = {"<f2": types.FLOAT16, "<u2": types.UINT16, "<i4": types.INT32}


def unpack_teacher(raw, layout) -> dict:
    """The packed teacher member (raw bytes) split into its arrays in-graph, by the set's layout
    (contract.teacher_layout: fixed byte offsets and shapes): a byte slice each, reinterpreted as its
    type. Values stay float16; class indices and boxes become INT32 (graph arithmetic, torch)."""
    out = {}
    for part in layout:
        node = fn.reinterpret(raw[part.offset:part.offset + part.nbytes], dtype=_DALI_TYPES[part.dtype],
                              shape=list(part.shape))
        out[part.name] = node if part.name == "values" else fn.cast(node, dtype=types.INT32)
    return out


def teacher_exts(layout) -> list[str]:
    """The member holding the teacher outputs, when they are read (a layout), else none (False / None)."""
    return [TEACHER_EXT] if layout else []


def teacher_names(layout) -> list[str]:
    """The iterator's names of the teacher outputs: full logits, or top-k values + class indices."""
    if not layout:
        return []
    if any(p.name == "indices" for p in layout):
        return ["teacher_topk_values", "teacher_topk_indices"]
    return ["teacher_logits"]


def teacher_outputs(teacher: dict, backend: Backend) -> tuple:
    """The teacher's values (and top-k class indices) of unpack_teacher's arrays, as graph outputs."""
    return tuple(backend.to_output(teacher[name]) for name in ("values", "indices") if name in teacher)


def teacher_batch(d: dict, layout):
    """The teacher outputs of one iterator dict: logits, (top-k values, class indices), or None."""
    if "teacher_topk_values" in d:  # top-k storage: (values, class indices); see kdkit.train.kd
        return d["teacher_topk_values"], d["teacher_topk_indices"]
    return d.get("teacher_logits")


def normalize(images, output: Output, mirror=0, crop=None, crop_pos=(0.5, 0.5)):
    """uint8 HWC images to the model's input: one fused crop + mirror + normalize + transpose.

    Fusing matters on the CPU backend: separate flip, float conversion and transpose passes each
    walk the whole image again.
    """
    kwargs = {} if crop is None else dict(crop=crop, crop_pos_x=crop_pos[0], crop_pos_y=crop_pos[1])
    dtype = types.FLOAT if output.dtype == "float32" else types.FLOAT16
    return fn.crop_mirror_normalize(images, dtype=dtype, output_layout="CHW" if output.planar else "HWC",
                                    mean=output.mean255, std=output.std255, mirror=mirror, **kwargs)


def resize_square(images, size: int, antialias: bool):
    """Resize to size x size with DALI's fn.resize, bilinear; antialiased as Pillow and torchvision do
    it unless `antialias` is off. (The CPU backend's fast route is pipelines.resize's operator; this
    is the GPU's, and the fallback's.)"""
    return fn.resize(images, size=[size, size], interp_type=types.INTERP_LINEAR, antialias=antialias)


def random_flip(flip: bool):
    """Per-sample 0/1 mirror flag (always 0 when flipping is off)."""
    return fn.random.coin_flip(probability=0.5, dtype=types.INT32) if flip else 0
