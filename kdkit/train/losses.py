"""Losses of the trainer: hard-label cross-entropy on (smoothed, mixed) soft targets, the KD term
between temperature-softened teacher and student distributions, and the AM-softmax margin.

Every hard-label target is a probability vector (one-hot, smoothed, or mixed by mixup/cutmix),
so one soft-target cross-entropy serves all cases; timm's mixup_target builds the same vectors.

    loss = (1 - alpha) * CE(student, target) + alpha * term(student, teacher)

The KD term is one object of KD_LOSSES, chosen by `--kd-loss` (kd_loss_type is the one lookup):

    kl      Hinton et al. (2015): T^2 * KL(softmax(t / T) || softmax(s / T)); the T^2 factor keeps the
            gradients' scale independent of T
    dkd     Decoupled KD (Zhao et al., CVPR 2022): the KL split into the target class against the rest
            (TCKD) and the distribution over the non-target classes (NCKD), weighted apart:
            T^2 * (dkd_alpha * TCKD + dkd_beta * NCKD), ramped in over dkd_warmup epochs
    kl-ls, dkd-ls   the same on standardized logits (Sun et al., CVPR 2024): teacher and student
            logits each z-scored per sample before the softmax at T (then a base temperature)

The teacher comes as kdkit.train.kd.TeacherTargets (dense logits and the batch's mix) or mutual
learning's kdkit.train.mutual.PeerTargets; both give log_probs(T, standardize) / probs(T, ...),
the distribution the term compares with. So mixed targets (a mix of two samples' teacher
distributions), top-k targets (a distribution over the stored classes) and peers (the peer's, or
its mean with the teacher's) are the same thing to every term. What each term does with them:

    top-k   kl, dkd: the classes left out have probability 0 (renormalize) or share the mass the k
            classes leave (marginal); for dkd the target class's probability is then the
            renormalized one, and NCKD covers the stored non-target classes. kl-ls, dkd-ls:
            standardizing needs every class's logit: marginal only (the left-out classes at their
            common value), renormalize is refused (Stored.check_data)
    mixing  kl, kl-ls: the two samples' (standardized) teacher distributions mixed with the images'
            lambda. dkd, dkd-ls: refused (DKD.refusals): DKD splits off *the* target class, and a
            mixed image has two
    peers   every term reads the peer's distribution (standardized on its own for -ls), averaged
            with the teacher's where the run has one; dkd's target class is the label's
"""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from timm.loss import JsdCrossEntropy, SoftTargetCrossEntropy

from kdkit.train.kd import TeacherTargets, dense_logits_from_topk, standardized, teacher_probs

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


