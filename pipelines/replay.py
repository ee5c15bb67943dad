"""Replay pipeline: the student's training input is one of the K views the teacher saw, cut from
the same crop box and flipped the same way, with that view's stored logits.

Per sample, in-graph: read the stored (K, 5) view boxes, draw k uniformly from 0..K-1, turn row
k's relative box back into the integer pixel box the teacher used (round(x * width), with the
width from fn.peek_image_shape, EXIF orientation applied as the decoder applies it), decode only
that region (fn.decoders.image_slice: ROI decode), resize, mirror by the row's flag, and pick row
k of the stored logits. Cropping before resizing on the same pixel grid makes the student's view
equal to the teacher's up to nothing but the decoder (tested against a full decode cut in numpy).

Colour jitter / auto-augment from the config are applied on top when set; they change pixels the
teacher never saw, so they are off by default for this role.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import nvidia.dali.math as dmath
from nvidia.dali import fn, types

from kdkit.pipelines import common
from kdkit.pipelines.config import Role, check
from kdkit.pipelines.train import Augment, train_views

if TYPE_CHECKING:
    from kdkit.pipelines.config import Backend


def choose_view(views):
    """A uniformly drawn view index k in 0..K-1 per sample (INT32 scalar), K from the stored rows."""
    count = fn.cast(views.shape()[0], dtype=types.INT32)
    u = fn.random.uniform(range=[0.0, 1.0])
    k = fn.cast(u * fn.cast(count, dtype=types.FLOAT), dtype=types.INT32)
    return dmath.min(k, count - 1)  # guards the one float rounding case u * K == K


def _to_pixels(rel, extent):
    return fn.cast(dmath.floor(rel * extent + 0.5), dtype=types.INT32)


def pixel_box(box, shape):
    """Row (x, y, w, h, flip) relative -> integer (x, y) anchor and (w, h) size inside the image."""
    height = fn.cast(shape[0], dtype=types.FLOAT)
    width = fn.cast(shape[1], dtype=types.FLOAT)
    h_max, w_max = fn.cast(shape[0], dtype=types.INT32), fn.cast(shape[1], dtype=types.INT32)
    x = dmath.clamp(_to_pixels(box[0], width), 0, w_max - 1)
    y = dmath.clamp(_to_pixels(box[1], height), 0, h_max - 1)
    w = dmath.max(dmath.min(_to_pixels(box[2], width), w_max - x), 1)
    h = dmath.max(dmath.min(_to_pixels(box[3], height), h_max - y), 1)
    return fn.stack(x, y), fn.stack(w, h)


def decode_view(jpegs, box, backend: Backend):
    """Decode exactly the stored crop of each image: uint8 HWC at the source resolution."""
    anchor, size = pixel_box(box, fn.peek_image_shape(jpegs))
    return fn.decoders.image_slice(jpegs, anchor, size, device=backend.decoder, output_type=types.RGB,
                                   **backend.decoder_args())  # (x, y) order: "WH"


@dataclass(frozen=True)
class Replay(Augment, Role):
    """(images, labels[, logits of the chosen view], chosen view index) for student training. Augment
    options (colour jitter, auto-augment) apply on top of the stored view: they change pixels the
    teacher never saw, so they are off by default."""

    name = "replay"
    shuffles = True
    last_batch = "drop"
    logits = True  # the stored views' logits are the point of this role

    def __post_init__(self):
        self.check_augment()
        # the stored views hold crop box and flip, not an angle: a rotated view is not what the teacher saw
        check(not self.rotate, "rotate", self.rotate, "0 with replay (stored views record no rotation angle)")
        check(not self.augmix_jsd, "augmix_jsd", self.augmix_jsd, "False with replay (one view per sample)")

    def members(self):
        return [common.IMAGE_EXT, common.LABEL_EXT, common.VIEWS_EXT]

    def graph(self, members, teacher, output, backend):
        jpegs, cls, stored = members
        views = common.decode_npy(stored)
        k = choose_view(views)
        box = views[k]
        native_op = self.resizer(backend) == "kdkit_resize_normalize"
        images = train_views(decode_view(jpegs, box, backend), self, output, native_op,
                             mirror=fn.cast(box[4] > 0.5, dtype=types.INT32))
        labels = backend.to_output(common.parse_label(cls))
        return (images, labels, *common.teacher_outputs(teacher, backend, row=k), backend.to_output(k))

    def output_names(self, teacher):
        return [*Role.output_names(self, teacher), "view_index"]
