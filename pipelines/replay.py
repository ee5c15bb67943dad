"""Replay pipeline: the student's training input is one of the K views the teacher saw, cut from
the same crop box and flipped the same way, with that view's stored logits.

Per sample, in-graph: read the stored (K, 5) view boxes, draw k uniformly from 0..K-1, turn row
k's relative box back into the integer pixel box the teacher used (round(x * width), with the
width from fn.peek_image_shape, EXIF orientation applied as the decoder applies it), decode only
that region (fn.decoders.image_slice: ROI decode), resize, mirror by the row's flag, and pick row
k of the stored logits. Cropping before resizing on the same pixel grid makes the student's view
equal to the teacher's up to nothing but the decoder (tested against a full decode cut in numpy).

Several views per decoded image (`views_per_load=N`, FKD's trick: decoding is the costly step, so
one decode feeds N training images): each sample is decoded once (the bounding box of the N views
it uses) and N of its stored views are cut from it (fn.slice of the stored pixel box, then the same
resize, flip and normalize as one view), each with its logits row; a batch of B samples yields B x N training images, sample by
sample (rows s*N .. s*N+N-1 are sample s's views). Which views: per sample and load, an offset o
drawn uniformly from 0..K-1 and the views o, o+1, ..., o+N-1 (mod K). So the N views of one load
are distinct whenever N <= K, every stored view is equally likely (probability N/K per epoch), and
the draw comes from DALI's random generator, which the loader's checkpoint saves: a resumed run
draws the same views. N > K is refused (DaliLoader, kdkit train), as it would repeat views in a load.
Cutting from the decoded bounding box gives the pixels of the one-view route (which decodes just the
box) as long as the decoder's output of a region equals that region of its full output (tested);
on the CPU backend the crops go through kdkit's operator one view at a time (N operator calls on
the same decoded region: pipelines.resize), on the GPU through fn.resize, as for one view.

Colour jitter / auto-augment from the config are applied on top when set; they change pixels the
teacher never saw, so they are off by default for this role.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import nvidia.dali.math as dmath
from nvidia.dali import fn, types

from kdkit.pipelines import common
from kdkit.pipelines.config import Role, check, positive_int
from kdkit.pipelines.shardset import first_member
from kdkit.pipelines.train import Augment, train_views

if TYPE_CHECKING:
    from kdkit.pipelines.config import Backend


def choose_view(views):
    """A uniformly drawn view index k in 0..K-1 per sample (INT32 scalar), K from the stored rows."""
    count = fn.cast(views.shape()[0], dtype=types.INT32)
    u = fn.random.uniform(range=[0.0, 1.0])
    k = fn.cast(u * fn.cast(count, dtype=types.FLOAT), dtype=types.INT32)
    return dmath.min(k, count - 1)  # guards the one float rounding case u * K == K


def view_rows(views, n: int) -> list:
    """n stored view indices per sample (INT32 scalars): a uniform offset o in 0..K-1, then o, o+1, ...,
    o+n-1 mod K, distinct while n <= K (the module doc)."""
    count = fn.cast(views.shape()[0], dtype=types.INT32)
    first = choose_view(views)
    return [first if j == 0 else (first + j) - ((first + j) // count) * count for j in range(n)]


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


def mirror_of(box):
    """The stored flip of a view row, as the 0/1 mirror flag of the resize."""
    return fn.cast(box[4] > 0.5, dtype=types.INT32)


def cut_views(jpegs, boxes: list, backend: Backend) -> list:
    """Decode each image once, just the region its boxes cover (their bounding box, ROI decode), and
    cut every box of `boxes` from it: uint8 HWC crops at the source resolution, the same pixels
    decode_view gives for each box alone (an ROI decode returns the whole decode's pixels in its
    region; tested bit for bit)."""
    shape = fn.peek_image_shape(jpegs)  # the decoder's output shape, EXIF orientation applied
    pixel = [pixel_box(box, shape) for box in boxes]
    low, high = pixel[0][0], pixel[0][0] + pixel[0][1]
    for anchor, size in pixel[1:]:
        low, high = dmath.min(low, anchor), dmath.max(high, anchor + size)
    region = fn.decoders.image_slice(jpegs, low, high - low, device=backend.decoder, output_type=types.RGB,
                                     **backend.decoder_args())  # (x, y) order: "WH"
    return [fn.slice(region, anchor - low, size, axis_names="WH", out_of_bounds_policy="error")
            for anchor, size in pixel]


@dataclass(frozen=True)
class Replay(Augment, Role):
    """(images, labels[, logits of the chosen view], chosen view index) for student training. Augment
    options (colour jitter, auto-augment) apply on top of the stored view: they change pixels the
    teacher never saw, so they are off by default. views_per_load=N: N stored views of each decoded
    sample, a batch of B samples yields B x N images (the module doc)."""

    name = "replay"
    shuffles = True
    last_batch = "drop"
    logits = True  # the stored views' logits are the point of this role
    views_per_load: int = 1  # stored views cut from each decoded image (N <= K)

    def __post_init__(self):
        self.check_augment()
        # the stored views hold crop box and flip, not an angle: a rotated view is not what the teacher saw
        check(not self.rotate, "rotate", self.rotate, "0 with replay (stored views record no rotation angle)")
        check(not self.augmix_jsd, "augmix_jsd", self.augmix_jsd, "False with replay (one view per sample)")
        positive_int("views_per_load", self.views_per_load)

    def check_shards(self, shards) -> None:
        """N <= K, the stored views per sample (the manifest's teacher block, else the first sample)."""
        if self.views_per_load == 1:
            return
        block = (shards.manifest.teacher or {}) if shards.manifest else {}
        k = block.get("views") or first_member(shards, common.VIEWS_EXT).shape[0]
        check(self.views_per_load <= k, "views_per_load", self.views_per_load,
              f"1..{k}: the shards store {k} views per sample, more per load would repeat views")

    def members(self):
        return [common.IMAGE_EXT, common.LABEL_EXT, common.VIEWS_EXT]

    def graph(self, members, teacher, output, backend):
        jpegs, cls, stored = members
        views = common.decode_npy(stored)
        native_op = self.resizer(backend) == "kdkit_resize_normalize"
        labels = backend.to_output(common.parse_label(cls))
        if self.views_per_load == 1:  # decode just the box (ROI decode)
            k = choose_view(views)
            box = views[k]
            images = train_views(decode_view(jpegs, box, backend), self, output, native_op, mirror=mirror_of(box))
            return (images, labels, *common.teacher_outputs(teacher, backend, row=k), backend.to_output(k))
        rows = view_rows(views, self.views_per_load)
        boxes = [views[k] for k in rows]
        images = [train_views(crop, self, output, native_op, mirror=mirror_of(box))
                  for crop, box in zip(cut_views(jpegs, boxes, backend), boxes)]
        logits = [fn.stack(*(t[k] for k in rows)) for t in (common.decode_npy(m) for m in teacher)]
        return (fn.stack(*images), labels, *(backend.to_output(t) for t in logits),
                backend.to_output(fn.stack(*rows)))

    def batch(self, outputs, teacher_kind, channels_last):
        """B samples of N views each -> B x N training images, sample by sample; labels repeated."""
        n = self.views_per_load
        if n == 1:
            return Role.batch(self, outputs, teacher_kind, channels_last)
        flat = {name: t.flatten(0, 1) for name, t in outputs.items() if name.startswith("teacher")}
        flat["images"] = outputs["images"].flatten(0, 1)
        flat["labels"] = outputs["labels"].repeat_interleave(n, dim=0)
        return Role.batch(self, flat, teacher_kind, channels_last)

    def output_names(self, teacher):
        return [*Role.output_names(self, teacher), "view_index"]
