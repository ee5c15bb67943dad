"""The trainer's data: shard sets checked before training starts, and DALI loaders per epoch.

Checks that fail early with a message saying what to do: KD asked for on shards without teacher
outputs, class counts that disagree (train vs val shards, --num-classes, stored teacher logits),
single-view logits used as multi-view and the reverse.

Loader order and resume: the train loader is rebuilt every epoch with a seed derived from
(seed, epoch), so epoch e's tar order, shuffle buffer and augmentation are a pure function of
(seed, epoch) (measured: bit-identical batches across rebuilds and DALI thread counts). Resuming
at an epoch boundary therefore replays exactly what the uninterrupted run would have read; a
mid-epoch resume rebuilds that epoch's loader and discards the batches already trained on (their
decoding is the cost: up to one epoch of loader work, no model work). A rebuild costs the DALI
pipeline build and the shuffle-buffer fill, once per epoch.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kdkit.errors import KdkitError
from kdkit.shards import contract
from kdkit.shards.tario import read_dali_index
from kdkit.train.config import TrainConfig
from kdkit.pipelines.loader import DaliLoader, LoaderConfig
from kdkit.pipelines.shardset import ShardSet, resolve_shards, scan_shards, teacher_format


@dataclass
class DataInfo:
    train: ShardSet
    val: ShardSet | None
    num_classes: int
    classes: list[dict]
    teacher: dict | None  # the train manifest's teacher block


def epoch_seed(seed: int, epoch: int) -> int:
    """Loader seed of one epoch; equal on every rank (the loader adds the rank for augmentation)."""
    return (seed * 1_000_003 + epoch * 10_007) % (2 ** 31)


def _set_name(s: ShardSet) -> str:
    return str(s.folder or s.tars[0].parent)


def resolve_data(cfg: TrainConfig) -> tuple[ShardSet, ShardSet | None]:
    """Train and val shard sets from a dataset root (root/<split>) or from a train shard-set folder
    (then val is its sibling folder <parent>/<val_split>, when it exists)."""
    if not cfg.data:
        raise KdkitError("no data: give a dataset root or a shard-set folder")
    root = Path(cfg.data)
    train = resolve_shards(root, cfg.train_split)
    if not cfg.val_split:
        return train, None
    if cfg.val_data:
        if not Path(cfg.val_data).exists():
            raise KdkitError(f"--val-data {cfg.val_data}: no such folder (give a dataset root or a shard-set folder)")
        return train, resolve_shards(Path(cfg.val_data), cfg.val_split)
    if train.folder is not None and train.folder.resolve() == root.resolve():
        sibling = root.parent / cfg.val_split
        return train, (resolve_shards(sibling) if (sibling / contract.MANIFEST).exists() else None)
    return train, resolve_shards(root, cfg.val_split)


def check_classes(cfg: TrainConfig, train: ShardSet, val: ShardSet | None) -> tuple[int, list[dict]]:
    man = train.manifest
    n = len(man.classes) if man else None
    classes = [c.to_json() for c in man.classes] if man else []
    if val is not None and val.manifest and n is not None and len(val.manifest.classes) != n:
        raise KdkitError(f"class counts disagree: {_set_name(train)} has {n} classes, {_set_name(val)} "
                         f"{len(val.manifest.classes)}; shard both splits from the same source")
    if cfg.num_classes is not None and n is not None and cfg.num_classes != n:
        raise KdkitError(f"--num-classes {cfg.num_classes} disagrees with {_set_name(train)} ({n} classes)")
    n = cfg.num_classes if cfg.num_classes is not None else n
    if n is None:
        raise KdkitError(f"{_set_name(train)}: no manifest to read the classes from; pass --num-classes")
    return n, classes


def _first_member(s: ShardSet, ext: str) -> np.ndarray:
    """The first sample's .npy member, read through the DALI index (no tar walk)."""
    offset, size = read_dali_index(s.indexes[0])[0][ext]
    with open(s.tars[0], "rb") as f:
        f.seek(offset)
        return np.load(io.BytesIO(f.read(size)))


