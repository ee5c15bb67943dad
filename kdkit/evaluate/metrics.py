"""Classification metrics from predicted probabilities: plain numpy, so a test can recompute
every number by hand.

Conventions: `probs` is (N, K) (already averaged over views and ensemble members), `labels` (N,)
class indices. The prediction is the arg-max (first index on ties). A sample counts for top-k
when fewer than k classes have a strictly higher probability than its true class.
Calibration is the expected calibration error of Guo et al. (2017) over 15 equal-width confidence
bins ((m-1)/15, m/15]: ECE = sum_m |B_m|/N * |accuracy(B_m) - mean confidence(B_m)|, with the
confidence of a sample = its top probability.
Average precision (AP) of a class is scikit-learn's `average_precision_score` on the one-vs-rest
problem "is it this class", scored by the class's probability: AP = sum_n (R_n - R_{n-1}) P_n over
the distinct scores taken as thresholds from the highest down (tied scores form one threshold), the
step-wise area under the precision-recall curve without interpolation. mAP (the OpenVINO seed's
headline metric) is the mean over the classes present in the evaluated set: a class without samples
has no recall, so its AP is undefined (None), it is left out of the mean and listed by id.
"""
from __future__ import annotations

import numpy as np

ECE_BINS = 15


def predictions(probs: np.ndarray) -> np.ndarray:
    return probs.argmax(axis=1)


def topk_correct(probs: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """(N,) bool: the true class is among the k most probable."""
    true_p = probs[np.arange(len(labels)), labels]
    return (probs > true_p[:, None]).sum(axis=1) < k


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """(K, K) counts; row = true class, column = predicted class."""
    cm = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(cm, (labels, preds), 1)
    return cm


def calibration_bins(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> list[dict]:
    """Per confidence bin: its edges, sample count, accuracy and mean confidence (None when empty)."""
    conf = probs.max(axis=1)
    correct = predictions(probs) == labels
    idx = np.clip(np.ceil(conf * bins).astype(int) - 1, 0, bins - 1)  # bin m holds ((m-1)/M, m/M]
    out = []
    for m in range(bins):
        sel = idx == m
        n = int(sel.sum())
        out.append({"lo": m / bins, "hi": (m + 1) / bins, "count": n,
                    "accuracy": float(correct[sel].mean()) if n else None,
                    "confidence": float(conf[sel].mean()) if n else None})
    return out


def expected_calibration_error(bins: list[dict], total: int) -> float:
    return float(sum(b["count"] / total * abs(b["accuracy"] - b["confidence"]) for b in bins if b["count"]))


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of the true class (probabilities floored at 1e-12)."""
    return float(-np.log(np.maximum(probs[np.arange(len(labels)), labels], 1e-12)).mean())


def average_precision(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """AP of one binary problem exactly as sklearn.metrics.average_precision_score (which kdkit does not
    depend on: it is these few lines); None when there is no positive sample."""
    positive = np.asarray(positive, bool)
    if not positive.any():
        return None
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    scores, positive = np.asarray(scores, np.float64)[order], positive[order]
    last = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]  # last index of each distinct score
    tp = np.cumsum(positive)[last]
    precision, recall = tp / (last + 1), tp / tp[-1]
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def mean_average_precision(probs: np.ndarray, labels: np.ndarray) -> tuple[float | None, list[float | None]]:
    """(mAP over the classes that have samples, per-class AP with None for classes without any)."""
    ap = [average_precision(probs[:, c], labels == c) for c in range(probs.shape[1])]
    present = [a for a in ap if a is not None]
    return (float(np.mean(present)) if present else None), ap


def classification_metrics(probs: np.ndarray, labels: np.ndarray, class_ids: list[str], class_names: list[str],
                           bins: int = ECE_BINS) -> dict:
    """Everything `kdkit eval` reports for clean data, as JSON-ready Python values."""
    probs = np.asarray(probs, np.float64)
    labels = np.asarray(labels, np.int64)
    n, k = probs.shape
    if n == 0:
        raise ValueError("no samples to evaluate")
    if labels.min() < 0 or labels.max() >= k:
        raise ValueError(f"labels outside 0..{k - 1} (max {labels.max()})")
    preds = predictions(probs)
    top5_k = min(5, k)
    cm = confusion_matrix(labels, preds, k)
    support = cm.sum(axis=1)
    cal = calibration_bins(probs, labels, bins)
    m_ap, ap = mean_average_precision(probs, labels)
    return {
        "num_samples": int(n),
        "top1": float((preds == labels).mean()),
        "top5": float(topk_correct(probs, labels, top5_k).mean()),
        "top5_k": top5_k,  # 5, or the class count when there are fewer classes
        "nll": nll(probs, labels),
        "ece": expected_calibration_error(cal, n),
        "ece_bins": bins,
        "map": m_ap,  # mean of per-class AP over the classes with samples (None if none has)
        "map_classes": sum(a is not None for a in ap),
        "ap_undefined": [class_ids[i] for i in range(k) if ap[i] is None],  # no samples: left out of mAP
        "per_class": [{"index": i, "id": class_ids[i], "name": class_names[i], "support": int(support[i]),
                       "top1": float(cm[i, i] / support[i]) if support[i] else None, "ap": ap[i]}
                      for i in range(k)],
        "confusion": cm.tolist(),
        "reliability": cal,
    }
