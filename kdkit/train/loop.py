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
from kdkit.train.mutual import mutual_losses
from kdkit.train.runs import BEST, LAST, PEER_BEST, PEER_LAST
from kdkit.train.state import for_use, make_checkpoint, model_checkpoint


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


def step_losses(p: Parts, images, target, t_probs) -> torch.Tensor:
    """The loss of each model trained: (1,), or (2,) for the two students of mutual learning."""
    if p.peer is None:
        return p.criterion(p.net(images), target, t_probs).reshape(1)
    return mutual_losses(p.net(images), p.peer.net(images), target, p.criterion, p.peer.criterion,
                         p.cfg.kd_temperature, t_probs)


def train_step(p: Parts, batch, step: int, steps: int, mixing: bool) -> tuple[torch.Tensor, bool]:
    """One micro-batch; returns (its loss per model, detached; whether the optimizer stepped)."""
    cfg = p.cfg
    images, target, t_probs = make_targets(p, batch, mixing)
    group_start = step - step % cfg.grad_accum
    group_size = min(cfg.grad_accum, steps - group_start)  # the epoch's last group may be short
    update = step + 1 == group_start + group_size
    with contextlib.ExitStack() as sync:
        for net in trained_nets(p):
            if not update and hasattr(net, "no_sync"):
                sync.enter_context(net.no_sync())
        with p.autocast():
            loss = step_losses(p, images, target, t_probs)
        p.scaler.scale(loss.sum() / group_size).backward()  # the peers' graphs are apart: one backward each
    if update:
        if p.sam is not None:  # second pass at the perturbed weights; its gradient is the one applied
            p.sam.perturb()
            p.optimizer.zero_grad(set_to_none=True)
            with frozen_bn_stats(p.model), p.autocast():
                p.criterion(p.net(images), target, t_probs).backward()
            p.sam.restore()
        optimizer_update(p)
    return loss.detach(), update


def trained_nets(p: Parts) -> list[torch.nn.Module]:
    return [p.net] + ([p.peer.net] if p.peer is not None else [])


def trained(p: Parts) -> list[tuple[torch.nn.Module, torch.optim.Optimizer, object]]:
    """(model, optimizer, scheduler) of each model trained: the one, or mutual learning's two."""
    return [(p.model, p.optimizer, p.scheduler)] + (
        [(p.peer.model, p.peer.optimizer, p.peer.scheduler)] if p.peer is not None else [])


def optimizer_update(p: Parts) -> None:
    for model, optimizer, _ in trained(p):
        if p.cfg.clip_grad is not None:
            p.scaler.unscale_(optimizer)
            clip_gradients(p.cfg, [q for q in model.parameters() if q.grad is not None])
        p.scaler.step(optimizer)
    p.scaler.update()
    p.updates += 1
    for _, optimizer, scheduler in trained(p):
        optimizer.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step_update(num_updates=p.updates)
    if p.ema is not None:
        p.ema.update(p.model, step=p.updates)


# ---------------------------------------------------------------------------------------------
# one epoch

def check_finite(p: Parts, window: list[torch.Tensor], first_step: int, epoch: int, steps: int) -> None:
    """Stop on a NaN / inf loss, naming the first bad step; checked every log_interval steps (one
    device sync) on every rank together. Nothing is saved after it: last.pth stays the last good one."""
    if not window:
        return
    # per step, the first model's loss, or the first non-finite one among the models trained
    per_model = torch.stack(window).float()  # (steps, models)
    first_bad = (~torch.isfinite(per_model)).int().argmax(dim=1, keepdim=True)  # 0 where all are finite
    losses = per_model.gather(1, first_bad).view(-1)
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
    for model, _, _ in trained(p):
        model.train()
    if p.frozen:
        set_backbone_frozen(p.model, True)
    mixing = (cfg.mixup > 0 or cfg.cutmix > 0) and not (cfg.mix_off_epoch and epoch >= cfg.mix_off_epoch)
    steps = len(loader)
    models = len(trained(p))
    sums = dict(sums or {"loss": [0.0] * models, "samples": 0})
    loss_sum = torch.zeros(models, dtype=torch.float64, device=p.rt.device)
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
            bar.set_postfix(loss=f"{window[-1][0].item():.4f}", lr=f"{current_lr(p.optimizer):.3g}")
            window, window_start = [], step + 1
        if updated and cfg.checkpoint_every and p.updates % cfg.checkpoint_every == 0 and not last:
            check_finite(p, window, window_start, epoch, steps)
            window, window_start = [], step + 1
            saved = {"loss": epoch_losses(sums, loss_sum), "samples": sums["samples"]}
            p.run.save(LAST, make_checkpoint(p, epoch, step + 1, {}, saved))
        step += 1
    bar.close()
    if step != steps:
        raise KdkitError(f"epoch {epoch + 1}: the loader gave {step} of {steps} batches; did the shards change "
                         "since the run started? (`kdkit verify` them)")
    elapsed = time.perf_counter() - t0
    *loss_total, samples, wait_sum, time_sum = p.rt.reduce_sum(
        [*epoch_losses(sums, loss_sum), sums["samples"], wait, elapsed])
    row = {"train_loss": loss_total[0] / max(samples, 1), "samples": int(samples),
           "images_per_s": samples / max(time_sum / p.rt.world, 1e-9),
           "loader_wait_share": wait_sum / max(time_sum, 1e-9), "epoch_time_s": elapsed}
    if p.peer is not None:
        row["peer_train_loss"] = loss_total[1] / max(samples, 1)
    return row


