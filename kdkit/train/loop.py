"""The training loop: `fit(cfg)` runs epochs of `train_step` and `evaluate`, writing the run folder.

Read top to bottom: train_step is one micro-batch (targets, forward, loss, backward, and an
optimizer update at the end of each accumulation group); train_one_epoch drives it over the DALI
loader with timing, NaN checks and mid-epoch checkpoints; end_epoch evaluates, steps the schedule
and saves; fit ties them together. Everything built before the first step lives in build.Parts.
"""
from __future__ import annotations

import contextlib
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from kdkit import runtime
from kdkit.errors import KdkitError
from kdkit.train.build import Parts, build, set_frozen
from kdkit.train.config import TrainConfig
from kdkit.train.losses import dense_logits_from_topk, one_hot_smoothed, teacher_probs
from kdkit.train.mix import mix_batch
from kdkit.train.model import set_backbone_frozen
from kdkit.train.optim import clip_gradients, current_lr, frozen_bn_stats
from kdkit.train.runs import BEST, LAST
from kdkit.train.state import for_use, make_checkpoint


class TrainingDiverged(KdkitError):
    """The loss became NaN or infinite; the last good checkpoint was kept."""


# ---------------------------------------------------------------------------------------------
# one step

def make_targets(p: Parts, batch, mixing: bool):
    """Images and the two targets of a batch: class probabilities (smoothed, mixed) and teacher
    probabilities at temperature T (stored or replayed logits mixed with the same lambda; an
    online teacher run on the mixed images themselves) or None without KD.

    With the GPU backend the batch is already on the device. A CPU-backend batch feeding a GPU arrives
    in pageable memory, so its copy is synchronous; pinning it first would add a full copy on the CPU,
    the side that is short of time on that path: feed GPUs with the GPU backend instead."""
    cfg, dev = p.cfg, p.rt.device
    images = batch.images.to(dev, non_blocking=True)
    target = one_hot_smoothed(batch.labels.to(dev, non_blocking=True).view(-1), p.data.num_classes,
                              cfg.label_smoothing)
    t_probs = None
    if cfg.kd in ("stored", "replay"):
        t_probs = teacher_probs(stored_teacher_logits(batch, p.data.num_classes, dev, cfg.topk_target),
                                cfg.kd_temperature)
    if mixing:
        images, target, t_probs, _ = mix_batch(images, target, t_probs, cfg.mixup, cfg.cutmix, cfg.mix_prob,
                                               cfg.mix_switch_prob)
    if p.teacher is not None:
        with torch.no_grad(), p.autocast():
            t_probs = teacher_probs(p.teacher(images), cfg.kd_temperature)
    return images, target, t_probs


def stored_teacher_logits(batch, num_classes: int, dev: torch.device, topk_target: str = "renormalize"
                          ) -> torch.Tensor:
    """Dense teacher logits of a batch: as stored, or built from top-k (values, indices) when the
    loader yields that pair (top-k storage; `topk_target`: losses.dense_logits_from_topk)."""
    t = batch.teacher_logits
    if isinstance(t, (tuple, list)):
        return dense_logits_from_topk(t[0].to(dev, non_blocking=True), t[1].to(dev, non_blocking=True), num_classes,
                                      topk_target)
    return t.to(dev, non_blocking=True)


def train_step(p: Parts, batch, step: int, steps: int, mixing: bool) -> tuple[torch.Tensor, bool]:
    """One micro-batch; returns (its loss, detached; whether the optimizer stepped)."""
    cfg = p.cfg
    images, target, t_probs = make_targets(p, batch, mixing)
    group_start = step - step % cfg.grad_accum
    group_size = min(cfg.grad_accum, steps - group_start)  # the epoch's last group may be short
    update = step + 1 == group_start + group_size
    sync = contextlib.nullcontext() if update or not hasattr(p.net, "no_sync") else p.net.no_sync()
    with sync:
        with p.autocast():
            loss = p.criterion(p.net(images), target, t_probs)
        p.scaler.scale(loss / group_size).backward()
    if update:
        if p.sam is not None:  # second pass at the perturbed weights; its gradient is the one applied
            p.sam.perturb()
            p.optimizer.zero_grad(set_to_none=True)
            with frozen_bn_stats(p.model), p.autocast():
                p.criterion(p.net(images), target, t_probs).backward()
            p.sam.restore()
        optimizer_update(p)
    return loss.detach(), update


def optimizer_update(p: Parts) -> None:
    if p.cfg.clip_grad is not None:
        p.scaler.unscale_(p.optimizer)
        clip_gradients(p.cfg, [q for q in p.model.parameters() if q.grad is not None])
    p.scaler.step(p.optimizer)
    p.scaler.update()
    p.optimizer.zero_grad(set_to_none=True)
    p.updates += 1
    if p.ema is not None:
        p.ema.update(p.model, step=p.updates)
    if p.scheduler is not None:
        p.scheduler.step_update(num_updates=p.updates)


# ---------------------------------------------------------------------------------------------
# one epoch

