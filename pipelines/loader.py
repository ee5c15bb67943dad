"""The PyTorch-facing loader: a DALI pipeline for one role behind an iterator of torch tensors.

    loader = DaliLoader("shards/imagenet", LoaderConfig(device="gpu", batch_size=256), role="train")
    for epoch in range(epochs):
        for images, labels, teacher_logits in loader:   # teacher_logits is None without them
            ...

Epoch and last batch: `len(loader)` is the number of batches this rank yields per epoch (DALI's
iterator knows the reader's size through reader_name). The reader pads each rank's part to whole
batches by repeating its last sample; `last_batch` then says what the last batch is:
  "partial" every sample exactly once, the last batch smaller (the default for eval roles);
  "drop"    only full batches, the remainder left out this epoch (default for training roles: a
            shuffled set drops different samples each epoch, and DDP steps stay equal-sized);
  "fill"    full batches, the last one completed with repeated samples.

Shuffling (training roles): DALI's webdataset reader cannot shuffle globally. Each epoch it
visits the tars in a new random order (shuffle_after_epoch, one seed for all ranks) and draws
samples at random from a buffer of `shuffle_buffer` samples read in sequence (random_shuffle +
initial_fill). So a batch mixes samples from about shuffle_buffer / samples_per_shard neighbouring
tars; the writer's interleaving of classes across shards does the rest (kdkit's shards hold
classes in random order, so a batch is near-uniform over classes as soon as the buffer holds a
few batches). The buffer costs memory (encoded images: ~110 KB each for ImageNet JPEGs) and is
filled before the first batch.

Distributed: shard_id/num_shards default to torch.distributed's rank and world size, so each rank
reads its own contiguous 1/world of the samples and together the ranks see every sample once
per epoch; batch_size is per rank.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from kdkit.shards import contract
from kdkit.pipelines import common
from kdkit.pipelines.shardset import (ShardScan, explain_failure, reading_order, resolve_shards, scan_shards, shard_range,
                                teacher_format)

ROLES = ("train", "eval", "replay", "teacher_views")
TEACHER_OUTPUTS = {contract.LOGITS_EXT: "teacher_logits", contract.TOPK_VALUES_EXT: "teacher_topk_values",
                   contract.TOPK_INDICES_EXT: "teacher_topk_indices"}  # member -> iterator output name


@dataclass
class LoaderConfig:
    device: str = "cpu"  # "gpu": device_id = local rank, "mixed" decode, GPU ops; "cpu": device_id=None
    batch_size: int = 64  # per rank
    num_threads: int = 4  # DALI CPU worker threads
    image_size: int = 224
    # reading
    shuffle: bool = True  # training roles only; eval and teacher views always read in stored order
    shuffle_buffer: int = 4096  # samples in the shuffle buffer (DALI initial_fill)
    seed: int = 0  # augmentation seed is seed + shard_id; the tar order seed is shared by all ranks
    shard_id: int | None = None  # default: torch.distributed rank (0 when not initialized)
    num_shards: int | None = None  # default: torch.distributed world size (1)
    last_batch: str | None = None  # "partial" | "drop" | "fill"; default per role (module docstring)
    teacher_logits: bool | None = None  # None: yield them when every sample has them
    missing: str = "error"  # a sample lacking a requested member: "error", or "skip" and count it
    # training augmentation
    random_area: tuple[float, float] = (0.08, 1.0)
    random_aspect_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    color_jitter: float = 0.0  # brightness/contrast/saturation strength, 0 = off
    auto_augment: str | None = None  # "autoaugment" | "randaugment" | "trivialaugment"
    randaugment_n: int = 2
    randaugment_m: int = 9
    antialias: bool = True  # resize like Pillow/torchvision; teacher views and replay must agree on it
    fast_idct: bool = False  # libjpeg-turbo's fast IDCT (JDCT_IFAST): cheaper CPU decode, not Pillow's exact one
    # evaluation
    crop_ratio: float = 0.875  # image_size / resized shorter side (224/256)
    eval_views: str = "center"  # "center" | "flip" | "tencrop"
    num_views: int = 4  # K random views of the teacher_views role
    # output
    layout: str = "CHW"  # "CHW", "HWC", or "channels_last" (NCHW tensors in channels-last memory)
    dtype: str = "float32"  # or "float16"
    mean: tuple[float, ...] = common.IMAGENET_MEAN
    std: tuple[float, ...] = common.IMAGENET_STD
    # performance
    prefetch_queue_depth: int = 2  # batches DALI prepares ahead
    reader_queue_depth: int = 1  # batches the reader loads ahead of decoding (DALI's default)
    hw_decoder_load: float | None = None  # GPU: share of JPEGs for the hardware decoder (DALI default)
    native_resize: bool = True  # CPU: kdkit's resize + normalize operator (pipelines.resize); False: fn.resize
    device_id: int | None = None  # GPU: default LOCAL_RANK


class Batch(NamedTuple):
    images: torch.Tensor
    labels: torch.Tensor
    teacher_logits: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None  # (values, indices) for top-k


class ViewsBatch(NamedTuple):
    center: torch.Tensor  # (B, C, H, W)
    views: torch.Tensor  # (B, K, C, H, W)
    boxes: torch.Tensor  # (B, K, 5) float32: x, y, w, h, flip
    labels: torch.Tensor


def rank_and_world(cfg: LoaderConfig) -> tuple[int, int]:
    rank, world = 0, 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    shard_id = rank if cfg.shard_id is None else cfg.shard_id
    num_shards = world if cfg.num_shards is None else cfg.num_shards
    if not 0 <= shard_id < num_shards:
        raise ValueError(f"shard_id={shard_id} outside 0..{num_shards - 1}")
    return shard_id, num_shards


def _device_id(cfg: LoaderConfig) -> int | None:
    if not common.is_gpu(cfg):
        return None
    if cfg.device_id is not None:
        return cfg.device_id
    return int(os.environ.get("LOCAL_RANK", 0))


def _default_last_batch(role: str) -> str:
    return "drop" if role in ("train", "replay") else "partial"


def build_pipeline(role: str, shards, cfg: LoaderConfig, shard_id: int = 0, num_shards: int = 1,
                   with_logits: bool = False):
    """The (unbuilt) DALI pipeline for `role` over a ShardSet; its outputs are the role's."""
    from kdkit.pipelines.eval import eval_pipeline
    from kdkit.pipelines.replay import replay_pipeline
    from kdkit.pipelines.teacher_views import teacher_views_pipeline
    from kdkit.pipelines.train import needs_conditionals, train_pipeline

    common_args = dict(batch_size=cfg.batch_size, num_threads=cfg.num_threads, device_id=_device_id(cfg),
                       prefetch_queue_depth=cfg.prefetch_queue_depth, shards=shards, cfg=cfg,
                       shard_id=shard_id, num_shards=num_shards)
    if role == "teacher_views":
        return teacher_views_pipeline(seed=cfg.seed, num_views=cfg.num_views, **common_args)
    seed = cfg.seed + shard_id
    if role == "eval":
        return eval_pipeline(seed=seed, with_logits=with_logits, **common_args)
    conditionals = needs_conditionals(cfg)
    if role == "train":
        return train_pipeline(seed=seed, with_logits=with_logits, enable_conditionals=conditionals, **common_args)
    if role == "replay":
        return replay_pipeline(seed=seed, with_logits=with_logits, enable_conditionals=conditionals, **common_args)
    raise ValueError(f"role={role!r}: expected one of {ROLES}")


