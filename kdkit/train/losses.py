"""Losses of the trainer: hard-label cross-entropy on (smoothed, mixed) soft targets, the KD term
between temperature-softened teacher and student distributions, and the AM-softmax margin.

Every hard-label target is a probability vector (one-hot, smoothed, or mixed by mixup/cutmix),
so one soft-target cross-entropy serves all cases; timm's mixup_target builds the same vectors.

    loss = (1 - alpha) * CE(student, target) + alpha * T^2 * KL(softmax(t / T) || softmax(s / T))

The T^2 factor (Hinton et al., 2015) keeps the KD gradients' scale independent of T. The teacher
comes as kdkit.train.kd.TeacherTargets (dense logits and the batch's mix), whose probs(T) is the
distribution the KL term compares with: mixed targets (a mix of two samples' teacher
distributions), top-k targets (a distribution over k classes) and mutual learning's peers
(kdkit.train.mutual) are the same thing to the loss.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.loss import JsdCrossEntropy, SoftTargetCrossEntropy

from kdkit.train.kd import TeacherTargets, dense_logits_from_topk, teacher_probs

_SOFT_CE = SoftTargetCrossEntropy()


def one_hot_smoothed(labels: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """(B,) class indices -> (B, C) targets: 1 - smoothing + smoothing / C on the class, smoothing / C elsewhere
    (the same vectors as timm's mixup_target with lam=1 and LabelSmoothingCrossEntropy's loss)."""
    off = smoothing / num_classes
    target = torch.full((labels.shape[0], num_classes), off, device=labels.device, dtype=torch.float32)
    return target.scatter_(1, labels.long().view(-1, 1), 1.0 - smoothing + off)


def soft_target_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of -sum(target * log_softmax(logits)): timm's SoftTargetCrossEntropy, in float32."""
    return _SOFT_CE(logits.float(), target)


def kd_kl(student_logits: torch.Tensor, target_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(target || softmax(s / T)), summed over classes, averaged over the batch (torch's
    kl_div, "batchmean"; it takes 0 * log 0 = 0, so targets with zeros (top-k, one-hot teachers) are exact).
    """
    log_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return F.kl_div(log_student, target_probs, reduction="batchmean") * temperature ** 2


def am_softmax_margin(cos_logits: torch.Tensor, target: torch.Tensor, scale: float, margin: float) -> torch.Tensor:
    """AM-softmax: subtract s * m from the (scaled cosine) logit of the target class before the CE.

    With a soft target (smoothed / mixed) the margin is spread in proportion to the target mass,
    which is the one-hot AM-softmax where the target is one-hot.
    """
    return cos_logits - scale * margin * target


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
            temperature: float = 4.0, alpha: float = 0.9, smoothing: float = 0.0) -> torch.Tensor:
    """The plain KD loss for class-index labels and teacher logits (no mixing): see the module doc."""
    target = one_hot_smoothed(labels, student_logits.shape[-1], smoothing)
    return DistillationLoss(temperature, alpha)(student_logits, target, TeacherTargets(teacher_logits.float()))


class DistillationLoss(torch.nn.Module):
    """(student logits, hard target probs, teacher targets | None) -> loss.

    Without teacher probs (teacher training, kd=none) it is the hard-label loss alone. With an
    AM-softmax head the margin applies to the hard-label term; the KD term compares the head's
    scaled cosine logits with the teacher, as any other logits.
    """

    def __init__(self, temperature: float = 4.0, alpha: float = 0.9, am_scale: float | None = None,
                 am_margin: float = 0.0):
        super().__init__()
        self.temperature, self.alpha = temperature, alpha
        self.am_scale, self.am_margin = am_scale, am_margin

    def forward(self, logits: torch.Tensor, target: torch.Tensor, teacher=None) -> torch.Tensor:
        hard_logits = logits if self.am_scale is None else am_softmax_margin(logits, target, self.am_scale,
                                                                           self.am_margin)
        hard = soft_target_ce(hard_logits, target)
        if teacher is None:
            return hard
        return (1.0 - self.alpha) * hard + self.alpha * kd_kl(logits, teacher.probs(self.temperature),
                                                              self.temperature)


class AugMixJsdLoss(torch.nn.Module):
    """AugMix's loss over the clean view and two AugMix views of each sample (`--augmix-jsd`): timm's
    JsdCrossEntropy (cross-entropy on the clean views, label smoothing included, plus alpha times the
    Jensen-Shannon divergence of the three predictions), behind DistillationLoss's signature.

    The logits come split-major as the loader stacks the views (B clean, B first AugMix, B second);
    `target` holds the B samples' one-hot (smoothed) rows, whose largest entry is the class: timm's
    loss takes class indices and smooths them itself.
    """

    def __init__(self, smoothing: float = 0.0, alpha: float = 12.0):
        super().__init__()
        self.jsd = JsdCrossEntropy(num_splits=3, alpha=alpha, smoothing=smoothing)

    def forward(self, logits: torch.Tensor, target: torch.Tensor, teacher=None) -> torch.Tensor:
        return self.jsd(logits.float(), target.argmax(dim=-1).repeat(3))
