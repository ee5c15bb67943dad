"""Evaluation pipeline: resize the shorter side, centre crop; or the test-time views (centre +
its mirror image, or the ten crops: four corners and centre, each also mirrored).

The crop ratio is the usual image_size / resize (e.g. 224/256 = 0.875, timm's crop_pct): the
shorter side is resized to round(image_size / crop_ratio) and image_size x image_size is cut
from the middle (or the corners), so eval numbers compare with timm's and torchvision's.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from nvidia.dali import fn, pipeline_def, types

from pipelines import common

if TYPE_CHECKING:
    from pipelines.loader import LoaderConfig
    from pipelines.shardset import ShardSet

EVAL_VIEWS = {"center": 1, "flip": 2, "tencrop": 10}
# (crop_pos_x, crop_pos_y) of the five crops of a ten-crop, in torchvision's FiveCrop order:
# top-left, top-right, bottom-left, bottom-right, centre; views 5..9 are these five mirrored.
TEN_CROP_POSITIONS = ((0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0), (0.5, 0.5))


def resize_size(cfg: LoaderConfig) -> int:
    if not 0 < cfg.crop_ratio <= 1:
        raise ValueError(f"crop_ratio={cfg.crop_ratio}: expected 0 < ratio <= 1")
    return int(round(cfg.image_size / cfg.crop_ratio))


def decode_eval(jpegs, cfg: LoaderConfig):
    """Encoded JPEGs to uint8 HWC images whose shorter side is resize_size(cfg)."""
    images = fn.decoders.image(jpegs, device=common.decoder_device(cfg), output_type=types.RGB,
                               **common.decoder_args(cfg))
    return resize_shorter(images, cfg)


def resize_shorter(images, cfg: LoaderConfig):
    return fn.resize(images, resize_shorter=resize_size(cfg), interp_type=types.INTERP_LINEAR, antialias=cfg.antialias)


def center_view(images, cfg: LoaderConfig, mirror=0):
    size = (cfg.image_size, cfg.image_size)
    return common.normalize(images, cfg, mirror=mirror, crop=size)


def eval_views(images, cfg: LoaderConfig):
    """One normalized view per sample ("center"), or a stack of V views: (V, C, H, W) / (V, H, W, C)."""
    size = (cfg.image_size, cfg.image_size)
    if cfg.eval_views == "center":
        return center_view(images, cfg)
    if cfg.eval_views == "flip":
        return fn.stack(center_view(images, cfg), center_view(images, cfg, mirror=1))
    if cfg.eval_views == "tencrop":
        crops = [common.normalize(images, cfg, mirror=m, crop=size, crop_pos=pos)
                 for m in (0, 1) for pos in TEN_CROP_POSITIONS]
        return fn.stack(*crops)
    raise ValueError(f"eval_views={cfg.eval_views!r}: expected one of {sorted(EVAL_VIEWS)}")


@pipeline_def
def eval_pipeline(shards: ShardSet, cfg: LoaderConfig, shard_id: int = 0, num_shards: int = 1,
                  with_logits: bool | str = False):
    """(images, labels[, teacher logits as stored]) in stored order, no randomness."""
    exts = [common.IMAGE_EXT, common.LABEL_EXT] + common.teacher_exts(with_logits)
    members = common.read_shards(shards, exts, cfg, shard_id, num_shards, shuffle=False, missing=cfg.missing)
    images = eval_views(decode_eval(members[0], cfg), cfg)
    labels = common.to_output_device(common.parse_label(members[1]), cfg)
    if not with_logits:
        return images, labels
    return (images, labels, *common.teacher_outputs(members[2:], cfg))