def check_finite(p: Parts, window: list[torch.Tensor], first_step: int, epoch: int, steps: int) -> None:
    """Stop on a NaN / inf loss, naming the first bad step; checked every log_interval steps (one
    device sync) on every rank together. Nothing is saved after it: last.pth stays the last good one."""
    if not window:
        return
    losses = torch.stack(window).float()
    bad = ~torch.isfinite(losses)
    if p.rt.any(bool(bad.any())):
        i = int(bad.nonzero()[0]) if bad.any() else 0
        where = f"epoch {epoch + 1}, step {first_step + i + 1}/{steps}" if bad.any() else f"epoch {epoch + 1} (another rank)"
        kept = p.run.path / LAST
        raise TrainingDiverged(
            f"loss is {losses[i].item() if bad.any() else 'nan'} at {where}; training stopped. "
            + (f"The last good checkpoint is kept: {kept}. " if kept.exists() else "No checkpoint was written yet. ")
            + "Lower --lr, add warmup or --clip-grad, or use --amp bf16 instead of fp16.")


def train_one_epoch(p: Parts, epoch: int, start_step: int = 0, sums: dict | None = None) -> dict:
    """One epoch of the run's loader from step `start_step` on (a resumed loader yields just the rest
    of its epoch; one that could not be restored skips p.skip_batches first)."""
    cfg = p.cfg
    loader = p.train_loader
    if (epoch < cfg.freeze_epochs) != p.frozen:
        set_frozen(p, epoch < cfg.freeze_epochs)
    p.model.train()
    if p.frozen:
        set_backbone_frozen(p.model, True)
    mixing = (cfg.mixup > 0 or cfg.cutmix > 0) and not (cfg.mix_off_epoch and epoch >= cfg.mix_off_epoch)
    steps = len(loader)
    sums = dict(sums or {"loss": 0.0, "samples": 0})
    loss_sum = torch.zeros((), dtype=torch.float64, device=p.rt.device)
    skip, p.skip_batches = p.skip_batches, 0
    bar = tqdm(total=steps, initial=start_step, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch",
               disable=not (cfg.progress and p.rt.is_main), leave=False, dynamic_ncols=True)
    window, window_start, wait, t0 = [], start_step, 0.0, time.perf_counter()
    step = start_step - skip  # the step of the next batch the loader yields
    batches = iter(loader)
    cuda = p.rt.device.type == "cuda"
    while True:  # the loader's whole epoch: DALI's iterator starts the next one once this one is exhausted
        # the wait for data starts once the GPU has finished the previous step: without the sync, next()
        # would also wait for the model (DALI's iterator syncs the host anyway, so this costs nothing)
        if cuda:
            torch.cuda.synchronize(p.rt.device)
        t = time.perf_counter()
        batch = next(batches, None)
        wait += time.perf_counter() - t
        if batch is None:
            break
        if step < start_step:  # a fresh loader after a resume: trained on before the interruption
            step += 1
            continue
        loss, updated = train_step(p, batch, step, steps, mixing)
        window.append(loss)
        loss_sum += loss * batch.labels.shape[0]
        sums["samples"] += int(batch.labels.shape[0])
        bar.update(1)
        last = step + 1 == steps
        if (step + 1) % cfg.log_interval == 0 or last:
            check_finite(p, window, window_start, epoch, steps)
            bar.set_postfix(loss=f"{window[-1].item():.4f}", lr=f"{current_lr(p.optimizer):.3g}")
            window, window_start = [], step + 1
        if updated and cfg.checkpoint_every and p.updates % cfg.checkpoint_every == 0 and not last:
            check_finite(p, window, window_start, epoch, steps)
            window, window_start = [], step + 1
            saved = {"loss": sums["loss"] + loss_sum.item(), "samples": sums["samples"]}
            p.run.save(LAST, make_checkpoint(p, epoch, step + 1, {}, saved))
        step += 1
    bar.close()
    if step != steps:
        raise KdkitError(f"epoch {epoch + 1}: the loader gave {step} of {steps} batches; did the shards change "
                         "since the run started? (`kdkit verify` them)")
    elapsed = time.perf_counter() - t0
    loss_total, samples, wait_sum, time_sum = p.rt.reduce_sum(
        [sums["loss"] + loss_sum.item(), sums["samples"], wait, elapsed])
    return {"train_loss": loss_total / max(samples, 1), "samples": int(samples),
            "images_per_s": samples / max(time_sum / p.rt.world, 1e-9),
            "loader_wait_share": wait_sum / max(time_sum, 1e-9), "epoch_time_s": elapsed}


# ---------------------------------------------------------------------------------------------
# evaluation and the end of an epoch

