"""Synthetic photo-like JPEGs for loader benchmarks, reproducible from a seed and with no download.

Random noise alone compresses badly and flat colour too well; these images mix a smooth
background, hard-edged shapes and sensor-like noise, which at quality 90 and ~440x350 pixels gives
JPEGs of ~50 KB: the same order of bytes per pixel as ImageNet photographs, which is what decode
cost depends on.

    python -m kdkit.bench.synthetic OUT --images 800 --classes 10
"""
from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def photo_like_jpeg(rng: np.random.Generator, width: int, height: int, quality: int = 90) -> bytes:
    base = rng.integers(0, 255, (height // 32 + 2, width // 32 + 2, 3), dtype=np.uint8)
    img = Image.fromarray(base).resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(12):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        box = [x0, y0, x0 + int(rng.integers(10, width // 2)), y0 + int(rng.integers(10, height // 2))]
        colour = tuple(int(c) for c in rng.integers(0, 255, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    noisy = np.asarray(img, np.int16) + rng.normal(0, 8, (height, width, 3)).astype(np.int16)
    out = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=quality)
    return out.getvalue()


def write_tree(root: Path, images: int = 800, classes: int = 10, seed: int = 0, quality: int = 90,
               width: tuple[int, int] = (380, 500), height: tuple[int, int] = (300, 400), workers: int = 1) -> int:
    """root/c<k>/img<i>.jpg, classes round-robin; returns the total bytes written. Image i is drawn from its
    own generator (seed, i), so the tree is the same whatever `workers` (processes) write it."""
    jobs = [(Path(root), i, classes, seed, quality, width, height) for i in range(images)]
    if workers <= 1:
        return sum(map(_write_one, jobs))
    from kdkit.workers import WorkerPool  # spawned workers; one that dies ends the run with one line

    with WorkerPool(workers, "writing synthetic images") as pool:
        return sum(pool.imap(_write_one, jobs, chunksize=max(1, images // (4 * workers)),
                             describe=lambda job: f"{job[0]}/c{job[1] % job[2]}/img{job[1]:05d}.jpg"))


def _write_one(job) -> int:
    root, i, classes, seed, quality, width, height = job
    rng = np.random.default_rng([seed, i])
    folder = root / f"c{i % classes}"
    folder.mkdir(parents=True, exist_ok=True)
    data = photo_like_jpeg(rng, int(rng.integers(*width)), int(rng.integers(*height)), quality)
    (folder / f"img{i:05d}.jpg").write_bytes(data)
    return len(data)


def main(argv: list[str] | None = None) -> None:
    from kdkit.options import COUNT, SEED, Parser, integer

    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--images", type=COUNT, default=800)
    p.add_argument("--classes", type=COUNT, default=10)
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--quality", type=integer(1, 100), default=90)
    p.add_argument("--workers", type=COUNT, default=1, help="processes writing images (the same images either way)")
    a = p.parse_args(argv)
    total = write_tree(a.out, a.images, a.classes, a.seed, a.quality, workers=a.workers)
    print(f"{a.out}: {a.images} JPEGs, {total / a.images / 1024:.0f} KB on average")


if __name__ == "__main__":
    main()
