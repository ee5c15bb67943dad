"""The trainer's data: shard sets checked before training starts, and the DALI loaders of a run.

Checks that fail early with a message saying what to do: KD asked for on shards without teacher
outputs, class counts that disagree (train vs val shards, --num-classes, stored teacher logits),
single-view logits used as multi-view and the reverse.

Loader order and resume: one train loader per run, built once, epoch after epoch (DALI reshuffles
the tar order every epoch and its random streams run on). Every checkpoint stores each rank's DALI
checkpoint of its loader (reader position and random generators, ~1 KB; kdkit.pipelines.DaliLoader
.state), so a resumed run builds the loader from it and continues exactly where the checkpoint was
taken, mid-epoch too, without decoding anything twice (tested: the same weights as a run never
stopped). Where that state cannot be used (another number of ranks, other loader options), the run
continues at the next epoch boundary with a fresh loader, and says so.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from kdkit.errors import KdkitError
from kdkit.shards import contract
from kdkit.pipelines import DaliLoader, Eval, Replay, ShardSet, Train, loader_config, resolve_shards, scan_shards
from kdkit.pipelines.shardset import first_member, teacher_format
from kdkit.pipelines.train import Augment
from kdkit.runtime import Runtime
from kdkit.teach.members import TOPK_VALUES
from kdkit.train.config import TrainConfig


@dataclass
class DataInfo:
    train: ShardSet
    val: ShardSet | None
    num_classes: int
    classes: list[dict]
    teacher: dict | None  # the train manifest's teacher block


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
    try:
        return train, resolve_shards(root, cfg.val_split)
    except KdkitError as e:
        raise KdkitError(f"{e}; evaluate on another set with --val-data SHARDS (e.g. the set the teacher pass "
                         "read), or train without evaluation: --val-split none") from None


def check_classes(cfg: TrainConfig, train: ShardSet, val: ShardSet | None) -> tuple[int, list[dict]]:
    man = train.manifest
    n = len(man.classes) if man else None
    classes = [c.to_json() for c in man.classes] if man else []
    if val is not None and val.manifest and n is not None and len(val.manifest.classes) != n:
        raise KdkitError(f"class counts disagree: {_set_name(train)} has {n} classes, {_set_name(val)} "
                         f"{len(val.manifest.classes)}; shard both splits from the same source")
    if val is not None and val.manifest and man and [c.id for c in val.manifest.classes] != [c.id for c in man.classes]:
        first = next(i for i, (a, b) in enumerate(zip(man.classes, val.manifest.classes)) if a.id != b.id)
        raise KdkitError(f"{_set_name(val)}: its classes are not {_set_name(train)}'s (first difference at index "
                         f"{first}: {val.manifest.classes[first].id!r} vs {man.classes[first].id!r}); shard both "
                         "splits from the same source")
    if cfg.num_classes is not None and n is not None and cfg.num_classes != n:
        raise KdkitError(f"--num-classes {cfg.num_classes} disagrees with {_set_name(train)} ({n} classes)")
    n = cfg.num_classes if cfg.num_classes is not None else n
    if n is None:
        raise KdkitError(f"{_set_name(train)}: no manifest to read the classes from; pass --num-classes")
    return n, classes


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
    shape = first_member(train, L).shape
    if cfg.kd == "stored" and len(shape) != 1:
        raise KdkitError(f"{_set_name(train)}: logits of {shape[0]} stored views per sample; use --kd replay")
    if cfg.kd == "replay" and len(shape) != 2:
        raise KdkitError(f"--kd replay: {_set_name(train)} stores single-view logits; use --kd stored")
    block = (train.manifest.teacher or {}) if train.manifest else {}
    if L == contract.TOPK_VALUES_EXT and cfg.topk_target == "marginal" and block.get("topk_values") != TOPK_VALUES:
        raise KdkitError(f"--topk-target marginal: {_set_name(train)} stores top-k raw logits, which do not say how "
                         "much mass the other classes hold; write the top-k again with this kdkit's "
                         "`kdkit add-teacher-logits --topk` (log-probabilities), or use --topk-target renormalize")
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


def _loader_config(cfg: TrainConfig, rt: Runtime, role, **reading):
    """The LoaderConfig of a run's loaders: the role plus what every loader of the run shares."""
    device = cfg.loader_device if cfg.loader_device != "auto" else rt.dali_device
    return loader_config(role, image_size=cfg.image_size, antialias=cfg.antialias,
                         layout="channels_last" if cfg.channels_last else "CHW", batch_size=cfg.batch_size,
                         num_threads=cfg.loader_threads, fast_idct=cfg.fast_idct, device=device,
                         device_id=rt.device_id if device == "gpu" else None, **reading)


def train_loader_config(cfg: TrainConfig, rt: Runtime):
    """The train loader's LoaderConfig. The last partial batch is dropped (the roles' default) so every
    rank runs the same number of equal-sized steps."""
    aug = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(Augment)}  # the same names in TrainConfig
    role = (Replay(views_per_load=cfg.views_per_load, **aug) if cfg.kd == "replay"
            else Train(random_area=tuple(cfg.random_area), flip=cfg.flip, **aug))
    return _loader_config(cfg, rt, role, shuffle_buffer=cfg.shuffle_buffer, seed=cfg.seed,
                          teacher_logits=cfg.kd in ("stored", "replay"))


def stream_key(cfg: TrainConfig, data: DataInfo, rt: Runtime) -> str:
    """What decides the train loader's stream of batches: its config (threads and queue depths aside)
    and its shards. A saved loader state is only restored into a loader with the same key."""
    lc = train_loader_config(cfg, rt)
    backend = dataclasses.replace(lc.backend, num_threads=1, prefetch_queue_depth=1, device_id=None)
    reading = dataclasses.replace(lc.reading, reader_queue_depth=1)
    return repr((lc.role, lc.output, reading, backend, [t.name for t in data.train.tars]))


def train_loader(cfg: TrainConfig, data: DataInfo, rt: Runtime, restore=None) -> DaliLoader:
    """The run's train loader (see the module doc), at the position `restore` (a DaliLoader.state()
    of this rank) or at the start."""
    loader = DaliLoader(data.train, train_loader_config(cfg, rt), checkpointing=True, restore=restore)
    if len(loader) == 0:
        raise KdkitError(f"{_set_name(data.train)}: {loader.num_samples} samples on this rank, fewer than one "
                         f"batch of {cfg.batch_size}; lower --batch-size")
    return loader


def eval_loader(cfg: TrainConfig, data: DataInfo, rt: Runtime) -> DaliLoader | None:
    """Every val sample exactly once across the ranks (partial last batch), in stored order."""
    if data.val is None:
        return None
    lc = _loader_config(cfg, rt, Eval(crop_ratio=cfg.eval_crop_ratio), teacher_logits=False, last_batch="partial")
    return DaliLoader(data.val, lc)
