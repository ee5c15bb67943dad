"""`kdkit eval`: accuracy, per-class accuracy and AP, mAP, confusion, calibration and (optionally) corruption
robustness of one checkpoint or an ensemble, on a shard set read by the DALI eval pipeline.

    report = evaluate(EvalConfig(checkpoints=["runs/r50/best.pt"], data="shards/imagenet", views="tencrop"))
    print(format_report(report)); write_outputs(report, Path("runs/r50/eval"))

Views: "center" (resize the shorter side to image_size / crop_ratio, centre crop), "flip" (centre
+ mirror) or "tencrop" (four corners + centre, each mirrored: the TF2 seed's 10-crop test).
Probabilities are averaged over views, then over the checkpoints of an ensemble (models.ensemble_probs).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from kdkit import __version__, atomic, runtime
from kdkit.errors import KdkitError
from kdkit.evaluate import metrics
from kdkit.evaluate.ensemble import ensemble_probs, load_models, open_eval_set
from kdkit.models.checkpoint import ModelInfo
from kdkit.options import same_as
from kdkit.pipelines.options import Backend, decoding

if TYPE_CHECKING:
    from kdkit.evaluate.robustness import RobustnessConfig  # imported when used: it pulls in scipy


@dataclass
class EvalConfig:
    checkpoints: list[Path]  # several: averaged as an ensemble
    data: Path  # a shard-set folder, or a dataset root holding `split`
    split: str = "val"
    views: str = "center"  # "center" | "flip" | "tencrop"
    crop_ratio: float = 0.875  # image_size / resized shorter side (224/256)
    batch_size: int = 64
    num_threads: int | None = None  # DALI threads; None: the cores / local ranks on the GPU, 2 on the CPU
    device: str = "cpu"  # "gpu": DALI decodes on the GPU and the models run there; "auto": the GPU if any
    amp: bool = True  # on the GPU: fp16 autocast and channels-last, as in training (probabilities in fp32)
    prefer_ema: bool = True  # use the checkpoint's EMA weights when it has them
    model_name: str | None = None  # for bare timm/torchvision state dicts
    trust_checkpoint: bool = False  # load pickled Python objects too (runs their code: trusted files only)
    ece_bins: int = metrics.ECE_BINS
    robustness: RobustnessConfig | None = None  # corruption errors and mCE too, when given
    extra: dict = field(default_factory=dict)  # recorded in the report as given (e.g. the command line)
    hw_decoder_load: float | None = same_as(Backend, "hw_decoder_load")  # the GPU decoder (DECODING)
    preallocate_width_hint: int | None = same_as(Backend, "preallocate_width_hint")
    preallocate_height_hint: int | None = same_as(Backend, "preallocate_height_hint")


def threads(cfg: EvalConfig, rt: runtime.Runtime) -> int:
    """DALI threads: as given, else the GPU's default (kdkit.runtime.dali_threads) or 2 on the CPU."""
    return runtime.dali_threads(cfg.num_threads, rt.dali_device == "gpu", cpu=2)


