"""Evaluation pipeline: resize the shorter side, centre crop; or the test-time views (centre +
its mirror image, or the ten crops: four corners and centre, each also mirrored).

The crop ratio is the usual image_size / resize (e.g. 224/256 = 0.875, timm's crop_pct): the
shorter side is resized to round(image_size / crop_ratio) and image_size x image_size is cut
from the middle (or the corners), so eval numbers compare with timm's and torchvision's.

On the CPU backend each centre / flip view is one call of kdkit's resize + normalize operator
(pipelines.resize: DALI's CPU fn.resize is slow) on the window of the decoded image that the view
covers, with fn.resize's geometry: one scale, shorter side / resize size, for both axes, the longer side's
resized length rounded and centred as fn.resize centres it, crop anchors rounded as
crop_mirror_normalize rounds them (tested against fn.resize + crop). Ten-crop keeps one fn.resize
and ten crops of it, which is faster than ten windows (resize.resizer).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import nvidia.dali.math as dmath
from nvidia.dali import fn, pipeline_def, types

from kdkit.pipelines import common, resize

if TYPE_CHECKING:
    from kdkit.pipelines.loader import LoaderConfig
    from kdkit.pipelines.shardset import ShardSet

EVAL_VIEWS = {"center": 1, "flip": 2, "tencrop": 10}
# (crop_pos_x, crop_pos_y) of the five crops of a ten-crop, in torchvision's FiveCrop order:
# top-left, top-right, bottom-left, bottom-right, centre; views 5..9 are these five mirrored.
TEN_CROP_POSITIONS = ((0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0), (0.5, 0.5))
CENTER = (0.5, 0.5)


def resize_size(cfg: LoaderConfig) -> int:
    if not 0 < cfg.crop_ratio <= 1:
        raise ValueError(f"crop_ratio={cfg.crop_ratio}: expected 0 < ratio <= 1")
    return int(round(cfg.image_size / cfg.crop_ratio))


def decode_eval(jpegs, cfg: LoaderConfig):
    """Encoded JPEGs to whole decoded uint8 HWC images; eval_views resizes and cuts them."""
    return fn.decoders.image(jpegs, device=common.decoder_device(cfg), output_type=types.RGB,
                             **common.decoder_args(cfg))


def resize_shorter(images, cfg: LoaderConfig):
    return fn.resize(images, resize_shorter=resize_size(cfg), interp_type=types.INTERP_LINEAR, antialias=cfg.antialias)


def _round(x):
    return dmath.floor(x + 0.5)


def view_window(shape, cfg: LoaderConfig, crop_pos):
    """(y, x) start and end, in decoded pixels, of the view resize_shorter + a size x size crop at
    crop_pos would show: what fn.resize + crop_mirror_normalize compute, as one window."""
    height, width = shape[0], shape[1]
    target, size = resize_size(cfg), cfg.image_size
    scale = dmath.min(height, width) / target  # input pixels per output pixel, both axes
    out_h, out_w = _round(height / scale), _round(width / scale)
    top = (height - out_h * scale) * 0.5 + _round(crop_pos[1] * (out_h - size)) * scale
    left = (width - out_w * scale) * 0.5 + _round(crop_pos[0] * (out_w - size)) * scale
    return fn.stack(top, left), fn.stack(top + size * scale, left + size * scale)


def _views(cfg: LoaderConfig) -> list[tuple[int, tuple[float, float]]]:
    """(mirror, crop position) of each view of cfg.eval_views."""
    if cfg.eval_views == "center":
        return [(0, CENTER)]
    if cfg.eval_views == "flip":
        return [(0, CENTER), (1, CENTER)]
    if cfg.eval_views == "tencrop":
        return [(m, pos) for m in (0, 1) for pos in TEN_CROP_POSITIONS]
    raise ValueError(f"eval_views={cfg.eval_views!r}: expected one of {sorted(EVAL_VIEWS)}")


def eval_views(images, cfg: LoaderConfig, views=None):
    """Decoded images -> one normalized view per sample ("center"), or a stack of V views:
    (V, C, H, W) / (V, H, W, C). `views` overrides cfg.eval_views with (mirror, crop_pos) pairs."""
    views = views or _views(cfg)
    if resize.resizer(cfg, "eval") == "kdkit_resize_normalize":
        shape = images.shape(dtype=types.FLOAT)
        outs = []
        for mirror, pos in views:
            start, end = view_window(shape, cfg, pos)
            outs.append(resize.resized_view(images, cfg, mirror=mirror, roi=(start, end)))
    else:
        resized = resize_shorter(images, cfg)
        crop = (cfg.image_size, cfg.image_size)
        outs = [common.normalize(resized, cfg, mirror=m, crop=crop, crop_pos=pos) for m, pos in views]
    return outs[0] if len(outs) == 1 else fn.stack(*outs)


def center_view(images, cfg: LoaderConfig):
    """Decoded images -> the normalized centre view (the teacher pass's single view)."""
    return eval_views(images, cfg, views=[(0, CENTER)])


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
