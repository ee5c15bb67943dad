"""What a checkpoint holds beyond the weights, and resuming from it.

A checkpoint follows kdkit.models.checkpoint's format; `train_state` is everything the next step
depends on, so a run killed and resumed reaches the same weights as one that never stopped:

    optimizer, scheduler (plateau counters included), scaler     their state_dicts
    updates                 optimizer updates so far (the scheduler's position, EMA warmup)
    step_in_epoch           micro-batches of the current epoch already trained (0 at a boundary)
    epoch_steps             micro-batches per epoch of each rank of the run that wrote it
    epoch_sums              that epoch's partial train-loss sums (so its metrics come out the same)
    best                    best val top-1 so far (which epoch best.pth holds)
    rng                     per rank: python, numpy, torch (and CUDA) generator states
    loader                  per rank: the train loader's DALI checkpoint (kdkit.train.data)
    loader_stream           what decided that loader's stream (data.stream_key): restored only into the same
    world                   ranks that wrote it (RNG and loader states are per rank)
    peer                    `kdkit train mutual`: the second student's weights, optimizer, scheduler
                            and best val top-1 (kdkit.train.mutual)

The data position is (epoch, step_in_epoch) and the loader state at it. A run resumed with the same
number of ranks and loader options continues each rank's loader exactly there. With another number
of ranks (the same options), the old ranks' loaders are rebuilt from their states and finish the
epoch, their remaining batches shared among the new ranks (kdkit.train.data.RestOfEpoch): every
sample of the epoch once, none twice, up to world - 1 batches left out; the next epochs come from a
fresh loader at the new world size. Counts kept in steps are rescaled to the new world (samples, not
batches): the optimizer updates (the LR schedule's position) and the epoch's partial loss sums.
Where the loader state cannot be used at all (other loader options or shards, a checkpoint without
loader states), the resumed run builds a fresh loader and skips as many of its first batches as
hold the samples already trained in that epoch: the epoch is finished with the samples it had left
in number, but on a fresh shuffle, so some samples of it are seen twice and others not (said when
the run starts).
"""
from __future__ import annotations

import hashlib
import random
import warnings

import numpy as np
import torch

