"""Image operations the corruptions are built from, in numpy/scipy/Pillow only.

The reference (Hendrycks & Dietterich 2019, `robustness/ImageNet-C/create_c/make_imagenet_c.py`)
uses OpenCV, scikit-image and ImageMagick (Wand). Each helper below says which of their calls it
stands in for, and whether it is exact (same arithmetic, same border rule) or an approximation.
Border rules map as: OpenCV BORDER_REFLECT_101 = scipy "mirror"; scikit-image's `gaussian`
passes its mode ("nearest" by default) straight to scipy.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from scipy import ndimage


def gaussian_kernel_1d(ksize: int, sigma: float) -> np.ndarray:
    """cv2.getGaussianKernel(ksize, sigma) for sigma > 0 (exact)."""
    t = np.arange(ksize) - (ksize - 1) / 2
    k = np.exp(-(t**2) / (2 * sigma**2))
    return k / k.sum()


def disk_kernel(radius: float, alias_blur: float) -> np.ndarray:
    """The reference's `disk`: an aliased disk, antialiased by cv2.GaussianBlur (exact).

    The support is 17 x 17 up to radius 8 (as in the reference, whatever the radius) and
    (2r+1)^2 above; the Gaussian is 3 x 3 or 5 x 5 with OpenCV's default reflect-101 border.
    """
    if radius <= 8:
        L, ksize = np.arange(-8, 8 + 1), 3
    else:
        L, ksize = np.arange(-radius, radius + 1), 5
    X, Y = np.meshgrid(L, L)
    aliased = np.asarray((X**2 + Y**2) <= radius**2, dtype=np.float32)
    aliased /= aliased.sum()
    g = gaussian_kernel_1d(ksize, alias_blur)
    out = ndimage.correlate1d(aliased, g, axis=0, mode="mirror")
    return ndimage.correlate1d(out, g, axis=1, mode="mirror").astype(np.float32)


def filter2d(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """cv2.filter2D(channel, -1, kernel) per channel (exact up to float rounding): correlation with
    the kernel centred, reflect-101 border."""
    return np.stack([ndimage.correlate(x[..., c], kernel, mode="mirror") for c in range(x.shape[-1])], axis=-1)


def gaussian_blur(x: np.ndarray, sigma: float, mode: str = "nearest", truncate: float = 4.0) -> np.ndarray:
    """skimage.filters.gaussian(x, sigma, multichannel=True): spatial axes only (exact)."""
    sig = (sigma, sigma) + (0,) * (x.ndim - 2)
    return ndimage.gaussian_filter(x, sigma=sig, mode=mode, truncate=truncate)


def clipped_zoom(img: np.ndarray, zoom_factor: float) -> np.ndarray:
    """Zoom into the centre and cut back to the input size (the reference's `clipped_zoom`, exact;
    like bethgelab/imagecorruptions it handles non-square images)."""
    h, w = img.shape[:2]
    ch, cw = int(np.ceil(h / zoom_factor)), int(np.ceil(w / zoom_factor))
    top, left = (h - ch) // 2, (w - cw) // 2
    crop = img[top:top + ch, left:left + cw]
    if crop.ndim == 2:
        out = ndimage.zoom(crop, zoom_factor, order=1)
    else:  # per channel: the same numbers as a (z, z, 1) zoom, three times faster
        out = np.stack([ndimage.zoom(crop[..., c], zoom_factor, order=1) for c in range(crop.shape[-1])], axis=-1)
    th, tw = (out.shape[0] - h) // 2, (out.shape[1] - w) // 2
    return out[th:th + h, tw:tw + w]


def motion_blur(x: np.ndarray, radius: int, sigma: float, angle: float) -> np.ndarray:
    """ImageMagick's MotionBlurImage(radius, sigma, angle), re-implemented (approximation).

    As ImageMagick does: a one-sided Gaussian kernel of width 2*radius+1 (weights exp(-i^2/2s^2),
    normalised), tap i sampling the pixel i steps back along `angle` (rounded to whole pixels),
    edge pixels replicated past the border. ImageMagick's sub-pixel handling and 16-bit quantum
    differ in detail; bethgelab/imagecorruptions uses the same scheme to drop the Wand dependency.
    """
    width = 2 * int(radius) + 1
    k = np.exp(-(np.arange(width) ** 2) / (2 * sigma**2))
    k /= k.sum()
    h, w = x.shape[:2]
    sin, cos = math.sin(math.radians(angle)), math.cos(math.radians(angle))
    out = np.zeros(x.shape, np.float32)
    p = width  # no tap reaches further; edge padding = clamping the sample position
    padded = np.pad(x, ((p, p), (p, p)) + ((0, 0),) * (x.ndim - 2), mode="edge")
    for i in range(width):
        dy, dx = -math.ceil(i * sin - 0.5), -math.ceil(i * cos - 0.5)
        if abs(dy) >= h or abs(dx) >= w:
            break  # the streak left the image
        out += k[i] * padded[p - dy:p - dy + h, p - dx:p - dx + w]
    return out


def plasma_fractal(mapsize: int, wibbledecay: float, rng: np.random.Generator) -> np.ndarray:
    """Diamond-square height map in [0, 1], side `mapsize` (a power of two): the reference's
    `plasma_fractal` (exact, with the generator passed in instead of numpy's global one)."""
    assert mapsize & (mapsize - 1) == 0
    a = np.empty((mapsize, mapsize), np.float64)
    a[0, 0] = 0
    step, wibble = mapsize, 100.0

    def wibbled_mean(arr):
        return arr / 4 + wibble * rng.uniform(-wibble, wibble, arr.shape)

    while step >= 2:
        half = step // 2
        corners = a[0:mapsize:step, 0:mapsize:step]
        sq = corners + np.roll(corners, -1, axis=0)
        sq += np.roll(sq, -1, axis=1)
        a[half:mapsize:step, half:mapsize:step] = wibbled_mean(sq)
        dr = a[half:mapsize:step, half:mapsize:step]
        ul = a[0:mapsize:step, 0:mapsize:step]
        a[0:mapsize:step, half:mapsize:step] = wibbled_mean(dr + np.roll(dr, 1, axis=0) + ul + np.roll(ul, -1, axis=1))
        a[half:mapsize:step, 0:mapsize:step] = wibbled_mean(dr + np.roll(dr, 1, axis=1) + ul + np.roll(ul, -1, axis=0))
        step //= 2
        wibble /= wibbledecay
    a -= a.min()
    return a / a.max()


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 2 ** (int(n) - 1).bit_length()


def local_shuffle(x: np.ndarray, max_delta: int, iterations: int, rng: np.random.Generator) -> np.ndarray:
    """glass_blur's pixel shuffle, vectorised (a variant of the reference's loop, not identical).

    The reference visits every pixel (h, w) of the inner region in reverse raster order and swaps
    it with (h + dy, w + dx), dy, dx uniform in [-d, d-1], one pixel at a time: ~50,000 Python-level
    swaps per 224 px image and iteration. Here the same swaps (every inner pixel once per iteration,
    the same partner distribution) are applied in (2d)^2 groups of positions 2d apart: swap windows
    of one group cannot overlap, so each group is one vectorised exchange. Pixels travel the same
    distances; only the order of the swaps, and so which pixels get carried along twice, differs.
    """
    x = x.copy()
    h, w = x.shape[:2]
    d = int(max_delta)
    hs, ws = np.arange(h - d, d, -1), np.arange(w - d, d, -1)  # the reference's scan ranges
    for _ in range(iterations):
        for rh in range(2 * d):
            for rw in range(2 * d):
                gh, gw = hs[rh::2 * d], ws[rw::2 * d]
                if not len(gh) or not len(gw):
                    continue
                H, W = np.meshgrid(gh, gw, indexing="ij")
                dy = rng.integers(-d, d, H.shape)
                dx = rng.integers(-d, d, H.shape)
                H2, W2 = H + dy, W + dx
                a, b = x[H, W].copy(), x[H2, W2].copy()
                x[H2, W2] = a  # partners first: where a partner is the pixel itself, a == b anyway
                x[H, W] = b
    return x


def affine_from_points(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """cv2.getAffineTransform: the 2 x 3 matrix mapping three (x, y) points onto three (exact)."""
    A = np.hstack([src, np.ones((3, 1))])
    return np.linalg.solve(A, dst).T


def warp_affine(x: np.ndarray, M: np.ndarray) -> np.ndarray:
    """cv2.warpAffine(x, M, (w, h), borderMode=BORDER_REFLECT_101), bilinear (exact up to OpenCV's
    fixed-point interpolation): dst(x, y) = src(M^-1 (x, y))."""
    h, w = x.shape[:2]
    full = np.vstack([M, [0, 0, 1]])
    inv = np.linalg.inv(full)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    sx = inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2]
    sy = inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2]
    return np.stack([ndimage.map_coordinates(x[..., c], [sy, sx], order=1, mode="mirror")
                     for c in range(x.shape[-1])], axis=-1)


