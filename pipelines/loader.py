"""The PyTorch-facing loader: a DALI pipeline for one role behind an iterator of torch tensors.

    loader = DaliLoader("shards/imagenet", loader_config("train", device="gpu", batch_size=256))
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

import warnings
from pathlib import Path

import torch
from nvidia.dali import pipeline_def

from kdkit.pipelines import common
from kdkit.pipelines.config import LoaderConfig, Role, loader_config
from kdkit.pipelines.eval import Eval
from kdkit.shards.reader import (ShardScan, check_checksums, explain_failure, not_the_data, reading_order,
                                 resolve_shards, scan_shards, shard_range, teacher_format, teacher_layout)
from kdkit.runtime import dali_threads, rank_and_world
from kdkit.shards.headers import check_headers


@pipeline_def
def role_pipeline(shards, cfg: LoaderConfig, shard_id: int, num_shards: int, teacher_kind):
    """The role's graph over the shard reader: cfg.role.graph(members, teacher members, ...)."""
    role = cfg.role
    own = role.members()
    members = common.read_shards(shards, own + common.teacher_exts(teacher_kind), cfg.reading, shard_id, num_shards,
                                 shuffle=role.shuffles and cfg.reading.shuffle)
    teacher = common.unpack_teacher(members[len(own)], teacher_kind) if teacher_kind else {}
    return role.graph(members[:len(own)], teacher, cfg.output, cfg.backend)


def device_id(cfg: LoaderConfig) -> int | None:
    """DALI's device_id: None on the CPU backend; on the GPU the configured one, else this process's
    GPU (kdkit.runtime decides: LOCAL_RANK)."""
    if not cfg.backend.gpu:
        return None
    if cfg.backend.device_id is not None:
        return cfg.backend.device_id
    from kdkit.runtime import gpu_index

    return gpu_index()


def build_pipeline(cfg: LoaderConfig, shards, shard_id: int = 0, num_shards: int = 1, teacher_kind=False,
                   checkpointing: bool = False, restore=None):
    """The (unbuilt) DALI pipeline of cfg.role over a ShardSet; its outputs are the role's.
    checkpointing / restore: DALI's pipeline checkpointing (see DaliLoader)."""
    b = cfg.backend
    extra = dict(enable_checkpointing=True, checkpoint=restore) if checkpointing else {}
    return role_pipeline(shards, cfg, shard_id, num_shards, teacher_kind, batch_size=cfg.reading.batch_size,
                         num_threads=dali_threads(b.num_threads, b.gpu), device_id=device_id(cfg),
                         prefetch_queue_depth=b.prefetch_queue_depth, seed=cfg.role.seed(cfg.reading, shard_id),
                         enable_conditionals=cfg.role.conditionals(), **extra)


def _scan(role: Role, cfg: LoaderConfig, shards) -> tuple[ShardScan, tuple | bool]:
    """Check the shards and decide whether the teacher outputs are read: False, or the packed member's
    layout (contract.teacher_layout, from the set's manifest) that the graph splits it by.

    They are read when asked for (Reading.teacher_logits=True, or a role that needs them) or, with
    teacher_logits=None, when every sample holds them. A set written in the layout before the packed
    member is refused where its outputs would be read, naming the command that converts it.
    """
    wanted = cfg.reading.teacher_logits if cfg.reading.teacher_logits is not None else role.logits
    if role.logits is False:
        wanted = False
    if wanted is not False and teacher_format(shards) == "legacy":
        teacher_layout(shards)  # refuses it, naming the conversion
    required = role.members() + common.teacher_exts(wanted)
    scan = scan_shards(shards, required, probe=[common.TEACHER_EXT], missing=cfg.reading.missing)
    held = scan.present[common.TEACHER_EXT] == sum(len(k) for k in scan.keys)
    if wanted is False or (wanted is None and not held):
        return scan, False
    return scan, teacher_layout(shards)


