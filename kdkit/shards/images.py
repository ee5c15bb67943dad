"""Turn whatever a source holds into the JPEG bytes a shard stores, or say why it can't.

Every image is decoded once here because this is the last safe place to catch a bad one: DALI's
webdataset reader cannot skip a sample that fails to decode later (DALI #3913).
"""
from __future__ import annotations

import contextlib
import io
import re
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps

from kdkit.errors import BadImage

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file must fail, not come back half grey


def _max_pixels() -> int:
    """KDKIT_MAX_PIXELS, checked: it is read at import, where a bad value must not be a traceback."""
    from kdkit.options import env_integer

    return env_integer("KDKIT_MAX_PIXELS", 100_000_000, low=1)


# Decompression-bomb guard: a small file may declare a huge image (a 0.9 MB PNG of 30000 x 30000 takes
# 1.6 GB to decode). Real photo datasets stay far below 100 megapixels (ImageNet's largest is under 40);
# an image above is skipped and reported (or stops the run with --strict). KDKIT_MAX_PIXELS raises it.
MAX_PIXELS = _max_pixels()
Image.MAX_IMAGE_PIXELS = MAX_PIXELS

DEFAULT_QUALITY = 95  # used whenever an image has to be (re-)encoded and --quality is not given
ORIENTATION = 0x0112  # EXIF orientation tag: 1 is upright, 2..8 mirror and/or rotate
HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")

# What to_rgb does, in words: the export's input.json and the docs quote it, so that another runtime
# can turn a file into the same pixels.
PIXELS_SPEC = ("EXIF orientation applied (Pillow's ImageOps.exif_transpose) and the tag dropped; 16-bit and "
               "32-bit integer greyscale (Pillow modes I;16*, I) scaled from 0..65535 to 0..255 (I above 65535: "
               "from 0..2^31-1), float greyscale (F) from the smallest of 0..1, 0..255, 0..65535 holding its "
               "maximum, each as floor(v * 255 / ref + 0.5) after clipping to 0..ref; transparency composited "
               "on white, per channel floor((c * a + 255 * (255 - a)) / 255 + 0.5) with c, a in 0..255; every "
               "other mode (CMYK, palette, greyscale, ...) through Pillow's convert('RGB')")


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


def orientation(img: Image.Image) -> int:
    """The EXIF orientation (1..8) an image declares; 1 (upright) where it has none or a broken one."""
    try:
        value = img.getexif().get(ORIENTATION, 1)
    except Exception:  # a malformed EXIF block does not make the pixels unusable: read them as stored
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _to_8bit(img: Image.Image) -> Image.Image:
    """A high-bit-depth greyscale image (HIGH_BIT_MODES) as 8-bit L, scaled as PIXELS_SPEC says. Pillow's
    own convert() clips at 255 instead, so a 16-bit scan comes out almost white."""
    x = np.asarray(img).astype(np.float64)
    finite = x[np.isfinite(x)]
    top = float(finite.max()) if finite.size else 0.0
    if img.mode == "F":
        ref = next((r for r in (1.0, 255.0, 65535.0) if top <= r), top)
    elif img.mode == "I" and top > 65535:
        ref = 2.0 ** 31 - 1
    else:
        ref = 65535.0
    x = np.clip(np.nan_to_num(x, nan=0.0, posinf=ref, neginf=0.0), 0, ref)  # a float scan may hold NaN / inf
    return Image.fromarray(np.floor(x * 255 / ref + 0.5).astype(np.uint8), mode="L")


def _on_white(img: Image.Image) -> Image.Image:
    """An image with transparency composited on white, as a viewer shows it (not on black, not with the
    hidden colours of transparent pixels), in integers so that other runtimes can match it exactly."""
    rgba = np.asarray(img.convert("RGBA"), dtype=np.uint32)
    c, a = rgba[..., :3], rgba[..., 3:]
    out = (2 * (c * a + 255 * (255 - a)) + 255) // 510  # floor(n / 255 + 1/2): rounded half up
    return Image.fromarray(out.astype(np.uint8), mode="RGB")


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in ALPHA_MODES or (img.mode in ("P", "L", "RGB") and "transparency" in img.info)