def epoch_losses(sums: dict, loss_sum: torch.Tensor) -> list[float]:
    """The epoch's summed loss per model so far: a resumed epoch's saved sums plus this run's."""
    before = sums["loss"] if isinstance(sums["loss"], list) else [sums["loss"]]  # a last.pth from before per-model sums: one float
    return [a + b for a, b in zip(before, loss_sum.tolist())]


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
    if p.peer is not None:
        p.rt.broadcast_buffers(p.peer.model)
    if p.ema is not None:
        p.rt.broadcast_buffers(p.ema.module)
    if p.val_loader is not None and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs):
        val = evaluate(p.model, p.val_loader, p)
        row.update(val_loss=val["loss"], val_top1=val["top1"], val_top5=val["top5"])
        if p.ema is not None:
            ema = evaluate(p.ema.module, p.val_loader, p)
            row.update(ema_loss=ema["loss"], ema_top1=ema["top1"], ema_top5=ema["top5"])
        if p.peer is not None:
            peer = evaluate(p.peer.model, p.val_loader, p)
            row.update(peer_val_loss=peer["loss"], peer_val_top1=peer["top1"], peer_val_top5=peer["top5"])
    if cfg.sched != "plateau" or "val_top1" in row:  # plateau needs a metric
        for key, (_, _, scheduler) in zip(("val_top1", "peer_val_top1"), trained(p)):
            if scheduler is not None:
                scheduler.step(epoch + 1, row.get(key))
    is_best = "val_top1" in row and (p.best is None or row["val_top1"] > p.best)
    if is_best:
        p.best = row["val_top1"]
    peer_is_best = p.peer is not None and "peer_val_top1" in row and (
        p.peer.best is None or row["peer_val_top1"] > p.peer.best)
    if peer_is_best:
        p.peer.best = row["peer_val_top1"]
    ckpt = make_checkpoint(p, epoch + 1, 0, row, None)
    p.history.append(row)
    p.run.log_epoch(row, final=epoch + 1 == cfg.epochs)  # before the checkpoint: resume drops newer rows
    if is_best:
        p.run.save(BEST, for_use(ckpt))
    if p.peer is not None:
        peer_ckpt = model_checkpoint(p.peer.cfg, p.data, p.peer.model, None, epoch + 1, peer_metrics(row))
        p.run.save(PEER_LAST, peer_ckpt)
        if peer_is_best:
            p.run.save(PEER_BEST, peer_ckpt)
    p.run.save(LAST, ckpt)
    if p.rt.is_main:
        print(format_row(row, cfg.epochs), flush=True)
    return row


def peer_metrics(row: dict) -> dict:
    """The epoch's row as the peer's checkpoint reports it: its own numbers under the usual names."""
    own = {k: v for k, v in row.items() if not k.startswith(("val_", "ema_", "train_loss", "peer_"))}
    return {**own, **{k[len("peer_"):]: v for k, v in row.items() if k.startswith("peer_")}}


def format_row(row: dict, epochs: int) -> str:
    parts = [f"epoch {row['epoch']}/{epochs}", f"train_loss {row['train_loss']:.4f}"]
    if "peer_train_loss" in row:
        parts.append(f"peer_train_loss {row['peer_train_loss']:.4f}")
    for key in ("val_top1", "val_top5", "ema_top1", "peer_val_top1"):
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
            f"samples of {d.num_classes} classes; {kd_words(p)}; {cfg.epochs} epochs of {len(p.train_loader)} steps, "
            f"batch {cfg.batch_size}{f' samples x {cfg.views_per_load} views' if cfg.views_per_load > 1 else ''}"
            f"{f' x {p.rt.world} ranks' if p.rt.distributed else ''}; run folder "
            f"{p.run.path}{start}")


def kd_words(p: Parts) -> str:
    if p.peer is None:
        return f"KD {p.cfg.kd}"
    head = " with the AM-softmax head" if p.peer.cfg.am_softmax else ""
    teacher = f" and KD {p.cfg.kd}" if p.cfg.kd != "none" else ""
    return f"mutual learning with {p.peer.cfg.model}{head}{teacher}"


def closing_line(p: Parts) -> str:
    rows = [r for r in p.history if r.get("val_top1") is not None]
    best = (f"best val top-1 {p.best:.2f} % (epoch {max(rows, key=lambda r: r['val_top1'])['epoch']}, "
            f"{p.run.path / BEST})" if p.best is not None and rows else "no val set: no best.pth")
    if p.peer is not None:
        prow = [r for r in p.history if r.get("peer_val_top1") is not None]
        best += (f"; peer {p.peer.cfg.model}: best val top-1 {p.peer.best:.2f} % "
                 f"(epoch {max(prow, key=lambda r: r['peer_val_top1'])['epoch']}, {p.run.path / PEER_BEST})"
                 if p.peer.best is not None and prow else f"; peer {p.run.path / PEER_LAST}")
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
