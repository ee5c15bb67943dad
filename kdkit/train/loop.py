"""The training loop: `fit(cfg)` runs epochs of `train_step` and `evaluate`, writing the run folder.

Read top to bottom: train_step is one micro-batch (targets, forward, loss, backward, and an
optimizer update at the end of each accumulation group); train_one_epoch drives it over the DALI
loader with timing, NaN checks and mid-epoch checkpoints; end_epoch evaluates, steps the schedule
and saves; fit ties them together. Everything built before the first step is the Trainer
(kdkit.train.build): its students, its KD mode, its loaders and where the run stands. Nothing
here asks which KD mode it has (the mode makes the teacher targets) or how many students it trains
(mutual learning is two students, each against the other: kdkit.train.mutual).
"""
from __future__ import annotations

import contextlib
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from kdkit import runtime
from kdkit.errors import KdkitError
from kdkit.train.build import Student, Trainer, build, set_frozen
from kdkit.train.config import TrainConfig
from kdkit.train.losses import one_hot_smoothed
from kdkit.train.mix import NO_MIX, mix_batch
from kdkit.train.model import set_backbone_frozen
from kdkit.train.mutual import mutual_losses
from kdkit.train.optim import clip_gradients, current_lr
from kdkit.train.runs import LAST
from kdkit.train.state import for_use, make_checkpoint, model_checkpoint


class TrainingDiverged(KdkitError):
    """The loss became NaN or infinite; the last good checkpoint was kept."""


# ---------------------------------------------------------------------------------------------
# one step

def train_step(t: Trainer, batch, step: int, steps: int,
               mixing: bool) -> tuple[torch.Tensor, bool, torch.Tensor | None]:
    """One micro-batch; returns (its loss per student, detached; whether the optimizer stepped; whether
    its teacher targets were unusable, a device tensor read only if the loss is not finite).

    With the GPU backend the batch is already on the device. A CPU-backend batch feeding a GPU arrives
    in pageable memory, so its copy is synchronous; pinning it first would add a full copy on the CPU,
    the side that is short of time on that path: feed GPUs with the GPU backend instead."""
    cfg, dev = t.cfg, t.rt.device
    # targets: class probabilities (smoothed, mixed) and the KD mode's teacher targets for these images
    images = batch.images.to(dev, non_blocking=True)
    target = one_hot_smoothed(batch.labels.to(dev, non_blocking=True).view(-1), t.data.num_classes,
                              cfg.label_smoothing)
    images, target, mix = (mix_batch(images, target, cfg.mixup, cfg.cutmix, cfg.mix_prob, cfg.mix_switch_prob)
                           if mixing else (images, target, NO_MIX))
    teacher = t.kd.targets(batch, images, mix)
    bad_target = unusable_targets(teacher)
    # forward and backward; DDP syncs gradients only at the last micro-batch of an accumulation group
    group_start = step - step % cfg.grad_accum
    group_size = min(cfg.grad_accum, steps - group_start)  # the epoch's last group may be short
    update = step + 1 == group_start + group_size
    with contextlib.ExitStack() as sync:
        for s in t.students:
            if not update and hasattr(s.net, "no_sync"):
                sync.enter_context(s.net.no_sync())
        with t.autocast():
            loss = student_losses(t.students, [s.net(images) for s in t.students], target, teacher)
        t.scaler.scale(loss.sum() / group_size).backward()  # the students' graphs are apart: one backward each
    if update:
        if t.sam is not None:  # SAM: the gradient applied is the one at the perturbed weights
            s = t.student

            def loss_there():
                with t.autocast():
                    return s.criterion(s.net(images), target, teacher)
            t.sam.second_pass(loss_there, s.model)
        optimizer_update(t)
    return loss.detach(), update, bad_target


def unusable_targets(teacher) -> torch.Tensor | None:
    """Whether a batch's teacher targets hold what no loss survives: NaN, +inf, or a row of -inf only (a
    single -inf is top-k storage's "class left out"). A 0-dim device tensor: no sync per step."""
    if teacher is None:
        return None
    # one reduction per step: a row's max is NaN if it holds a NaN, +inf with a +inf, -inf if all are -inf
    return ~torch.isfinite(teacher.logits.amax(dim=-1)).all()


def student_losses(students: list[Student], logits: list[torch.Tensor], target, teacher) -> torch.Tensor:
    """The loss of each student, (1,) or (2,): against the labels and the teacher targets, and with
    mutual learning's two against each other too."""
    if len(students) == 1:
        return students[0].criterion(logits[0], target, teacher).reshape(1)
    return mutual_losses(logits, target, [s.criterion for s in students], teacher)