def check_teacher_outputs(cfg: TrainConfig, train: ShardSet, num_classes: int) -> None:
    """Stored / replay KD: every train sample holds the teacher outputs the mode reads, of the right width."""
    if cfg.kd not in ("stored", "replay"):
        return
    V = contract.VIEWS_EXT
    # full logits, or top-k values + indices: the kind the loader reads (pipelines.shardset.teacher_format)
    L = contract.TOPK_VALUES_EXT if teacher_format(train) == "topk" else contract.LOGITS_EXT
    scan = scan_shards(train, [contract.IMAGE_EXT, contract.LABEL_EXT], probe=[L, V])
    total = scan.num_samples
    if scan.present[L] == 0:
        raise KdkitError(f"--kd {cfg.kd}: shard set {_set_name(train)} has no teacher logits; add them with "
                         f"`kdkit add-teacher-logits {_set_name(train)} ...` first, or train without KD (--kd none)")
    if scan.present[L] < total:
        raise KdkitError(f"{_set_name(train)}: only {scan.present[L]} of {total} samples have teacher logits "
                         "(an interrupted teacher pass?); finish `kdkit add-teacher-logits` first")
    if cfg.kd == "replay" and scan.present[V] < total:
        raise KdkitError(f"--kd replay: {_set_name(train)} has no stored views (.{V}) for "
                         f"{total - scan.present[V]} samples; use --kd stored, or write multi-view logits")
    shape = _first_member(train, L).shape
    if cfg.kd == "stored" and len(shape) != 1:
        raise KdkitError(f"{_set_name(train)}: logits of {shape[0]} stored views per sample; use --kd replay")
    if cfg.kd == "replay" and len(shape) != 2:
        raise KdkitError(f"--kd replay: {_set_name(train)} stores single-view logits; use --kd stored")
    block = (train.manifest.teacher or {}) if train.manifest else {}
    # top-k rows are k wide: the class count is the teacher block's (indices >= it would be wrong)
    width = shape[-1] if L == contract.LOGITS_EXT else block.get("num_classes", num_classes)
    if width != num_classes or block.get("num_classes", width) != width:
        raise KdkitError(f"class counts disagree: {_set_name(train)} stores teacher logits over {width} classes, "
                         f"the shards and model have {num_classes}")


def prepare_data(cfg: TrainConfig) -> DataInfo:
    train, val = resolve_data(cfg)
    n, classes = check_classes(cfg, train, val)
    check_teacher_outputs(cfg, train, n)
    return DataInfo(train, val, n, classes, train.manifest.teacher if train.manifest else None)


def loader_config(cfg: TrainConfig, device: torch.device, **kw) -> LoaderConfig:
    dali_device = cfg.loader_device if cfg.loader_device != "auto" else ("gpu" if device.type == "cuda" else "cpu")
    return LoaderConfig(
        device=dali_device, batch_size=cfg.batch_size, num_threads=cfg.loader_threads, image_size=cfg.image_size,
        shuffle_buffer=cfg.shuffle_buffer, random_area=tuple(cfg.random_area), flip=cfg.flip,
        antialias=cfg.antialias, fast_idct=cfg.fast_idct,
        color_jitter=cfg.color_jitter, auto_augment=cfg.auto_augment, randaugment_n=cfg.randaugment_n,
        randaugment_m=cfg.randaugment_m, crop_ratio=cfg.eval_crop_ratio,
        layout="channels_last" if cfg.channels_last else "CHW",
        device_id=device.index if device.type == "cuda" else None, **kw)


def train_loader(cfg: TrainConfig, data: DataInfo, device: torch.device, epoch: int,
                 last_batch: str | None = None) -> DaliLoader:
    """Epoch `epoch`'s loader (see the module doc). The last partial batch is dropped by default so
    every rank runs the same number of equal-sized steps."""
    role = "replay" if cfg.kd == "replay" else "train"
    lc = loader_config(cfg, device, seed=epoch_seed(cfg.seed, epoch), teacher_logits=cfg.kd in ("stored", "replay"),
                       last_batch=last_batch)
    loader = DaliLoader(data.train, lc, role=role)
    if len(loader) == 0:
        raise KdkitError(f"{_set_name(data.train)}: {loader.num_samples} samples on this rank, fewer than one "
                         f"batch of {cfg.batch_size}; lower --batch-size")
    return loader


def eval_loader(cfg: TrainConfig, data: DataInfo, device: torch.device) -> DaliLoader | None:
    """Every val sample exactly once across the ranks (partial last batch), in stored order."""
    if data.val is None:
        return None
    return DaliLoader(data.val, loader_config(cfg, device, teacher_logits=False, last_batch="partial"), role="eval")
