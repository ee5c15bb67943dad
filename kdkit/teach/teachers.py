"""Teachers from local checkpoints: one model, or an ensemble whose probabilities are averaged.

A kdkit checkpoint carries everything (model name and kwargs, class count, image size, mean/std);
a bare timm/torchvision state dict needs the model name, and its transform comes from timm's
pretrained config for that name. Nothing is ever downloaded. Every way a checkpoint can be wrong
(missing, unreadable, another architecture, another class count) is a KdkitError naming the file,
raised before any shard is read.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from kdkit.errors import KdkitError
from kdkit.models.checkpoint import extract_state_dict, file_sha256, is_kdkit_checkpoint, load_weights, read_checkpoint
from kdkit.models.factory import create_model
from kdkit.teach.config import TeacherSpec


@dataclass
class Teacher:
    model: nn.Module
    name: str
    num_classes: int
    image_size: int
    crop_ratio: float | None  # None: the checkpoint does not say (a kdkit checkpoint)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    record: dict  # what the manifest's teacher block says about this teacher


def _classifier_rows(model: nn.Module, state: dict) -> int | None:
    """Class count of a bare state dict, read from the classifier timm names for the model."""
    names = getattr(model, "pretrained_cfg", {}).get("classifier")
    for name in (names if isinstance(names, (list, tuple)) else [names]):
        w = state.get(f"{name}.weight") if name else None
        if w is not None and w.ndim >= 1:
            return int(w.shape[0])
    return None


def load_teacher(spec: TeacherSpec, num_classes: int) -> Teacher:
    """Build and load one teacher; refuse it unless it predicts `num_classes` classes."""
    path = Path(spec.checkpoint)
    obj = read_checkpoint(path)
    state = extract_state_dict(obj, prefer_ema=spec.prefer_ema)
    if is_kdkit_checkpoint(obj):
        name = obj["model"]
        if spec.model and spec.model != name:
            raise KdkitError(f"{path}: a kdkit checkpoint of {name!r}, but --model {spec.model!r} was given; "
                             "leave --model out (the checkpoint names its model)")
        kwargs = dict(obj.get("model_kwargs") or {})
        classes = int(obj["num_classes"])
        _refuse_class_count(path, classes, num_classes)
        model = create_model(name, num_classes=classes, **kwargs)
        pcfg = getattr(model, "pretrained_cfg", {})
        size = int(obj.get("image_size") or pcfg.get("input_size", (3, 224, 224))[-1])
        mean, std = tuple(obj.get("mean") or pcfg["mean"]), tuple(obj.get("std") or pcfg["std"])
        crop_ratio = None
    else:
        if not spec.model:
            raise KdkitError(f"{path}: a bare state dict names no model; give its timm name with --model")
        name, kwargs = spec.model, dict(spec.model_kwargs)
        # build for the set's class count, then read the checkpoint's own: a 1000-class state dict
        # for a 3-class set must be refused as a class-count problem, not as a shape soup
        model = create_model(name, num_classes=num_classes, **kwargs)
        classes = _classifier_rows(model, state)
        if classes is not None:
            _refuse_class_count(path, classes, num_classes)
        pcfg = model.pretrained_cfg
        size, crop_ratio = int(pcfg["input_size"][-1]), float(pcfg.get("crop_pct") or 0.875)
        mean, std = tuple(pcfg["mean"]), tuple(pcfg["std"])
    load_weights(model, state, str(path))
    model.eval().requires_grad_(False)
    record = {"model": name, "model_kwargs": kwargs, "checkpoint": str(path), "checkpoint_sha256": file_sha256(path),
              "ema": bool(spec.prefer_ema), "mean": list(mean), "std": list(std)}
    return Teacher(model, name, num_classes, size, crop_ratio, mean, std, record)


def _refuse_class_count(path: Path, classes: int, wanted: int) -> None:
    if classes != wanted:
        raise KdkitError(f"{path}: the teacher predicts {classes} classes, the shard set has {wanted}; "
                         "use a teacher trained on this set's classes (class indexes must mean the same)")


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
        first = teachers[0]
        self.renorm: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        for t in teachers:
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


def load_teachers(specs: list[TeacherSpec], num_classes: int, image_size: int | None,
                  crop_ratio: float | None) -> tuple[TeacherEnsemble, list[Teacher], int, float]:
    """All teachers, checked to agree on the input size the one pipeline gives them."""
    teachers = [load_teacher(s, num_classes) for s in specs]
    size = image_size or teachers[0].image_size
    ratio = crop_ratio or next((t.crop_ratio for t in teachers if t.crop_ratio), 0.875)
    if image_size is None:
        sizes = {t.image_size for t in teachers}
        if len(sizes) > 1:
            raise KdkitError("the teachers expect different image sizes ("
                             + ", ".join(f"{t.record['checkpoint']}: {t.image_size}" for t in teachers)
                             + "); choose one with --image-size")
    return TeacherEnsemble(teachers), teachers, size, ratio
