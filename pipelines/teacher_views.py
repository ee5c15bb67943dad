"""The views a teacher pass computes outputs for: the centre crop (the simple single-view mode)
and K random-resized crops, each returned with its crop box and flip so the student's replay
pipeline can cut exactly the same pixels later.

Reproducibility: a view's box and flip come from random numbers drawn per sample on the host
(ViewDraws: numpy's default_rng seeded by (seed, shard, index of the sample in its shard)) and fed
into the graph, not from DALI's random operators (whose generators, one per batch slot, run on from
sample to sample). So a sample's boxes are the same whatever the batch size, the rank or world size,
and whichever shards one pipeline read before it: the teacher pass reads all of a rank's shards
with one pipeline and a resumed or re-split pass stores the same boxes (tested). The boxes are
stored next to the logits anyway, which is what makes them authoritative, not the seed.

Boxes are the integer pixel boxes of the decoded image (the shape fn.peek_image_shape reports, EXIF
orientation applied as the decoder applies it), computed with torchvision's RandomResizedCrop rule (ten
tries of an area share and a log-uniform aspect ratio, else the centre crop of the clamped aspect
ratio) written as DALI arithmetic (random_box): x, y, w, h and the flip, as the packed teacher member
stores them, so replay cuts exactly these pixels again.
"""
from __future__ import annotations

import bisect
import itertools
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from nvidia.dali import fn, types
from nvidia.dali import math as dmath

from kdkit.options import check_options, option
from kdkit.pipelines import common
from kdkit.pipelines.config import Role, ViewsBatch, as_nchw
from kdkit.pipelines.eval import center_view, decode_eval
from kdkit.pipelines.options import CenterCrop, RandomCrop
from kdkit.pipelines.resize import resized_view

if TYPE_CHECKING:
    from kdkit.pipelines.config import Output

TRIES = 10  # torchvision's RandomResizedCrop: tries before the centre-crop fallback
DRAWS = 2 * TRIES + 3  # per view: (area share, log aspect) per try, then x, y and flip


@dataclass(frozen=True)
class ViewDraws:
    """The random numbers of every sample's views, (num_views, DRAWS) float32 in [0, 1): DALI's
    external source calls it per sample with the sample's place in the epoch (the reader's order).
    `shards`: (shard index, samples) of each tar the pipeline reads, in reading order; a sample's
    numbers come from default_rng((seed, shard index, its index in that shard)). Without `shards`
    the whole epoch counts as shard 0."""

    seed: int
    num_views: int
    shards: tuple[tuple[int, int], ...] = ()
    _starts: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        starts = tuple(itertools.accumulate((n for _, n in self.shards), initial=0))
        object.__setattr__(self, "_starts", starts)

    def locate(self, i: int) -> tuple[int, int]:
        """(shard index, index within that shard) of the epoch's sample i; past the end (the reader's
        padding of the last batch) the last sample."""
        if not self.shards:
            return 0, i
        i = min(i, self._starts[-1] - 1) if self._starts[-1] else 0
        k = bisect.bisect_right(self._starts, i) - 1
        return self.shards[k][0], i - self._starts[k]

    def __call__(self, info) -> np.ndarray:
        shard, j = self.locate(info.idx_in_epoch)
        return np.random.default_rng([self.seed, shard, j]).random((self.num_views, DRAWS), dtype=np.float32)


def _as_float(node):
    return fn.cast(node, dtype=types.FLOAT)


def _as_int(node):
    return fn.cast(node, dtype=types.INT32)


