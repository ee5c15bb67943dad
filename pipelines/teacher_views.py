"""The views a teacher pass computes outputs for: the centre crop (the simple single-view mode)
and K random-resized crops, each returned with its crop box and flip so the student's replay
pipeline can cut exactly the same pixels later.

Reproducibility: the reader does not shuffle and every random operator draws from the pipeline's
`seed`, so the same shard set read with the same seed, batch size and shard_id/num_shards gives
the same boxes on every rerun (tested). DALI's random operators keep one generator per position
in the batch, so changing the batch size changes the boxes; the boxes are stored next to the
logits anyway, which is what makes them authoritative, not the seed.

Boxes are computed on the decoded image's integer pixel grid (fn.random_crop_generator on the
shape fn.peek_image_shape reports, EXIF orientation applied as the decoder applies it) and stored
relative to it; converting back with round(x * width) gives the same integers again.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from nvidia.dali import fn, pipeline_def, types

from kdkit.pipelines import common, resize
from kdkit.pipelines.eval import center_view

if TYPE_CHECKING:
    from kdkit.pipelines.loader import LoaderConfig
    from kdkit.pipelines.shardset import ShardSet


def _as_float(node):
    return fn.cast(node, dtype=types.FLOAT)


def random_view(full, shape, cfg: LoaderConfig):
    """One random-resized crop of the decoded image: (normalized view, (5,) box x, y, w, h, flip)."""
    height, width = _as_float(shape[0]), _as_float(shape[1])
    anchor, size = fn.random_crop_generator(  # (y, x) and (h, w): the order of the shape given
        shape[0:2], random_area=list(cfg.random_area), random_aspect_ratio=list(cfg.random_aspect_ratio))
    flip = fn.random.coin_flip(probability=0.5 if cfg.flip else 0.0, dtype=types.INT32)
    crop = fn.slice(full, anchor, size, axes=[0, 1])
    view = resize.resized_view(crop, cfg, mirror=flip)
    box = fn.stack(_as_float(anchor[1]) / width, _as_float(anchor[0]) / height,
                   _as_float(size[1]) / width, _as_float(size[0]) / height, _as_float(flip))
    return view, box


def teacher_views(jpegs, cfg: LoaderConfig, num_views: int):
    """(centre view, K views stacked, (K, 5) float32 boxes) from one full decode per image."""
    if num_views < 1:
        raise ValueError(f"num_views={num_views}: expected at least 1")
    shape = fn.peek_image_shape(jpegs)
    full = fn.decoders.image(jpegs, device=common.decoder_device(cfg), output_type=types.RGB,
                             **common.decoder_args(cfg))
    center = center_view(full, cfg)
    views, boxes = zip(*(random_view(full, shape, cfg) for _ in range(num_views)))
    return center, fn.stack(*views), fn.stack(*boxes)


@pipeline_def
def teacher_views_pipeline(shards: ShardSet, cfg: LoaderConfig, shard_id: int = 0, num_shards: int = 1,
                           num_views: int = 4):
    """(centre view, views (K, C, H, W), boxes (K, 5), labels), in stored order."""
    jpegs, cls = common.read_shards(shards, [common.IMAGE_EXT, common.LABEL_EXT], cfg, shard_id, num_shards,
                                    shuffle=False, missing=cfg.missing)
    center, views, boxes = teacher_views(jpegs, cfg, num_views)
    labels = common.parse_label(cls)
    return center, views, common.to_output_device(boxes, cfg), common.to_output_device(labels, cfg)