def optimizer_update(t: Trainer) -> None:
    for s in t.students:
        if t.cfg.clip_grad is not None:
            t.scaler.unscale_(s.optimizer)
            clip_gradients(t.cfg, [q for q in s.model.parameters() if q.grad is not None])
        t.scaler.step(s.optimizer)
    t.scaler.update()
    t.at.updates += 1
    for s in t.students:
        s.optimizer.zero_grad(set_to_none=True)
        if s.scheduler is not None:
            s.scheduler.step_update(num_updates=t.at.updates)
        if s.ema is not None:
            s.ema.update(s.model, step=t.at.updates)


# ---------------------------------------------------------------------------------------------
# one epoch

def check_finite(t: Trainer, window: list[torch.Tensor], first_step: int, epoch: int, steps: int,
                 targets: list | None = None) -> None:
    """Stop on a NaN / inf loss, naming the first bad step; checked every log_interval steps (one
    device sync) on every rank together. Nothing is saved after it: last.pth stays the last good one.
    `targets`: per step of the window, whether its teacher targets were unusable (train_step): then the
    message names them as the cause, instead of advising a lower learning rate."""
    if not window:
        return
    # per step, the first student's loss, or the first non-finite one among the students
    per_model = torch.stack(window).float()  # (steps, students)
    first_bad = (~torch.isfinite(per_model)).int().argmax(dim=1, keepdim=True)  # 0 where all are finite
    losses = per_model.gather(1, first_bad).view(-1)
    bad = ~torch.isfinite(losses)
    if t.rt.any(bool(bad.any())):
        i = int(bad.nonzero()[0]) if bad.any() else 0
        where = f"epoch {epoch + 1}, step {first_step + i + 1}/{steps}" if bad.any() else f"epoch {epoch + 1} (another rank)"
        kept = t.run.path / LAST
        cause = bad_target_step(targets, first_step, i if bad.any() else len(window) - 1)
        raise TrainingDiverged(
            f"loss is {losses[i].item() if bad.any() else 'nan'} at {where}; training stopped. "
            + (f"The last good checkpoint is kept: {kept}. " if kept.exists() else "No checkpoint was written yet. ")
            + (f"Cause: the teacher targets of step {cause} are not finite (NaN or inf) - {t.kd.words()}; "
               + (f"check the stored outputs with `kdkit verify --decode {t.cfg.data}` and write them again from a "
                  "sound teacher (a lower --lr will not help)" if t.kd.stored
                  else "is the teacher checkpoint diverged? (a lower --lr will not help)")
               if cause is not None else "Lower --lr, add warmup or --clip-grad, or use --amp bf16 instead of fp16."))


def bad_target_step(targets: list | None, first_step: int, upto: int) -> int | None:
    """The first step (1-based) up to window index `upto` whose teacher targets were unusable, if any."""
    for j, flag in enumerate((targets or [])[:upto + 1]):
        if flag is not None and bool(flag):
            return first_step + j + 1
    return None


