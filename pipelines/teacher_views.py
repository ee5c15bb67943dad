"""The views a teacher pass computes outputs for: the centre crop (the simple single-view mode)
and K random-resized crops, each returned with its crop box and flip so the student's replay
pipeline can cut exactly the same pixels later.

Reproducibility: the reader does not shuffle and every random operator draws from the pipeline's
`seed`, so the same shard set read with the same seed, batch size and shard_id/num_shards gives
the same boxes on every rerun (tested). DALI's random operators keep one generator per position
in the batch, so changing the batch size changes the boxes; the boxes are stored next to the
logits anyway, which is what makes them authoritative, not the seed.

Boxes are the integer pixel boxes of the decoded image (fn.random_crop_generator on the shape
fn.peek_image_shape reports, EXIF orientation applied as the decoder applies it): x, y, w, h and the
flip, as the packed teacher member stores them, so replay cuts exactly these pixels again.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from nvidia.dali import fn, types

from kdkit.options import check_options, option
from kdkit.pipelines import common
from kdkit.pipelines.config import Role, ViewsBatch, as_nchw
from kdkit.pipelines.eval import center_view, decode_eval
from kdkit.pipelines.options import CenterCrop, RandomCrop
from kdkit.pipelines.resize import resized_view

if TYPE_CHECKING:
    from kdkit.pipelines.config import Output


def _as_int(node):
    return fn.cast(node, dtype=types.INT32)


def random_view(full, shape, crop: RandomCrop, output: Output, native_op: bool):
    """One random-resized crop of the decoded image: (normalized view, (5,) INT32 pixel box x, y, w, h, flip)."""
    anchor, size = fn.random_crop_generator(  # (y, x) and (h, w): the order of the shape given
        shape[0:2], random_area=list(crop.random_area), random_aspect_ratio=list(crop.random_aspect_ratio))
    flip = fn.random.coin_flip(probability=0.5 if crop.flip else 0.0, dtype=types.INT32)
    view = resized_view(fn.slice(full, anchor, size, axes=[0, 1]), output, native_op, mirror=flip)
    box = fn.stack(_as_int(anchor[1]), _as_int(anchor[0]), _as_int(size[1]), _as_int(size[0]), flip)
    return view, box


@dataclass(frozen=True)
class TeacherViews(RandomCrop, CenterCrop, Role):
    """(centre view, views (K, C, H, W), boxes (K, 5), labels) in stored order, from one full decode
    per image: the centre crop (crop_ratio, as the eval role cuts it) and K seeded random views."""

    num_views: int = option(4, "K random views per image", low=1)

    name = "teacher_views"
    logits = False  # the teacher pass computes them

    def __post_init__(self):
        check_options(self)

    def graph(self, members, teacher, output, backend):
        jpegs, cls = members
        native_op = self.resizer(backend) == "kdkit_resize_normalize"
        shape = fn.peek_image_shape(jpegs)
        full = decode_eval(jpegs, backend)
        center = center_view(full, self.crop_ratio, output, native_op)
        views, boxes = zip(*(random_view(full, shape, self, output, native_op) for _ in range(self.num_views)))
        labels = common.parse_label(cls)
        return center, fn.stack(*views), backend.to_output(fn.stack(*boxes)), backend.to_output(labels)

    def output_names(self, teacher_kind):
        return ["center", "views", "boxes", "labels"]

    def batch(self, d, teacher_kind, channels_last):
        return ViewsBatch(as_nchw(d["center"], channels_last), as_nchw(d["views"], channels_last), d["boxes"],
                          d["labels"])

    def seed(self, reading, shard_id):
        """The same seed on every rank: a sample's views depend on the seed, not on which rank read it."""
        return reading.seed
