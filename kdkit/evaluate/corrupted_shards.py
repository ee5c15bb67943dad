"""Corrupted copies of an eval set: computed on the fly, or written once as kdkit shard sets.

Both start from the same pixels: the DALI eval pipeline's centre view (resize the shorter side
to image_size / crop_ratio, centre crop), read as uint8 HWC. DALI cannot run the corruptions
itself (they are numpy/scipy functions, and kdkit's graphs never call back into Python), so the
views leave DALI as raw pixels and are corrupted in Python, optionally in worker processes. The
random state of each corruption comes from the sample key (corruptions.sample_rng), so on-the-fly
and written-once images are the same. As ImageNet-C's files, the result is stored as a JPEG of
quality 85 (`quality`); on the fly the same JPEG round trip is applied, unless turned off.

Written once, each corruption x severity is one shard set, OUT/<corruption>-<severity>/, with the
source's sample keys, labels and shard layout, 224-style images that need no further crop
(evaluate them with crop_ratio=1), a manifest recording the corruption, and DALI indexes: it
passes `kdkit verify` and reads like any other set (`kdkit eval CKPT --data OUT/fog-3`).
"""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import numpy as np
import torch

from kdkit import __version__, atomic
from kdkit.errors import KdkitError
from kdkit.evaluate.corruptions import corrupt, encode_jpeg, jpeg_roundtrip, sample_rng
from kdkit.shards import contract, tario
from kdkit.shards.resume import fingerprint, open_job
from kdkit.workers import WorkerPool

STORE_QUALITY = 85  # ImageNet-C saved its images as JPEG, quality 85 (make_imagenet_c.py)


def set_name(corruption: str, severity: int) -> str:
    return f"{corruption}-{severity}"


def raw_view_loader(shards, image_size: int, crop_ratio: float, batch_size: int, num_threads: int, rt=None):
    """A DALI eval loader yielding the centre view as pixel values (float 0..255, HWC, exact integers),
    on the DALI backend of `rt` (kdkit.runtime; the CPU without one)."""
    from kdkit.pipelines import eval_loader
    from kdkit.pipelines.options import Transform

    raw = Transform(image_size, crop_ratio, mean=(0.0, 0.0, 0.0), std=(1 / 255,) * 3)  # (x - 0) / (1/255) / 255
    return eval_loader(shards, raw, batch_size, num_threads, rt, layout="HWC")


def as_uint8(images) -> np.ndarray:
    return images.round().clamp(0, 255).to(torch.uint8).cpu().numpy()


def corrupt_views(task) -> list:
    """One image, one corruption, several severities: uint8 arrays (after the JPEG round trip when
    `quality` is set) or JPEG bytes (`as_jpeg`). Top-level so worker processes can run it."""
    img, key, name, severities, seed, quality, frost_dir, as_jpeg = task
    out = []
    for s in severities:
        x = corrupt(img, name, s, sample_rng(seed, name, s, key), frost_dir)
        if as_jpeg:
            out.append(encode_jpeg(x, quality))
        else:
            out.append(jpeg_roundtrip(x, quality) if quality else x)
    return out


