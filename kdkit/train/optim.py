"""Optimizer, LR schedule and SAM: timm's factories configured from TrainConfig, plus what timm lacks.

timm gives: SGD with Nesterov ("sgd"), AdamW, RAdam, LAMB and LARS for large batches, Lookahead
(any name prefixed "lookahead_"), no weight decay on biases and norm weights (filter_bias_and_bn:
every parameter with ndim <= 1), and warmup + cosine / step / multistep / plateau schedules.
timm has no SAM, so `SAM` below wraps any optimizer; it needs the whole batch's gradient, so it
works with neither gradient accumulation nor fp16 loss scaling (use bf16).
"""
from __future__ import annotations

import warnings

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.scheduler.plateau_lr import PlateauLRScheduler
from timm.utils import dispatch_clip_grad

from kdkit.errors import KdkitError
from kdkit.train.config import TrainConfig


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """timm's optimizer over every parameter (frozen ones included: freezing comes later and is undone)."""
    try:
        return create_optimizer_v2(model, opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                   momentum=cfg.momentum, filter_bias_and_bn=not cfg.bias_decay)
    except (ValueError, AssertionError) as e:
        raise KdkitError(f"optimizer {cfg.opt!r}: {e}") from None


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, updates_per_epoch: int):
    """Warmup then the named schedule. Stepped per optimizer update (smooth warmup and cosine), except
    plateau, which decides once per epoch from the validation top-1."""
    if cfg.sched == "plateau" and not cfg.val_split:
        raise KdkitError("sched=plateau reduces the LR when val top-1 stops improving: it needs a --val-split")
    per_update = cfg.sched != "plateau"
    # cosine: warmup first, then the whole cosine over the remaining epochs (timm's warmup_prefix),
    # so the LR peaks at the end of warmup without a kink; step milestones stay absolute epochs
    prefix = cfg.sched == "cosine" and 0 < cfg.warmup_epochs < cfg.epochs
    with warnings.catch_warnings():
        # timm deprecates its plateau scheduler because it does not checkpoint its counters;
        # scheduler_state() below saves them, so a resumed plateau run continues exactly
        warnings.simplefilter("ignore", FutureWarning)
        sched, _ = create_scheduler_v2(
            optimizer, sched=cfg.sched, num_epochs=cfg.epochs - (cfg.warmup_epochs if prefix else 0),
            warmup_prefix=prefix, decay_epochs=cfg.decay_epochs,
            decay_milestones=list(cfg.decay_milestones), decay_rate=cfg.decay_rate, min_lr=cfg.min_lr,
            warmup_lr=cfg.warmup_lr, warmup_epochs=cfg.warmup_epochs, patience_epochs=cfg.patience_epochs,
            plateau_mode="max", step_on_epochs=not per_update, updates_per_epoch=max(1, updates_per_epoch))
    return sched


def scheduler_state(sched) -> dict | None:
    if sched is None:
        return None
    state = sched.state_dict()
    if isinstance(sched, PlateauLRScheduler):  # timm's state_dict leaves out patience / cooldown counters
        state = {"timm": state, "plateau": sched.lr_scheduler.state_dict()}
    return state


def load_scheduler_state(sched, state: dict | None) -> None:
    if sched is None or state is None:
        return
    if isinstance(sched, PlateauLRScheduler):
        sched.load_state_dict(state["timm"])
        sched.lr_scheduler.load_state_dict(state["plateau"])
    else:
        sched.load_state_dict(state)


def clip_gradients(cfg: TrainConfig, params) -> None:
    if cfg.clip_grad is not None:
        dispatch_clip_grad(params, value=cfg.clip_grad, mode=cfg.clip_mode)


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])


class SAM:
    """Sharpness-aware minimization (Foret et al., 2021) around a base optimizer (timm has none).

    A step is: gradient g at w; move to w + e with e = rho * g / ||g|| (ASAM: scaled by w^2, the
    norm by |w|); gradient at w + e; back to w; the base optimizer steps with that second gradient.
    The trainer calls perturb() between the two backward passes and restore() before stepping.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, rho: float = 0.05, adaptive: bool = False):
        if rho <= 0:
            raise ValueError(f"SAM rho must be > 0, got {rho}")
        self.optimizer, self.rho, self.adaptive = optimizer, rho, adaptive
        self._moved: list[tuple[torch.Tensor, torch.Tensor]] = []

    def _params(self):
        return [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]

    @torch.no_grad()
    def perturb(self) -> None:
        params = self._params()
        norms = [((p.abs() if self.adaptive else 1.0) * p.grad).norm(2) for p in params]
        scale = self.rho / (torch.stack(norms).norm(2) + 1e-12)
        self._moved = []
        for p in params:
            e = (p.pow(2) if self.adaptive else 1.0) * p.grad * scale
            p.add_(e)
            self._moved.append((p, e))

    @torch.no_grad()
    def restore(self) -> None:
        for p, e in self._moved:
            p.sub_(e)
        self._moved = []


class frozen_bn_stats:
    """Context: BatchNorm running statistics are not updated (SAM's second forward pass sees the
    perturbed weights; its batch statistics must not count twice)."""

    def __init__(self, model: torch.nn.Module):
        self.bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]

    def __enter__(self):
        self.saved = [m.momentum for m in self.bns]
        for m in self.bns:
            m.momentum = 0.0
        return self

    def __exit__(self, *exc):
        for m, mom in zip(self.bns, self.saved):
            m.momentum = mom
