"""The two pictures `kdkit eval` writes: the confusion matrix and the reliability diagram."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from kdkit import atomic

MAX_TICK_LABELS = 40  # above this many classes, axis labels would be unreadable: none are drawn


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt

    return plt


def confusion_png(confusion: list[list[int]], names: list[str], path: Path, title: str = "") -> None:
    """Row-normalised confusion matrix (each true class sums to 1), counts on the cells when small."""
    plt = _pyplot()
    cm = np.asarray(confusion, np.float64)
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    k = len(cm)
    size = min(4 + 0.35 * k, 16)
    fig, ax = plt.subplots(figsize=(size, size))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    if k <= MAX_TICK_LABELS:
        ax.set_xticks(range(k), names, rotation=90, fontsize=8)
        ax.set_yticks(range(k), names, fontsize=8)
    if k <= 15:
        for i in range(k):
            for j in range(k):
                if cm[i, j]:
                    ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=8,
                            color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title or "confusion matrix")
    fig.tight_layout()
    try:
        atomic.save_figure(fig, path, dpi=120)
    finally:
        plt.close(fig)


def reliability_png(bins: list[dict], ece: float, path: Path, title: str = "") -> None:
    """Accuracy per confidence bin against the diagonal, with the share of samples per bin below."""
    plt = _pyplot()
    lo = np.array([b["lo"] for b in bins])
    width = bins[0]["hi"] - bins[0]["lo"]
    acc = np.array([b["accuracy"] if b["count"] else 0.0 for b in bins])
    conf = np.array([b["confidence"] if b["count"] else np.nan for b in bins])
    counts = np.array([b["count"] for b in bins], np.float64)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(5, 6), height_ratios=[3, 1], sharex=True)
    top.bar(lo, acc, width=width, align="edge", edgecolor="black", color="tab:blue", label="accuracy")
    top.plot(lo + width / 2, conf, "o", color="tab:red", markersize=4, label="mean confidence")
    top.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.legend(loc="upper left", fontsize=8)
    top.set_title(title or f"reliability ({len(bins)} bins), ECE {100 * ece:.2f} %")
    bottom.bar(lo, counts / max(counts.sum(), 1), width=width, align="edge", edgecolor="black", color="tab:gray")
    bottom.set_xlim(0, 1)
    bottom.set_xlabel("confidence (top probability)")
    bottom.set_ylabel("share")
    fig.tight_layout()
    try:
        atomic.save_figure(fig, path, dpi=120)
    finally:
        plt.close(fig)
