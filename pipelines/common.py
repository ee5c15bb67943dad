"""Graph pieces every role shares: the shard reader, the in-graph label and logits decoding, the
final normalize, and the one CPU/GPU switch.

Every function here builds DALI graph nodes and must be called inside a `@pipeline_def`
function. Nothing in a graph calls back into Python, so the CPU backend runs on DALI's own
threads (`num_threads`) exactly as the GPU one does.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from nvidia.dali import fn, types

from kdkit.shards import contract

if TYPE_CHECKING:
    from kdkit.pipelines.loader import LoaderConfig
    from kdkit.pipelines.shardset import ShardSet

# --- sample members the pipelines read: the shard contract's names, re-exported -------------------
IMAGE_EXT = contract.IMAGE_EXT
LABEL_EXT = contract.LABEL_EXT
LOGITS_EXT = contract.LOGITS_EXT  # float16 (C,), or (K, C) with one row per stored view
VIEWS_EXT = contract.VIEWS_EXT  # float32 (K, 5): x, y, w, h (relative to the decoded image), flip
VIEW_FIELDS = contract.VIEW_FIELDS

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

READER_NAME = "Reader"  # what the iterator asks for the epoch size (reader_name=)

_POWERS = np.array([10 ** (contract.LABEL_WIDTH - 1 - i) for i in range(contract.LABEL_WIDTH)], np.int32)


def is_gpu(cfg: LoaderConfig) -> bool:
    if cfg.device not in ("cpu", "gpu"):
        raise ValueError(f"device={cfg.device!r}: expected 'cpu' or 'gpu'")
    return cfg.device == "gpu"


def decoder_device(cfg: LoaderConfig) -> str:
    """Decoders take encoded bytes on the CPU; "mixed" means their output lands on the GPU."""
    return "mixed" if is_gpu(cfg) else "cpu"


def decoder_args(cfg: LoaderConfig) -> dict:
    """Decoder options beyond DALI's defaults: libjpeg-turbo's fast integer IDCT (the CPU decoder, and
    the mixed one's CPU fallback) and the GPU decoder's hardware share."""
    args = {"use_fast_idct": True} if cfg.fast_idct else {}
    if is_gpu(cfg) and cfg.hw_decoder_load is not None:
        args["hw_decoder_load"] = cfg.hw_decoder_load
    return args


def to_output_device(node, cfg: LoaderConfig):
    """Small CPU-side outputs (labels, logits, boxes) follow the images onto the GPU."""
    return node.gpu() if is_gpu(cfg) else node


def read_shards(shards: ShardSet, exts: list[str], cfg: LoaderConfig, shard_id: int, num_shards: int,
                shuffle: bool, missing: str = "error") -> list:
    """One DataNode per member in `exts` (raw bytes), read by fn.readers.webdataset.

    Shuffling, when on, has two levels (see LoaderConfig.shuffle_buffer): the order of whole tars
    is reshuffled every epoch (`shuffle_after_epoch`, with one seed shared by every rank so the
    ranks still split the set between them), and samples are drawn at random from a buffer of
    `shuffle_buffer` samples read in sequence (`random_shuffle` + `initial_fill`).
    `pad_last_batch` repeats a rank's last sample up to a full batch so every rank runs the same
    number of iterations; the iterator then trims, drops or keeps the padding per its policy.
    """
    shuffle_args = {}
    if shuffle:
        shuffle_args = dict(random_shuffle=True, initial_fill=cfg.shuffle_buffer, shuffle_after_epoch=True,
                            shuffle_after_epoch_seed=cfg.seed)
    out = fn.readers.webdataset(
        paths=[str(t) for t in shards.tars], index_paths=[str(i) for i in shards.indexes], ext=list(exts),
        missing_component_behavior=missing, shard_id=shard_id, num_shards=num_shards,
        pad_last_batch=True, seed=cfg.seed + shard_id, prefetch_queue_depth=cfg.reader_queue_depth,
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


def decode_npy(raw):
    """A stored .npy member (teacher logits, view boxes) as the array it holds, in-graph."""
    return fn.decoders.numpy(raw)


def teacher_exts(with_logits) -> list[str]:
    """Members holding the teacher outputs: full logits (with_logits True / "full"), top-k values +
    class indices (with_logits "topk"), or none (False / None)."""
    if not with_logits:
        return []
    if with_logits == "topk":
        return [contract.TOPK_VALUES_EXT, contract.TOPK_INDICES_EXT]
    return [LOGITS_EXT]


def teacher_outputs(members: list, cfg: LoaderConfig, row=None) -> tuple:
    """The teacher members decoded in-graph (row `row` of each, for one of K stored views)."""
    outs = [decode_npy(m) for m in members]
    if row is not None:
        outs = [o[row] for o in outs]
    return tuple(to_output_device(o, cfg) for o in outs)


def output_layout(cfg: LoaderConfig) -> str:
    if cfg.layout not in ("CHW", "HWC", "channels_last"):
        raise ValueError(f"layout={cfg.layout!r}: expected 'CHW', 'HWC' or 'channels_last'")
    return "CHW" if cfg.layout == "CHW" else "HWC"  # channels_last: HWC in DALI, NCHW view in torch


def output_dtype(cfg: LoaderConfig):
    try:
        return {"float32": types.FLOAT, "float16": types.FLOAT16}[cfg.dtype]
    except KeyError:
        raise ValueError(f"dtype={cfg.dtype!r}: expected 'float32' or 'float16'") from None


def normalize(images, cfg: LoaderConfig, mirror=0, crop=None, crop_pos=(0.5, 0.5)):
    """uint8 HWC images to the model's input: one fused crop + mirror + normalize + transpose.

    Fusing matters on the CPU backend: separate flip, float conversion and transpose passes each
    walk the whole image again.
    """
    kwargs = {} if crop is None else dict(crop=crop, crop_pos_x=crop_pos[0], crop_pos_y=crop_pos[1])
    return fn.crop_mirror_normalize(
        images, dtype=output_dtype(cfg), output_layout=output_layout(cfg),
        mean=[m * 255 for m in cfg.mean], std=[s * 255 for s in cfg.std], mirror=mirror, **kwargs)


def resize_square(images, cfg: LoaderConfig):
    """Resize to image_size x image_size with DALI's fn.resize, bilinear; antialiased as Pillow and
    torchvision do it unless cfg.antialias is off. (The CPU backend's fast route is
    pipelines.resize's operator; this is the GPU's, and the fallback's.)"""
    size = cfg.image_size
    return fn.resize(images, size=[size, size], interp_type=types.INTERP_LINEAR, antialias=cfg.antialias)


def random_flip(cfg: LoaderConfig):
    """Per-sample 0/1 mirror flag (always 0 when flipping is off)."""
    return fn.random.coin_flip(probability=0.5, dtype=types.INT32) if cfg.flip else 0