def collect_probs(models, infos: list[ModelInfo], shards, cfg: EvalConfig,
                  rt: runtime.Runtime | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(probs (N, K), labels (N,)) over the whole set, in stored order."""
    from kdkit.pipelines import eval_loader

    rt = rt or runtime.Runtime()
    gpu = rt.device.type == "cuda"
    loader = eval_loader(shards, infos[0].transform(cfg.crop_ratio), cfg.batch_size,
                         threads(cfg, rt), rt, views=cfg.views, **decoding(cfg))
    if gpu:
        models = [m.to(memory_format=torch.channels_last) for m in models]
    probs, labels = [], []
    for images, y, _ in loader:
        with torch.autocast(rt.device.type, dtype=torch.float16, enabled=gpu and cfg.amp):
            p = ensemble_probs(models, images.to(rt.device))
        # copied back without waiting (into pinned memory): the host queues the next batch meanwhile, and
        # the device keeps no more than a batch of probabilities; one sync below, before they are read
        probs.append(p.to("cpu", non_blocking=gpu))
        labels.append(y.to("cpu", non_blocking=gpu))
    if gpu:
        torch.cuda.synchronize(rt.device)
    if not probs:
        return np.zeros((0, 0), np.float32), np.zeros(0, np.int64)
    return torch.cat(probs).numpy(), torch.cat(labels).view(-1).numpy()


def evaluate(cfg: EvalConfig) -> dict:
    """Run the evaluation `cfg` describes and return the report (JSON-ready)."""
    from kdkit.pipelines.eval import EVAL_VIEWS

    if cfg.views not in EVAL_VIEWS:
        raise KdkitError(f"views {cfg.views!r}: expected one of {', '.join(EVAL_VIEWS)}")
    decoding(cfg)  # the decoder's options, checked as the flags check them
    t0 = time.perf_counter()
    with runtime.start(cfg.device, announce="kdkit eval", distributed=False) as rt:
        cfg = dataclasses.replace(cfg, num_threads=threads(cfg, rt))
        models, infos = load_models(cfg.checkpoints, cfg.prefer_ema, cfg.model_name, rt.device, cfg.trust_checkpoint)
        shards = open_eval_set(cfg.data, cfg.split, infos)
        probs, labels = collect_probs(models, infos, shards, cfg, rt)
        robustness = None
        if cfg.robustness is not None:
            from kdkit.evaluate.robustness import evaluate_robustness

            robustness = evaluate_robustness(models, infos, shards, cfg, cfg.robustness, rt)
    info = infos[0]
    try:
        scores = metrics.classification_metrics(probs, labels, info.class_ids(), info.class_names(), cfg.ece_bins)
    except ValueError as e:  # labels beyond the model's classes: only possible without a manifest to check
        raise KdkitError(f"{shards.folder or cfg.data}: {e}; the set does not match {info.source}") from None
    report = {
        "kdkit_version": __version__,
        "models": [i.to_json() for i in infos],
        "ensemble": len(infos) > 1,
        "data": {"path": str(shards.folder or cfg.data), "split": cfg.split,
                 "classes_checked": shards.manifest is not None},
        "transform": {"image_size": info.image_size, "crop_ratio": cfg.crop_ratio, "views": cfg.views,
                      "num_views": EVAL_VIEWS[cfg.views], "mean": list(info.mean), "std": list(info.std),
                      "averaging": "softmax probabilities, over views then over models"},
        "metrics": scores,
        **({"extra": cfg.extra} if cfg.extra else {}),
    }
    if robustness is not None:
        report["robustness"] = robustness
    report["seconds"] = round(time.perf_counter() - t0, 2)
    return report


def write_outputs(report: dict, out: Path, json_path: Path | None = None, plots: bool = True) -> list[Path]:
    """metrics.json (or json_path), confusion.png and reliability.png; returns the files written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = Path(json_path) if json_path else out / "metrics.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_json(json_path, report)
    written = [json_path]
    if plots:
        from kdkit.evaluate.plots import confusion_png, reliability_png

        m = report["metrics"]
        names = [c["name"] or c["id"] for c in m["per_class"]]
        confusion_png(m["confusion"], names, out / "confusion.png",
                      title=f"confusion ({m['num_samples']} samples, top-1 {100 * m['top1']:.2f} %)")
        reliability_png(m["reliability"], m["ece"], out / "reliability.png")
        written += [out / "confusion.png", out / "reliability.png"]
    return written


def _map_line(m: dict) -> str:
    """mAP, and which classes it leaves out (no samples in the set: AP undefined)."""
    if m.get("map") is None:
        return f"{'mAP':<10}{'-':>8}     (no class has samples)"
    absent = m["ap_undefined"]
    note = (f"; {len(absent)} without samples left out: {', '.join(absent[:5])}{', ...' if len(absent) > 5 else ''}"
            if absent else "")
    return f"{'mAP':<10}{100 * m['map']:>8.2f} %   (mean one-vs-rest AP over {m['map_classes']} classes{note})"


def format_report(report: dict, max_classes: int = 20) -> str:
    """The table `kdkit eval` prints."""
    m, t = report["metrics"], report["transform"]
    models = ", ".join(f"{x['source']} ({x['model']}, {x['weights']} weights)" for x in report["models"])
    lines = [f"{'ensemble of ' if report['ensemble'] else ''}{models}",
             f"on {report['data']['path']}: {m['num_samples']} samples, {len(m['per_class'])} classes; "
             f"{t['views']} ({t['num_views']} view{'s' if t['num_views'] > 1 else ''}), {t['image_size']} px, "
             f"crop ratio {t['crop_ratio']}",
             "",
             f"{'top-1':<10}{100 * m['top1']:>8.2f} %",
             f"{'top-' + str(m['top5_k']):<10}{100 * m['top5']:>8.2f} %",
             f"{'NLL':<10}{m['nll']:>8.4f}",
             f"{'ECE':<10}{100 * m['ece']:>8.2f} %   ({m['ece_bins']} equal-width confidence bins)",
             _map_line(m)]
    rows = m["per_class"]
    shown = rows
    if len(rows) > max_classes:  # the worst classes are the ones worth reading; all are in the JSON
        shown = sorted((r for r in rows if r["top1"] is not None), key=lambda r: r["top1"])[:10]
        lines += ["", f"10 worst of {len(rows)} classes (all in the JSON):"]
    else:
        lines += ["", "per class:"]
    width = max([len(str(r["name"] or r["id"])) for r in shown] + [5]) + 2
    lines.append(f"  {'index':>5}  {'class':<{width}}{'samples':>8}{'top-1 %':>10}{'AP %':>9}")
    for r in shown:
        acc = "-" if r["top1"] is None else f"{100 * r['top1']:.2f}"
        ap = "-" if r.get("ap") is None else f"{100 * r['ap']:.2f}"
        lines.append(f"  {r['index']:>5}  {str(r['name'] or r['id']):<{width}}{r['support']:>8}{acc:>10}{ap:>9}")
    if "robustness" in report:
        from kdkit.evaluate.robustness import format_robustness

        lines += ["", format_robustness(report["robustness"])]
    return "\n".join(lines)
