"""The ImageNet-C corruptions (Hendrycks & Dietterich, ICLR 2019), 15 types x 5 severities.

Each corruption takes the decoded, resized and centre-cropped eval view as uint8 HWC (the
reference corrupts the 224 x 224 `Resize(256) + CenterCrop(224)` image), a severity 1..5 and a
numpy Generator, and returns uint8 HWC of the same shape. Severity constants are the reference's,
from `hendrycks/robustness` `ImageNet-C/create_c/make_imagenet_c.py` (identical in the
`imagenet_c` package). Float results become uint8 the way the reference stores them
(`np.uint8(img)`: clipped, truncated).

| corruption        | constants, severity 1..5                                       | how kdkit follows it     |
|-------------------|----------------------------------------------------------------|--------------------------|
| gaussian_noise    | sigma .08 .12 .18 .26 .38                                       | exact                    |
| shot_noise        | photons 60 25 12 5 3                                            | exact                    |
| impulse_noise     | s&p amount .03 .06 .09 .17 .27                                  | exact in law (skimage)   |
| defocus_blur      | (radius, alias) (3,.1) (4,.5) (6,.5) (8,.5) (10,.5)             | exact                    |
| glass_blur        | (sigma, delta, iters) (.7,1,2) (.9,2,1) (1,2,3) (1.1,3,2) (1.5,4,2) | shuffle vectorised   |
| motion_blur       | (radius, sigma) (10,3) (15,5) (15,8) (15,12) (20,15)             | ImageMagick re-made      |
| zoom_blur         | zooms 1..1.10/.01, 1..1.15/.01, 1..1.20/.02, 1..1.24/.02, 1..1.30/.03 | exact              |
| snow              | 7-tuples in SNOW below                                          | motion blur re-made      |
| frost             | (image, frost) (1,.4) (.8,.6) (.7,.7) (.65,.7) (.6,.75)         | procedural frost layer   |
| fog               | (strength, decay) (1.5,2) (2,2) (2.5,1.7) (2.5,1.5) (3,1.4)     | exact                    |
| brightness        | HSV value + .1 .2 .3 .4 .5                                      | exact (closed form)      |
| contrast          | factor .4 .3 .2 .1 .05                                          | exact                    |
| elastic_transform | (alpha, sigma, affine) in ELASTIC below                         | exact up to rounding     |
| pixelate          | scale .6 .5 .4 .3 .25 (Pillow BOX)                               | exact                    |
| jpeg_compression  | quality 25 18 15 10 7 (Pillow)                                  | exact                    |

Pixel-sized constants (blur radii, glass-blur deltas, elastic sigmas) are ImageNet-C's for
224 px and are not rescaled at other image sizes. CORRUPTIONS.md has the details.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from kdkit.evaluate import imageops as ops

GROUPS = {
    "noise": ["gaussian_noise", "shot_noise", "impulse_noise"],
    "blur": ["defocus_blur", "glass_blur", "motion_blur", "zoom_blur"],
    "weather": ["snow", "frost", "fog", "brightness"],
    "digital": ["contrast", "elastic_transform", "pixelate", "jpeg_compression"],
}
NAMES = [n for group in GROUPS.values() for n in group]  # Hendrycks' order of the 15
SEVERITIES = (1, 2, 3, 4, 5)

SNOW = [(0.1, 0.3, 3, 0.5, 10, 4, 0.8), (0.2, 0.3, 2, 0.5, 12, 4, 0.7), (0.55, 0.3, 4, 0.9, 12, 8, 0.7),
        (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65), (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55)]
# "244 should have been 224, but ultimately nothing is incorrect" (the reference's own comment)
ELASTIC = [(244 * 2, 244 * 0.7, 244 * 0.1), (244 * 2, 244 * 0.08, 244 * 0.2), (244 * 0.05, 244 * 0.01, 244 * 0.02),
           (244 * 0.07, 244 * 0.01, 244 * 0.02), (244 * 0.12, 244 * 0.01, 244 * 0.02)]


def _unit(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float64) / 255.0


def _store(x01: np.ndarray) -> np.ndarray:
    """[0, 1] floats to uint8 as the reference stores them: np.uint8(clip(x) * 255) truncates."""
    return (np.clip(x01, 0, 1) * 255).astype(np.uint8)


def gaussian_noise(x, severity, rng):
    c = [0.08, 0.12, 0.18, 0.26, 0.38][severity - 1]
    return _store(_unit(x) + rng.normal(size=x.shape, scale=c))


def shot_noise(x, severity, rng):
    c = [60, 25, 12, 5, 3][severity - 1]
    return _store(rng.poisson(_unit(x) * c) / c)


def impulse_noise(x, severity, rng):
    # skimage.util.random_noise(mode="s&p", amount=c): each value independently becomes salt or
    # pepper with probability c, half of them salt
    c = [0.03, 0.06, 0.09, 0.17, 0.27][severity - 1]
    out = _unit(x)
    flipped = rng.random(x.shape) < c
    salted = rng.random(x.shape) < 0.5
    out[flipped & salted] = 1.0
    out[flipped & ~salted] = 0.0
    return _store(out)


def defocus_blur(x, severity, rng):
    radius, alias = [(3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)][severity - 1]
    return _store(ops.filter2d(_unit(x).astype(np.float32), ops.disk_kernel(radius, alias)))


def glass_blur(x, severity, rng):
    sigma, delta, iterations = [(0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2)][severity - 1]
    blurred = _store(ops.gaussian_blur(_unit(x), sigma))
    shuffled = ops.local_shuffle(blurred, delta, iterations, rng)
    return _store(ops.gaussian_blur(_unit(shuffled), sigma))


def motion_blur(x, severity, rng):
    radius, sigma = [(10, 3), (15, 5), (15, 8), (15, 12), (20, 15)][severity - 1]
    out = ops.motion_blur(x.astype(np.float32), radius, sigma, rng.uniform(-45, 45))
    return np.clip(out, 0, 255).astype(np.uint8)


def zoom_blur(x, severity, rng):
    zooms = [np.arange(1, 1.11, 0.01), np.arange(1, 1.16, 0.01), np.arange(1, 1.21, 0.02),
             np.arange(1, 1.26, 0.02), np.arange(1, 1.31, 0.03)][severity - 1]
    img = _unit(x).astype(np.float32)
    out = np.zeros_like(img)
    for z in zooms:
        out += ops.clipped_zoom(img, z)
    return _store((img + out) / (len(zooms) + 1))


def snow(x, severity, rng):
    mean, std, zoom, threshold, radius, sigma, mix = SNOW[severity - 1]
    img = _unit(x).astype(np.float32)
    h, w = img.shape[:2]
    flakes = rng.normal(size=(h, w), loc=mean, scale=std)
    flakes = ops.clipped_zoom(flakes[..., None], zoom)[..., 0]
    flakes[flakes < threshold] = 0
    flakes = (np.clip(flakes, 0, 1) * 255).astype(np.uint8)  # the reference goes through an 8-bit image
    streaks = ops.motion_blur(flakes[..., None].astype(np.float32), radius, sigma, rng.uniform(-135, -45))
    streaks = np.round(np.clip(streaks, 0, 255)) / 255.0
    gray = img @ np.array([0.299, 0.587, 0.114], np.float32)  # cv2.COLOR_RGB2GRAY
    img = mix * img + (1 - mix) * np.maximum(img, gray[..., None] * 1.5 + 0.5)
    return _store(img + streaks + np.rot90(streaks, k=2))


def frost(x, severity, rng, frost_dir=None):
    c_img, c_frost = [(1, 0.4), (0.8, 0.6), (0.7, 0.7), (0.65, 0.7), (0.6, 0.75)][severity - 1]
    h, w = x.shape[:2]
    layer = ops.load_frost_photo(frost_dir, h, w, rng) if frost_dir else ops.frost_texture(h, w, rng)
    return np.clip(c_img * x.astype(np.float64) + c_frost * layer, 0, 255).astype(np.uint8)


def fog(x, severity, rng):
    strength, decay = [(1.5, 2), (2.0, 2), (2.5, 1.7), (2.5, 1.5), (3.0, 1.4)][severity - 1]
    img = _unit(x)
    h, w = img.shape[:2]
    peak = img.max()
    img = img + strength * ops.plasma_fractal(ops.next_power_of_2(max(h, w, 256)), decay, rng)[:h, :w, None]
    return _store(img * peak / (peak + strength))


def brightness(x, severity, rng):
    # rgb2hsv, V += c (clipped), hsv2rgb: every channel of an HSV colour is V times a function of
    # H and S only, so the round trip scales RGB by V'/V; black (V = 0, S = 0 by skimage's
    # convention) becomes grey V'.
    c = [0.1, 0.2, 0.3, 0.4, 0.5][severity - 1]
    img = _unit(x)
    v = img.max(axis=-1, keepdims=True)
    v_new = np.minimum(v + c, 1.0)
    scaled = img * np.divide(v_new, v, out=np.zeros_like(v), where=v > 0)
    return _store(np.where(v > 0, scaled, v_new))


def contrast(x, severity, rng):
    c = [0.4, 0.3, 0.2, 0.1, 0.05][severity - 1]
    img = _unit(x)
    means = img.mean(axis=(0, 1), keepdims=True)
    return _store((img - means) * c + means)


def elastic_transform(x, severity, rng):
    alpha, sigma, affine = ELASTIC[severity - 1]
    img = _unit(x).astype(np.float32)
    h, w = img.shape[:2]
    # a random affine warp of three points around the centre (as (x, y) points, as OpenCV reads them)
    center, size = np.float32([h, w]) // 2, min(h, w) // 3
    pts1 = np.float32([center + size, [center[0] + size, center[1] - size], center - size])
    pts2 = pts1 + rng.uniform(-affine, affine, size=pts1.shape).astype(np.float32)
    img = ops.warp_affine(img, ops.affine_from_points(pts1.astype(np.float64), pts2.astype(np.float64)))
    # then a smooth random displacement field
    dx = ops.gaussian_blur(rng.uniform(-1, 1, size=(h, w)), sigma, mode="reflect", truncate=3) * alpha
    dy = ops.gaussian_blur(rng.uniform(-1, 1, size=(h, w)), sigma, mode="reflect", truncate=3) * alpha
    ys, xs = np.mgrid[0:h, 0:w]
    coords = [ys + dy, xs + dx]
    from scipy.ndimage import map_coordinates

    out = np.stack([map_coordinates(img[..., c], coords, order=1, mode="reflect") for c in range(img.shape[-1])], -1)
    return _store(out)


def pixelate(x, severity, rng):
    c = [0.6, 0.5, 0.4, 0.3, 0.25][severity - 1]
    h, w = x.shape[:2]
    img = Image.fromarray(x).resize((int(w * c), int(h * c)), Image.Resampling.BOX)
    return np.asarray(img.resize((w, h), Image.Resampling.BOX))


def jpeg_compression(x, severity, rng):
    return jpeg_roundtrip(x, [25, 18, 15, 10, 7][severity - 1])


def jpeg_roundtrip(x: np.ndarray, quality: int) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(encode_jpeg(x, quality))).convert("RGB"))


def encode_jpeg(x: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(x).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


_FUNCS = {f.__name__: f for f in (gaussian_noise, shot_noise, impulse_noise, defocus_blur, glass_blur, motion_blur,
                                  zoom_blur, snow, frost, fog, brightness, contrast, elastic_transform, pixelate,
                                  jpeg_compression)}


def corrupt(x: np.ndarray, name: str, severity: int, rng: np.random.Generator, frost_dir=None) -> np.ndarray:
    """Apply corruption `name` at `severity` (1..5) to one uint8 HWC RGB image."""
    if name not in _FUNCS:
        raise ValueError(f"unknown corruption {name!r}; known: {', '.join(NAMES)}")
    if severity not in SEVERITIES:
        raise ValueError(f"severity {severity}: expected 1..5")
    if x.dtype != np.uint8 or x.ndim != 3 or x.shape[-1] != 3:
        raise ValueError(f"expected a uint8 HxWx3 image, got {x.dtype} {x.shape}")
    if name == "frost":
        out = frost(x, severity, rng, frost_dir)
    else:
        out = _FUNCS[name](x, severity, rng)
    return np.ascontiguousarray(out)


def sample_rng(seed: int, name: str, severity: int, key: str) -> np.random.Generator:
    """The generator for one (corruption, severity, sample): derived from the sample key, so the same
    image gets the same corruption on the fly, when written to shards, and on any rank."""
    import zlib

    return np.random.default_rng([seed, NAMES.index(name), severity, zlib.crc32(key.encode())])


def parse_corruptions(text: str | None) -> list[str]:
    """"all", a group name ("noise", "blur", "weather", "digital") or a comma list, in Hendrycks' order."""
    if not text or text == "none":
        return []
    chosen: set[str] = set()
    for part in (p.strip() for p in text.split(",") if p.strip()):
        if part == "all":
            chosen.update(NAMES)
        elif part in GROUPS:
            chosen.update(GROUPS[part])
        elif part in _FUNCS:
            chosen.add(part)
        else:
            raise ValueError(f"unknown corruption {part!r}; known: all, {', '.join(GROUPS)}, {', '.join(NAMES)}")
    return [n for n in NAMES if n in chosen]


def parse_severities(text: str) -> list[int]:
    """"1-5", "3" or "1,3,5"."""
    out: set[int] = set()
    for part in (p.strip() for p in str(text).split(",") if p.strip()):
        lo, _, hi = part.partition("-")
        try:
            out.update(range(int(lo), int(hi or lo) + 1))
        except ValueError:
            raise ValueError(f"severities {text!r}: expected e.g. 1-5, 3 or 1,3,5") from None
    if not out or not out <= set(SEVERITIES):
        raise ValueError(f"severities {text!r}: expected values in 1..5")
    return sorted(out)