def _members(role: str, with_logits: bool | str) -> list[str]:
    exts = [common.IMAGE_EXT, common.LABEL_EXT]
    if role == "replay":
        exts.append(common.VIEWS_EXT)
    return exts + common.teacher_exts(with_logits)


def _scan(role: str, cfg: LoaderConfig, shards) -> tuple[ShardScan, bool | str]:
    """Check the shards and decide which teacher outputs are read: False (none), "full" (the
    .logits.npy member) or "topk" (.topk_logits.npy values + .topk_idx.npy class indices).

    Logits are read when asked for (cfg.teacher_logits=True; replay asks by default) or, with
    teacher_logits=None, when every sample holds them. Full logits win when a set holds both; top-k
    is read when the set holds top-k only (`kdkit add-teacher-logits --topk`).
    """
    wanted = cfg.teacher_logits if cfg.teacher_logits is not None else (True if role == "replay" else None)
    if role == "teacher_views":
        wanted = False
    kind = teacher_format(shards) or "full"  # "full" when none: a missing-member error names .logits.npy
    held = common.teacher_exts(kind)[0]
    # asked for: every sample must hold them (or, with missing="skip", those that don't are left out)
    scan = scan_shards(shards, _members(role, kind if wanted else False), probe=[held], missing=cfg.missing)
    if wanted is None:
        return scan, (kind if scan.present[held] == sum(len(k) for k in scan.keys) else False)
    return scan, (kind if wanted else False)


