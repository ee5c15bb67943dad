"""Classifier heads: finding a model's classifier, and the heads kdkit puts in its place.

A checkpoint whose head is not the registry's (today: the AM-softmax head of `kdkit train
--am-softmax`) records it as `head` ({"type": "am_softmax", "scale", "margin"}); `apply_head`
rebuilds it, so every consumer (teacher pass, online KD, fine-tuning, eval, predict, export) loads
such a checkpoint through kdkit.models.checkpoint.load_model like any other.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kdkit.errors import KdkitError


class AMSoftmaxHead(torch.nn.Module):
    """Scaled cosine logits s * cos(w_c, x) (the OpenVINO seed's AM-softmax head); the margin m is
    applied in the loss, to the target class only (kdkit.train.losses.am_softmax_margin). No bias: a
    bias would break the cosine geometry the margin relies on. timm has no such head."""

    def __init__(self, in_features: int, num_classes: int, scale: float = 30.0):
        super().__init__()
        self.in_features, self.num_classes, self.scale = in_features, num_classes, scale
        self.weight = torch.nn.Parameter(torch.empty(num_classes, in_features))
        torch.nn.init.normal_(self.weight, std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * F.linear(F.normalize(x.float(), dim=-1), F.normalize(self.weight.float(), dim=-1))


def classifier_name(model: torch.nn.Module) -> str:
    """Dotted name of the model's classifier module (timm's get_classifier), e.g. "fc" or "head.fc"."""
    head = model.get_classifier()
    for name, module in model.named_modules():
        if module is head and name:
            return name
    raise KdkitError(f"{type(model).__name__}: cannot locate its classifier module")


def classifier_width(model: torch.nn.Module, state: dict) -> int | None:
    """Classes a state dict predicts, read off the weight of `model`'s classifier (None if absent)."""
    w = state.get(f"{classifier_name(model)}.weight")
    return int(w.shape[0]) if w is not None and w.ndim >= 1 else None


def replace_classifier(model: torch.nn.Module, new: torch.nn.Module) -> None:
    parent, _, leaf = classifier_name(model).rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def am_softmax(model: torch.nn.Module, scale: float) -> torch.nn.Module:
    """`model` with its Linear classifier replaced by an AMSoftmaxHead of the same shape."""
    head = model.get_classifier()
    if not isinstance(head, torch.nn.Linear):
        raise KdkitError(f"AM-softmax head: {type(model).__name__}'s classifier {classifier_name(model)} is a "
                         f"{type(head).__name__}, not a Linear layer")
    replace_classifier(model, AMSoftmaxHead(head.in_features, head.out_features, scale))
    return model


def apply_head(model: torch.nn.Module, head: dict | None, source: str) -> torch.nn.Module:
    """Put the head a checkpoint records (`head`, None for the registry's own) in place."""
    if not head:
        return model
    if head.get("type") != "am_softmax":
        raise KdkitError(f"{source}: unknown classifier head {head.get('type')!r}; this kdkit cannot rebuild it")
    return am_softmax(model, float(head.get("scale", 30.0)))