class CorruptionPool:
    """Maps corrupt_views over tasks, in order: in this process, or in `workers` processes
    (kdkit.workers: spawned, and a worker that fails or dies ends the map with one line)."""

    def __init__(self, workers: int = 1):
        self.workers = workers
        self.pool = WorkerPool(workers, "corrupting images") if workers > 1 else None

    def map(self, tasks: list) -> list:
        if self.pool is None:
            return [corrupt_views(t) for t in tasks]
        return self.pool.map(corrupt_views, tasks, chunksize=max(1, len(tasks) // (4 * self.workers)),
                             describe=lambda task: f"sample {task[1]}, {task[2]}")

    def close(self):
        if self.pool is not None:
            self.pool.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write_corrupted(data, out, image_size: int, corruptions: list[str], severities: list[int],
                    split: str = "val", crop_ratio: float = 0.875, seed: int = 0, quality: int = STORE_QUALITY,
                    frost_dir=None, batch_size: int = 32, num_threads: int = 2, workers: int = 1,
                    command: str = "", progress: bool = True) -> list[Path]:
    """Write OUT/<corruption>-<severity>/ shard sets for every pair; returns their folders.

    Resumable (kdkit.shards.resume): a shard written with the same options and source is kept, and
    only the source shards some set still lacks are decoded again; a folder holding a set made with
    other options is refused. The source is decoded once; the views of one source shard are held in
    memory while its corrupted copies are written (about image_size^2 * 3 bytes per sample).
    """
    from kdkit.shards.reader import ShardSet, resolve_shards

    src = resolve_shards(data, split)
    if src.manifest is None:
        raise KdkitError(f"{data}: no manifest.json; corrupted sets copy the class list from it")
    out = Path(out)
    pairs = [(c, s) for c in corruptions for s in severities]
    if not pairs:
        raise KdkitError("no corruptions selected")
    names = [contract.tar_name(split, i) for i in range(len(src.tars))]
    source = {"converter": "kdkit-corrupt", "root": str(src.folder),
              "shards_sha256": [r.sha256 for r in src.manifest.shards]}
    with contextlib.ExitStack() as held:  # every set's folder stays locked until its manifest is written
        jobs = {}
        for c, s in pairs:
            options = {"corruption": c, "severity": s, "image_size": image_size, "crop_ratio": crop_ratio,
                       "quality": quality, "seed": seed, "frost": "photos" if frost_dir else "procedural"}
            fp = fingerprint({**options, **source})
            jobs[(c, s)] = (held.enter_context(open_job(out / set_name(c, s), fp, command, "corrupted set")[0]),
                            options)
        # only the source shards some set still lacks (missing, or damaged since) are decoded: a rerun continues
        lacking = {(c, s): set(job.todo(names, progress)) for (c, s), (job, _) in jobs.items()}
        todo = [i for i, n in enumerate(names) if any(n in missing for missing in lacking.values())]
        for job, _ in jobs.values():
            job.clear_temps([names[i] for i in todo])
        if todo:
            tars = [src.tars[i] for i in todo]
            _write(ShardSet(tars=tars, checksums={t: src.checksums[t] for t in tars if t in src.checksums}),
                   [names[i] for i in todo], jobs, lacking, corruptions,
                   severities, image_size, crop_ratio, seed, quality, frost_dir, batch_size, num_threads, workers,
                   progress)
        folders = []
        for (c, s), (job, options) in jobs.items():
            records = job.complete(names)
            man = contract.Manifest(
                split=src.manifest.split, classes=src.manifest.classes,
                shards=[contract.ShardRecord(r["tar"], r["idx"], r["num_samples"], r["bytes"], r["sha256"])
                        for r in records],
                source={"converter": "kdkit-corrupt", "root": str(src.folder), "corruption": c, "severity": s},
                options=options, command=command, kdkit_version=__version__)
            atomic.write_text(job.folder / contract.SKIP_REPORT, "path\treason\n")
            tario.atomic_write_json(job.folder / contract.MANIFEST, man.to_json())
            folders.append(job.folder)
    return folders


def _write(shards, names: list[str], jobs: dict, lacking: dict, corruptions, severities, image_size, crop_ratio, seed,
           quality, frost_dir, batch_size, num_threads, workers, progress) -> None:
    """Decode `shards` once and write each of their corrupted copies that a job still lacks."""
    loader = raw_view_loader(shards, image_size, crop_ratio, batch_size, num_threads)
    order = loader.keys()
    name_of = dict(zip(shards.tars, names))
    pending: list[tuple[str, np.ndarray, int]] = []  # (key, view, label) of the current source shard
    current, pos, done_shards = None, 0, 0

    def flush(tar: Path, pool: CorruptionPool):
        name = name_of[tar]
        for c in corruptions:
            todo = [s for s in severities if name in lacking[(c, s)]]
            if todo:
                jpegs = pool.map([(img, key, c, todo, seed, quality, frost_dir, True) for key, img, _ in pending])
                for j, s in enumerate(todo):
                    samples = [{"__key__": key, contract.IMAGE_EXT: jpegs[k][j],
                                contract.LABEL_EXT: contract.encode_label(y)} for k, (key, _, y) in enumerate(pending)]
                    jobs[(c, s)][0].write(name, samples)

    with CorruptionPool(workers) as pool:
        for images, labels, _ in loader:
            imgs = as_uint8(images)
            for img, y in zip(imgs, labels.tolist()):
                tar, key = order[pos]
                pos += 1
                if current is not None and tar != current:
                    flush(current, pool)
                    done_shards += 1
                    pending = []
                    if progress:
                        print(f"corrupted shard {done_shards}/{len(shards.tars)} x {len(jobs)} sets", file=sys.stderr)
                current = tar
                pending.append((key, img, int(y)))
        if current is not None:
            flush(current, pool)


def corrupted_set(root: Path, corruption: str, severity: int, image_size: int):
    """The written-once set for one pair, checked to have been written for this image size."""
    from kdkit.shards.verify import load_manifest
    from kdkit.shards.reader import resolve_shards

    folder = Path(root) / set_name(corruption, severity)
    if not (folder / contract.MANIFEST).exists():
        raise KdkitError(f"{folder}: no corrupted shard set here; write it with "
                         f"`kdkit eval --write-corrupted {root} --data SHARDS ...`")
    made = load_manifest(folder).options
    if int(made.get("image_size", -1)) != image_size:
        raise KdkitError(f"{folder}: written at {made.get('image_size')} px, the model wants {image_size} px")
    return resolve_shards(folder)
