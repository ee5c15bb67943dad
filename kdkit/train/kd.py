"""How a batch gets its teacher targets: one object per KD mode, chosen once by name (kd_mode).

    NoKD     the labels alone (a teacher, or any classifier trained without one)
    Stored   teacher logits stored in the shards for one view per image (the eval centre crop)
    Replay   K stored views per image with their crop boxes: the loader cuts the view the teacher saw
             (views_per_load of them per decode) and hands over that view's logits
    Online   a teacher run on the student's own (mixed) batch each step

Each mode owns what differs between them: the option combinations it refuses (`refusals`, part of
TrainConfig's check), what it checks of the train set before anything runs (`check_data`), the
loader role it trains from (`role`), what it builds before the first step (`prepare`: the online
teacher), how it makes a batch's teacher targets (`targets`) and how it describes itself (`words`).
The trainer only calls these (as timm's trainer calls its task); a fifth way to get teacher targets
is one class here and its name in KD_MODES. What targets are is here too (TeacherTargets: dense
teacher logits, top-k rebuilt, and the batch's mix); the KD *loss* that reads them is the
criterion's (kdkit.train.losses).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from kdkit.errors import KdkitError
from kdkit.models.checkpoint import check_classes, load_model
from kdkit.options import option_fields
from kdkit.shards import contract
from kdkit.train.mix import MixParams, mix_log_targets


def teacher_probs(teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(t / T) in float32 (stored logits are float16); -inf logits get probability 0."""
    return F.softmax(teacher_logits.float() / temperature, dim=-1)


def standardized(logits: torch.Tensor) -> torch.Tensor:
    """Logit standardization (Sun et al., CVPR 2024): each row's z-score, (z - mean) / (1e-7 + std), in
    float32. As the authors' code (sunshangquan/logit-standardization-KD, `normalize`): the unbiased
    standard deviation (torch's default), 1e-7 added to it, not to the variance. Rows must be finite:
    top-k storage renormalized (-inf for the classes left out) has no mean or spread, and is refused
    before training (kdkit.train.kd.Stored.check_data)."""
    x = logits.float()
    return (x - x.mean(-1, keepdim=True)) / (1e-7 + x.std(-1, keepdim=True))


def log_softmax_at(logits: torch.Tensor, temperature: float, standardize: bool = False) -> torch.Tensor:
    """log softmax(z / T) in float32, z the logits or, with `standardize`, their z-scores."""
    z = standardized(logits) if standardize else logits.float()
    return F.log_softmax(z / temperature, dim=-1)


def dense_logits_from_topk(values: torch.Tensor, indices: torch.Tensor, num_classes: int,
                           target: str = "renormalize") -> torch.Tensor:
    """Dense (..., C) teacher logits from stored top-k (values, indices): the student's target is
    softmax(dense / T). Two readings of what top-k leaves out (`kdkit train --topk-target`):

    renormalize  the other classes get -inf: the teacher's distribution renormalized over its k best
                 classes, the classes it ranks below the k-th get no probability (ReLabel; FKD's
                 "hardening"). What top-k gives up is their share of the mass at temperature T.
    marginal     FKD's marginal smoothing: the k classes keep the teacher's own probabilities
                 exp(values) and the mass left, 1 - sum(exp(values)), is spread evenly over the other
                 C - k classes (each gets the logit log(rest / (C - k))). Needs values that are
                 log-probabilities (top-k as `kdkit add-teacher-logits` writes it: log_softmax). At
                 T = 1 it is exactly that distribution; at T > 1 that distribution softened like any
                 logits (the kept classes keep their order, the others stay equal).

    Either way softmax(dense / T) sums to 1 per row.
    """
    if target not in ("renormalize", "marginal"):  # TrainConfig.topk_target's choices
        raise ValueError(f"target={target!r}: expected renormalize or marginal")
    v = values.float()
    fill = torch.full((*values.shape[:-1], 1), float("-inf"), dtype=torch.float32, device=values.device)
    others = num_classes - values.shape[-1]
    if target == "marginal" and others > 0:
        # fp16 rounding can put the kept mass a hair over 1: then nothing is left (log 0 = -inf)
        rest = (1.0 - v.exp().sum(-1, keepdim=True)).clamp_min(0.0)
        fill = torch.log(rest / others)
    dense = fill.expand(*values.shape[:-1], num_classes).clone()
    return dense.scatter_(-1, indices.long(), v)


def dense_teacher_logits(stored, num_classes: int, device: torch.device, topk_target: str = "renormalize"
                         ) -> torch.Tensor:
    """Dense float32 teacher logits of a batch: as stored, or rebuilt from top-k (values, indices)
    when the loader yields that pair (top-k storage; `topk_target`: dense_logits_from_topk)."""
    if isinstance(stored, (tuple, list)):
        return dense_logits_from_topk(stored[0].to(device, non_blocking=True), stored[1].to(device, non_blocking=True),
                                      num_classes, topk_target)
    return stored.to(device, non_blocking=True).float()