class LoaderWait:
    """How long training waited for the loader in an epoch (the metrics' loader_wait_share), measured
    without making the host wait for the device every step.

    On the CPU it is the host's time in the loader's next(). On CUDA the host runs ahead of the GPU, so
    its own wait says little: two CUDA events on the training stream, one queued before asking the
    loader for a batch and one after, time the gap the GPU itself saw between the end of one step's
    work and the start of the next (the batch's copy into torch's tensors included): zero while the
    loader keeps ahead, the GPU's idle time when it does not. The events are read every log_interval
    steps, when the loop checks the loss anyway (that read waits for the device), and at the end of
    the epoch."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.seconds = 0.0
        self.pairs: list[tuple] = []
        self._start = None

    def before(self) -> None:
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._start = time.perf_counter()

    def after(self) -> None:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.pairs.append((self._start, end))
        else:
            self.seconds += time.perf_counter() - self._start

    def collect(self, finish: bool = False) -> float:
        """The seconds waited so far; finish=True at the end of the epoch waits for the device once."""
        if self.cuda and finish:
            torch.cuda.synchronize(self.device)
        if self.pairs:
            self.pairs[-1][1].synchronize()
            self.seconds += sum(a.elapsed_time(b) for a, b in self.pairs) / 1000  # ms
            self.pairs = []
        return self.seconds


def train_one_epoch(t: Trainer, epoch: int, start_step: int = 0, sums: dict | None = None) -> dict:
    """One epoch of the run's loader from step `start_step` on (a resumed loader yields just the rest
    of its epoch; one that could not be restored skips t.at.skip_batches first). A run resumed with
    another number of ranks first finishes the interrupted epoch from the old ranks' loaders
    (t.loaders.rest, kdkit.train.data.RestOfEpoch), without mid-epoch checkpoints."""
    cfg = t.cfg
    loader = t.loaders.train if t.loaders.rest is None else t.loaders.rest
    if (epoch < cfg.freeze_epochs) != t.frozen:
        set_frozen(t, epoch < cfg.freeze_epochs)
    for s in t.students:
        s.model.train()
        s.criterion.set_epoch(epoch)  # terms that ramp in over epochs (DKD's warmup)
    if t.frozen:
        set_backbone_frozen(t.student.model, True)
    mixing = (cfg.mixup > 0 or cfg.cutmix > 0) and not (cfg.mix_off_epoch and epoch >= cfg.mix_off_epoch)
    steps = len(loader)
    n = len(t.students)
    sums = dict(sums or {"loss": [0.0] * n, "samples": 0})
    loss_sum = torch.zeros(n, dtype=torch.float64, device=t.rt.device)
    skip, t.at.skip_batches = t.at.skip_batches, 0
    bar = tqdm(total=steps, initial=start_step, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch",
               disable=not (cfg.progress and t.rt.is_main), leave=False, dynamic_ncols=True)
    window, window_start, wait, t0 = [], start_step, LoaderWait(t.rt.device), time.perf_counter()
    targets: list = []  # per step of the window: its teacher targets were unusable (train_step)
    step = start_step - skip  # the step of the next batch the loader yields
    batches = iter(loader)
    while True:  # the loader's whole epoch: DALI's iterator starts the next one once this one is exhausted
        wait.before()
        batch = next(batches, None)
        if batch is None:
            break
        wait.after()
        if step < start_step:  # a fresh loader after a resume: trained on before the interruption
            step += 1
            continue
        loss, updated, bad_target = train_step(t, batch, step, steps, mixing)
        window.append(loss)
        targets.append(bad_target)
        loss_sum += loss * batch.labels.shape[0]
        sums["samples"] += int(batch.labels.shape[0])
        bar.update(1)
        last = step + 1 == steps
        if (step + 1) % cfg.log_interval == 0 or last:
            check_finite(t, window, window_start, epoch, steps, targets)
            wait.collect()
            bar.set_postfix(loss=f"{window[-1][0].item():.4f}", lr=f"{current_lr(t.student.optimizer):.3g}")
            window, window_start, targets = [], step + 1, []
        if (updated and cfg.checkpoint_every and t.at.updates % cfg.checkpoint_every == 0 and not last
                and loader is t.loaders.train):
            check_finite(t, window, window_start, epoch, steps, targets)
            window, window_start, targets = [], step + 1, []
            saved = {"loss": epoch_losses(sums, loss_sum), "samples": sums["samples"]}
            t.run.save(LAST, make_checkpoint(t, epoch, step + 1, {}, saved))
        step += 1
    bar.close()
    t.loaders.rest = None  # the interrupted epoch is done: its loaders go
    if step != steps:
        raise KdkitError(f"epoch {epoch + 1}: the loader gave {step} of {steps} batches; did the shards change "
                         "since the run started? (`kdkit verify` them)")
    waited = wait.collect(finish=True)
    elapsed = time.perf_counter() - t0
    *loss_total, samples, wait_sum, time_sum = t.rt.reduce_sum(
        [*epoch_losses(sums, loss_sum), sums["samples"], waited, elapsed])
    row = {"samples": int(samples), "images_per_s": samples / max(time_sum / t.rt.world, 1e-9),
           "loader_wait_share": wait_sum / max(time_sum, 1e-9), "epoch_time_s": elapsed}
    for s, total in zip(t.students, loss_total):
        row[f"{s.prefix}train_loss"] = total / max(samples, 1)
    return row


def epoch_losses(sums: dict, loss_sum: torch.Tensor) -> list[float]:
    """The epoch's summed loss per student so far: a resumed epoch's saved sums plus this run's."""
    before = sums["loss"] if isinstance(sums["loss"], list) else [sums["loss"]]  # a last.pth from before per-model sums: one float
    return [a + b for a, b in zip(before, loss_sum.tolist())]