def frost_texture(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """A procedural frost layer, uint8 RGB (h, w, 3): an APPROXIMATION of the reference's frost
    photographs, which kdkit does not ship (see CORRUPTIONS.md; `frost_dir` uses the real ones).

    Frost on glass is a pale haze with bright, thin ice needles branching in all directions. Here:
    a plasma-fractal haze (the fog generator) sets where the frost is dense; a few hundred short
    bright strokes at random angles, denser where the haze is, give the needles; a slight blur
    softens them, and a blue-white tint imitates the photos' colour. Nothing here was fitted to the
    photos (kdkit has none): errors on this frost are kdkit's own, not comparable with ImageNet-C's.
    """
    side = next_power_of_2(max(h, w))
    haze = plasma_fractal(side, 1.8, rng)[:h, :w]
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    n = int(0.012 * h * w)
    ys, xs = rng.uniform(0, h, n), rng.uniform(0, w, n)
    keep = rng.uniform(0, 1, n) < 0.25 + 0.75 * haze[ys.astype(int), xs.astype(int)]
    for y, x in zip(ys[keep], xs[keep]):
        ang, length = rng.uniform(0, 2 * math.pi), rng.uniform(2, 0.08 * max(h, w))
        for branch in (0.0, rng.uniform(-0.9, 0.9)):  # a needle and one side branch
            x2, y2 = x + length * math.cos(ang + branch), y + length * math.sin(ang + branch)
            draw.line([(x, y), (x2, y2)], fill=int(rng.uniform(150, 255)), width=1)
            length *= 0.5
    needles = np.asarray(canvas.filter(ImageFilter.GaussianBlur(0.6)), np.float32) / 255
    layer = np.clip(0.55 * haze + 0.8 * needles, 0, 1) * 190
    tint = np.array([0.86, 0.94, 1.0], np.float32)  # photographs of frost are slightly blue
    return np.clip(layer[..., None] * tint, 0, 255).astype(np.uint8)


def load_frost_photo(frost_dir, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """A random h x w crop of one of the reference's frost photos (frost1.png ... frost6.jpg).

    As the reference: `randint(5)` picks among the first five files (the sixth is never used),
    crop position uniform. Photos smaller than the image are enlarged (x1.1 margin) first, as
    bethgelab/imagecorruptions does for inputs larger than 224 px.
    """
    from pathlib import Path

    names = ["frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg", "frost6.jpg"]
    path = Path(frost_dir) / names[int(rng.integers(5))]
    img = Image.open(path).convert("RGB")
    scale = max(h / img.height, w / img.width)
    if scale > 1:
        img = img.resize((math.ceil(img.width * scale * 1.1), math.ceil(img.height * scale * 1.1)),
                         Image.Resampling.BICUBIC)
    arr = np.asarray(img)
    y0, x0 = int(rng.integers(0, arr.shape[0] - h + 1)), int(rng.integers(0, arr.shape[1] - w + 1))
    return arr[y0:y0 + h, x0:x0 + w]
