"""Replay pipeline: the student's training input is one of the K views the teacher saw, cut from
the same crop box and flipped the same way, with that view's stored logits.

Per sample, in-graph: split the packed teacher member into its stored (K, 5) integer pixel boxes
and values (common.unpack_teacher), draw which N of the views this load uses (N = `views_per_load`,
1 by default), decode only the region they cover (fn.decoders.image_slice: ROI decode; for one view,
that view's box), cut, resize, mirror by each row's flag, and pick the same rows of the stored
logits. The boxes are the teacher's pixels of the decoded image (EXIF orientation applied, as
fn.peek_image_shape reports it), kept inside the image here so a crafted box cannot reach outside. Cropping before resizing on the same pixel grid makes the student's view equal to the
teacher's up to nothing but the decoder (tested against a full decode cut in numpy).

Several views per decoded image (`views_per_load=N`, FKD's trick: decoding is the costly step, so
one decode feeds N training images): each sample is decoded once (the bounding box of its N views)
and the N views are cut from that region, each with its logits row; a batch of B samples yields
B x N training images, sample by sample (rows s*N .. s*N+N-1 are sample s's views). Which views: per
sample and load, an offset o drawn uniformly from 0..K-1 and the views o, o+1, ..., o+N-1 (mod K).
So the N views of one load are distinct whenever N <= K, every stored view is equally likely
(probability N/K per epoch), and the draw comes from DALI's random generator, which the loader's
checkpoint saves: a resumed run draws the same views. N > K is refused (DaliLoader, kdkit train), as
it would repeat views in a load. Cutting from the decoded bounding box gives the pixels of decoding
each box alone as long as the decoder's output of a region equals that region of its full output
(tested). On the CPU backend one call of kdkit's operator resizes all N boxes of the region (its
`boxes` argument: each box resized as if cut out first, bit for bit, without copying it out; one
work item per view on DALI's threads); on the GPU, and wherever the operator is not used, each box is
cut with fn.slice and resized with fn.resize. The box arithmetic works on the (N, 5) rows as whole
tensors: a dozen DALI operators per batch whatever N is (one operator per scalar made the graph's
bookkeeping cost more than the decode it saved).

Colour jitter / auto-augment from the config are applied on top when set; they change pixels the
teacher never saw, so they are off by default for this role.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import nvidia.dali.math as dmath
import numpy as np
from nvidia.dali import fn, types

from kdkit.errors import OptionError
from kdkit.options import check_options
from kdkit.pipelines import common
from kdkit.pipelines.config import Role
from kdkit.pipelines.options import Augment, StoredViews
from kdkit.pipelines.resize import resized_view
from kdkit.shards.reader import teacher_layout
from kdkit.pipelines.train import jitter_ranges, train_views

if TYPE_CHECKING:
    from kdkit.pipelines.config import Backend, Output


def view_rows(views, n: int):
    """n stored view indices per sample, INT32 (n,): a uniform offset o in 0..K-1, then o, o+1, ...,
    o+n-1 mod K, distinct while n <= K (the module doc); K from the stored rows."""
    count = fn.cast(views.shape()[0], dtype=types.INT32)
    u = fn.random.uniform(range=[0.0, 1.0])
    first = dmath.min(fn.cast(u * fn.cast(count, dtype=types.FLOAT), dtype=types.INT32), count - 1)  # u * K == K
    rows = first + types.Constant(np.arange(n, dtype=np.int32))
    return rows - (rows // count) * count


def take_rows(stored, rows, n: int):
    """Rows `rows` (from view_rows: consecutive mod K) of a stored (K, ...) array, as (n, ...): one
    slice of the array written twice, instead of n element picks and a stack."""
    return fn.slice(fn.cat(stored, stored, axis=0), start=rows[0:1], shape=[n], axes=[0])


def pixel_boxes(views, shape):
    """Rows (x, y, w, h, flip) INT32 pixels -> (x, y) anchors and (w, h) sizes, INT32 (n, 2) each, inside
    the image (pipelines.teacher_views drew them there; a crafted box is clamped, not read outside)."""
    limit = fn.stack(fn.cast(shape[1], dtype=types.INT32), fn.cast(shape[0], dtype=types.INT32))
    anchor = dmath.clamp(views[:, 0:2], 0, limit - 1)
    return anchor, dmath.max(dmath.min(views[:, 2:4], limit - anchor), 1)


def cut_views(jpegs, views, backend: Backend):
    """Decode each image once, just the region its stored views (n, 5) cover (their bounding box, ROI
    decode; the box itself for one view): (uint8 HWC region, the views' pixel boxes in it (n, 4) x, y,
    w, h, INT32). Cutting a box from the region gives the pixels of decoding that box alone (an ROI
    decode returns the whole decode's pixels in its region; tested bit for bit)."""
    anchor, size = pixel_boxes(views, fn.peek_image_shape(jpegs))  # EXIF orientation applied, as decoded
    low = fn.reductions.min(anchor, axes=0)
    high = fn.reductions.max(anchor + size, axes=0)
    region = fn.decoders.image_slice(jpegs, low, high - low, device=backend.decoder, output_type=types.RGB,
                                     **backend.decoder_args())  # (x, y) order: "WH"
    return region, fn.cat(anchor - low, size, axis=1)


def view_colors(augment: Augment, n: int):
    """Independent colour-jitter factors for each of n views, (n, 4) brightness, contrast, saturation,
    hue in degrees, drawn from the training role's jitter_ranges."""
    ranges = jitter_ranges(augment.color_jitter, augment.hue)
    return fn.stack(*(fn.random.uniform(range=r, shape=[n]) for r in ranges), axis=1)


def replay_views(jpegs, views, augment: Augment, output: Output, backend: Backend):
    """The stored views (n, 5) of each sample as training inputs (n, ...) in Output's layout: one ROI
    decode (cut_views), then on the CPU backend one call of kdkit's operator for the n boxes (each box
    resized as if cut out first: the same pixels as fn.slice + the operator, tested), elsewhere (GPU,
    no operator, an augment policy) fn.slice + train_views per view."""
    n = augment.views_per_load
    region, boxes = cut_views(jpegs, views, backend)
    flips = fn.cast(views[:, 4:5], dtype=types.FLOAT)
    if augment.resizer(backend) == "kdkit_resize_normalize":
        columns = [fn.cast(boxes, dtype=types.FLOAT), flips]
        if augment.color_jitter or augment.hue:
            columns.append(view_colors(augment, n))
        return resized_view(region, output, True, boxes=fn.cat(*columns, axis=1))
    mirrors = fn.cast(flips > 0.5, dtype=types.INT32)
    crops = [fn.slice(region, boxes[j, 0:2], boxes[j, 2:4], axis_names="WH", out_of_bounds_policy="error")
             for j in range(n)]
    return fn.stack(*(train_views(crop, augment, output, False, mirror=mirrors[j, 0]) for j, crop in enumerate(crops)))


@dataclass(frozen=True)
class Replay(Augment, StoredViews, Role):
    """(images, labels[, logits of the chosen view], chosen view index) for student training. Augment
    options (colour jitter, auto-augment) apply on top of the stored view: they change pixels the
    teacher never saw, so they are off by default. views_per_load=N: N stored views of each decoded
    sample, a batch of B samples yields B x N images (the module doc)."""

    name = "replay"
    shuffles = True
    last_batch = "drop"
    logits = True  # the stored views' logits are the point of this role

    def __post_init__(self):
        check_options(self)

    def refusals(self):
        return Augment.refusals(self) + self.replay_refusals()

    def check_shards(self, shards) -> None:
        """Stored views to replay, and N <= K, the stored views per sample (the teacher block's layout)."""
        boxes = [p for p in teacher_layout(shards) if p.name == "boxes"]
        if not boxes:
            raise OptionError(f"{shards.folder or 'the shard set'} stores single-view teacher outputs (no view boxes) "
                              "to replay; use kd=stored, or write multi-view outputs (add-teacher-logits --views K)")
        k = boxes[0].shape[0]
        if self.views_per_load > k:
            raise OptionError(f"views_per_load={self.views_per_load}: expected 1..{k}: {shards.folder or 'the shard set'} "
                              f"stores {k} views per sample, more per load would repeat views")

    def graph(self, members, teacher, output, backend):
        jpegs, cls = members
        n = self.views_per_load
        views = teacher["boxes"]
        rows = view_rows(views, n)
        images = replay_views(jpegs, take_rows(views, rows, n), self, output, backend)
        chosen = {name: take_rows(teacher[name], rows, n) for name in ("values", "indices") if name in teacher}
        labels = backend.to_output(common.parse_label(cls))
        return (images, labels, *common.teacher_outputs(chosen, backend), backend.to_output(rows))

    def batch(self, outputs, teacher_kind, channels_last):
        """B samples of N views each -> B x N training images, sample by sample; labels repeated."""
        flat = {name: t.flatten(0, 1) for name, t in outputs.items() if name.startswith("teacher")}
        flat["images"] = outputs["images"].flatten(0, 1)
        flat["labels"] = outputs["labels"].repeat_interleave(self.views_per_load, dim=0)
        return Role.batch(self, flat, teacher_kind, channels_last)

    def output_names(self, teacher_kind):
        return [*Role.output_names(self, teacher_kind), "view_index"]
