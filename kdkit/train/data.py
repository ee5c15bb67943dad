"""The trainer's data: shard sets checked before training starts, and the DALI loaders of a run.

Checks that fail early with a message saying what to do: class counts that disagree (train vs val
shards, --num-classes), and whatever the KD mode needs of the train set (kdkit.train.kd: teacher
outputs present, for the right number of views and classes).

Loader order and resume: one train loader per run, built once, epoch after epoch (DALI reshuffles
the tar order every epoch and its random streams run on). Every checkpoint stores each rank's DALI
checkpoint of its loader (reader position and random generators, ~1 KB; kdkit.pipelines.DaliLoader
.state), so a resumed run builds the loader from it and continues exactly where the checkpoint was
taken, mid-epoch too, without decoding anything twice (tested: the same weights as a run never
stopped). With another number of ranks and the same options, the interrupted epoch is finished by
the old ranks' loaders, rebuilt from their states and their remaining batches shared among the new
ranks (RestOfEpoch): each sample of that epoch is still trained once. Where the state cannot be used
at all (other loader options or shards, or none saved), the run builds a fresh loader, starts that
epoch over with it and skips as many samples as were trained before the interruption (kdkit.train.state
says what that does to the samples seen), and says so.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from kdkit.errors import KdkitError
from kdkit.pipelines import DaliLoader, eval_loader as make_eval_loader, loader_config
from kdkit.pipelines.options import DECODING, Transform, decoding
from kdkit.runtime import Runtime
from kdkit.shards import contract
from kdkit.shards.location import location
from kdkit.shards.reader import ShardSet, resolve_shards
from kdkit.train.config import TrainConfig


@dataclass
class DataInfo:
    train: ShardSet
    val: ShardSet | None
    num_classes: int
    classes: list[dict]
    teacher_block: dict | None  # the train manifest's teacher block (what wrote its teacher outputs)
    transform: Transform  # the run's input transform: the loaders read it, the checkpoints record it
    train_identity: dict | None = None  # kdkit.train.state.train_identity, once the train loader has scanned it


def _set_name(s: ShardSet) -> str:
    return str(s.folder or s.tars[0].parent)


def resolve_data(cfg: TrainConfig) -> tuple[ShardSet, ShardSet | None]:
    """Train and val shard sets from a dataset root (root/<split>) or from a train shard-set folder
    (then val is its sibling folder <parent>/<val_split>, when it exists); local or bucket URLs."""
    if not cfg.data:
        raise KdkitError("no data: give a dataset root or a shard-set folder")
    root = location(cfg.data)
    train = resolve_shards(root, cfg.train_split)
    if not cfg.val_split:
        return train, None
    if cfg.val_data:
        if not location(cfg.val_data).exists():
            raise KdkitError(f"--val-data {cfg.val_data}: no such folder (give a dataset root or a shard-set folder)")
        return train, resolve_shards(location(cfg.val_data), cfg.val_split)
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


def prepare_data(cfg: TrainConfig, kd=None) -> DataInfo:
    """The run's shard sets and classes, checked, and checked against what the KD mode reads (`kd`, by
    default the config's: kdkit.train.kd)."""
    if kd is None:
        from kdkit.train.kd import kd_mode

        kd = kd_mode(cfg.kd)(cfg)
    train, val = resolve_data(cfg)
    n, classes = check_classes(cfg, train, val)
    kd.check_data(train, n)
    return DataInfo(train, val, n, classes, train.manifest.teacher if train.manifest else None,
                    Transform(cfg.image_size, cfg.eval_crop_ratio))


def train_loader_config(cfg: TrainConfig, kd, data: DataInfo, rt: Runtime):
    """The train loader's LoaderConfig: the KD mode's role with the run's options. The last partial
    batch is dropped (the roles' default) so every rank runs the same number of equal-sized steps."""
    device, device_id = rt.dali_backend(cfg.loader_device)
    t = data.transform
    return loader_config(kd.role(), image_size=t.image_size, mean=t.mean, std=t.std, antialias=cfg.antialias,
                         layout="channels_last" if cfg.channels_last else "CHW", batch_size=cfg.batch_size,
                         num_threads=cfg.loader_threads, fast_idct=cfg.fast_idct, device=device, device_id=device_id,
                         shuffle_buffer=cfg.shuffle_buffer, seed=cfg.seed, teacher_logits=kd.stored, **decoding(cfg))