class DaliLoader:
    """Iterate the batches of cfg.role (Batch: images, labels, teacher_logits | None; ViewsBatch for
    teacher views) over a shard set, as torch tensors, epoch after epoch.

    checkpointing=True: `state()` returns DALI's checkpoint of the position after the last batch
    handed out (reader position and every random generator; about 1 KB), and a loader built with
    the same config, shards and rank and `restore=` that state continues exactly there: the rest of
    that epoch, then the same epochs that would have followed (DALI's pipeline checkpointing,
    through its iterator, which also keeps the epoch's batch count). The trainer resumes this way.
    """

    def __init__(self, shards, cfg: LoaderConfig, split: str = "train", checkpointing: bool = False,
                 restore: str | bytes | None = None):
        if not isinstance(cfg, LoaderConfig):
            raise TypeError("DaliLoader(shards, cfg): cfg is a LoaderConfig (kdkit.pipelines.loader_config)")
        self.cfg = cfg
        self.role = cfg.role
        self.shards = resolve_shards(shards, split)
        rank, world = rank_and_world()
        self.shard_id = rank if cfg.reading.shard_id is None else cfg.reading.shard_id
        self.num_shards = world if cfg.reading.num_shards is None else cfg.reading.num_shards
        if not 0 <= self.shard_id < self.num_shards:
            raise ValueError(f"shard_id={self.shard_id} outside 0..{self.num_shards - 1}")
        self.scan, self.teacher_kind = _scan(self.role, cfg, self.shards)
        self.role.check_shards(self.shards)
        # a damaged image must never reach DALI (its decoder can crash on one, kdkit.shards.headers): shards
        # with a manifest checksum are hashed against it, the image headers of any other are walked
        unverified = check_checksums(self.shards, [t for t, _ in reading_order(self.shards, self.scan, self.shard_id,
                                                                                self.num_shards)],
                                     progress=self.shard_id == 0)
        check_headers(unverified, common.IMAGE_EXT, progress=self.shard_id == 0)
        self.last_batch = cfg.reading.last_batch or self.role.last_batch
        self.last_view_index: torch.Tensor | None = None  # replay: the view each image of the last batch shows
        self.checkpointing = checkpointing or restore is not None
        self.restored = restore is not None
        self._it = None
        self._guarded(lambda: self._start(restore))

    # -- DALI underneath ----------------------------------------------------------------------
    def _start(self, restore) -> None:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        policies = {"partial": LastBatchPolicy.PARTIAL, "drop": LastBatchPolicy.DROP, "fill": LastBatchPolicy.FILL}
        # DALI's auto_aug calls DALI's own deprecated operator aliases, and DALI forces such warnings to
        # show (a filter cannot silence them): record them, drop those, pass any other warning on
        with warnings.catch_warnings(record=True) as caught:
            self.pipeline = build_pipeline(self.cfg, self.shards, self.shard_id, self.num_shards, self.teacher_kind,
                                           self.checkpointing, restore)
            self.pipeline.build()
        for w in caught:
            if not issubclass(w.category, DeprecationWarning):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        self.output_names = self.role.output_names(self.teacher_kind)
        # prepare_first_batch=False: with True, a loader restored at the end of an epoch would consume the
        # rest of that epoch while being built, and its first loop would be the next epoch
        self._it = DALIGenericIterator([self.pipeline], self.output_names, reader_name=common.READER_NAME,
                                       last_batch_policy=policies[self.last_batch], auto_reset=True,
                                       prepare_first_batch=False)

    def state(self):
        """DALI's checkpoint of the position after the last batch handed out (needs checkpointing=True)."""
        if not self.checkpointing:
            raise ValueError("state(): build the loader with checkpointing=True")
        return self._it.checkpoints()[0]

    def _guarded(self, step):
        """Run a step that drives DALI; a DALI failure becomes a ShardError naming shard and key. Errors of
        the machine (CUDA, out of memory: reader.not_the_data) and errors not DALI's go through unchanged."""
        try:
            return step()
        except RuntimeError as e:
            if "pipeline" not in str(e).lower() or not_the_data(e):
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
        if self.role.shuffles and self.cfg.reading.shuffle:
            raise ValueError("keys(): this loader shuffles; use shuffle=False or an eval/teacher_views role")
        return reading_order(self.shards, self.scan, self.shard_id, self.num_shards)

    def __len__(self) -> int:
        return len(self._it)

    def __iter__(self):
        it = iter(self._it)
        channels_last = self.cfg.output.layout == "channels_last"
        while True:
            try:
                out = self._guarded(lambda: next(it))
            except StopIteration:
                return
            d = out[0]
            view_index = d.get("view_index")  # replay: (B, N), N views per load
            self.last_view_index = None if view_index is None else view_index.reshape(-1)
            yield self.role.batch(d, self.teacher_kind, channels_last)


def eval_loader(shards, transform, batch_size: int, num_threads: int, rt=None, views: str = "center",
                per_rank: bool = False, split: str = "val", **options) -> DaliLoader:
    """The loader of a model's evaluation views over a shard set, the one way every stage builds it
    (eval, export, OpenVINO, corrupted sets, the teacher pass's centre view, training's val set).

    The eval role at the model's `transform` (image size, crop ratio, mean / std: a checkpoint's
    ModelInfo, or a kdkit.pipelines.options.Transform), every sample exactly once in stored order
    (partial last batch, no teacher outputs), read by this process alone, or split between the ranks
    of a torchrun job with `per_rank`. The runtime `rt` (kdkit.runtime.Runtime; default: the CPU)
    decides the device: DALI on its GPU with channels-last tensors, or DALI's CPU backend. Any other
    loader option (layout, antialias, ...) goes in `options`."""
    if rt is None:
        from kdkit.runtime import Runtime

        rt = Runtime()
    settings = dict(image_size=transform.image_size, mean=tuple(transform.mean), std=tuple(transform.std),
                    layout="channels_last" if rt.device.type == "cuda" else "CHW", batch_size=batch_size,
                    num_threads=num_threads, last_batch="partial", teacher_logits=False, device=rt.dali_device,
                    device_id=rt.device_id, **({} if per_rank else dict(shard_id=0, num_shards=1)))
    cfg = loader_config(Eval(views=views, crop_ratio=transform.crop_ratio), **{**settings, **options})
    return DaliLoader(shards, cfg, split=split)