class DaliLoader:
    """Iterate (images, labels, teacher_logits | None) torch batches of one role over a shard set."""

    def __init__(self, shards, cfg: LoaderConfig | None = None, role: str = "train", split: str = "train"):
        self.cfg = cfg = cfg or LoaderConfig()
        if role not in ROLES:
            raise ValueError(f"role={role!r}: expected one of {ROLES}")
        self.role = role
        self.shards = resolve_shards(shards, split)
        self.shard_id, self.num_shards = rank_and_world(cfg)
        self.scan, self.with_logits = _scan(role, cfg, self.shards)
        self.last_batch = cfg.last_batch or _default_last_batch(role)
        self.last_view_index: torch.Tensor | None = None  # replay: the view each sample of the last batch used
        self._it = None
        self._guarded(self._start)

    # -- DALI underneath ----------------------------------------------------------------------
    def _start(self) -> None:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        policies = {"partial": LastBatchPolicy.PARTIAL, "drop": LastBatchPolicy.DROP, "fill": LastBatchPolicy.FILL}
        if self.last_batch not in policies:
            raise ValueError(f"last_batch={self.last_batch!r}: expected one of {sorted(policies)}")
        # DALI's auto_aug calls DALI's own deprecated operator aliases, and DALI forces such warnings to
        # show (a filter cannot silence them): record them, drop those, pass any other warning on
        with warnings.catch_warnings(record=True) as caught:
            self.pipeline = build_pipeline(self.role, self.shards, self.cfg, self.shard_id, self.num_shards,
                                           self.with_logits)
            self.pipeline.build()
        for w in caught:
            if not issubclass(w.category, DeprecationWarning):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        self.output_names = self._output_names()
        self._it = DALIGenericIterator([self.pipeline], self.output_names, reader_name=common.READER_NAME,
                                       last_batch_policy=policies[self.last_batch], auto_reset=True,
                                       prepare_first_batch=False)

    def _output_names(self) -> list[str]:
        if self.role == "teacher_views":
            return ["center", "views", "boxes", "labels"]
        names = ["images", "labels"] + [TEACHER_OUTPUTS[e] for e in common.teacher_exts(self.with_logits)]
        return names + (["view_index"] if self.role == "replay" else [])

    def _guarded(self, step):
        """Run a step that drives DALI; a DALI failure becomes a ShardError naming shard and key."""
        try:
            return step()
        except RuntimeError as e:
            if "pipeline" not in str(e).lower():  # not DALI's: let it through unchanged
                raise
            raise explain_failure(e, self.shards, self.scan, common.IMAGE_EXT, self.shard_id,
                                  self.num_shards) from e

    # -- what users see -------------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        """Samples this rank reads per epoch (before the last-batch policy)."""
        begin, end = shard_range(self.scan.num_samples, self.shard_id, self.num_shards)
        return end - begin

    @property
    def skipped(self) -> int:
        """Samples of the whole set left out because a requested member is missing (missing="skip")."""
        return self.scan.skipped

    def keys(self) -> list[tuple[Path, str]]:
        """(tar, sample key) of every sample this rank yields per epoch, in the order yielded.

        Only for loaders that read in stored order (eval, teacher_views, or shuffle=False) with
        last_batch="partial": the i-th sample of the epoch is keys()[i]. This is how outputs computed
        from a batch (teacher logits) are joined back to their samples.
        """
        if self.role in ("train", "replay") and self.cfg.shuffle:
            raise ValueError("keys(): this loader shuffles; use shuffle=False or an eval/teacher_views role")
        return reading_order(self.shards, self.scan, self.shard_id, self.num_shards)

    def __len__(self) -> int:
        return len(self._it)

    def __iter__(self):
        it = iter(self._it)
        while True:
            try:
                out = self._guarded(lambda: next(it))
            except StopIteration:
                return
            yield self._to_batch(out[0])

    def _to_batch(self, d: dict):
        channels_last = self.cfg.layout == "channels_last"

        def image(t):  # (..., H, W, C) -> (..., C, H, W) view with channels-last strides
            return t.movedim(-1, -3) if channels_last else t

        if self.role == "teacher_views":
            return ViewsBatch(image(d["center"]), image(d["views"]), d["boxes"], d["labels"])
        self.last_view_index = d.get("view_index")
        teacher = d.get("teacher_logits")
        if self.with_logits == "topk":  # top-k storage: (values, class indices); see kdkit.train.losses
            teacher = (d["teacher_topk_values"], d["teacher_topk_indices"])
        return Batch(image(d["images"]), d["labels"], teacher)
