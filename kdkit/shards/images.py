"""Turn whatever a source holds into the JPEG bytes a shard stores, or say why it can't.

Every image is decoded once here because this is the last safe place to catch a bad one: DALI's
webdataset reader cannot skip a sample that fails to decode later (DALI #3913).
"""
from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile

from kdkit.errors import BadImage

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file must fail, not come back half grey
# Decompression-bomb guard: a small file may declare a huge image (a 0.9 MB PNG of 30000 x 30000 takes
# 1.6 GB to decode). Real photo datasets stay far below 100 megapixels (ImageNet's largest is under 40);
# an image above is skipped and reported (or stops the run with --strict). KDKIT_MAX_PIXELS raises it.
MAX_PIXELS = int(os.environ.get("KDKIT_MAX_PIXELS", 100_000_000))
Image.MAX_IMAGE_PIXELS = MAX_PIXELS

DEFAULT_QUALITY = 95  # used whenever an image has to be (re-)encoded and --quality is not given


@dataclass(frozen=True)
class ImageOptions:
    max_size: int | None = None  # downscale so the chosen side is at most this many pixels
    resize_side: str = "shorter"  # "shorter" (ImageNet habit: keeps crops sharp) or "longer"
    quality: int | None = None  # re-encode every image at this JPEG quality; None keeps JPEG bytes


def _target_size(w: int, h: int, opts: ImageOptions) -> tuple[int, int] | None:
    if not opts.max_size:
        return None
    side = min(w, h) if opts.resize_side == "shorter" else max(w, h)
    if side <= opts.max_size:
        return None
    scale = opts.max_size / side
    return max(1, round(w * scale)), max(1, round(h * scale))


def _encode(img: Image.Image, quality: int) -> bytes:
    """An RGB JPEG: readers always get 3 channels (grayscale, CMYK, palette and alpha images converted)."""
    if img.mode != "RGB":
        if img.mode in ("RGBA", "LA", "P", "PA") or "transparency" in img.info:
            # composite transparency on white, as a viewer would show it, instead of black
            rgba = img.convert("RGBA")
            bg = Image.new("RGB", rgba.size, (255, 255, 255))
            bg.paste(rgba, mask=rgba.split()[-1])
            img = bg
        else:
            img = img.convert("RGB")  # CMYK, YCCK, I;16, F, ...
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=quality, optimize=False)
    return out.getvalue()


def prepare_image(raw: bytes | np.ndarray, opts: ImageOptions) -> tuple[bytes, bool]:
    """(jpeg_bytes, reencoded). Raises BadImage with a one-line reason."""
    if isinstance(raw, np.ndarray):
        img = _from_array(raw)
        size = _target_size(*img.size, opts)
        if size is not None:
            img = img.resize(size, Image.Resampling.LANCZOS)
        return _encode(img, opts.quality or DEFAULT_QUALITY), True
    if not raw:
        raise BadImage("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(raw))
            fmt = img.format
            size = _target_size(*img.size, opts)
            # source JPEG bytes are kept when they are already what a shard stores: an RGB JPEG
            keep = fmt == "JPEG" and img.mode == "RGB" and size is None and opts.quality is None
            if keep:
                # Decoding at 1/8 scale still entropy-decodes the whole stream, so truncation and
                # corrupt data are caught, at a fraction of the cost of a full decode.
                img.draft(img.mode, (max(1, img.size[0] // 8), max(1, img.size[1] // 8)))
            img.load()
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage(f"over the {MAX_PIXELS / 1e6:.0f}-megapixel limit (a decompression-bomb guard; set "
                       f"KDKIT_MAX_PIXELS to allow it): {e}".replace("\n", " ")) from None
    except Exception as e:  # Pillow raises many types for bad data; all mean "cannot decode"
        raise BadImage(f"cannot decode: {type(e).__name__}: {e}".replace("\n", " ")) from None
    if keep:
        return raw, False
    if size is not None:
        if img.mode not in ("RGB", "L"):
            img = img.convert("RGB") if img.mode not in ("RGBA", "LA", "P", "PA") else img.convert("RGBA")
        img = img.resize(size, Image.Resampling.LANCZOS)
    return _encode(img, opts.quality or DEFAULT_QUALITY), True


def _from_array(arr: np.ndarray) -> Image.Image:
    if arr.dtype != np.uint8:
        raise BadImage(f"pixel array has dtype {arr.dtype}; expected uint8")
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 2:
        return Image.fromarray(arr, mode="L")
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        return Image.fromarray(arr, mode="RGB" if arr.shape[-1] == 3 else "RGBA")
    raise BadImage(f"pixel array has shape {arr.shape}; expected (H,W), (H,W,1), (H,W,3) or (H,W,4)")
