"""Everything a training run holds, built from a TrainConfig and checked before the first step.

`build(cfg, rt)` does, in order: the KD mode (kdkit.train.kd) and the data checks (shards, classes,
teacher outputs), the resume checkpoint, the students (model, fine-tuning weights, head; mutual
learning's second one), what the KD mode needs (the online teacher), the loaders, each student's
optimizer / schedule / EMA, the run folder, and the resumed state. Any bad input therefore fails
here with a KdkitError, before anything is trained or written. The result is a Trainer, in a few
named parts:

    students   the models trained: one, or mutual learning's two; each a Student (model, what the
               step calls, optimizer, schedule, loss, EMA, best val top-1, its file and metric names)
    kd         how a batch gets its teacher targets (kdkit.train.kd)
    loaders    the train loader (one per run) and the val loader (kdkit.train.data)
    at         where the run stands: optimizer updates, the epoch and step it continues from, history
    scaler, sam, run, data, cfg, rt: the AMP grad scaler, SAM, the run folder, the shard sets, the
               options and the runtime
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
from kdkit.train.kd import KD, kd_mode
from kdkit.train.losses import AugMixJsdLoss, DistillationLoss, kd_loss_type
from kdkit.train.model import build_model, load_finetune, set_backbone_frozen
from kdkit.train.mutual import peer_config
from kdkit.train.optim import SAM, build_optimizer, build_scheduler
from kdkit.train.runs import BEST, LAST, PEER_BEST, PEER_LAST, RunDir, lock_run
from kdkit.train.state import (check_same_train_set, loader_state, read_resume_checkpoint, rest_of_epoch, restore,
                              seed_everything, train_identity)


@dataclass
class Student:
    """One model being trained, and what trains it."""

    cfg: TrainConfig  # the run's config, with this student's model and head (kdkit.train.mutual.peer_config)
    model: torch.nn.Module  # the plain model: what is saved and evaluated
    net: torch.nn.Module  # what the training step calls: the model, or DDP / torch.compile around it
    optimizer: torch.optim.Optimizer
    scheduler: object | None
    criterion: DistillationLoss | AugMixJsdLoss
    ema: ModelEmaV3 | None = None
    best: float | None = None  # best val top-1 so far
    prefix: str = ""  # of its metrics ("peer_" for mutual learning's second student)
    files: tuple[str, str] = (LAST, BEST)  # its latest and best checkpoints in the run folder


@dataclass
class Loaders:
    train: object  # kdkit.pipelines.DaliLoader: one per run (kdkit.train.data)
    val: object | None
    rest: object | None = None  # a run resumed with another number of ranks: the interrupted epoch's rest first


@dataclass
class Position:
    """Where the run stands."""

    updates: int = 0  # optimizer updates so far
    epoch: int = 0  # the epoch to continue from ...
    step: int = 0  # ... and its micro-batches already trained
    sums: dict | None = None  # that epoch's partial train-loss sums
    skip_batches: int = 0  # a resume on a fresh loader: its first batches, standing for the samples already trained
    history: list[dict] = field(default_factory=list)  # the metrics rows of the epochs done


@dataclass
class Trainer:
    cfg: TrainConfig
    rt: Runtime  # device, rank and world (kdkit.runtime)
    data: data_mod.DataInfo
    kd: KD
    students: list[Student]
    loaders: Loaders
    run: RunDir
    scaler: torch.amp.GradScaler
    sam: SAM | None = None
    at: Position = field(default_factory=Position)
    frozen: bool = False
    device_defaults: list[str] = field(default_factory=list)  # options the device chose (TrainConfig.on)

    @property
    def student(self) -> Student:
        """The first student: the run's model (best.pth, last.pth)."""
        return self.students[0]

    def autocast(self):
        return autocast(self.cfg, self.rt)


def autocast(cfg: TrainConfig, rt: Runtime):
    """The run's mixed precision (--amp) around a forward pass."""
    if cfg.amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device_type=rt.device.type, dtype=torch.bfloat16 if cfg.amp == "bf16" else torch.float16)


def criterion(cfg: TrainConfig) -> DistillationLoss | AugMixJsdLoss:
    """The loss of a step: AugMix's JSD loss over the loader's three views, else hard-label CE + the KD term
    (--kd-loss)."""
    if cfg.augmix_jsd:
        return AugMixJsdLoss(cfg.label_smoothing)
    return DistillationLoss(cfg.kd_temperature, cfg.kd_alpha, cfg.am_scale if cfg.am_softmax else None, cfg.am_margin,
                            kd_loss_type(cfg.kd_loss).from_config(cfg))


