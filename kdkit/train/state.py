"""What a checkpoint holds beyond the weights, and resuming from it.

A checkpoint follows kdkit.models.checkpoint's format; `train_state` is everything the next step
depends on, so a run killed and resumed reaches the same weights as one that never stopped:

    optimizer, scheduler (plateau counters included), scaler     their state_dicts
    updates                 optimizer updates so far (the scheduler's position, EMA warmup)
    step_in_epoch           micro-batches of the current epoch already trained (0 at a boundary)
    epoch_sums              that epoch's partial train-loss sums (so its metrics come out the same)
    best                    best val top-1 so far (which epoch best.pth holds)
    rng                     per rank: python, numpy, torch (and CUDA) generator states
    loader                  per rank: the train loader's DALI checkpoint (kdkit.train.data)
    loader_stream           what decided that loader's stream (data.stream_key): restored only into the same
    world                   ranks that wrote it (RNG and loader states are per rank)
    peer                    `kdkit train mutual`: the second student's weights, optimizer, scheduler
                            and best val top-1 (kdkit.train.mutual)

The data position is (epoch, step_in_epoch) and the loader state at it.
"""
from __future__ import annotations

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


def make_checkpoint(p, epoch: int, step_in_epoch: int, metrics: dict, epoch_sums: dict | None) -> dict:
    """The checkpoint dict of the current state. Collective under DDP (gathers every rank's RNG and
    loader state)."""
    rngs = p.rt.gather(rng_state())
    loaders = p.rt.gather(p.train_loader.state())
    ckpt = model_checkpoint(p.cfg, p.data, p.model, p.ema.module if p.ema is not None else None, epoch, metrics)
    ckpt["train_state"] = {
        "optimizer": p.optimizer.state_dict(), "scheduler": scheduler_state(p.scheduler),
        "scaler": p.scaler.state_dict(), "updates": p.updates, "step_in_epoch": step_in_epoch,
        "epoch_sums": epoch_sums, "best": p.best, "rng": rngs, "world": p.rt.world,
        "loader": loaders, "loader_stream": stream_key(p.cfg, p.data, p.rt),
        "config": p.cfg.to_dict(),
    }
    if p.peer is not None:  # mutual learning: the second student (kdkit.train.mutual)
        ckpt["train_state"]["peer"] = peer_state(p.peer)
    return ckpt


def model_checkpoint(cfg, data, model, ema_model, epoch: int, metrics: dict) -> dict:
    """What a checkpoint says about one model (kdkit.models.checkpoint's format), without train_state."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    ckpt = {
        "model": cfg.model, "model_kwargs": model_kwargs(cfg),
        "num_classes": data.num_classes, "classes": data.classes,
        "image_size": cfg.image_size, "crop_ratio": cfg.eval_crop_ratio,
        "mean": list(IMAGENET_DEFAULT_MEAN), "std": list(IMAGENET_DEFAULT_STD),
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


def loader_state(resume: tuple[str, dict] | None, cfg, data, rt):
    """This rank's saved loader state, where the resumed run's loader can continue from it; else None
    (with a warning: the run then continues at the next epoch boundary, see restore)."""
    if resume is None:
        return None
    path, ckpt = resume
    ts = ckpt["train_state"]
    states, why = ts.get("loader"), None
    if not states:
        why = "it holds no loader state"
    elif len(states) != rt.world:
        why = f"it was written by {len(states)} ranks, this run has {rt.world}"
    elif ts.get("loader_stream") != stream_key(cfg, data, rt):
        why = "the loader's options or shards differ from the run's"
    if why:
        warnings.warn(f"{path}: the data position cannot be restored exactly ({why}); training continues "
                      "with a freshly shuffled loader", stacklevel=2)
        return None
    return states[rt.rank]


def restore(p, path: str, ckpt: dict) -> tuple[int, int, dict | None]:
    """Load a resume checkpoint into the built parts; returns (epoch, step_in_epoch, epoch_sums)."""
    if ckpt.get("num_classes") not in (None, p.data.num_classes):
        raise KdkitError(f"{path}: {ckpt['num_classes']} classes, the shards have {p.data.num_classes}")
    if ckpt.get("classes") and p.data.classes and [c["id"] for c in ckpt["classes"]] != [c["id"] for c in p.data.classes]:
        raise KdkitError(f"{path}: trained on other classes than {p.cfg.data} holds (same count, other ids or "
                         "order); resume on the shards the run started with")
    load_weights(p.model, ckpt["state_dict"], path)
    if p.ema is not None and ckpt.get("ema_state_dict"):
        p.ema.module.load_state_dict(ckpt["ema_state_dict"])
    ts = ckpt["train_state"]
    p.optimizer.load_state_dict(ts["optimizer"])
    load_scheduler_state(p.scheduler, ts["scheduler"])
    p.scaler.load_state_dict(ts["scaler"])
    p.updates, p.best = ts["updates"], ts["best"]
    if p.peer is not None:
        load_peer_state(p.peer, ts.get("peer"), path)
    rngs = ts["rng"]
    if ts.get("world", 1) != p.rt.world:
        warnings.warn(f"{path} was written by {ts.get('world', 1)} ranks, this run has {p.rt.world}: "
                      "training continues, but not bit-for-bit as the original would have")
    set_rng_state(rngs[p.rt.rank % len(rngs)])
    if not p.train_loader.restored:  # a fresh loader: its first epoch is a whole one, the first steps skipped
        p.skip_batches = int(ts["step_in_epoch"])
    return int(ckpt["epoch"]), int(ts["step_in_epoch"]), ts.get("epoch_sums")
