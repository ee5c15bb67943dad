"""Conversion throughput: `kdkit shard folder` vs a plain `tar` of the same files, in one run.

    .venv/bin/python scripts/bench_convert.py --images 800 --workers 2 --out bench-out/convert

Generates an ImageNet-like class-folder tree (JPEGs of about 500x375 at quality 90, photo-like
content: smooth structure plus sensor noise), then times, on the same files and in the same process:
  tar          `tar -cf` of the tree (the floor: pure I/O, no decoding or checking)
  pass-through `kdkit shard folder` keeping JPEG bytes (every image still decoded once to check it)
  max-size     `kdkit shard folder --max-size 256` (resize shorter side + re-encode at quality 95)
  max-size q85 `kdkit shard folder --max-size 256 --quality 85`
and prints images/s, source MB/s and output size, as a markdown table (and JSON with --json).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image


def photo_like(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    base = rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(base).resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32)
    detail = np.asarray(Image.fromarray(rng.integers(0, 255, (h // 6, w // 6, 3), dtype=np.uint8))
                        .resize((w, h), Image.Resampling.BILINEAR), dtype=np.float32)
    img = 0.7 * img + 0.3 * detail + rng.normal(0, 6, (h, w, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def make_tree(root: Path, n: int, classes: int, seed: int = 0) -> int:
    rng = np.random.default_rng(seed)
    total = 0
    for i in range(n):
        d = root / f"class{i % classes:03d}"
        d.mkdir(parents=True, exist_ok=True)
        w, h = int(rng.integers(400, 560)), int(rng.integers(300, 420))
        buf = io.BytesIO()
        photo_like(rng, w, h).save(buf, format="JPEG", quality=90)
        (d / f"img{i:06d}.jpg").write_bytes(buf.getvalue())
        total += buf.tell()
    return total


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=800)
    ap.add_argument("--classes", type=int, default=20)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", type=Path, default=Path("bench-out/convert"))
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()

    if a.out.exists():
        shutil.rmtree(a.out)
    src = a.out / "raw"
    src_bytes = make_tree(src, a.images, a.classes)
    kd = [sys.executable, "-m", "kdkit", "shard", "folder", str(src)]
    common = ["--workers", str(a.workers), "--shard-size-mb", "64", "--quiet"]
    runs = {
        "tar": (["tar", "-cf", str(a.out / "plain.tar"), "-C", str(src), "."], a.out / "plain.tar"),
        "kdkit pass-through": (kd + [str(a.out / "pass")] + common, a.out / "pass"),
        "kdkit --max-size 256": (kd + [str(a.out / "max256")] + common + ["--max-size", "256"], a.out / "max256"),
        "kdkit --max-size 256 --quality 85": (
            kd + [str(a.out / "max256q85")] + common + ["--max-size", "256", "--quality", "85"], a.out / "max256q85"),
    }
    results = []
    for name, (cmd, produced) in runs.items():
        secs = timed(cmd)
        out_bytes = produced.stat().st_size if produced.is_file() else sum(
            p.stat().st_size for p in produced.rglob("*.tar"))
        results.append({"run": name, "seconds": secs, "images_per_s": a.images / secs,
                        "source_mb_per_s": src_bytes / 1e6 / secs, "output_mb": out_bytes / 1e6})
    tar_rate = results[0]["images_per_s"]
    print(f"\n{a.images} JPEGs (~500x375, {src_bytes / a.images / 1e3:.0f} KB each, {src_bytes / 1e6:.0f} MB), "
          f"{a.workers} workers, {platform.processor() or platform.machine()}, {os.cpu_count()} cores\n")
    print("| run | images/s | source MB/s | output MB | vs tar |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for r in results:
        print(f"| {r['run']} | {r['images_per_s']:.0f} | {r['source_mb_per_s']:.1f} | {r['output_mb']:.1f} | "
              f"{r['images_per_s'] / tar_rate:.2f}x |")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"images": a.images, "source_bytes": src_bytes, "workers": a.workers,
                                      "cores": os.cpu_count(), "results": results}, indent=1))


if __name__ == "__main__":
    main()