def _kl_rows(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row from log-probabilities: sum of p * (log p - log q) over the classes where p > 0
    (a class the target gives no probability adds nothing, whatever log q; rows with no mass at all, a
    NaN log p, add 0). Written out because torch's kl_div with log targets turns exp(-inf) * -inf into
    NaN; the masks keep NaN out of the gradient too."""
    p = log_p.exp().nan_to_num(0.0)
    keep = p > 0
    return (p * (torch.where(keep, log_p, 0.0) - torch.where(keep, log_q, 0.0))).sum(-1)


def dkd(student_logits: torch.Tensor, teacher_log_probs: torch.Tensor, classes: torch.Tensor, temperature: float,
        alpha: float, beta: float) -> torch.Tensor:
    """Decoupled KD (Zhao et al., CVPR 2022, eq. 5-7): T^2 * (alpha * TCKD + beta * NCKD), averaged over
    the batch, from the student's logits and the teacher's log-probabilities at T.

        TCKD = KL(b_t || b_s),  b = (p_gt, 1 - p_gt)            the target class against the rest
        NCKD = KL(p^_t || p^_s), p^_i = p_i / (1 - p_gt), i != gt  the distribution over the other classes

    As the authors' mdistiller (mdistiller/distillers/DKD.py): the T^2 factor on both parts, the sum
    over classes averaged over the batch, the target class taken from the labels (their `gt_mask`).
    Two changes that leave the value unchanged where theirs is finite: the target class is left out
    of NCKD exactly (-inf) where they subtract 1000 from its logit, and log(1 - p_gt) is a logsumexp
    over the other classes where they take the log of a sum of probabilities (which is -inf once the
    teacher is sure at low T). A teacher that gives the other classes no probability at all (top-k
    that stores only the target class) has no NCKD: that row adds 0.
    """
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_t = teacher_log_probs.float()
    gt = F.one_hot(classes.long(), log_s.shape[-1]).bool()
    rest_t = log_t.masked_fill(gt, float("-inf")).logsumexp(-1, keepdim=True)  # log(1 - p_gt)
    rest_s = log_s.masked_fill(gt, float("-inf")).logsumexp(-1, keepdim=True)
    at_gt = classes.long().view(-1, 1)
    tckd = _kl_rows(torch.cat([log_t.gather(-1, at_gt), rest_t], -1), torch.cat([log_s.gather(-1, at_gt), rest_s], -1))
    nckd = _kl_rows((log_t - rest_t).masked_fill(gt, float("-inf")), (log_s - rest_s).masked_fill(gt, float("-inf")))
    return (alpha * tckd + beta * nckd).mean() * temperature ** 2


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


class KL:
    """Hinton et al.'s KD term, T^2 * KL(teacher || student) at temperature T (`--kd-loss kl`)."""

    name: ClassVar[str] = "kl"
    standardize: ClassVar[bool] = False  # logit standardization of teacher and student logits
    words: ClassVar[str] = "KL"

    def __init__(self, weight: float = 1.0):
        self.weight = weight

    @classmethod
    def from_config(cls, cfg) -> KL:
        return cls(cfg.kl_weight)

    @classmethod
    def refusals(cls, cfg) -> list[tuple[bool, str]]:
        """The option combinations this term has no sound meaning for (TrainConfig.refusals)."""
        return []

    def __call__(self, logits: torch.Tensor, target: torch.Tensor, teacher, temperature: float,
                 epoch: int) -> torch.Tensor:
        student = standardized(logits) if self.standardize else logits
        return self.weight * kd_kl(student, teacher.probs(temperature, self.standardize), temperature)


class KLStandardized(KL):
    """KL on standardized logits (Sun et al., CVPR 2024; `--kd-loss kl-ls`): both sides z-scored per
    sample, then softened by T, the base temperature. As the authors' code, T^2 with the base
    temperature: the gradient through the z-score is 1 / std of the student's logits smaller than
    plain KL's, which the authors make up with a KD weight of 9 against a CE weight of 0.1 (T 2, on
    100 classes): --kd-alpha 0.9 --kl-weight 10. A z-score is at most sqrt(C - 1), so with few classes
    the same T gives flatter targets (10 classes: 3 at most)."""

    name = "kl-ls"
    standardize = True
    words = "KL on standardized logits"


class DKD(KL):
    """Decoupled KD (`--kd-loss dkd`, see dkd()): dkd_alpha * TCKD + dkd_beta * NCKD, ramped in linearly
    over the first dkd_warmup epochs as mdistiller does it (min(epoch / warmup, 1), epochs counted from 1:
    the first epoch gets 1 / warmup), constant within an epoch. mdistiller's CIFAR-100 recipe (CE weight
    1, alpha 1, beta 8, T 4, warmup 20 of 240 epochs) is --kd-alpha 0.5 --dkd-alpha 1 --dkd-beta 8 --dkd-warmup
    20: their loss, halved (the LR's business)."""

    name = "dkd"
    words = "DKD"

    def __init__(self, alpha: float = 1.0, beta: float = 8.0, warmup: int = 0):
        super().__init__()
        self.alpha, self.beta, self.warmup = alpha, beta, warmup

    @classmethod
    def from_config(cls, cfg) -> DKD:
        return cls(cfg.dkd_alpha, cfg.dkd_beta, cfg.dkd_warmup)

    @classmethod
    def refusals(cls, cfg):
        return [(bool(cfg.mixup or cfg.cutmix),
                 f"kd_loss={cfg.kd_loss}: DKD separates the target class from the others, and a mixed image has two "
                 "target classes; set --mixup 0 --cutmix 0, or use --kd-loss kl / kl-ls with mixing")]

    def ramp(self, epoch: int) -> float:
        return min((epoch + 1) / self.warmup, 1.0) if self.warmup else 1.0

    def __call__(self, logits, target, teacher, temperature, epoch):
        # the class of an unmixed (smoothed) hard target is its largest entry (mixing is refused)
        student = standardized(logits) if self.standardize else logits
        return self.ramp(epoch) * dkd(student, teacher.log_probs(temperature, self.standardize), target.argmax(-1),
                                      temperature, self.alpha, self.beta)


class DKDStandardized(DKD):
    """DKD on standardized logits (`--kd-loss dkd-ls`; the authors multiply alpha and beta by their KD weight
    of 9: --dkd-alpha 9 --dkd-beta 72 for their CIFAR-100 recipe)."""

    name = "dkd-ls"
    standardize = True
    words = "DKD on standardized logits"


KD_LOSSES = {term.name: term for term in (KL, KLStandardized, DKD, DKDStandardized)}


def kd_loss_type(name: str) -> type[KL]:
    """The KD term called `name` (TrainConfig.kd_loss): the one place a loss's name is looked up."""
    return KD_LOSSES[name]


class DistillationLoss(torch.nn.Module):
    """(student logits, hard target probs, teacher targets | None) -> loss.

    Without teacher probs (teacher training, kd=none) it is the hard-label loss alone. With an
    AM-softmax head the margin applies to the hard-label term; the KD term (`term`, KL by default)
    compares the head's scaled cosine logits with the teacher, as any other logits. The trainer
    tells it the epoch (set_epoch) for terms that ramp in (DKD's warmup).
    """

    def __init__(self, temperature: float = 4.0, alpha: float = 0.9, am_scale: float | None = None,
                 am_margin: float = 0.0, term: KL | None = None):
        super().__init__()
        self.temperature, self.alpha = temperature, alpha
        self.am_scale, self.am_margin = am_scale, am_margin
        self.term = term or KL()
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def forward(self, logits: torch.Tensor, target: torch.Tensor, teacher=None) -> torch.Tensor:
        hard_logits = logits if self.am_scale is None else am_softmax_margin(logits, target, self.am_scale,
                                                                           self.am_margin)
        hard = soft_target_ce(hard_logits, target)
        if teacher is None:
            return hard
        return (1.0 - self.alpha) * hard + self.alpha * self.term(logits, target, teacher, self.temperature,
                                                                  self.epoch)


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

    def set_epoch(self, epoch: int) -> None:
        """Nothing in this loss changes with the epoch (DistillationLoss's interface)."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor, teacher=None) -> torch.Tensor:
        return self.jsd(logits.float(), target.argmax(dim=-1).repeat(3))
