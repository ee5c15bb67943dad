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
import math
from dataclasses import dataclass

import torch

from kdkit.errors import KdkitError
from kdkit.train.config import TrainConfig
from kdkit.train.kd import log_softmax_at
from kdkit.train.optim import load_scheduler_state, scheduler_state


def peer_config(cfg: TrainConfig) -> TrainConfig:
    """The second student's config: the run's, with --peer-model and --peer-am-softmax."""
    return dataclasses.replace(cfg, model=cfg.peer_model or cfg.model, am_softmax=cfg.peer_am_softmax)


@dataclass
class PeerTargets:
    """A student's soft target in mutual learning: its peer's detached distribution at T, averaged with
    the teacher's where the run has one. The loss reads it as it reads teacher targets (probs)."""

    peer_logits: torch.Tensor
    teacher: object | None = None  # kdkit.train.kd.TeacherTargets

    def log_probs(self, temperature: float, standardize: bool = False) -> torch.Tensor:
        """log of the peer's softmax at T (of its z-scored logits with `standardize`), or of the mean
        of the peer's and the teacher's distributions, each standardized on its own."""
        peer = log_softmax_at(self.peer_logits.detach(), temperature, standardize)
        if self.teacher is None:
            return peer
        return torch.logaddexp(peer, self.teacher.log_probs(temperature, standardize)) - math.log(2.0)

    def probs(self, temperature: float, standardize: bool = False) -> torch.Tensor:
        return self.log_probs(temperature, standardize).exp()


def mutual_losses(logits: list[torch.Tensor], target: torch.Tensor, criteria: list, teacher=None) -> torch.Tensor:
    """(loss_1, loss_2) of the module doc: each student's KD loss against its detached peer (and the
    teacher's targets, where the run has a teacher)."""
    (a, b), (loss_a, loss_b) = logits, criteria
    return torch.stack([loss_a(a, target, PeerTargets(b, teacher)), loss_b(b, target, PeerTargets(a, teacher))])


def peer_state(peer) -> dict:
    """The peer's part of last.pth's train_state (peer: kdkit.train.build.Student)."""
    return {"state_dict": peer.model.state_dict(), "optimizer": peer.optimizer.state_dict(),
            "scheduler": scheduler_state(peer.scheduler), "best": peer.best, "model": peer.cfg.model}


def load_peer_state(peer, state: dict | None, path: str) -> None:
    from kdkit.models.checkpoint import load_weights

    if not state:
        raise KdkitError(f"{path}: holds no peer (not a `kdkit train mutual` checkpoint); resume it with the "
                         "command that wrote it")
    load_weights(peer.model, state["state_dict"], f"{path} (peer)")
    peer.optimizer.load_state_dict(state["optimizer"])
    load_scheduler_state(peer.scheduler, state["scheduler"])
    peer.best = state["best"]