from kdkit import __version__
from kdkit.errors import KdkitError
from kdkit.models.checkpoint import is_kdkit_checkpoint, load_weights, read_checkpoint
from kdkit.train.data import stream_key
from kdkit.train.model import head_info, model_kwargs
from kdkit.train.mutual import load_peer_state, peer_state
from kdkit.train.optim import load_scheduler_state, scheduler_state


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """The generators' states as plain values and tensors, so a checkpoint loads with weights_only=True."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def make_checkpoint(t, epoch: int, step_in_epoch: int, metrics: dict, epoch_sums: dict | None) -> dict:
    """The checkpoint dict of the trainer's current state (t: kdkit.train.build.Trainer). Collective
    under DDP (gathers every rank's RNG and loader state)."""
    rngs = t.rt.gather(rng_state())
    loaders = t.rt.gather(t.loaders.train.state())
    s = t.student
    ckpt = model_checkpoint(t.cfg, t.data, s.model, s.ema.module if s.ema is not None else None, epoch, metrics)
    ckpt["train_state"] = {
        "optimizer": s.optimizer.state_dict(), "scheduler": scheduler_state(s.scheduler),
        "scaler": t.scaler.state_dict(), "updates": t.at.updates, "step_in_epoch": step_in_epoch,
        "epoch_steps": len(t.loaders.train),
        "epoch_sums": epoch_sums, "best": s.best, "rng": rngs, "world": t.rt.world,
        "loader": loaders, "loader_stream": stream_key(t.cfg, t.kd, t.data, t.rt),
        "config": t.cfg.to_dict(), "train_set": t.data.train_identity,
    }
    for peer in t.students[1:]:  # mutual learning: the second student (kdkit.train.mutual)
        ckpt["train_state"]["peer"] = peer_state(peer)
    return ckpt


def model_checkpoint(cfg, data, model, ema_model, epoch: int, metrics: dict) -> dict:
    """What a checkpoint says about one model (kdkit.models.checkpoint's format), without train_state:
    the input transform is the run's (data.transform), the one its loaders read."""
    ckpt = {
        "model": cfg.model, "model_kwargs": model_kwargs(cfg),
        "num_classes": data.num_classes, "classes": data.classes,
        "image_size": data.transform.image_size, "crop_ratio": data.transform.crop_ratio,
        "mean": list(data.transform.mean), "std": list(data.transform.std),
        "state_dict": model.state_dict(),
        "ema_state_dict": ema_model.state_dict() if ema_model is not None else None,
        "epoch": epoch, "metrics": metrics, "kdkit_version": __version__, "train_state": None,
    }
    if head_info(cfg):
        ckpt["head"] = head_info(cfg)  # not in the base format: consumers must rebuild this head
    return ckpt


def for_use(ckpt: dict) -> dict:
    """A checkpoint without its train_state (best.pth: for evaluation, export, fine-tuning)."""
    return {**ckpt, "train_state": None}


def read_resume_checkpoint(cfg) -> tuple[str, dict] | None:
    if not cfg.resume:
        return None
    path = str(cfg.run_dir / "last.pth") if cfg.resume == "last" else cfg.resume
    ckpt = read_checkpoint(path, cfg.trust_checkpoint)
    if is_kdkit_checkpoint(ckpt) and ckpt.get("model") and ckpt["model"] != cfg.model:
        raise KdkitError(f"{path}: a checkpoint of {ckpt['model']!r}, but this run builds {cfg.model!r}; "
                         f"pass --model {ckpt['model']} or another checkpoint")
    if not isinstance(ckpt, dict) or not ckpt.get("train_state"):
        raise KdkitError(f"{path}: holds no train_state (best.pth and exported checkpoints do not); resume "
                         "from last.pth, or start a new run from these weights with --finetune")
    return path, ckpt


def train_identity(data, keys: list[list[str]]) -> dict:
    """What the run trains on: the train set's folder, sample count and a digest of its sample keys (per
    shard, in shard order; kdkit.shards.reader.ShardScan.keys): a set moved elsewhere keeps it; another
    set, or the same one written again from other files, does not."""
    h = hashlib.sha256()
    for shard in keys:
        h.update("\n".join(shard).encode("utf-8", "surrogateescape") + b"\n\0")
    return {"folder": str(data.train.folder or data.train.tars[0].parent), "samples": sum(map(len, keys)),
            "keys_sha256": h.hexdigest()}


def check_same_train_set(resume: tuple[str, dict] | None, data) -> None:
    """A resumed run continues on the samples it started with: on another set it would keep the old epoch
    length (the saved DALI loader state) and its folder would no longer say what its first epochs saw.
    Checked from the indexes before the loader is built on the saved state, and before config.yaml is
    rewritten."""
    if resume is None:
        return
    path, ckpt = resume
    was = ckpt["train_state"].get("train_set")
    if not was:  # a checkpoint written before kdkit recorded its set: not known
        return
    from kdkit.shards.reader import sample_keys

    now = train_identity(data, sample_keys(data.train))  # the indexes the loader then reads: read once
    if was["keys_sha256"] != now["keys_sha256"]:
        raise KdkitError(f"{path}: this run trained on {was['folder']} ({was['samples']} samples); {now['folder']} "
                         f"holds other samples ({now['samples']}). Resume it on the set it started with, or start "
                         f"a new run from these weights on this set: --name NEW --finetune {path}")


def loader_state(resume: tuple[str, dict] | None, cfg, kd, data, rt):
    """Where the resumed run's data comes from: this rank's saved loader state, where its loader can
    continue from it; the old ranks' states (a list), where the run has another number of ranks but the
    same loader and stopped inside an epoch (kdkit.train.data.RestOfEpoch finishes that epoch from them);
    else None: a fresh loader (with a warning where an epoch was interrupted, see restore)."""
    if resume is None:
        return None
    path, ckpt = resume
    ts = ckpt["train_state"]
    states, why = ts.get("loader"), None
    same_stream = bool(states) and ts.get("loader_stream") == stream_key(cfg, kd, data, rt)
    if states and len(states) != rt.world:
        if not ts["step_in_epoch"]:
            return None  # at an epoch boundary: a fresh loader at the new world size is exactly right
        if same_stream and "epoch_steps" in ts:
            return list(states)
    if not states:
        why = "it holds no loader state"
    elif not same_stream:
        why = "the loader's options or shards differ from the run's"
    elif len(states) != rt.world:
        why = f"it was written by {len(states)} ranks (this run has {rt.world}) without the length of its epoch"
    if why:
        warnings.warn(f"{path}: the data position cannot be restored exactly ({why}); training continues "
                      "with a freshly shuffled loader", stacklevel=2)
        return None
    return states[rt.rank]


def rest_of_epoch(resume: tuple[str, dict], saved: list, cfg, kd, data, rt):
    """The loader of the interrupted epoch's remaining batches (kdkit.train.data.RestOfEpoch) from the old
    ranks' saved loader states."""
    from kdkit.train.data import RestOfEpoch

    ts = resume[1]["train_state"]
    return RestOfEpoch(cfg, kd, data, rt, saved, int(ts["epoch_steps"]) - int(ts["step_in_epoch"]))


def restore(t, path: str, ckpt: dict) -> None:
    """Load a resume checkpoint into the built trainer (kdkit.train.build.Trainer): weights, optimizer,
    schedule, scaler, RNG, and where the run stands (t.at)."""
    if ckpt.get("num_classes") not in (None, t.data.num_classes):
        raise KdkitError(f"{path}: {ckpt['num_classes']} classes, the shards have {t.data.num_classes}")
    if ckpt.get("classes") and t.data.classes and [c["id"] for c in ckpt["classes"]] != [c["id"] for c in t.data.classes]:
        raise KdkitError(f"{path}: trained on other classes than {t.cfg.data} holds (same count, other ids or "
                         "order); resume on the shards the run started with")
    s = t.student
    load_weights(s.model, ckpt["state_dict"], path)
    if s.ema is not None and ckpt.get("ema_state_dict"):
        s.ema.module.load_state_dict(ckpt["ema_state_dict"])
    ts = ckpt["train_state"]
    s.optimizer.load_state_dict(ts["optimizer"])
    load_scheduler_state(s.scheduler, ts["scheduler"])
    t.scaler.load_state_dict(ts["scaler"])
    t.at.updates, s.best = ts["updates"], ts["best"]
    for peer in t.students[1:]:
        load_peer_state(peer, ts.get("peer"), path)
    rngs = ts["rng"]
    old_world, step, sums = ts.get("world", 1), int(ts["step_in_epoch"]), ts.get("epoch_sums")
    if old_world != t.rt.world:
        warnings.warn(f"{path} was written by {old_world} ranks, this run has {t.rt.world}: "
                      "training continues, but not bit-for-bit as the original would have")
        # counted in steps of the old world: the same samples are old_world / world as many steps now
        scale = old_world / t.rt.world
        t.at.updates = round(t.at.updates * scale)
        if sums:  # rank 0's partial sums stand for each rank's (as with the same world): old_world of them
            loss = sums["loss"] if isinstance(sums["loss"], list) else [sums["loss"]]
            sums = {**sums, "samples": sums["samples"] * scale, "loss": [x * scale for x in loss]}
    set_rng_state(rngs[t.rt.rank % len(rngs)])
    if t.loaders.rest is not None:  # the old ranks' loaders finish the epoch: its steps counted from 0 here
        step = 0
    elif not t.loaders.train.restored and step:  # a fresh loader: skip the samples already trained, in number
        old_batch = (ts.get("config") or {}).get("batch_size", t.cfg.batch_size)
        step = t.at.skip_batches = step * old_world * old_batch // (t.rt.world * t.cfg.batch_size)
    t.at.epoch, t.at.step, t.at.sums = int(ckpt["epoch"]), step, sums
    started = (ts.get("config") or {}).get("epochs")
    if started is not None and started != t.cfg.epochs and t.cfg.sched != "plateau":
        reschedule(t, started)


def reschedule(t, started: int) -> None:
    """A resumed run given other --epochs: the LR schedule becomes that of a run started with them, at the
    position reached (as timm's train.py does on --resume: its scheduler is built for --epochs and stepped
    to the start epoch). The saved schedule ran out at its own end: a finished cosine run extended would
    train every added epoch at LR 0. Plateau has no length: its saved counters are kept."""
    from kdkit.train.optim import build_scheduler

    updates_per_epoch = -(-len(t.loaders.train) // t.cfg.grad_accum)
    for s in t.students:
        if s.scheduler is None:
            continue
        s.scheduler = build_scheduler(s.cfg, s.optimizer, updates_per_epoch)
        s.scheduler.step(t.at.epoch)  # an epoch-stepped schedule (step, multistep, linear, exp) at the epoch
        s.scheduler.step_update(num_updates=t.at.updates)  # a per-update one (cosine, warmup) at the update
    if t.rt.is_main:
        lr = t.student.optimizer.param_groups[0]["lr"]
        print(f"kdkit train: the LR schedule is now that of a {t.cfg.epochs}-epoch run (this run started with "
              f"{started}); it goes on from epoch {t.at.epoch + 1} at LR {lr:.3g}")
