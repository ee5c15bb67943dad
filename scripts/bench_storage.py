"""What teacher outputs add to a shard set of ImageNet-size JPEGs: bytes per sample and share of the set.

    .venv/bin/python scripts/bench_storage.py                     # 200 images, 1000 classes
    .venv/bin/python scripts/bench_storage.py --images 400 --views 1 4 10 --topk 5 10

A set of photo-like JPEGs of ImageNet's size (~700x525, ~110 KB at quality 90; kdkit.bench.synthetic)
is written as real kdkit tars + DALI indexes (kdkit.shards.tario.write_shard), then written again
with the teacher members `kdkit add-teacher-logits` would add, made by the same function the
teacher pass uses (kdkit.teach.members.encode, from random 1000-class logits and random boxes: the
byte count depends only on the shapes): the centre crop (one (C,) row, no boxes) and K stored views
((K, C) rows + (K, 5) boxes), each as full fp16 logits and as top-k (fp16 log-probabilities + int32
class indices). Reported from the files on disk: bytes added per sample (tars + indexes) and as a
share of the set without them; the tar-member accounting (members.added_bytes, what the manifest's
`storage` records) is printed beside it as the check.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np

from kdkit.bench.synthetic import photo_like_jpeg
from kdkit.bench.sysinfo import save_report
from kdkit.shards import contract, tario
from kdkit.teach import members as mem


def set_bytes(folder: Path) -> int:
    """Bytes of a set's tars and DALI indexes."""
    return sum(p.stat().st_size for p in folder.iterdir() if p.suffix in (".tar", ".idx"))


def write_set(folder: Path, samples: list[dict], per_shard: int) -> int:
    folder.mkdir(parents=True)
    for i in range(0, len(samples), per_shard):
        tario.write_shard(folder / contract.tar_name("train", i // per_shard), samples[i:i + per_shard])
    return set_bytes(folder)


def teacher_members(rng, views: int | None, classes: int, topk: int | None, size=(700, 525)) -> dict[str, bytes]:
    logits = rng.normal(0, 2, (views or 1, classes)).astype(np.float32)
    boxes = None
    if views:  # integer pixel boxes inside a size[0] x size[1] image, as the teacher pass draws them
        wh = (rng.uniform(0.3, 1.0, (views, 2)) * size).astype(np.int64)
        xy = (rng.uniform(0, 1, (views, 2)) * (np.array(size) - wh)).astype(np.int64)
        boxes = np.concatenate([xy, wh, rng.integers(0, 2, (views, 1))], axis=1)
    return mem.encode(logits if views else logits[0], boxes, topk)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--views", type=int, nargs="+", default=[1, 4, 10], help="K stored views (besides the centre crop)")
    ap.add_argument("--topk", type=int, nargs="+", default=[5, 10])
    ap.add_argument("--per-shard", type=int, default=200,
                    help="samples per tar (each tar ends in up to 10 KB of padding)")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)

    rng = np.random.default_rng(0)
    work = Path(a.work or tempfile.mkdtemp(prefix="bench-storage-"))
    shutil.rmtree(work / "base", ignore_errors=True)
    base = [{"__key__": f"n{i % a.classes:05d}/img{i:06d}", contract.IMAGE_EXT: photo_like_jpeg(
             rng, int(rng.integers(640, 760)), int(rng.integers(480, 570))),
             contract.LABEL_EXT: contract.encode_label(i % a.classes)} for i in range(a.images)]
    base_bytes = write_set(work / "base", base, a.per_shard)
    jpeg = np.mean([len(s[contract.IMAGE_EXT]) for s in base])
    rows = []
    for views in [None, *a.views]:
        for topk in [None, *a.topk]:
            added = [teacher_members(rng, views, a.classes, topk) for _ in base]
            folder = work / "with"
            shutil.rmtree(folder, ignore_errors=True)
            total = write_set(folder, [{**s, **t} for s, t in zip(base, added)], a.per_shard)
            accounted = [mem.added_bytes(s["__key__"], t) for s, t in zip(base, added)]
            rows.append({"views": views or "centre", "storage": f"top-{topk}" if topk else "full fp16",
                         "payload_per_sample": float(np.mean([p for p, _ in accounted])),
                         "tar_per_sample": float(np.mean([b for _, b in accounted])),
                         "on_disk_per_sample": (total - base_bytes) / a.images,
                         "share_of_set": (total - base_bytes) / base_bytes})
            shutil.rmtree(folder)
    shutil.rmtree(work / "base")
    print(f"{a.images} JPEGs of {jpeg / 1024:.0f} KB on average ({a.classes} classes); the set without teacher "
          f"outputs: {base_bytes / a.images / 1024:.1f} KB per sample (tars + DALI indexes)\n")
    print("| views | storage | member bytes per sample | in the tar (headers, 512-byte padding) | on disk "
          "(tars + indexes) | share of the set |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['views']} | {r['storage']} | {r['payload_per_sample']:.0f} | {r['tar_per_sample']:.0f} "
              f"| {r['on_disk_per_sample']:.0f} | {100 * r['share_of_set']:.2f} % |")
    if a.json:
        save_report(a.json, {"config": {k: str(v) for k, v in vars(a).items()}, "jpeg_bytes": jpeg,
                             "base_bytes_per_sample": base_bytes / a.images, "rows": rows})
    return rows


if __name__ == "__main__":
    main()