@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, p: Parts) -> dict:
    """Loss, top-1 and top-5 (%) over the val set; every sample counted once across the ranks."""
    model.eval()
    k = min(5, p.data.num_classes)
    loss = top1 = top5 = n = 0.0
    for batch in loader:
        images = batch.images.to(p.rt.device, non_blocking=True)
        labels = batch.labels.to(p.rt.device, non_blocking=True).view(-1)
        with p.autocast():
            logits = model(images)
        logits = logits.float()
        loss += F.cross_entropy(logits, labels, reduction="sum").item()
        hits = logits.topk(k, dim=1).indices == labels[:, None]
        top1 += hits[:, 0].sum().item()
        top5 += hits.any(dim=1).sum().item()
        n += labels.shape[0]
    loss, top1, top5, n = p.rt.reduce_sum([loss, top1, top5, n])
    return {"loss": loss / max(n, 1), "top1": 100 * top1 / max(n, 1), "top5": 100 * top5 / max(n, 1), "count": int(n)}


def end_epoch(p: Parts, epoch: int, train: dict) -> dict:
    cfg = p.cfg
    row = {"epoch": epoch + 1, **train, "lr": current_lr(p.optimizer), "updates": p.updates}
    # every rank takes rank 0's BatchNorm statistics (model and EMA): each rank's last steps updated
    # its own on its own batches; so all ranks evaluate, and continue from, what rank 0 saves
    p.rt.broadcast_buffers(p.model)
    if p.ema is not None:
        p.rt.broadcast_buffers(p.ema.module)
    if p.val_loader is not None and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs):
        val = evaluate(p.model, p.val_loader, p)
        row.update(val_loss=val["loss"], val_top1=val["top1"], val_top5=val["top5"])
        if p.ema is not None:
            ema = evaluate(p.ema.module, p.val_loader, p)
            row.update(ema_loss=ema["loss"], ema_top1=ema["top1"], ema_top5=ema["top5"])
    if p.scheduler is not None and (cfg.sched != "plateau" or "val_top1" in row):  # plateau needs a metric
        p.scheduler.step(epoch + 1, row.get("val_top1"))
    is_best = "val_top1" in row and (p.best is None or row["val_top1"] > p.best)
    if is_best:
        p.best = row["val_top1"]
    ckpt = make_checkpoint(p, epoch + 1, 0, row, None)
    p.history.append(row)
    p.run.log_epoch(row, final=epoch + 1 == cfg.epochs)  # before the checkpoint: resume drops newer rows
    if is_best:
        p.run.save(BEST, for_use(ckpt))
    p.run.save(LAST, ckpt)
    if p.rt.is_main:
        print(format_row(row, cfg.epochs), flush=True)
    return row


def format_row(row: dict, epochs: int) -> str:
    parts = [f"epoch {row['epoch']}/{epochs}", f"train_loss {row['train_loss']:.4f}"]
    for key in ("val_top1", "val_top5", "ema_top1"):
        if key in row:
            parts.append(f"{key} {row[key]:.2f}")
    parts += [f"lr {row['lr']:.3g}", f"{row['images_per_s']:.0f} img/s",
              f"loader wait {100 * row['loader_wait_share']:.0f}%"]
    return "  ".join(parts)


def opening_line(p: Parts) -> str:
    cfg, d = p.cfg, p.data
    val = f", {p.val_loader.num_samples * p.rt.world} val" if p.val_loader is not None else ", no val set"
    start = f"; resuming at epoch {p.start[0] + 1}" + (f", step {p.start[1] + 1}" if p.start[1] else "") \
        if p.start != (0, 0, None) else ""
    return (f"kdkit train: {cfg.model} on {d.train.folder or cfg.data}: {p.train_loader.scan.num_samples} train{val} "
            f"samples of {d.num_classes} classes; KD {cfg.kd}; {cfg.epochs} epochs of {len(p.train_loader)} steps, "
            f"batch {cfg.batch_size}{f' samples x {cfg.views_per_load} views' if cfg.views_per_load > 1 else ''}"
            f"{f' x {p.rt.world} ranks' if p.rt.distributed else ''}; run folder "
            f"{p.run.path}{start}")


def closing_line(p: Parts) -> str:
    rows = [r for r in p.history if r.get("val_top1") is not None]
    best = (f"best val top-1 {p.best:.2f} % (epoch {max(rows, key=lambda r: r['val_top1'])['epoch']}, "
            f"{p.run.path / BEST})" if p.best is not None and rows else "no val set: no best.pth")
    return f"kdkit train: done, {best}; last checkpoint {p.run.path / LAST}"


def fit(cfg: TrainConfig) -> list[dict]:
    """Train as configured (under torchrun: one rank of a DDP run); returns the per-epoch metrics."""
    with runtime.start(cfg.device, announce="kdkit train") as rt:
        p = build(cfg, rt)
        epoch, step, sums = p.start
        if rt.is_main:
            print(opening_line(p), flush=True)
        if epoch >= cfg.epochs and rt.is_main:
            print(f"kdkit train: {p.run.path} already finished {epoch} of {cfg.epochs} epochs")
        for e in range(epoch, cfg.epochs):
            train = train_one_epoch(p, e, step, sums)
            end_epoch(p, e, train)
            step, sums = 0, None
        p.run.close()
        if rt.is_main:
            print(closing_line(p), flush=True)
        return p.history