def student_model(cfg: TrainConfig, data: data_mod.DataInfo, rt: Runtime, finetune: bool) -> torch.nn.Module:
    """A student's model on the device: built by name, its backbone from --finetune (a new run only)."""
    model = build_model(cfg, data.num_classes)
    if finetune and cfg.finetune:
        reset = load_finetune(model, cfg.finetune, cfg)
        if rt.is_main:
            print(f"kdkit train: backbone from {cfg.finetune}; new head ({', '.join(reset)})")
    if cfg.sync_bn and rt.distributed:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model.to(rt.device, memory_format=torch.channels_last if cfg.channels_last else torch.preserve_format)


def build(cfg: TrainConfig, rt: Runtime, start_run: bool = True) -> Trainer:
    """All parts of a run; start_run=False (the LR finder) neither writes a run folder nor resumes.
    The run folder is locked first (rank 0): a second run there is refused before any work."""
    lock = lock_run(cfg.run_dir) if start_run and rt.is_main else None
    try:
        t = _build(cfg, rt, start_run)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    t.run.lock = lock  # released by t.run.close()
    return t


def _build(cfg: TrainConfig, rt: Runtime, start_run: bool) -> Trainer:
    defaults, cfg = cfg.auto_options(), cfg.on(rt)  # from here on: what this device trains with
    if cfg.freeze_epochs and not cfg.finetune:
        raise KdkitError("--freeze-epochs freezes a loaded backbone: give --finetune CHECKPOINT")
    kd = kd_mode(cfg.kd)(cfg)
    data = data_mod.prepare_data(cfg, kd)
    resume = read_resume_checkpoint(cfg) if start_run else None

    seed_everything(cfg.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
    configs = [cfg, peer_config(cfg)] if cfg.mutual else [cfg]  # the peer: the same seeded generator, later draws
    models = [student_model(c, data, rt, finetune=resume is None) for c in configs]
    kd.prepare(data, rt, lambda: autocast(cfg, rt))
    optimizers = [build_optimizer(c, m) for c, m in zip(configs, models)]  # before freezing: frozen parameters join later
    check_same_train_set(resume, data)
    saved = loader_state(resume, cfg, kd, data, rt)
    train_loader = data_mod.train_loader(cfg, kd, data, rt, None if isinstance(saved, list) else saved)
    data.train_identity = train_identity(data, train_loader.scan.keys)
    rest = rest_of_epoch(resume, saved, cfg, kd, data, rt) if isinstance(saved, list) else None
    updates_per_epoch = -(-len(train_loader) // cfg.grad_accum)
    students = [Student(c, m, m, o, build_scheduler(c, o, updates_per_epoch), criterion(c),
                        ema=ModelEmaV3(m, decay=cfg.ema_decay, use_warmup=cfg.ema_warmup) if cfg.ema and i == 0 else None,
                        prefix="peer_" if i else "", files=(PEER_LAST, PEER_BEST) if i else (LAST, BEST))
                for i, (c, m, o) in enumerate(zip(configs, models, optimizers))]
    t = Trainer(cfg=cfg, rt=rt, data=data, kd=kd, students=students,
                loaders=Loaders(train_loader, data_mod.eval_loader(cfg, data, rt), rest), run=RunDir(cfg, rt.is_main),
                scaler=torch.amp.GradScaler(rt.device.type, enabled=cfg.amp == "fp16"),
                sam=SAM(optimizers[0], cfg.sam_rho, cfg.sam_adaptive) if cfg.sam_rho > 0 else None)
    t.device_defaults = defaults
    if start_run:
        t.run.start(cfg, resuming=resume is not None)
    # each rank mixes and drops out differently; a resume replaces these with the saved states
    seed_everything(cfg.seed + 1_000 * (rt.rank + 1))
    if resume:
        restore(t, *resume)
        t.run.keep_metrics_until(t.at.epoch)
        t.at.history = [r for r in t.run.read_metrics() if r["epoch"] <= t.at.epoch]
    set_frozen(t, t.at.epoch < cfg.freeze_epochs)
    return t


def set_frozen(t: Trainer, frozen: bool) -> None:
    """Freeze or thaw the backbone and (re)wrap the models: DDP only syncs parameters that require
    grad when it is built, so DDP is rebuilt around the model when the set changes."""
    if frozen or t.frozen:
        set_backbone_frozen(t.student.model, frozen)
    t.frozen = frozen
    for s in t.students:
        s.net = wrap(t, s.model)


def wrap(t: Trainer, model: torch.nn.Module) -> torch.nn.Module:
    """What the training step calls: the model, in DDP across ranks, compiled with --compile."""
    net = model
    if t.rt.distributed:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[t.rt.device.index] if t.rt.device.type == "cuda" else None)
    return torch.compile(net) if t.cfg.compile else net
