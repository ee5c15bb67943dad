"""Crop -> normalized size x size view: the resize of random-resized-crop and the final normalize.

On the GPU backend this is fn.resize + fn.crop_mirror_normalize, both fast there. On the CPU
backend DALI's fn.resize is the costliest step of the train pipeline (45% of all CPU time on the
2-core profile in the README, twice Pillow's time for the same resize), so the CPU backend uses
kdkit's own DALI operator, fn.kdkit_resize_normalize (pipelines/native): the same bilinear
filter, antialiased when shrinking as Pillow and torchvision do it, resize + mirror + normalize
in one pass per image on DALI's threads. Where that operator cannot be built (no C++ compiler),
the CPU backend falls back to DALI's operators (pipelines.native says so once).

The eval views use the same operator on the window of the decoded image each view shows
(pipelines.eval.view_window). Pipelines that change the resized pixels before normalizing (colour
jitter on the GPU or without the operator, auto-augment) use common.resize_square +
common.normalize instead; colour jitter on the CPU is folded into the operator (see
pipelines.train.train_views).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from nvidia.dali import fn

from kdkit.pipelines import common, native

if TYPE_CHECKING:
    from kdkit.pipelines.loader import LoaderConfig


def uses_native(cfg: LoaderConfig) -> bool:
    """True where resized_view runs kdkit's CPU operator: CPU backend, cfg.native_resize, and the
    operator built."""
    return not common.is_gpu(cfg) and cfg.native_resize and native.available()


def resizer(cfg: LoaderConfig, role: str) -> str:
    """Which operator resizes `role`'s images under cfg: "kdkit_resize_normalize" or "fn.resize".
    The one place that decides it (train_views and eval_views route by it; bench-loader reports
    it). Auto-augment policies need the resized uint8 pixels, so training roles with one keep
    fn.resize. Ten-crop evaluation keeps it too: one fn.resize and ten crops of it beat ten
    windows through the operator (measured: 275 vs 177 img/s on 2 cores; centre-only 643 vs 972)."""
    if not uses_native(cfg) or (role in ("train", "replay") and cfg.auto_augment):
        return "fn.resize"
    if role == "eval" and cfg.eval_views == "tencrop":
        return "fn.resize"
    return "kdkit_resize_normalize"


def resized_view(crops, cfg: LoaderConfig, mirror=0, roi=None, color=None):
    """uint8 HWC crops of any size -> normalized size x size views (common.normalize's layout and
    dtype), mirrored where `mirror` is 1; equal to common.normalize(common.resize_square(crops)).
    `roi`: ((y, x) start, (y, x) end) of the window of each crop to resize, in pixels (native
    operator only: pipelines.eval uses it). `color`: per-sample (brightness, contrast, saturation)
    factors applied as fn.color_twist applies them, after resizing (native operator only).

    fn.resize differs from the native operator only at the image borders, where it repeats the
    edge pixel while Pillow (and the native operator) cut and renormalize the filter window, and by
    its rounding to uint8 before normalizing: at most a few grey levels on the outermost pixels
    (tested).
    """
    common.output_dtype(cfg)  # validates cfg.dtype for both routes
    if not uses_native(cfg):
        if roi is not None or color is not None:
            raise ValueError("resized_view(roi=..., color=...) needs the native operator (see uses_native)")
        return common.normalize(common.resize_square(crops, cfg), cfg, mirror=mirror)
    extra = {} if roi is None else dict(roi_start=roi[0], roi_end=roi[1])
    if color is not None:
        extra.update(brightness=color[0], contrast=color[1], saturation=color[2])
    return fn.kdkit_resize_normalize(
        crops, size=cfg.image_size, mean=[m * 255 for m in cfg.mean], std=[s * 255 for s in cfg.std],
        mirror=mirror, antialias=cfg.antialias, planar=common.output_layout(cfg) == "CHW",
        half=cfg.dtype == "float16", **extra)
