"""Everything a training run holds, built from a TrainConfig and checked before the first step.

`build(cfg, dist)` does, in order: data checks (shards, classes, teacher outputs), the resume
checkpoint (architecture, train_state), the model (fine-tuning weights, AM-softmax head), the
online teacher, optimizer / SAM / scheduler / scaler / EMA, the run folder, and the resumed state.
Any bad input therefore fails here with a KdkitError, before anything is trained or written.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from timm.utils import ModelEmaV3

from kdkit.errors import KdkitError
from kdkit.runtime import Runtime
from kdkit.train import data as data_mod
from kdkit.train.config import TrainConfig
from kdkit.train.losses import AugMixJsdLoss, DistillationLoss
from kdkit.train.model import build_model, build_teacher, load_finetune, set_backbone_frozen
from kdkit.train.mutual import Peer, build_peer, check_mutual_options
from kdkit.train.optim import SAM, build_optimizer, build_scheduler
from kdkit.train.runs import RunDir
from kdkit.train.state import loader_state, read_resume_checkpoint, restore, seed_everything


@dataclass
class Parts:
    cfg: TrainConfig
    rt: Runtime  # device, rank and world (kdkit.runtime)
    data: data_mod.DataInfo
    model: torch.nn.Module  # the plain model: what is saved and evaluated
    net: torch.nn.Module  # what the training step calls: the model, or DDP / torch.compile around it
    optimizer: torch.optim.Optimizer
    scheduler: object | None
    scaler: torch.amp.GradScaler
    criterion: DistillationLoss | AugMixJsdLoss
    run: RunDir
    teacher: torch.nn.Module | None = None
    peer: Peer | None = None  # mutual learning: the second student (kdkit.train.mutual)
    sam: SAM | None = None
    ema: ModelEmaV3 | None = None
    train_loader: object | None = None  # one per run (kdkit.train.data)
    val_loader: object | None = None
    updates: int = 0  # optimizer updates so far
    best: float | None = None  # best val top-1 so far
    frozen: bool = False
    skip_batches: int = 0  # a resume whose loader could not be restored: batches of its first epoch already trained
    start: tuple[int, int, dict | None] = (0, 0, None)  # (epoch, step_in_epoch, epoch_sums) to continue from
    history: list[dict] = field(default_factory=list)

    def autocast(self):
        if self.cfg.amp == "none":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.cfg.amp == "bf16" else torch.float16
        return torch.autocast(device_type=self.rt.device.type, dtype=dtype)


def check_options(cfg: TrainConfig) -> None:
    check_mutual_options(cfg)
    if cfg.sam_rho > 0 and cfg.grad_accum > 1:
        raise KdkitError("SAM perturbs the weights along the whole batch's gradient: use --grad-accum 1 with it")
    if cfg.sam_rho > 0 and cfg.amp == "fp16":
        raise KdkitError("SAM with fp16 loss scaling is not supported: use --amp bf16")
    if cfg.kd == "online" and not cfg.teacher_checkpoint:
        raise KdkitError("--kd online needs --teacher-checkpoint (kdkit never downloads weights)")
    if cfg.freeze_epochs and not cfg.finetune:
        raise KdkitError("--freeze-epochs freezes a loaded backbone: give --finetune CHECKPOINT")


def build(cfg: TrainConfig, rt: Runtime, start_run: bool = True) -> Parts:
    """All parts of a run; start_run=False (the LR finder) neither writes a run folder nor resumes."""
    check_options(cfg)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = rt.device.type == "cuda" and not cfg.deterministic
    data = data_mod.prepare_data(cfg)
    resume = read_resume_checkpoint(cfg) if start_run else None

    seed_everything(cfg.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
    model = build_model(cfg, data.num_classes)
    if cfg.finetune and not resume:
        reset = load_finetune(model, cfg.finetune, cfg)
        if rt.is_main:
            print(f"kdkit train: backbone from {cfg.finetune}; new head ({', '.join(reset)})")
    if cfg.sync_bn and rt.distributed:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(rt.device, memory_format=torch.channels_last if cfg.channels_last else torch.preserve_format)
    teacher = build_teacher(cfg, data.num_classes, data.classes, rt.device) if cfg.kd == "online" else None

    optimizer = build_optimizer(cfg, model)  # before any freezing: frozen parameters join later
    loader = data_mod.train_loader(cfg, data, rt, loader_state(resume, cfg, data, rt))
    updates_per_epoch = -(-len(loader) // cfg.grad_accum)
    peer = build_peer(cfg, data.num_classes, rt, updates_per_epoch) if cfg.mutual else None
    p = Parts(
        cfg=cfg, rt=rt, data=data, model=model, net=model, optimizer=optimizer,
        scheduler=build_scheduler(cfg, optimizer, updates_per_epoch),
        scaler=torch.amp.GradScaler(rt.device.type, enabled=cfg.amp == "fp16"),
        criterion=criterion(cfg),
        run=RunDir(cfg, rt.is_main), teacher=teacher, peer=peer,
        sam=SAM(optimizer, cfg.sam_rho, cfg.sam_adaptive) if cfg.sam_rho > 0 else None,
        ema=ModelEmaV3(model, decay=cfg.ema_decay, use_warmup=cfg.ema_warmup) if cfg.ema else None,
        train_loader=loader, val_loader=data_mod.eval_loader(cfg, data, rt))
    if start_run:
        p.run.start(cfg, resuming=resume is not None)
    # each rank mixes and drops out differently; a resume replaces these with the saved states
    seed_everything(cfg.seed + 1_000 * (rt.rank + 1))
    if resume:
        p.start = restore(p, *resume)
        p.run.keep_metrics_until(p.start[0])
        p.history = [r for r in p.run.read_metrics() if r["epoch"] <= p.start[0]]
    set_frozen(p, p.start[0] < cfg.freeze_epochs)
    return p


def criterion(cfg: TrainConfig) -> DistillationLoss | AugMixJsdLoss:
    """The loss of a step: AugMix's JSD loss over the loader's three views, else hard-label CE + KD."""
    if cfg.augmix_jsd:
        return AugMixJsdLoss(cfg.label_smoothing)
    return DistillationLoss(cfg.kd_temperature, cfg.kd_alpha, cfg.am_scale if cfg.am_softmax else None, cfg.am_margin)


def set_frozen(p: Parts, frozen: bool) -> None:
    """Freeze or thaw the backbone and (re)wrap the model: DDP only syncs parameters that require
    grad when it is built, so DDP is rebuilt around the model when the set changes."""
    if frozen or p.frozen:
        set_backbone_frozen(p.model, frozen)
    p.frozen = frozen
    p.net = wrap(p, p.model)
    if p.peer is not None:
        p.peer.net = wrap(p, p.peer.model)


def wrap(p: Parts, model: torch.nn.Module) -> torch.nn.Module:
    """What the training step calls: the model, in DDP across ranks, compiled with --compile."""
    net = model
    if p.rt.distributed:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[p.rt.device.index] if p.rt.device.type == "cuda" else None)
    return torch.compile(net) if p.cfg.compile else net
