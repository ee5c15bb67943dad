"""Teacher outputs for the samples of one shard, with the views cut by the DALI pipelines.

One loader per shard, reading that tar alone in stored order: the loader yields no keys, but an
unshuffled single-tar reader yields the samples exactly in `reading_order` (= tar order), and the
labels DALI decodes are compared with that order's labels, so a join by position that went wrong
fails loudly instead of storing one sample's logits under another's key. Per-shard loaders are
also what make the random views reproducible under resume and torchrun: a shard's boxes depend
only on the shard and the seed (shard_seed), not on which shards ran before it or on which rank.
Building a loader costs ~10 ms on the CPU, nothing next to a shard of thousands of images.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kdkit.errors import KdkitError
from kdkit.runtime import Runtime
from kdkit.teach.config import TeacherPassConfig
from kdkit.teach.teachers import TeacherEnsemble


def shard_seed(seed: int, shard_index: int) -> int:
    """The DALI seed of one shard's random views: distinct per shard (one seed for every shard
    would give sample j of each shard the same relative box), fixed for a given (seed, shard)."""
    return (seed * 1_000_003 + shard_index * 7_919 + 1) % (2**31 - 1)


@dataclass
class ShardOutputs:
    keys: list[str]
    logits: np.ndarray  # float32 (N, C) or (N, K, C)
    boxes: np.ndarray | None  # float32 (N, K, 5)


@contextlib.contextmanager
def cpu_threads(cfg: TeacherPassConfig, rt: Runtime):
    """On the CPU, DALI's worker threads and torch's intra-op threads share the cores. Oversubscribed,
    torch's OpenMP threads spin while DALI's run: a pass on 2 cores with 2 DALI + 2 torch threads
    measured 10x slower than with 1 torch thread. So torch gets the cores DALI leaves, for the pass."""
    if rt.device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(cfg.torch_threads or max(1, cores - cfg.threads))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def loader_config(cfg: TeacherPassConfig, rt: Runtime, image_size: int, crop_ratio: float, mean, std,
                  shard_index: int):
    """The loader of one shard's views: the eval role's centre crop, or the teacher_views role's K views."""
    from kdkit.pipelines import TeacherViews, loader_config as make

    role = "eval" if cfg.views is None else TeacherViews(
        num_views=cfg.views, crop_ratio=crop_ratio, random_area=tuple(cfg.random_area),
        random_aspect_ratio=tuple(cfg.random_aspect_ratio), flip=cfg.flip)
    extra = {"crop_ratio": crop_ratio} if cfg.views is None else {}
    return make(role, **extra, image_size=image_size, mean=tuple(mean), std=tuple(std), antialias=cfg.antialias,
                layout="channels_last" if rt.device.type == "cuda" else "CHW", batch_size=cfg.batch_size,
                shuffle=False, seed=shard_seed(cfg.seed, shard_index), last_batch="partial", teacher_logits=False,
                shard_id=0, num_shards=1,  # one tar, read whole: this process's part is chosen by shard, not by DALI
                num_threads=cfg.threads, device=rt.dali_device, device_id=rt.device_id)


def run_shard(tar: Path, shard_index: int, labels: list[int], ensemble: TeacherEnsemble, cfg: TeacherPassConfig,
              rt: Runtime, image_size: int, crop_ratio: float, mean, std, on_images=None) -> ShardOutputs:
    """Teacher outputs for every sample of `tar`, in tar order; `labels` are the tar's own, in order."""
    from kdkit.pipelines import DaliLoader, ShardSet, reading_order

    lcfg = loader_config(cfg, rt, image_size, crop_ratio, mean, std, shard_index)
    loader = DaliLoader(ShardSet(tars=[Path(tar)]), lcfg)
    keys = [k for _, k in reading_order(loader.shards, loader.scan)]
    if len(keys) != len(labels):
        raise KdkitError(f"{tar}: DALI's index lists {len(keys)} samples, the tar holds {len(labels)}; "
                         "rewrite the index with `kdkit verify --fix-index`")
    device = rt.device
    amp = cfg.amp and device.type == "cuda"
    logits, boxes, seen = [], [], []
    for batch in loader:
        if cfg.views is None:
            images, batch_labels = batch.images, batch.labels
        else:  # (B, K, C, H, W) -> (B*K, C, H, W): the teacher sees every view as one more image
            images, batch_labels = batch.views.flatten(0, 1), batch.labels
            boxes.append(batch.boxes.cpu().float())
        images = images.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            out = ensemble(images)
        out = out.float().cpu()
        if cfg.views is not None:
            out = out.view(len(batch_labels), cfg.views, -1)
        logits.append(out)
        seen.extend(batch_labels.view(-1).tolist())
        if on_images is not None:
            on_images(len(batch_labels))
    if seen != labels:
        first = next((i for i, (a, b) in enumerate(zip(seen, labels)) if a != b), min(len(seen), len(labels)))
        raise KdkitError(f"{tar}: the pipeline's sample {first} does not match the tar's (label or count differs: "
                         f"{len(seen)} read, {len(labels)} in the tar); its outputs cannot be joined by key")
    return ShardOutputs(keys, torch.cat(logits).numpy(), torch.cat(boxes).numpy() if boxes else None)