@dataclass
class TeacherTargets:
    """A batch's teacher targets: dense logits, and the mixup / cutmix draw that still applies to them.

    Stored and replayed logits belong to the unmixed samples, so the student's target is the mix of
    the two samples' teacher distributions with the images' lambda (kdkit.train.mix says why that is
    an approximation); an online teacher saw the mixed images themselves (mix None)."""

    logits: torch.Tensor  # (B, C) float32; -inf where top-k storage left a class out
    mix: MixParams | None = None

    def log_probs(self, temperature: float, standardize: bool = False) -> torch.Tensor:
        """log softmax(logits / T) (of the logits' z-scores with `standardize`: logit standardization,
        each sample's logits before mixing), mixed as the images were; -inf logits stay -inf."""
        lp = log_softmax_at(self.logits, temperature, standardize)
        return mix_log_targets(lp, self.mix) if self.mix is not None else lp

    def probs(self, temperature: float, standardize: bool = False) -> torch.Tensor:
        """The distribution of log_probs: -inf logits get probability 0."""
        return self.log_probs(temperature, standardize).exp()


class KD:
    """No teacher: the hard-label loss alone (the base of the other modes)."""

    name: ClassVar[str] = "none"
    distills: ClassVar[bool] = False  # the run has a teacher (a student run; its default name says so)
    stored: ClassVar[bool] = False  # the train loader hands over teacher outputs stored in the shards
    stored_views: ClassVar[bool] = False  # ... for K views with their boxes, which the loader cuts (views_per_load)
    runs_teacher: ClassVar[bool] = False  # a teacher model runs beside the student (--teacher-checkpoint)

    def __init__(self, cfg):
        self.cfg = cfg

    @classmethod
    def refusals(cls, cfg) -> list[tuple[bool, str]]:
        """The option combinations this mode cannot train (TrainConfig.refusals)."""
        return [(cfg.views_per_load > 1 and not cls.stored_views,
                 f"views_per_load={cfg.views_per_load}: several stored views per load need kd=replay (the run has "
                 f"kd={cls.name}); leave it at 1"),
                (cfg.augmix_jsd and cls.distills,
                 f"augmix_jsd=True: the JSD loss trains on the labels (timm's JsdCrossEntropy), not on a teacher; use "
                 f"--kd none, or --augmix without --augmix-jsd for --kd {cls.name}")]

    def role(self):
        """The train loader's role (kdkit.pipelines), with the run's options for it."""
        from kdkit.pipelines.train import Train

        return role_from(Train, self.cfg)

    def check_data(self, train, num_classes: int) -> None:
        """Refuse a train set this mode cannot read, before anything runs (a KdkitError saying what to do)."""

    def prepare(self, data, rt, autocast) -> None:
        """Build what the targets need (the online teacher), once, before the first step."""
        self.num_classes = data.num_classes

    def targets(self, batch, images: torch.Tensor, mix: MixParams | None) -> TeacherTargets | None:
        """The teacher targets of a batch whose (possibly mixed) images the student sees."""
        return None

    def words(self) -> str:
        return "no KD (labels only)"


def role_from(role_type: type, cfg):
    """A loader role built from a config that holds its options under the same names (TrainConfig
    inherits the roles' option declarations, kdkit.pipelines.options)."""
    return role_type(**{name: getattr(cfg, name) for name in option_fields(role_type)})


