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
and ten crops of it, which is faster than ten windows (Eval.resizer).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import nvidia.dali.math as dmath
from nvidia.dali import fn, types

from kdkit.options import check_options, option
from kdkit.pipelines import common
from kdkit.pipelines.config import Role
from kdkit.pipelines.options import CenterCrop
from kdkit.pipelines.resize import resized_view

if TYPE_CHECKING:
    from kdkit.pipelines.config import Backend, Output

EVAL_VIEWS = {"center": 1, "flip": 2, "tencrop": 10}
# (crop_pos_x, crop_pos_y) of the five crops of a ten-crop, in torchvision's FiveCrop order:
# top-left, top-right, bottom-left, bottom-right, centre; views 5..9 are these five mirrored.
TEN_CROP_POSITIONS = ((0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0), (0.5, 0.5))
CENTER = (0.5, 0.5)


def resize_size(image_size: int, crop_ratio: float) -> int:
    """The shorter side the image is resized to before the image_size x image_size crop."""
    return int(round(image_size / crop_ratio))


def decode_eval(jpegs, backend: Backend):
    """Encoded JPEGs to whole decoded uint8 HWC images; eval_views resizes and cuts them."""
    return fn.decoders.image(jpegs, device=backend.decoder, output_type=types.RGB, **backend.decoder_args())


def resize_shorter(images, size: int, antialias: bool):
    return fn.resize(images, resize_shorter=size, interp_type=types.INTERP_LINEAR, antialias=antialias)


def _round(x):
    return dmath.floor(x + 0.5)


def view_window(shape, image_size: int, crop_ratio: float, crop_pos):
    """(y, x) start and end, in decoded pixels, of the view resize_shorter + a size x size crop at
    crop_pos would show: what fn.resize + crop_mirror_normalize compute, as one window."""
    height, width = shape[0], shape[1]
    target, size = resize_size(image_size, crop_ratio), image_size
    scale = dmath.min(height, width) / target  # input pixels per output pixel, both axes
    out_h, out_w = _round(height / scale), _round(width / scale)
    top = (height - out_h * scale) * 0.5 + _round(crop_pos[1] * (out_h - size)) * scale
    left = (width - out_w * scale) * 0.5 + _round(crop_pos[0] * (out_w - size)) * scale
    return fn.stack(top, left), fn.stack(top + size * scale, left + size * scale)


def view_list(views: str) -> list[tuple[int, tuple[float, float]]]:
    """(mirror, crop position) of each view of "center", "flip" or "tencrop"."""
    if views == "center":
        return [(0, CENTER)]
    if views == "flip":
        return [(0, CENTER), (1, CENTER)]
    return [(m, pos) for m in (0, 1) for pos in TEN_CROP_POSITIONS]


def eval_views(images, views: list, crop_ratio: float, output: Output, native_op: bool):
    """Decoded images -> one normalized view per sample (one (mirror, crop_pos) in `views`), or a
    stack of V views: (V, C, H, W) / (V, H, W, C)."""
    if native_op:
        shape = images.shape(dtype=types.FLOAT)
        outs = []
        for mirror, pos in views:
            start, end = view_window(shape, output.image_size, crop_ratio, pos)
            outs.append(resized_view(images, output, True, mirror=mirror, roi=(start, end)))
    else:
        resized = resize_shorter(images, resize_size(output.image_size, crop_ratio), output.antialias)
        crop = (output.image_size, output.image_size)
        outs = [common.normalize(resized, output, mirror=m, crop=crop, crop_pos=pos) for m, pos in views]
    return outs[0] if len(outs) == 1 else fn.stack(*outs)


def center_view(images, crop_ratio: float, output: Output, native_op: bool):
    """Decoded images -> the normalized centre view (the teacher pass's single view)."""
    return eval_views(images, [(0, CENTER)], crop_ratio, output, native_op)


@dataclass(frozen=True)
class Eval(CenterCrop, Role):
    """(images, labels[, teacher logits as stored]) in stored order, no randomness: the centre view,
    or a stack of test-time views (flip, tencrop) per sample."""

    views: str = option("center", "test-time views: center, flip (centre + mirror) or tencrop", choices=tuple(EVAL_VIEWS))

    name = "eval"

    def __post_init__(self):
        check_options(self)

    def graph(self, members, teacher, output, backend):
        jpegs, cls = members
        native_op = self.resizer(backend) == "kdkit_resize_normalize"
        images = eval_views(decode_eval(jpegs, backend), view_list(self.views), self.crop_ratio, output, native_op)
        return (images, backend.to_output(common.parse_label(cls)), *common.teacher_outputs(teacher, backend))

    def resizer(self, backend):
        """Ten-crop keeps one fn.resize and ten crops of it: faster than ten windows through the
        operator (measured: 275 vs 177 img/s on 2 cores; centre-only 643 vs 972)."""
        return "fn.resize" if self.views == "tencrop" else Role.resizer(self, backend)