def stream_key(cfg: TrainConfig, kd, data: DataInfo, rt: Runtime) -> str:
    """What decides the train loader's stream of batches: its config (threads and queue depths aside)
    and its shards. A saved loader state is only restored into a loader with the same key."""
    lc = train_loader_config(cfg, kd, data, rt)
    backend = dataclasses.replace(lc.backend, num_threads=1, prefetch_queue_depth=1, device_id=None,
                                  **dict.fromkeys(DECODING))  # how fast, not what: the decoder's load and buffers
    reading = dataclasses.replace(lc.reading, reader_queue_depth=1)
    return repr((lc.role, lc.output, reading, backend, [t.name for t in data.train.tars]))


def train_loader(cfg: TrainConfig, kd, data: DataInfo, rt: Runtime, restore=None) -> DaliLoader:
    """The run's train loader (see the module doc), at the position `restore` (a DaliLoader.state()
    of this rank) or at the start."""
    loader = DaliLoader(data.train, train_loader_config(cfg, kd, data, rt), checkpointing=True, restore=restore)
    if len(loader) == 0:
        raise KdkitError(f"{_set_name(data.train)}: {loader.num_samples} samples on this rank, fewer than one "
                         f"batch of {cfg.batch_size}; lower --batch-size")
    return loader


class RestOfEpoch:
    """The batches an epoch had left when it was interrupted, for a run resumed with another number of
    ranks (the loader states in the checkpoint are the old ranks', one each).

    This rank rebuilds the old ranks' loaders it needs, each with the run's options on the old rank's
    part of the shards (shard_id = old rank, num_shards = old world) and restored from that rank's
    state, so each continues exactly where it stopped. Their remaining batches are numbered in turn
    (batch b of old rank o is number b * old_world + o) and number j goes to the new rank j % world.
    Every sample the epoch had left is trained once, by one rank; to keep the ranks' step counts equal
    (DDP), the last (count % world) batches are left out, as last_batch="drop" leaves out a remainder.
    Growing the world, several new ranks share one old rank's batches and each decodes all of them (it
    keeps its own): the rest of one epoch at the old rank's speed. Shrinking it, each new rank reads
    whole old shares. No DALI state describes this position, so no checkpoint is taken inside it: an
    interruption here resumes from the same checkpoint again."""

    def __init__(self, cfg: TrainConfig, kd, data: DataInfo, rt: Runtime, states: list, left: int):
        """states: each old rank's loader state; left: the batches each old rank had left of its epoch."""
        self.old_world, self.rank, self.world, self.left = len(states), rt.rank, rt.world, left
        total = left * self.old_world
        self.kept = total - total % self.world  # numbers 0 .. kept - 1 are trained
        self.steps = self.kept // self.world
        base = train_loader_config(cfg, kd, data, rt)
        needed = sorted({j % self.old_world for j in range(self.rank, self.kept, self.world)})
        self.loaders = {o: DaliLoader(data.train, dataclasses.replace(base, reading=dataclasses.replace(
            base.reading, shard_id=o, num_shards=self.old_world)), checkpointing=True, restore=states[o])
            for o in needed}

    def owner(self, b: int, o: int) -> int:
        """The new rank that trains batch b of old rank o."""
        return (b * self.old_world + o) % self.world

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        iterators = {o: iter(loader) for o, loader in self.loaders.items()}
        for b in range(self.left):
            for o in range(self.old_world):
                if b * self.old_world + o >= self.kept:
                    return
                if o in iterators:  # an old rank none of whose batches are this rank's is not even built
                    batch = next(iterators[o], None)  # decoded either way: the old loader's stream goes on
                    if batch is None:
                        raise KdkitError(f"{_set_name(self.loaders[o].shards)}: rank {o} of the interrupted run had "
                                         f"fewer batches left than its checkpoint says; did the shards change?")
                    if self.owner(b, o) == self.rank:
                        yield batch


def eval_loader(cfg: TrainConfig, data: DataInfo, rt: Runtime) -> DaliLoader | None:
    """Every val sample exactly once across the ranks (partial last batch), in stored order."""
    if data.val is None:
        return None
    device, device_id = rt.dali_backend(cfg.loader_device)
    return make_eval_loader(data.val, data.transform, cfg.batch_size, cfg.loader_threads, per_rank=True,
                            antialias=cfg.antialias, fast_idct=cfg.fast_idct, device=device, device_id=device_id,
                            layout="channels_last" if cfg.channels_last else "CHW", **decoding(cfg))