# ---------------------------------------------------------------------------------------------
# evaluation and the end of an epoch

@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, t: Trainer) -> dict:
    """Loss, top-1 and top-k (%, k = min(5, classes), named top{k}: top5, or top3 on a 3-class set, as `kdkit eval`
    names it) over the val set; every sample counted once across the ranks."""
    model.eval()
    k = min(5, t.data.num_classes)
    # summed on the device (float64: counts stay exact): no batch waits for the device to answer, one
    # transfer at the end (reduce_sum)
    totals = torch.zeros(4, dtype=torch.float64, device=t.rt.device)  # loss, top-1 hits, top-k hits, samples
    for batch in loader:
        images = batch.images.to(t.rt.device, non_blocking=True)
        labels = batch.labels.to(t.rt.device, non_blocking=True).view(-1)
        with t.autocast():
            logits = model(images)
        logits = logits.float()
        hits = logits.topk(k, dim=1).indices == labels[:, None]
        totals += torch.stack([F.cross_entropy(logits, labels, reduction="sum").double(),
                               hits[:, 0].sum().double(), hits.any(dim=1).sum().double(),
                               torch.full((), labels.shape[0], dtype=torch.float64, device=t.rt.device)])
    loss, top1, topk, n = t.rt.reduce_sum(totals)
    return {"loss": loss / max(n, 1), "top1": 100 * top1 / max(n, 1), f"top{k}": 100 * topk / max(n, 1), "count": int(n)}


def end_epoch(t: Trainer, epoch: int, train: dict) -> dict:
    cfg = t.cfg
    row = {"epoch": epoch + 1, **train, "lr": current_lr(t.student.optimizer), "updates": t.at.updates}
    # every rank takes rank 0's BatchNorm statistics (models and EMA): each rank's last steps updated
    # its own on its own batches; so all ranks evaluate, and continue from, what rank 0 saves
    for s in t.students:
        t.rt.broadcast_buffers(s.model)
        if s.ema is not None:
            t.rt.broadcast_buffers(s.ema.module)
    if t.loaders.val is not None and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs):
        for s in t.students:
            val = evaluate(s.model, t.loaders.val, t)
            row.update({f"{s.prefix}val_{m}": v for m, v in val.items() if m != "count"})
            if s.ema is not None:
                ema = evaluate(s.ema.module, t.loaders.val, t)
                row.update({f"ema_{m}": v for m, v in ema.items() if m != "count"})
    if cfg.sched != "plateau" or "val_top1" in row:  # plateau needs a metric
        for s in t.students:
            if s.scheduler is not None:
                s.scheduler.step(epoch + 1, row.get(f"{s.prefix}val_top1"))
    improved = [s for s in t.students
                if f"{s.prefix}val_top1" in row and (s.best is None or row[f"{s.prefix}val_top1"] > s.best)]
    for s in improved:
        s.best = row[f"{s.prefix}val_top1"]
    ckpt = make_checkpoint(t, epoch + 1, 0, row, None)
    t.at.history.append(row)
    t.run.log_epoch(row, final=epoch + 1 == cfg.epochs)  # before the checkpoint: resume drops newer rows
    for s in t.students:
        last, best = s.files
        use = for_use(ckpt) if s is t.student else model_checkpoint(s.cfg, t.data, s.model, None, epoch + 1,
                                                                    own_metrics(row, s.prefix))
        if s in improved:
            t.run.save(best, use)
        if s is not t.student:
            t.run.save(last, use)
    t.run.save(LAST, ckpt)
    if t.rt.is_main:
        print(format_row(row, cfg.epochs), flush=True)
    return row


def own_metrics(row: dict, prefix: str) -> dict:
    """The epoch's row as one student's checkpoint reports it: its own numbers under the usual names."""
    if not prefix:
        return row
    shared = {k: v for k, v in row.items() if not k.startswith(("val_", "ema_", "train_loss", prefix))}
    return {**shared, **{k[len(prefix):]: v for k, v in row.items() if k.startswith(prefix)}}


def format_row(row: dict, epochs: int) -> str:
    parts = [f"epoch {row['epoch']}/{epochs}", f"train_loss {row['train_loss']:.4f}"]
    if "peer_train_loss" in row:
        parts.append(f"peer_train_loss {row['peer_train_loss']:.4f}")
    for key in ("val_top1", *(k for k in row if k.startswith("val_top") and k != "val_top1"), "ema_top1", "peer_val_top1"):
        if key in row:
            parts.append(f"{key} {row[key]:.2f}")
    parts += [f"lr {row['lr']:.3g}", f"{row['images_per_s']:.0f} img/s",
              f"loader wait {100 * row['loader_wait_share']:.0f}%"]
    return "  ".join(parts)


