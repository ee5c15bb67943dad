"""Deep mutual learning (Zhang et al., 2018), the OpenVINO seed's MobileNetV3 recipe: `kdkit train mutual`.

Two students learn together from the start, each from the labels and from the other's softened
predictions; no trained teacher is needed. On every batch both see the same (augmented, mixed)
images, and each minimises kdkit's KD loss with its peer, detached, in the teacher's place:

    loss_1 = (1 - alpha) * CE(s1, y) + alpha * T^2 * KL(softmax(s2 / T) || softmax(s1 / T))
    loss_2 = (1 - alpha) * CE(s2, y) + alpha * T^2 * KL(softmax(s1 / T) || softmax(s2 / T))

(--kd-alpha, --kd-temperature; the paper's loss is CE + KL at T = 1, i.e. alpha 0.5 up to a factor 2.)
With a teacher on top (--kd stored / replay / online), each student's soft target is the mean of the
teacher's and the peer's softened distributions, (softmax(t / T) + softmax(s_peer / T)) / 2, in the
KL above: one target, so alpha keeps its meaning (the weight of everything not the labels).
Both are updated from the same forward pass, each by its own optimizer and schedule (the paper
updates them in turn, recomputing the second's input to the KL after the first's step; the
simultaneous form costs one forward pass less and is what most implementations do). The peer may
be another architecture (--peer-model) and carry the AM-softmax head (--peer-am-softmax): the
seed's "softmax for the main model, AM-softmax for the auxiliary model".

The run folder holds the first student as usual (best.pth, last.pth) and the peer beside it
(peer_best.pth, peer_last.pth: kdkit checkpoints `kdkit eval` takes alone or as an ensemble); its
optimizer and schedule state ride in last.pth's train_state, so the pair resumes exactly.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from kdkit.errors import KdkitError
from kdkit.train.config import TrainConfig
from kdkit.train.losses import DistillationLoss, teacher_probs
from kdkit.train.model import build_model
from kdkit.train.optim import build_optimizer, build_scheduler, load_scheduler_state, scheduler_state


@dataclass
class Peer:
    """The second student and what trains it; cfg is the run's config with the peer's model and head."""
    cfg: TrainConfig
    model: torch.nn.Module
    net: torch.nn.Module  # what the step calls (DDP / compile around model, as Parts.net)
    optimizer: torch.optim.Optimizer
    scheduler: object | None
    criterion: DistillationLoss
    best: float | None = None


def peer_config(cfg: TrainConfig) -> TrainConfig:
    return dataclasses.replace(cfg, model=cfg.peer_model or cfg.model, am_softmax=cfg.peer_am_softmax)


def check_mutual_options(cfg: TrainConfig) -> None:
    """What mutual learning does not combine with, refused in one line each before anything runs."""
    if not cfg.mutual:
        if cfg.peer_model or cfg.peer_am_softmax:
            raise KdkitError("--peer-model / --peer-am-softmax describe the second student of `kdkit train mutual`")
        return
    refused = [(cfg.sam_rho > 0, "--sam-rho: SAM's second pass is not supported for two students"),
               (cfg.ema, "--ema: EMA weights of the two students are not supported"),
               (bool(cfg.finetune), "--finetune: loading one backbone into two students is not supported")]
    for bad, why in refused:
        if bad:
            raise KdkitError(f"kdkit train mutual: {why}")


def build_peer(cfg: TrainConfig, num_classes: int, rt, updates_per_epoch: int) -> Peer:
    """The peer, built after the first student from the same seeded generator: another initialisation."""
    pcfg = peer_config(cfg)
    fmt = torch.channels_last if cfg.channels_last else torch.preserve_format
    model = build_model(pcfg, num_classes)
    if cfg.sync_bn and rt.distributed:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(rt.device, memory_format=fmt)
    optimizer = build_optimizer(pcfg, model)
    return Peer(cfg=pcfg, model=model, net=model, optimizer=optimizer,
                scheduler=build_scheduler(pcfg, optimizer, updates_per_epoch),
                criterion=DistillationLoss(cfg.kd_temperature, cfg.kd_alpha,
                                           cfg.am_scale if pcfg.am_softmax else None, cfg.am_margin))


def mutual_losses(logits_1: torch.Tensor, logits_2: torch.Tensor, target: torch.Tensor,
                  criterion_1: DistillationLoss, criterion_2: DistillationLoss, temperature: float,
                  t_probs: torch.Tensor | None = None) -> torch.Tensor:
    """(loss_1, loss_2) of the module doc: each student's KD loss against its detached peer (and the
    teacher's probabilities at T, t_probs, where the run has a teacher)."""
    def soft_target(peer_logits):
        peer = teacher_probs(peer_logits.detach(), temperature)
        return peer if t_probs is None else (peer + t_probs) / 2

    loss_1 = criterion_1(logits_1, target, soft_target(logits_2))
    loss_2 = criterion_2(logits_2, target, soft_target(logits_1))
    return torch.stack([loss_1, loss_2])


def peer_state(peer: Peer) -> dict:
    """The peer's part of last.pth's train_state."""
    return {"state_dict": peer.model.state_dict(), "optimizer": peer.optimizer.state_dict(),
            "scheduler": scheduler_state(peer.scheduler), "best": peer.best, "model": peer.cfg.model}


def load_peer_state(peer: Peer, state: dict | None, path: str) -> None:
    from kdkit.models.checkpoint import load_weights

    if not state:
        raise KdkitError(f"{path}: holds no peer (not a `kdkit train mutual` checkpoint); resume it with the "
                         "command that wrote it")
    load_weights(peer.model, state["state_dict"], f"{path} (peer)")
    peer.optimizer.load_state_dict(state["optimizer"])
    load_scheduler_state(peer.scheduler, state["scheduler"])
    peer.best = state["best"]
