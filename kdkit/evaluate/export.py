"""`kdkit export`: a checkpoint as ONNX with a dynamic batch axis, checked against PyTorch on real
inputs with ONNX Runtime, and timed against PyTorch eager in the same run.

    report = export(ExportConfig(checkpoint="runs/r50/best.pt", data="shards/imagenet"))

The graph takes `images` (N, 3, S, S) float32, normalised as the checkpoint's eval transform
says, and returns `logits` (N, classes). The transform and the class list travel in the ONNX
metadata (kdkit.image_size, kdkit.mean, kdkit.std, kdkit.crop_ratio, kdkit.classes) so a runtime
can rebuild the preprocessing. Exporter: torch.export-based ("dynamo", PyTorch's default since
2.9) first; the TorchScript-based exporter if that fails (the report says which, and why).
The report (parity, throughput, the file's sha256) is written beside the model as NAME.export.json,
after the model is in place: a report always describes the model beside it. EXPORT.md describes the
next steps to TensorRT. `format="openvino"` writes an OpenVINO IR folder
instead, optionally with an NNCF int8 model (kdkit.evaluate.deploy).
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from kdkit import atomic
from kdkit.errors import KdkitError
from kdkit.evaluate.parity import check_parity, parity_inputs, time_runners
from kdkit.models.checkpoint import ModelInfo, load_model
from kdkit.shards.tario import sha256_file

INPUT, OUTPUT = "images", "logits"


@dataclass
class ExportConfig:
    checkpoint: Path
    output: Path | None = None  # default: the checkpoint's path with .onnx
    exporter: str = "auto"  # "auto" (dynamo, else torchscript), "dynamo" or "torchscript"
    opset: int = 18
    data: Path | None = None  # parity inputs: the eval view of this shard set's first samples
    images: list[Path] = field(default_factory=list)  # ... or these image files (predict's transform)
    split: str | None = None  # of `data`; None: val, or the only split it holds (ensemble.default_split)
    crop_ratio: float = 0.875
    parity_samples: int = 16
    atol: float = 1e-3  # max |ONNX Runtime - PyTorch| over the logits for the parity check to pass
    benchmark: bool = True
    batch_size: int = 32  # throughput batch
    iterations: int = 20
    warmup: int = 3
    threads: int | None = None  # intra-op threads of both runtimes (default: torch's current setting)
    prefer_ema: bool = True
    model_name: str | None = None
    trust_checkpoint: bool = False  # load pickled Python objects too (runs their code: trusted files only)
    format: str = "onnx"  # or "openvino": an IR folder (kdkit.evaluate.deploy)
    embed_preprocessing: bool = False  # openvino: the IR takes uint8 NHWC RGB and normalises it itself
    int8: bool = False  # openvino: also an NNCF int8 IR, calibrated on `data`
    calibration_samples: int = 300
    calibration_split: str = "train"
    max_drop: float | None = None  # top-1 points; given: NNCF's quantize_with_accuracy_control


def export_onnx(model: torch.nn.Module, image_size: int, path: Path, opset: int = 18,
                exporter: str = "auto") -> dict:
    """Write `path`; returns {"exporter": used, "fallback_reason": why dynamo was not used | None}."""
    example = torch.randn(2, 3, image_size, image_size)  # batch 2: torch.export specialises a batch of 1
    reason = None
    if exporter in ("auto", "dynamo"):
        try:
            batch = torch.export.Dim("batch", min=1)
            with contextlib.redirect_stdout(io.StringIO()):  # its progress lines are not ours to print
                torch.onnx.export(model, (example,), str(path), dynamo=True, opset_version=opset,
                                  input_names=[INPUT], output_names=[OUTPUT], dynamic_shapes=({0: batch},),
                                  verbose=False)
            return {"exporter": "dynamo", "fallback_reason": None}
        except Exception as e:  # any exporter failure: fall back, and say why in the report
            if exporter == "dynamo":
                raise KdkitError(f"dynamo ONNX export failed ({type(e).__name__}: {str(e)[:300]}); "
                                 "try --exporter torchscript") from None
            reason = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
    if exporter not in ("auto", "torchscript"):
        raise KdkitError(f"exporter {exporter!r}: expected auto, dynamo or torchscript")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter warns that it is legacy
        torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=min(opset, 17),
                          input_names=[INPUT], output_names=[OUTPUT],
                          dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}})
    return {"exporter": "torchscript", "fallback_reason": reason}


def add_metadata(path: Path, info: ModelInfo, crop_ratio: float) -> None:
    """Store the eval transform and class list in the ONNX file, and check the model is valid."""
    import onnx

    m = onnx.load(str(path))
    meta = {"kdkit.model": info.model, "kdkit.image_size": str(info.image_size), "kdkit.mean": json.dumps(info.mean),
            "kdkit.std": json.dumps(info.std), "kdkit.crop_ratio": str(crop_ratio),
            "kdkit.classes": json.dumps([{"index": i, "id": c, "name": n}
                                         for i, (c, n) in enumerate(zip(info.class_ids(), info.class_names()))])}
    for k, v in meta.items():
        entry = m.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.checker.check_model(m)
    onnx.save(m, str(path))


def ort_runner(session):
    """ONNX Runtime as a function of a normalised float batch, returning the logits."""
    return lambda x: session.run([OUTPUT], {INPUT: x.numpy()})[0]


def ort_session(path: Path, threads: int | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


@torch.no_grad()
def throughput(model: torch.nn.Module, session, sample: torch.Tensor, batch_size: int, iterations: int,
               warmup: int, repeats: int = 1) -> dict:
    """Images/s of PyTorch eager and ONNX Runtime on the same batch (time_runners)."""
    reps = -(-batch_size // len(sample))
    batch = sample.repeat(reps, 1, 1, 1)[:batch_size].contiguous()
    feed = {INPUT: batch.numpy()}
    r = time_runners({"eager": lambda: model(batch), "ort": lambda: session.run([OUTPUT], feed)},
                     batch_size, iterations, warmup, repeats)
    e, o = r["eager"], r["ort"]
    return {"batch_size": batch_size, "iterations": iterations, "warmup": warmup, "repeats": repeats,
            "threads": torch.get_num_threads(), "torch_eager_img_s": e, "onnxruntime_img_s": o, "speedup": o / e}


def export(cfg: ExportConfig) -> dict:
    if cfg.split is None:
        from kdkit.evaluate.ensemble import default_split

        cfg = dataclasses.replace(cfg, split=default_split(cfg.data))
    if cfg.format == "openvino":
        from kdkit.evaluate.deploy import export_openvino

        return export_openvino(cfg)
    if cfg.format != "onnx":
        raise KdkitError(f"format {cfg.format!r}: expected onnx or openvino")
    if cfg.int8 or cfg.embed_preprocessing or cfg.max_drop is not None:
        raise KdkitError("--int8, --max-drop and --embed-preprocessing are OpenVINO steps: give --format openvino")
    model, info = load_model(cfg.checkpoint, prefer_ema=cfg.prefer_ema, model_name=cfg.model_name,
                             trust=cfg.trust_checkpoint)
    out = Path(cfg.output) if cfg.output else Path(cfg.checkpoint).with_suffix(".onnx")
    out.parent.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    # built and checked under a temporary name (kdkit.atomic), then put in place with its report: a failed or
    # interrupted export leaves the previous model and report as they were, or (interrupted between the
    # two renames) a model without a report, never a report that describes another model. The exporter may
    # put the weights in NAME.data beside the graph; add_metadata embeds them in the one file, so that goes too.
    try:
        with atomic.replacing(out) as tmp:
            how = export_onnx(model, info.image_size, tmp, cfg.opset, cfg.exporter)
            add_metadata(tmp, info, cfg.crop_ratio)
            session = ort_session(tmp, cfg.threads or torch.get_num_threads())
            inputs, source = parity_inputs(cfg, info)
            report = {"checkpoint": str(cfg.checkpoint), "onnx": str(out), "bytes": tmp.stat().st_size,
                      "sha256": sha256_file(tmp), **how,
                      "opset": cfg.opset if how["exporter"] == "dynamo" else min(cfg.opset, 17),
                      "model": info.to_json(),
                      "input": {"name": INPUT, "shape": ["batch", 3, info.image_size, info.image_size]},
                      "parity": {"inputs": source, **check_parity(model, ort_runner(session), inputs, cfg.atol)}}
            if cfg.benchmark:
                report["throughput"] = throughput(model, session, inputs, cfg.batch_size, cfg.iterations, cfg.warmup)
            report_path(out).unlink(missing_ok=True)  # the old report goes before its model is replaced ...
        atomic.write_json(report_path(out), report)  # ... and the new one comes after the new model
    finally:
        data = atomic.temp_path(out)
        data.with_name(data.name + ".data").unlink(missing_ok=True)
    return report


def report_path(onnx: Path) -> Path:
    """The report of an ONNX export, beside it: model.onnx -> model.export.json."""
    return Path(onnx).with_suffix(".export.json")


def format_export(r: dict) -> str:
    p, m = r["parity"], r["model"]
    lines = [f"{r['checkpoint']} ({m['model']}, {m['weights']} weights) ->",
             f"{r['onnx']}: {r['bytes'] / 1e6:.1f} MB, opset {r['opset']}, {r['exporter']} exporter"
             + (f" (dynamo failed: {r['fallback_reason']})" if r.get("fallback_reason") else ""),
             f"input {r['input']['name']} {tuple(r['input']['shape'])} float32, normalised; output logits",
             f"parity vs PyTorch on {p['inputs']}, batch sizes {p['batch_sizes']}: max |diff| {p['max_abs_diff']:.2e}, "
             f"top-1 agreement {100 * p['top1_agreement']:.1f} % -> {'OK' if p['ok'] else 'FAILED'} "
             f"(atol {p['atol']:g})"]
    if "throughput" in r:
        t = r["throughput"]
        lines += [f"throughput, batch {t['batch_size']}, CPU threads {t['threads']}: PyTorch eager "
                  f"{t['torch_eager_img_s']:.1f} img/s, ONNX Runtime {t['onnxruntime_img_s']:.1f} img/s "
                  f"({t['speedup']:.2f}x)"]
    return "\n".join(lines)
