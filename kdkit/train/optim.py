"""Optimizer, LR schedule and SAM: timm's factories configured from TrainConfig, plus what timm lacks.

timm gives: SGD with Nesterov ("sgd"), AdamW, RAdam, LAMB and LARS for large batches, Lookahead
(any name prefixed "lookahead_"), no weight decay on biases and norm weights (filter_bias_and_bn:
every parameter with ndim <= 1), and warmup + cosine / step / multistep / plateau schedules. The Keras
seed's per-epoch decays are timm's too: linear is the polynomial schedule with power 1, exp the step
schedule decaying every epoch; both run from --lr in the first epoch after warmup to --min-lr in the
last. Its `--optimizer rmsprop` is timm's TF-style RMSpropTF (alpha 0.9, eps 1e-3 as in timm's
rmsproptf recipes for EfficientNet / MobileNetV3; momentum is --momentum).
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


RMSPROP_EPS = 1e-3  # timm's rmsproptf recipes (--opt-eps .001); RMSpropTF's own 1e-10 is TF1's


def optimizer_name(opt: str) -> tuple[str, dict]:
    """timm's name for kdkit's --opt, and the defaults kdkit gives it: "rmsprop" is the TF-style RMSprop
    (timm's "rmsprop" is torch's, whose eps sits outside the square root: not the Keras seed's)."""
    lookahead, base = ("lookahead_", opt[len("lookahead_"):]) if opt.startswith("lookahead_") else ("", opt)
    if base in ("rmsprop", "rmsproptf"):
        return lookahead + "rmsproptf", {"eps": RMSPROP_EPS}
    return opt, {}


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """timm's optimizer over every parameter (frozen ones included: freezing comes later and is undone)."""
    name, kwargs = optimizer_name(cfg.opt)
    if cfg.opt_eps is not None:
        kwargs["eps"] = cfg.opt_eps
    try:
        return create_optimizer_v2(model, opt=name, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                   momentum=cfg.momentum, filter_bias_and_bn=not cfg.bias_decay, **kwargs)
    except (ValueError, AssertionError) as e:
        raise KdkitError(f"optimizer {cfg.opt!r}: {e}") from None


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, updates_per_epoch: int):
    """Warmup then the named schedule. Stepped per optimizer update (smooth warmup and cosine), except
    plateau, which decides once per epoch from the validation top-1, and the Keras seed's linear / exp,
    which set one LR per epoch."""
    if cfg.sched == "plateau" and not cfg.val_split:
        raise KdkitError("sched=plateau reduces the LR when val top-1 stops improving: it needs a --val-split")
    if cfg.sched in ("linear", "exp"):
        return _per_epoch_decay(cfg, optimizer)
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


def _per_epoch_decay(cfg: TrainConfig, optimizer: torch.optim.Optimizer):
    """The Keras seed's --lr_sched linear / exp: after warmup, epoch i of the n decay epochs (0-based)
    trains at lr - (lr - min_lr) * i / (n - 1) (linear) or lr * (min_lr / lr) ** (i / (n - 1)) (exp):
    --lr in the first, --min-lr in the last. timm's poly (power 1) and step (every epoch) schedules,
    with the decay spanning n - 1 epochs so that the last epoch is at the end of it."""
    decay = cfg.epochs - cfg.warmup_epochs  # >= 2, 0 < min_lr <= lr for exp: TrainConfig.refusals
    rate = (cfg.min_lr / cfg.lr) ** (1 / (decay - 1)) if cfg.sched == "exp" else 1.0  # poly: the power
    sched, _ = create_scheduler_v2(
        optimizer, sched="poly" if cfg.sched == "linear" else "step", num_epochs=decay - 1, warmup_prefix=True,
        decay_epochs=1, decay_rate=rate, min_lr=cfg.min_lr, warmup_lr=cfg.warmup_lr,
        warmup_epochs=cfg.warmup_epochs, step_on_epochs=True)
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

    def second_pass(self, loss_of, model: torch.nn.Module) -> None:
        """The update's second half, after the first backward: move to w + e, replace the gradient by
        that of loss_of() there (BatchNorm statistics left as the first pass set them), move back; the
        base optimizer then steps with it."""
        self.perturb()
        self.optimizer.zero_grad(set_to_none=True)
        with frozen_bn_stats(model):
            loss_of().backward()
        self.restore()


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
