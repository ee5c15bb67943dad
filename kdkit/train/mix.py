"""Mixup and CutMix on a batch, with the teacher's targets mixed by the same lambda.

timm's `Mixup` draws lambda (and the CutMix box) inside `__call__` and mixes only the images and
the class targets; it has no hook to mix a third tensor with the same draw, which KD from stored
logits needs. So this module draws the parameters itself, the way timm does (numpy's global RNG,
Beta(alpha, alpha), switch / mix probabilities, partner = the batch reversed) and reuses timm's
box helper (`cutmix_bbox_and_lam`), whose area-corrected lambda is what the targets get:

    image  = lam * x_i + (1 - lam) * x_j              (mixup), or x_i with x_j pasted in a box (cutmix)
    target = lam * y_i + (1 - lam) * y_j              (timm's mixup_target, label smoothing included)
    teacher= lam * p_i + (1 - lam) * p_j,  p = softmax(teacher_logits / T)   (kdkit.train.kd.TeacherTargets)

For stored (or replayed) logits the teacher term is an approximation: the teacher never saw the
mixed image, and its output on it is not in general the mix of its outputs on the two images.
An online teacher (kd=online) is run on the mixed images themselves and needs no such mixing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from timm.data.mixup import cutmix_bbox_and_lam


@dataclass
class MixParams:
    kind: str = "none"  # "none" | "mixup" | "cutmix"
    lam: float = 1.0  # weight of the sample itself; for cutmix the area-corrected value
    box: tuple[int, int, int, int] | None = None  # cutmix (y_lo, y_hi, x_lo, x_hi) of the pasted region


NO_MIX = MixParams()


def draw_mix(image_shape, mixup_alpha: float, cutmix_alpha: float, prob: float = 1.0,
             switch_prob: float = 0.5) -> MixParams:
    """One draw per batch, as timm's Mixup(mode="batch"): which kind, lambda, and the cutmix box."""
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        return MixParams()
    if np.random.rand() >= prob:
        return MixParams()
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or np.random.rand() < switch_prob)
    lam = float(np.random.beta(cutmix_alpha, cutmix_alpha) if use_cutmix else np.random.beta(mixup_alpha, mixup_alpha))
    if not use_cutmix:
        return MixParams("mixup", lam)
    box, lam = cutmix_bbox_and_lam(tuple(image_shape), lam, correct_lam=True)
    return MixParams("cutmix", float(lam), tuple(int(v) for v in box))


def mix_images(images: torch.Tensor, p: MixParams) -> torch.Tensor:
    """The mixed batch (a new tensor); sample i is mixed with sample B-1-i."""
    if p.kind == "mixup":
        return images * p.lam + images.flip(0) * (1.0 - p.lam)
    if p.kind == "cutmix":
        yl, yh, xl, xh = p.box
        out = images.clone()
        out[..., yl:yh, xl:xh] = images.flip(0)[..., yl:yh, xl:xh]
        return out
    return images


def mix_targets(target: torch.Tensor | None, p: MixParams) -> torch.Tensor | None:
    """lam * t_i + (1 - lam) * t_{B-1-i} for per-sample probability vectors (class or teacher targets)."""
    if target is None or p.kind == "none":
        return target
    return target * p.lam + target.flip(0) * (1.0 - p.lam)


def mix_log_targets(log_target: torch.Tensor, p: MixParams) -> torch.Tensor:
    """mix_targets in log space: log(lam * exp(a_i) + (1 - lam) * exp(a_{B-1-i})), without leaving it
    (a distribution's log-probabilities stay exact where its probabilities would underflow)."""
    if p.kind == "none":
        return log_target
    own, other = (math.log(w) if w > 0 else -math.inf for w in (p.lam, 1.0 - p.lam))
    return torch.logaddexp(log_target + own, log_target.flip(0) + other)


def mix_batch(images: torch.Tensor, target: torch.Tensor, mixup_alpha: float, cutmix_alpha: float,
              prob: float = 1.0, switch_prob: float = 0.5):
    """(mixed images, mixed class targets, MixParams) from one draw; the teacher's targets are mixed
    with the same MixParams (mix_targets, through kdkit.train.kd.TeacherTargets).

    `images` are (B, C, H, W); the cutmix box is drawn on their H x W (timm reads shape[-2:]).
    """
    p = draw_mix(images.shape, mixup_alpha, cutmix_alpha, prob, switch_prob)
    return mix_images(images, p), mix_targets(target, p), p