def to_rgb(img: Image.Image) -> tuple[Image.Image, list[str]]:
    """The pixels a viewer shows, as an RGB image (PIXELS_SPEC), and what had to change for it:
    "orientation", "high_bit_depth", "alpha". The one file-to-pixels conversion of kdkit: the shard
    writers, `kdkit predict` and the export's parity inputs all read image files through it."""
    changed = []
    if orientation(img) != 1:
        img = ImageOps.exif_transpose(img)
        changed.append("orientation")
    if img.mode in HIGH_BIT_MODES:
        img = _to_8bit(img)
        changed.append("high_bit_depth")
    if _has_alpha(img):
        opaque = img.mode in ALPHA_MODES and img.getchannel(img.mode[-1]).getextrema()[0] == 255
        img = _on_white(img)
        if not opaque:
            changed.append("alpha")
    elif img.mode != "RGB":
        img = img.convert("RGB")  # CMYK, YCbCr, palette, greyscale, 1-bit: Pillow's conversions
    return img, changed


@contextlib.contextmanager
def _decoding():
    """Pillow's many errors for bad data as one BadImage with a one-line reason."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage(f"over the {MAX_PIXELS / 1e6:g}-megapixel limit (a decompression-bomb guard; set "
                       f"KDKIT_MAX_PIXELS to allow it): {e}".replace("\n", " ")) from None
    except Exception as e:  # Pillow raises many types for bad data; all mean "cannot decode"
        raise BadImage(f"cannot decode: {type(e).__name__}: {_why(e)}") from None


def _why(e: Exception) -> str:
    """Pillow's message without the repr of the in-memory file it read ("<_io.BytesIO object at 0x...>")."""
    text = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(e))
    return text.replace("\n", " ").strip()


def check_decodes(raw: bytes) -> None:
    """Decode encoded image bytes fully, or raise BadImage with a one-line reason (`kdkit verify --decode`,
    and the reader's search for the sample DALI failed on)."""
    if not raw:
        raise BadImage("empty file")
    with _decoding(), Image.open(io.BytesIO(raw)) as img:
        img.load()


def load_rgb(raw: bytes) -> tuple[Image.Image, list[str]]:
    """Encoded image bytes as the RGB pixels a viewer shows (to_rgb), or BadImage with a one-line reason."""
    if not raw:
        raise BadImage("empty file")
    with _decoding():
        img = Image.open(io.BytesIO(raw))
        img.load()
        return to_rgb(img)


def _encode(img: Image.Image, quality: int) -> bytes:
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=quality, optimize=False)  # no exif=: the tag is not carried over
    return out.getvalue()


def prepare_image(raw: bytes | np.ndarray, opts: ImageOptions) -> tuple[bytes, list[str]]:
    """(jpeg_bytes, what was changed: to_rgb's words). Raises BadImage with a one-line reason."""
    if isinstance(raw, np.ndarray):
        img, changed = to_rgb(_from_array(raw))
    else:
        if not raw:
            raise BadImage("empty file")
        with _decoding():
            img = Image.open(io.BytesIO(raw))
            # Source JPEG bytes are kept when they are already what a shard stores: an upright RGB JPEG.
            # One that is upright only through its EXIF tag is re-encoded upright (at --quality, else
            # DEFAULT_QUALITY, one generation at 95 costs under a grey level on average): DALI applies
            # the tag, but Pillow, stock webdataset and timm's readers do not, and a shard must read the
            # same everywhere. Pillow has no lossless JPEG rotation (jpegtran's) to do it without loss.
            keep = (img.format == "JPEG" and img.mode == "RGB" and opts.quality is None
                    and orientation(img) == 1 and _target_size(*img.size, opts) is None)
            if keep:
                # Decoding at 1/8 scale still entropy-decodes the whole stream, so truncation and
                # corrupt data are caught, at a fraction of the cost of a full decode.
                img.draft(img.mode, (max(1, img.size[0] // 8), max(1, img.size[1] // 8)))
            img.load()
            if keep:
                return raw, []
            img, changed = to_rgb(img)
    size = _target_size(*img.size, opts)
    if size is not None:
        img = img.resize(size, Image.Resampling.LANCZOS)
    return _encode(img, opts.quality or DEFAULT_QUALITY), changed


def decoded_size(raw: bytes) -> tuple[int, int]:
    """(width, height) of an encoded image as decoders hand it over, EXIF orientation applied (rotated by
    90 degrees for orientations 5-8), from its header alone (no decode)."""
    with Image.open(io.BytesIO(raw)) as img:
        w, h = img.size
        turned = orientation(img) in (5, 6, 7, 8)
    return (h, w) if turned else (w, h)


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
