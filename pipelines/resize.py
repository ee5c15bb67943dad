"""Crop -> normalized size x size view: the resize of random-resized-crop and the final normalize.

On the GPU backend this is fn.resize + fn.crop_mirror_normalize, both fast there. On the CPU
backend DALI's fn.resize is the costliest step of the train pipeline (45% of all CPU time on the
2-core profile in docs/loader.md, twice Pillow's time for the same resize), so the CPU backend uses
kdkit's own DALI operator, fn.kdkit_resize_normalize (kdkit.pipelines.native): the same bilinear
filter, antialiased when shrinking as Pillow and torchvision do it, resize + mirror + normalize
in one pass per image on DALI's threads. Where that operator cannot be built (no C++ compiler),
the CPU backend falls back to DALI's operators (kdkit.pipelines.native says so once).

Which operator a role uses is the role's decision (Role.resizer): auto-augment policies need the
resized uint8 pixels, so training with one keeps fn.resize; ten-crop evaluation keeps one fn.resize
and cuts ten crops from it. Colour jitter on the CPU is folded into the operator (pipelines.train).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from nvidia.dali import fn

from kdkit.pipelines import common, native

if TYPE_CHECKING:
    from kdkit.pipelines.config import Backend, Output


def native_available(backend: Backend) -> bool:
    """True where kdkit's CPU operator can resize: CPU backend, native_resize on, and the operator built."""
    return not backend.gpu and backend.native_resize and native.available()


def resized_view(crops, output: Output, native_op: bool, mirror=0, roi=None, color=None, boxes=None):
    """uint8 HWC crops of any size -> normalized size x size views (Output's layout and dtype),
    mirrored where `mirror` is 1; equal to common.normalize(common.resize_square(crops)).
    `native_op`: through kdkit's CPU operator (else DALI's fn.resize + crop_mirror_normalize).
    `roi`: ((y, x) start, (y, x) end) of the window of each crop to resize, in pixels (native
    operator only: pipelines.eval uses it). `color`: per-sample (brightness, contrast, saturation, hue
    in degrees) applied as fn.color_twist applies them, after resizing (native operator only).
    `boxes`: per sample (N, 5 or 9) windows in whole pixels x, y, w, h, flip[, colour factors]: N views
    of each crop, output (N, ...), each the view of that window cut out first (native operator only).

    fn.resize differs from the native operator only at the image borders, where it repeats the
    edge pixel while Pillow (and the native operator) cut and renormalize the filter window, and by
    its rounding to uint8 before normalizing: at most a few grey levels on the outermost pixels
    (tested).
    """
    if not native_op:
        if roi is not None or color is not None or boxes is not None:
            raise ValueError("resized_view(roi=, color=, boxes=) needs the native operator (see native_available)")
        return common.normalize(common.resize_square(crops, output.image_size, output.antialias), output,
                                mirror=mirror)
    extra = {} if roi is None else dict(roi_start=roi[0], roi_end=roi[1])
    if boxes is not None:  # their flip column mirrors
        extra["boxes"] = boxes
    else:
        extra["mirror"] = mirror
    if color is not None:
        extra.update(brightness=color[0], contrast=color[1], saturation=color[2], hue=color[3])
    return fn.kdkit_resize_normalize(
        crops, size=output.image_size, mean=output.mean255, std=output.std255,
        antialias=output.antialias, planar=output.planar, half=output.dtype == "float16", **extra)
