"""`kdkit lr-find`: the LR range test (Smith, 2017; the OpenVINO seed's LR finder).

Train from the run's initial state with the learning rate growing exponentially from start_lr to
end_lr, one optimizer update per batch, through the same training step and loss as `kdkit train`
(KD, mixing and label smoothing included); record the loss, smoothed by an exponential moving
average, and stop once it exceeds `diverge` times its minimum. The suggested LR is where the
smoothed loss falls fastest (steepest negative slope against log LR) before its minimum, the
usual reading of the plot; lr_at_min / 10 is reported beside it as the conservative choice.
Writes lr_find.png and lr_find.json into the run folder. Single process (no DDP).
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from kdkit.errors import KdkitError
from kdkit import runtime
from kdkit.train.build import build
from kdkit.train.config import TrainConfig
from kdkit.train.loop import train_step


@dataclass
class LrFindResult:
    lrs: list[float]
    losses: list[float]  # smoothed
    raw_losses: list[float]
    suggested_lr: float
    lr_at_min: float
    png: Path | None = None

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "png": str(self.png) if self.png else None}


def lr_schedule(start_lr: float, end_lr: float, num_steps: int) -> np.ndarray:
    return start_lr * (end_lr / start_lr) ** (np.arange(num_steps) / max(num_steps - 1, 1))


def suggest(lrs: list[float], losses: list[float], skip: int = 3) -> tuple[float, float]:
    """(steepest-descent LR before the loss minimum, LR at the minimum)."""
    lo = int(np.argmin(losses))
    if lo <= skip + 1:
        return lrs[lo] / 10, lrs[lo]
    slope = np.gradient(np.asarray(losses[:lo + 1]), np.log10(np.asarray(lrs[:lo + 1])))
    return float(lrs[skip + int(np.argmin(slope[skip:]))]), float(lrs[lo])


def lr_find(cfg: TrainConfig, start_lr: float = 1e-7, end_lr: float = 10.0, num_steps: int = 100,
            smooth: float = 0.05, diverge: float = 4.0, out_dir: Path | None = None) -> LrFindResult:
    if not 0 < start_lr < end_lr:
        raise KdkitError(f"lr-find: need 0 < start-lr < end-lr, got {start_lr}, {end_lr}")
    cfg = dataclasses.replace(cfg, sched="none", ema=False, resume=None, val_split=None, grad_accum=1,
                              checkpoint_every=0, lr=start_lr, freeze_epochs=0)
    with runtime.start(cfg.device, announce="kdkit lr-find", distributed=False) as rt:
        lrs, raw, smoothed = _range_test(build(cfg, rt, start_run=False), start_lr, end_lr, num_steps, smooth,
                                         diverge)
    if len(lrs) < 5:
        raise KdkitError(f"lr-find: the loss diverged after {len(lrs)} steps; lower --start-lr")
    suggested, at_min = suggest(lrs, smoothed)
    result = LrFindResult(lrs, smoothed, raw, suggested, at_min)
    out = Path(out_dir) if out_dir else Path(cfg.output) / (cfg.name or f"lr-find-{cfg.model}")
    out.mkdir(parents=True, exist_ok=True)
    result.png = plot(result, out / "lr_find.png")
    (out / "lr_find.json").write_text(json.dumps(result.to_json(), indent=1))
    return result


def _range_test(t, start_lr: float, end_lr: float, num_steps: int, smooth: float, diverge: float):
    """(LRs, raw losses, smoothed losses) of one update per batch at exponentially growing LRs
    (t: kdkit.train.build.Trainer)."""
    for s in t.students:
        s.model.train()
    mixing = t.cfg.mixup > 0 or t.cfg.cutmix > 0
    lrs, raw, smoothed, avg, best = [], [], [], 0.0, math.inf
    batches = iter(t.loaders.train)
    bar = tqdm(total=num_steps, desc="lr-find", unit="step", disable=not t.cfg.progress, dynamic_ncols=True)
    for i, lr in enumerate(lr_schedule(start_lr, end_lr, num_steps)):
        bar.update(1)
        batch = next(batches, None)
        if batch is None:  # more steps than one epoch: the loader's next epoch, as training would
            batches = iter(t.loaders.train)
            batch = next(batches)
        for s in t.students:
            for group in s.optimizer.param_groups:
                group["lr"] = float(lr)
        loss = train_step(t, batch, 0, 1, mixing)[0][0].item()
        if not math.isfinite(loss):
            break
        avg = smooth * loss + (1 - smooth) * avg if i else loss
        lrs.append(float(lr))
        raw.append(loss)
        smoothed.append(avg)
        best = min(best, avg)
        bar.set_postfix(lr=f"{lr:.2g}", loss=f"{avg:.3f}")
        if avg > diverge * best:
            break
    bar.close()
    return lrs, raw, smoothed


def plot(r: LrFindResult, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(r.lrs, r.raw_losses, color="0.75", linewidth=0.8, label="loss")
    ax.plot(r.lrs, r.losses, label="smoothed loss")
    ax.axvline(r.suggested_lr, color="C3", linestyle="--", label=f"suggested {r.suggested_lr:.2g}")
    ax.axvline(r.lr_at_min, color="0.4", linestyle=":", label=f"minimum {r.lr_at_min:.2g}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.set_title(f"LR range test: {len(r.lrs)} steps, suggested LR {r.suggested_lr:.2g}")
    ax.set_ylim(bottom=0, top=min(max(r.raw_losses), 2 * max(r.losses)))  # a loss is never below zero
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