def random_box(height, width, u, crop: RandomCrop):
    """(x, y, w, h, flip) of one random-resized crop of an image of height x width pixels (float scalars)
    from its DRAWS numbers u: torchvision's RandomResizedCrop.get_params, vectorised over the tries.
    The first try whose rounded box fits wins; without one, the whole image cut to the nearest allowed
    aspect ratio, centred."""
    (a0, a1), (r0, r1) = crop.random_area, crop.random_aspect_ratio
    lr0, lr1 = math.log(r0), math.log(r1)
    area = height * width
    share = a0 + u[0:2 * TRIES:2] * (a1 - a0)
    ratio = dmath.exp(lr0 + u[1:2 * TRIES:2] * (lr1 - lr0))
    ws = dmath.floor(dmath.sqrt(area * share * ratio) + 0.5)
    hs = dmath.floor(dmath.sqrt(area * share / ratio) + 0.5)
    fits = _as_float((ws <= width) & (hs <= height) & (ws >= 1) & (hs >= 1))
    tries = types.Constant(np.arange(TRIES, dtype=np.float32))
    first = fn.reductions.min(tries * fits + TRIES * (1 - fits))  # TRIES where none fits
    chosen = _as_float(tries == first)
    found = _as_float(first < TRIES)
    narrow, wide = _as_float(width / height < r0), _as_float(width / height > r1)
    fallback_w = narrow * width + wide * dmath.floor(height * r1 + 0.5) + (1 - narrow - wide) * width
    fallback_h = narrow * dmath.floor(width / r0 + 0.5) + wide * height + (1 - narrow - wide) * height
    w = found * fn.reductions.sum(chosen * ws) + (1 - found) * fallback_w
    h = found * fn.reductions.sum(chosen * hs) + (1 - found) * fallback_h
    x = found * dmath.min(dmath.floor(u[2 * TRIES] * (width - w + 1)), width - w) + \
        (1 - found) * dmath.floor((width - w) / 2)
    y = found * dmath.min(dmath.floor(u[2 * TRIES + 1] * (height - h + 1)), height - h) + \
        (1 - found) * dmath.floor((height - h) / 2)
    flip = _as_float(u[2 * TRIES + 2] < (0.5 if crop.flip else 0.0))
    return x, y, w, h, flip


def random_view(full, shape, u, crop: RandomCrop, output: Output, native_op: bool):
    """One random-resized crop of the decoded image from its DRAWS numbers u: (normalized view, (5,) INT32
    pixel box x, y, w, h, flip)."""
    height, width = _as_float(shape[0]), _as_float(shape[1])
    x, y, w, h, flip = random_box(height, width, u, crop)
    anchor = fn.cast(fn.stack(y, x), dtype=types.INT64)  # (y, x) and (h, w): the shape's order
    size = fn.cast(fn.stack(h, w), dtype=types.INT64)
    view = resized_view(fn.slice(full, anchor, size, axes=[0, 1]), output, native_op,
                        mirror=fn.cast(flip, dtype=types.INT32))
    return view, fn.stack(_as_int(x), _as_int(y), _as_int(w), _as_int(h), _as_int(flip))


@dataclass(frozen=True)
class TeacherViews(RandomCrop, CenterCrop, Role):
    """(centre view, views (K, C, H, W), boxes (K, 5), labels) in stored order, from one full decode
    per image: the centre crop (crop_ratio, as the eval role cuts it) and K random views drawn per
    sample (ViewDraws; by default seeded by the pipeline's seed, each sample by its place in the epoch)."""

    num_views: int = option(4, "K random views per image", low=1)
    draws: ViewDraws | None = None  # the teacher pass's: seeded per shard (kdkit.teach.compute)

    name = "teacher_views"
    logits = False  # the teacher pass computes them

    def __post_init__(self):
        check_options(self)

    def graph(self, members, teacher, output, backend):
        from nvidia.dali.pipeline import Pipeline

        jpegs, cls = members
        native_op = self.resizer(backend) == "kdkit_resize_normalize"
        shape = fn.peek_image_shape(jpegs)
        full = decode_eval(jpegs, backend)
        center = center_view(full, self.crop_ratio, output, native_op)
        draws = self.draws or ViewDraws(Pipeline.current().seed, self.num_views)
        u = fn.external_source(source=draws, batch=False, dtype=types.FLOAT, ndim=2)
        views, boxes = zip(*(random_view(full, shape, u[k], self, output, native_op) for k in range(self.num_views)))
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
