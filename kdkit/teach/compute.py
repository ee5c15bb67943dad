"""Teacher outputs for the samples of a rank's shards, with the views cut by the DALI pipelines.

The loaders read in stored order and yield no keys, but an unshuffled reader yields the samples
exactly in `reading_order` (tar after tar, tar order within), and the labels DALI decodes are
compared with the tar's own, so a join by position that went wrong fails loudly instead of storing
one sample's logits under another's key. One loader reads all of a rank's shards, centre view or
random views (run_shards says why that keeps the boxes reproducible).
"""
from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kdkit.errors import KdkitError
from kdkit.runtime import Runtime, cores
from kdkit.shards.location import location
from kdkit.teach.config import TeacherPassConfig
from kdkit.teach.teachers import TeacherEnsemble


@dataclass
class ShardOutputs:
    keys: list[str]  # in tar order, as DALI's index lists them
    labels: list[int]  # as the pipeline decoded them: checked against the tar's before the join by key
    logits: np.ndarray  # float32 (N, C) or (N, K, C)
    boxes: np.ndarray | None  # int32 (N, K, 5) pixel boxes x, y, w, h, flip


@contextlib.contextmanager
def cpu_threads(cfg: TeacherPassConfig, rt: Runtime):
    """On the CPU, DALI's worker threads and torch's intra-op threads share the cores. Oversubscribed,
    torch's OpenMP threads spin while DALI's run: a pass on 2 cores with 2 DALI + 2 torch threads
    measured 10x slower than with 1 torch thread. So torch gets the cores DALI leaves, for the pass."""
    if rt.device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(cfg.torch_threads or max(1, cores() - cfg.threads))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def views_config(cfg: TeacherPassConfig, rt: Runtime, transform, shards: list[tuple[int, int]]):
    """The LoaderConfig of the K random views (the teacher_views role) of the tars of `shards`, (shard
    index, samples) in reading order: one pipeline for all of them, each sample's views drawn from
    (seed, shard index, its index in the shard) (pipelines.teacher_views.ViewDraws)."""
    from kdkit.pipelines import TeacherViews, loader_config
    from kdkit.pipelines.options import decoding
    from kdkit.pipelines.teacher_views import ViewDraws

    role = TeacherViews(num_views=cfg.views, crop_ratio=transform.crop_ratio, random_area=tuple(cfg.random_area),
                        random_aspect_ratio=tuple(cfg.random_aspect_ratio), flip=cfg.flip,
                        draws=ViewDraws(cfg.seed, cfg.views, tuple(shards)))
    return loader_config(role, image_size=transform.image_size, mean=tuple(transform.mean), std=tuple(transform.std),
                         antialias=cfg.antialias, layout="channels_last" if rt.device.type == "cuda" else "CHW",
                         batch_size=cfg.batch_size, shuffle=False, seed=cfg.seed, last_batch="partial",
                         teacher_logits=False,
                         shard_id=0, num_shards=1,  # these tars, read whole: this process's part is chosen by shard
                         num_threads=cfg.threads, device=rt.dali_device, device_id=rt.device_id, **decoding(cfg))


def shard_loader(cfg: TeacherPassConfig, rt: Runtime, shards, transform, indexes: list[int]):
    """The loader of the views the teacher sees over the tars of `shards` (their shard indexes: `indexes`):
    the eval centre crop (kdkit.pipelines.eval_loader), or the K random views of views_config."""
    from kdkit.pipelines import DaliLoader, eval_loader
    from kdkit.pipelines.options import decoding
    from kdkit.shards import contract
    from kdkit.shards.reader import scan_shards

    if cfg.views is None:
        return eval_loader(shards, transform, cfg.batch_size, cfg.threads, rt, antialias=cfg.antialias,
                           **decoding(cfg))
    counts = [sum(u) for u in scan_shards(shards, [contract.IMAGE_EXT, contract.LABEL_EXT]).usable]
    return DaliLoader(shards, views_config(cfg, rt, transform, list(zip(indexes, counts))))


def run_shards(shards: list[tuple[int, Path]], ensemble: TeacherEnsemble, cfg: TeacherPassConfig, rt: Runtime,
               transform, on_images=None, checksums: dict[Path, str] | None = None
               ) -> Iterator[tuple[int, ShardOutputs]]:
    """(shard index, its outputs in tar order) for each (index, tar) of `shards`, as each one completes;
    a tar named in `checksums` (its manifest's sha256) must still have those bytes (check_checksums).

    One loader reads all of this process's shards, so a GPU pipeline's start-up (decoder init, device and
    pinned buffers, an empty prefetch queue) is paid once per rank, not once per shard: the centre view
    has no randomness, and the random views' numbers are drawn per sample from (seed, shard, index in
    the shard) (pipelines.teacher_views.ViewDraws), so a shard's boxes do not depend on which shards ran
    before it on this rank (resume, another world size) and a rerun stores the same. Outputs stay on
    the device until a shard is complete (no wait for the device per batch); the caller writes shards
    in the background.
    """
    from kdkit.shards.reader import ShardSet, reading_order

    amp = cfg.amp and rt.device.type == "cuda"
    for group in [shards] if shards else []:
        loader = shard_loader(cfg, rt, ShardSet(tars=[location(t) for _, t in group], checksums=checksums or {}),
                              transform, [i for i, _ in group])
        order = [k for _, k in reading_order(loader.shards, loader.scan)]
        counts = [sum(u) for u in loader.scan.usable]
        starts = [0, *itertools.accumulate(counts)]
        # outputs, labels and boxes of samples read but not yet handed over, in reading order, kept where
        # they were made (on the GPU): a batch asks nothing of the device, so the host queues the next
        # forward while this one runs; one copy per shard brings them back
        rows: list[torch.Tensor] = []
        views: list[torch.Tensor] = []
        labels: list[torch.Tensor] = []
        read = done = 0

        def hand_over():
            nonlocal rows, views, labels, done
            c = counts[done]
            flat = torch.cat(rows) if rows else torch.zeros(0)
            got = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64)
            boxes = torch.cat(views) if views else None
            out = ShardOutputs(order[starts[done]:starts[done] + c], got[:c].tolist(), flat[:c].cpu().numpy(),
                               None if boxes is None else boxes[:c].cpu().numpy())
            rows, labels = [flat[c:]], [got[c:]]  # the next shard's first samples, still on the device
            views = [boxes[c:]] if boxes is not None else []
            done += 1
            return group[done - 1][0], out

        for batch in loader:
            if cfg.views is None:
                images = batch.images
            else:  # (B, K, C, H, W) -> (B*K, C, H, W): the teacher sees every view as one more image
                images = batch.views.flatten(0, 1)
                views.append(batch.boxes)  # on the device, as the role gives them (int32 pixel boxes)
            with torch.autocast(rt.device.type, dtype=torch.float16, enabled=amp):
                out = ensemble(images.to(rt.device, non_blocking=True)).float()
            n = len(batch.labels)
            rows.append(out.view(n, cfg.views, -1) if cfg.views is not None else out)
            labels.append(batch.labels.view(-1))
            read += n
            if on_images is not None:
                on_images(n)
            while done < len(group) and read - starts[done] >= counts[done]:  # a shard is complete: hand it over
                yield hand_over()
        while done < len(group) and counts[done] == 0:
            yield hand_over()
        if done < len(group):
            raise KdkitError(f"{group[done][1]}: the pipeline read fewer samples than DALI's index lists; rewrite "
                             "the index with `kdkit verify --fix-index`")