class Stored(KD):
    """Teacher logits stored in the shards, one view per image (full, or top-k rebuilt to dense)."""

    name = "stored"
    distills = True
    stored = True
    views_per_image: ClassVar[str] = "single"

    def check_data(self, train, num_classes: int) -> None:
        """Every train sample holds the packed teacher outputs, for the right number of views and classes,
        in a form the run's options can read (top-k as log-probabilities for marginal, ...)."""
        from kdkit.shards.reader import scan_shards, teacher_block, teacher_format, teacher_layout
        from kdkit.teach.members import TOPK_VALUES

        where = str(train.folder or train.tars[0].parent)
        if teacher_format(train) is None:
            raise KdkitError(f"--kd {self.name}: shard set {where} has no teacher logits; add them with "
                             f"`kdkit add-teacher-logits {where} ...` first, or train without KD (--kd none)")
        layout = {p.name: p for p in teacher_layout(train)}  # refuses a set in the layout before the packed member
        scan = scan_shards(train, [contract.IMAGE_EXT, contract.LABEL_EXT], probe=[contract.TEACHER_EXT])
        total, held = scan.num_samples, scan.present[contract.TEACHER_EXT]
        if held < total:
            raise KdkitError(f"{where}: only {held} of {total} samples have teacher logits (an interrupted "
                             "teacher pass?); finish `kdkit add-teacher-logits` first")
        self.check_views(where, "boxes" in layout)
        block = teacher_block(train)
        topk = "indices" in layout
        if topk and self.cfg.topk_target == "marginal" and block.get("topk_values") != TOPK_VALUES:
            raise KdkitError(f"--topk-target marginal: {where} stores top-k raw logits, which do not say how much mass "
                             "the other classes hold; write the top-k again with this kdkit's `kdkit add-teacher-logits "
                             "--topk` (log-probabilities), or use --topk-target renormalize")
        if topk and self.cfg.topk_target == "renormalize" and self.standardizes():
            raise KdkitError(f"--kd-loss {self.cfg.kd_loss}: standardizing needs every class's logit, and {where} stores "
                             "top-k renormalized (the other classes at -inf); use --topk-target marginal (they share the "
                             "mass the k classes leave), or --kd-loss kl / dkd")
        width = int(block.get("num_classes") or 0)
        if width != num_classes:
            raise KdkitError(f"class counts disagree: {where} stores teacher logits over {width} classes, the shards "
                             f"and model have {num_classes}")

    def standardizes(self) -> bool:
        from kdkit.train.losses import kd_loss_type

        return kd_loss_type(self.cfg.kd_loss).standardize

    def check_views(self, where: str, views: bool) -> None:
        if views:
            raise KdkitError(f"{where}: logits of several stored views per sample; use --kd replay")

    def targets(self, batch, images, mix):
        return TeacherTargets(dense_teacher_logits(batch.teacher_logits, self.num_classes,
                                                   images.device, self.cfg.topk_target), mix)

    def words(self) -> str:
        return "KD from stored single-view logits"


class Replay(Stored):
    """K stored views per image with their boxes: the student sees the view the teacher saw."""

    name = "replay"
    stored_views = True

    @classmethod
    def refusals(cls, cfg):
        from kdkit.pipelines.options import StoredViews

        return super().refusals(cfg) + StoredViews.replay_refusals(cfg)

    def role(self):
        from kdkit.pipelines.replay import Replay as ReplayRole

        return role_from(ReplayRole, self.cfg)

    def check_views(self, where: str, views: bool) -> None:
        if not views:
            raise KdkitError(f"--kd replay: {where} stores single-view logits (no view boxes); use --kd stored, or "
                             "write multi-view logits (add-teacher-logits --views K)")

    def words(self) -> str:
        n = self.cfg.views_per_load
        return "KD from replayed stored views" + (f", {n} per decode" if n > 1 else "")


class Online(KD):
    """A teacher model run on the student's batch (after mixing) every step."""

    name = "online"
    distills = True
    runs_teacher = True

    def prepare(self, data, rt, autocast) -> None:
        super().prepare(data, rt, autocast)
        if not self.cfg.teacher_checkpoint:
            raise KdkitError("--kd online needs --teacher-checkpoint (kdkit never downloads weights)")
        self.teacher = build_teacher(self.cfg, data.num_classes, data.classes, rt.device)
        self.autocast = autocast

    @torch.no_grad()
    def targets(self, batch, images, mix):
        with self.autocast():
            return TeacherTargets(self.teacher(images).float())

    def words(self) -> str:
        return f"KD from an online teacher ({self.cfg.teacher_model or self.cfg.teacher_checkpoint})"


def build_teacher(cfg, num_classes: int, classes: list[dict], device: torch.device) -> torch.nn.Module:
    """The online teacher: any checkpoint load_model reads (its model named by it, or --teacher-model
    for a bare state dict), checked to know this run's classes (by id and order where it lists them),
    in eval mode on `device`."""
    teacher, info = load_model(cfg.teacher_checkpoint, model_name=cfg.teacher_model, num_classes=num_classes,
                               prefer_ema=cfg.checkpoint_ema, trust=cfg.trust_checkpoint)
    if classes:  # the shards' class list (sets without a manifest have only a count)
        check_classes(info, classes, cfg.data)
    fmt = torch.channels_last if cfg.channels_last else torch.preserve_format
    return teacher.to(device, memory_format=fmt).requires_grad_(False)


KD_MODES = {mode.name: mode for mode in (KD, Stored, Replay, Online)}


def kd_mode(name: str) -> type[KD]:
    """The KD mode called `name` (TrainConfig.kd): the one place a mode's name is looked up."""
    return KD_MODES[name]


__all__ = ["KD", "KD_MODES", "Online", "Replay", "Stored", "TeacherTargets", "build_teacher", "dense_logits_from_topk",
           "kd_mode", "log_softmax_at", "standardized", "teacher_probs"]
