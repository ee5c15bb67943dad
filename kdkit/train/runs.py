"""The run folder, `runs/<name>/`: what a training run leaves for people and later stages.

    config.yaml     the resolved config (defaults < recipe < flags); `-c runs/x/config.yaml` reruns it
    metrics.jsonl   one JSON object per epoch: train loss, val top-1/top-k (val_top5, or val_top3 on a 3-class
                    set: k = min(5, classes), as `kdkit eval`; and EMA's), LR,
                    images/s, loader wait share (the share of the epoch spent waiting for the next
                    batch after the previous step finished on the device), epoch time
    last.pth        kdkit checkpoint after the latest epoch (or N updates), with train_state: resume
    best.pth        the epoch with the best val top-1 (train_state dropped: it is for using, not resuming)
    peer_best.pth, peer_last.pth    `kdkit train mutual`: the second student's best and latest epoch
                    (for using; its resume state is in last.pth); its numbers are the peer_* metrics
    curves.png      loss, accuracy and LR per epoch
    tb/             TensorBoard events (--tensorboard)

Only rank 0 writes; on other ranks every method here does nothing. Rank 0 holds `runs/.<name>.kdkit-lock`
(kdkit.locks) from before it reads or writes the folder: a second run there is refused at once. The lock
lies beside the folder, so a run refused before it starts leaves no folder behind.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import yaml

from kdkit import atomic, locks
from kdkit.errors import KdkitError
from kdkit.models.checkpoint import save_checkpoint
from kdkit.train.config import TrainConfig, config_diff, save_config

CONFIG, METRICS, LAST, BEST, CURVES = "config.yaml", "metrics.jsonl", "last.pth", "best.pth", "curves.png"
PEER_LAST, PEER_BEST = "peer_last.pth", "peer_best.pth"  # mutual learning's second student (kdkit.train.mutual)


def lock_run(folder: Path) -> locks.Lock:
    """The run folder's lock, taken before anything in it is read or written (kdkit.locks)."""
    return locks.beside(folder, f"the run folder {folder}",
                        "wait for that run to finish, or give this one another --name (or --output)")


class RunDir:
    def __init__(self, cfg: TrainConfig, is_main: bool = True):
        self.path = cfg.run_dir
        self.is_main = is_main
        self._tb = None
        # the clock starts with the run: a run shorter than 30 s draws its curves once, at the end, not also
        # after its first epoch (a second drawing, matplotlib's ~1 s, for every short run)
        self._plotted = time.monotonic()
        self.lock: locks.Lock | None = None  # kdkit.train.build takes it first thing; close() releases it

    def start(self, cfg: TrainConfig, resuming: bool) -> None:
        """Create the folder and write config.yaml; refuse to overwrite a run that has checkpoints."""
        if not self.is_main:
            return
        if not resuming and (self.path / LAST).exists():
            raise KdkitError(f"{self.path} already holds a run ({LAST}); pass --resume to continue it, or a "
                             "new --name")
        self.path.mkdir(parents=True, exist_ok=True)
        old = self.path / CONFIG
        if resuming and old.exists():
            for key, (before, now) in config_diff(yaml.safe_load(old.read_text()) or {}, cfg).items():
                print(f"kdkit train: resuming with {key}={now!r} (the run started with {before!r})")
        save_config(cfg, old)
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise KdkitError("--tensorboard needs the tensorboard package (pip install tensorboard)") from None
            self._tb = SummaryWriter(str(self.path / "tb"))

    # -- metrics ---------------------------------------------------------------------------------
    def read_metrics(self) -> list[dict]:
        p = self.path / METRICS
        return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.exists() else []

    def keep_metrics_until(self, epoch: int) -> None:
        """On resume: drop rows of epochs after the checkpoint's (written, then killed before saving)."""
        if self.is_main and (self.path / METRICS).exists():
            rows = [r for r in self.read_metrics() if r.get("epoch", 0) <= epoch]
            atomic.write_text(self.path / METRICS, "".join(json.dumps(r) + "\n" for r in rows))

    def log_epoch(self, row: dict, final: bool = False) -> None:
        """Append the epoch's row; redraw curves.png after the last epoch and at most every 30 s
        before it (drawing costs ~0.5 s, more than a whole epoch of a tiny test run)."""
        if not self.is_main:
            return
        atomic.append(self.path / METRICS, json.dumps(row) + "\n")  # a full disk never leaves half a row
        if self._tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "epoch":
                    self._tb.add_scalar(k, v, row["epoch"])
            self._tb.flush()
        if final or time.monotonic() - self._plotted > 30:
            plot_curves(self.read_metrics(), self.path / CURVES)
            self._plotted = time.monotonic()

    # -- checkpoints -------------------------------------------------------------------------------
    def save(self, name: str, ckpt: dict) -> Path | None:
        if not self.is_main:
            return None
        path = self.path / name
        save_checkpoint(path, ckpt)
        return path

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def plot_curves(rows: list[dict], out: Path) -> None:
    """Loss, accuracy and LR against epoch as one PNG (matplotlib's Agg backend: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        return
    epochs = [r["epoch"] for r in rows]

    def series(key):
        pts = [(r["epoch"], r[key]) for r in rows if r.get(key) is not None]
        return ([e for e, _ in pts], [v for _, v in pts]) if pts else None

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    tops = sorted({k for r in rows for k in r if "_top" in k})  # top-k is top5, or top3 on 3 classes
    for ax, keys, title in ((axes[0], ("train_loss", "val_loss", "peer_train_loss", "peer_val_loss"), "loss"),
                            (axes[1], tops, "accuracy (%)"),
                            (axes[2], ("lr",), "learning rate (end of epoch)")):
        for key in keys:
            s = series(key)
            if s:
                ax.plot(*s, marker="o", markersize=3, label=key)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    axes[0].set_xlim(0.5, max(epochs) + 0.5)
    from matplotlib.ticker import MaxNLocator

    for ax in axes:  # epochs are whole numbers
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    try:
        atomic.save_figure(fig, out, dpi=80)
    finally:
        plt.close(fig)
