"""Teachers from local checkpoints: one model, or an ensemble whose probabilities are averaged.

Each checkpoint is read by kdkit.models.checkpoint.load_model (a kdkit checkpoint of any head, or a
bare timm/torchvision state dict with its model name). Nothing is ever downloaded. Every way a
checkpoint can be wrong (missing, unreadable, another architecture, another class count) is a
KdkitError naming the file, raised before any shard is read.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from kdkit.errors import KdkitError
from kdkit.models.checkpoint import ModelInfo, check_classes, load_model
from kdkit.teach.config import TeacherSpec


@dataclass
class Teacher:
    model: nn.Module
    info: ModelInfo
    record: dict  # what the manifest's teacher block says about this teacher


def load_teacher(spec: TeacherSpec, num_classes: int) -> Teacher:
    """Build and load one teacher; refuse it unless it predicts `num_classes` classes."""
    model, info = load_model(spec.checkpoint, model_name=spec.model, model_kwargs=spec.model_kwargs,
                             num_classes=num_classes, prefer_ema=spec.prefer_ema, trust=spec.trust)
    model.requires_grad_(False)
    record = {"model": info.model, "model_kwargs": info.model_kwargs, "checkpoint": str(spec.checkpoint),
              "checkpoint_sha256": info.sha256(), "ema": info.weights == "ema", "mean": list(info.mean),
              "std": list(info.std)}
    if info.head:
        record["head"] = info.head
    return Teacher(model, info, record)


class TeacherEnsemble(nn.Module):
    """Input views normalized for the first teacher -> one row of stored 'logits' per view.

    One teacher: its logits unchanged. Several: log of the mean of their softmax probabilities
    (`combine: "mean-prob"`), so softmax(stored) is exactly the averaged probability and any
    temperature applied later acts on a proper log-probability. logsumexp keeps it finite where a
    probability underflows. A teacher whose mean/std differ from the first one's gets the input
    re-normalized here, so one DALI pipeline feeds them all.
    """

    def __init__(self, teachers: list[Teacher]):
        super().__init__()
        self.models = nn.ModuleList(t.model for t in teachers)
        first = teachers[0].info
        self.renorm: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        for t in (t.info for t in teachers):
            if t.mean == first.mean and t.std == first.std:
                self.renorm.append(None)
                continue
            # x_t = (x0 * std0 + mean0 - mean_t) / std_t, per channel
            s0, m0 = torch.tensor(first.std), torch.tensor(first.mean)
            st, mt = torch.tensor(t.std), torch.tensor(t.mean)
            self.renorm.append(((s0 / st).view(1, -1, 1, 1), ((m0 - mt) / st).view(1, -1, 1, 1)))
        self.combine = "single" if len(teachers) == 1 else "mean-prob"

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = []
        for model, renorm in zip(self.models, self.renorm):
            xi = x if renorm is None else x * renorm[0].to(x) + renorm[1].to(x)
            outs.append(model(xi).float())
        if len(outs) == 1:
            return outs[0]
        logp = torch.stack([o.log_softmax(-1) for o in outs])
        return torch.logsumexp(logp, dim=0) - math.log(len(outs))


def load_teachers(specs: list[TeacherSpec], classes, image_size: int | None, crop_ratio: float | None,
                  data: str = "the shard set") -> tuple[TeacherEnsemble, list[Teacher], int, float]:
    """All teachers, checked to know the set's classes (by id and order, where a checkpoint lists them)
    and to agree on the input size the one pipeline gives them."""
    teachers = [load_teacher(s, len(classes)) for s in specs]
    infos = [t.info for t in teachers]
    for info in infos:
        check_classes(info, classes, data)
    size = image_size or infos[0].image_size
    ratio = crop_ratio or next((i.crop_ratio for i in infos if i.crop_ratio), 0.875)
    if image_size is None:
        sizes = {i.image_size for i in infos}
        if len(sizes) > 1:
            raise KdkitError("the teachers expect different image sizes ("
                             + ", ".join(f"{i.source}: {i.image_size}" for i in infos)
                             + "); choose one with --image-size")
    return TeacherEnsemble(teachers), teachers, size, ratio