def opening_line(t: Trainer) -> str:
    cfg, d, at = t.cfg, t.data, t.at
    val = (f"{t.loaders.val.num_samples * t.rt.world} val samples" if t.loaders.val is not None else
           "no val set (no evaluation)")
    start = (f"; resuming at epoch {at.epoch + 1}" + (f", step {at.step + 1}" if at.step else "")
             if (at.epoch, at.step) != (0, 0) else "")
    rest = t.loaders.rest
    if rest is not None:
        start = (f"; resuming epoch {at.epoch + 1} where {rest.old_world} ranks left it: its remaining batches, "
                 f"{len(rest)} steps per rank here (no checkpoint until it ends)")
    return (f"kdkit train: {cfg.model} on {d.train.folder or cfg.data}: {t.loaders.train.scan.num_samples} train "
            f"samples of {d.num_classes} classes, {val}; {what_trains(t)}; {cfg.epochs} epochs of {len(t.loaders.train)} "
            f"steps, batch {cfg.batch_size}{f' samples x {cfg.views_per_load} views' if cfg.views_per_load > 1 else ''}"
            f"{f' x {t.rt.world} ranks' if t.rt.distributed else ''}{precision(t)}; run folder {t.run.path}{start}")


def precision(t: Trainer) -> str:
    """On CUDA: the autocast and memory format, and which of them are the device's defaults."""
    if t.rt.device.type != "cuda":
        return ""
    amp = "no" if t.cfg.amp == "none" else t.cfg.amp
    words = f"; {amp} autocast, {'channels-last' if t.cfg.channels_last else 'NCHW'}"
    flags = {"amp": "--amp none", "channels_last": "--no-channels-last"}
    chosen = [flags[k] for k in t.device_defaults if k in flags]
    return words + (f" (the CUDA defaults; {' / '.join(chosen)} to turn off)" if chosen else "")


def what_trains(t: Trainer) -> str:
    """The KD mode's words, mutual learning's peer, and the KD term of a run that has one."""
    term = getattr(t.student.criterion, "term", None)
    loss = f" ({term.words})" if term is not None and (t.kd.distills or len(t.students) > 1) else ""
    for peer in t.students[1:]:
        head = " with the AM-softmax head" if peer.cfg.am_softmax else ""
        return (f"mutual learning with {peer.cfg.model}{head}" + (f" and {t.kd.words()}" if t.kd.distills else "")
                + loss)
    return t.kd.words() + loss


def closing_line(t: Trainer) -> str:
    parts = []
    for s in t.students:
        key = f"{s.prefix}val_top1"
        rows = [r for r in t.at.history if r.get(key) is not None]
        last, best = s.files
        if s.best is not None and rows:
            parts.append(f"{'peer ' + s.cfg.model + ': ' if s.prefix else ''}best val top-1 {s.best:.2f} % (epoch "
                         f"{max(rows, key=lambda r: r[key])['epoch']}, {t.run.path / best})")
        else:
            parts.append(f"peer {t.run.path / last}" if s.prefix else "no val set: no best.pth")
    return f"kdkit train: done, {'; '.join(parts)}; last checkpoint {t.run.path / LAST}"


def fit(cfg: TrainConfig) -> list[dict]:
    """Train as configured (under torchrun: one rank of a DDP run); returns the per-epoch metrics."""
    with runtime.start(cfg.device, announce="kdkit train", deterministic=cfg.deterministic) as rt, \
            contextlib.ExitStack() as stack:
        t = build(cfg, rt)
        stack.callback(t.run.close)  # also on an error or Ctrl-C: the run folder's lock is released
        epoch, step, sums = t.at.epoch, t.at.step, t.at.sums
        if rt.is_main:
            print(opening_line(t), flush=True)
        if epoch >= cfg.epochs and rt.is_main:
            print(f"kdkit train: {t.run.path} already finished {epoch} of {cfg.epochs} epochs")
        for e in range(epoch, cfg.epochs):
            train = train_one_epoch(t, e, step, sums)
            end_epoch(t, e, train)
            step, sums = 0, None
        t.run.close()
        if rt.is_main:
            print(closing_line(t), flush=True)
        return t.at.history
