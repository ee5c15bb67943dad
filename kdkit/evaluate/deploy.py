"""`kdkit export --format openvino [--int8]`: a checkpoint as OpenVINO IR (model.xml + model.bin),
checked against PyTorch through the OpenVINO runtime, and optionally quantised to int8 with NNCF.

    report = export(ExportConfig("runs/r18/best.pt", format="openvino", data="shards/imagenet", int8=True))

The output is a folder: model.xml/.bin (fp32 weights), input.json (the input spec: size, layout,
RGB, mean/std, crop ratio, classes, the checkpoint's sha256), report.json, and with --int8
model_int8.xml/.bin. The spec is also stored in each IR's rt_info (kdkit/spec), so an IR alone is
enough for `kdkit predict model.xml`. The folder is built under a temporary name of kdkit's own
(`.NAME.<pid>.kdkit-tmp`, kdkit.atomic) and renamed when complete; a re-export moves the earlier one
to `.NAME.<pid>.kdkit-old` for the moment of the swap. Nothing else beside NAME is touched but its lock,
`.NAME.kdkit-lock` (kdkit.locks): one export of NAME at a time.

Conversion is OpenVINO's own (`openvino.convert_model` on the PyTorch module, dynamic batch);
`--embed-preprocessing` adds OpenVINO's PrePostProcessor steps so the IR takes uint8 NHWC RGB
crops and normalises them itself. int8: `nncf.quantize` on eval views of the calibration split,
or `nncf.quantize_with_accuracy_control` with --max-drop (top-1 points on the eval split).
openvino and nncf are the optional `deploy` extra (pip install -e ".[deploy]").
"""
from __future__ import annotations

import glob
import json
import os
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch

from kdkit import atomic, locks
from kdkit.errors import KdkitError
from kdkit.evaluate.ensemble import denormalize_uint8, normalize_uint8, open_eval_set
from kdkit.evaluate.openvino import IR, IR_INT8, REPORT, RT_KEY, SPEC, OpenVINOModel, require
from kdkit.evaluate.predict import CROP_SPEC
from kdkit.shards.images import PIXELS_SPEC
from kdkit.evaluate.parity import check_parity, parity_inputs, time_runners
from kdkit.models.checkpoint import ModelInfo, load_model

__all__ = ["EvalViews", "OpenVINOModel", "export_openvino", "format_openvino"]


def input_spec(info: ModelInfo, crop_ratio: float, embedded: bool, checkpoint: Path | None) -> dict:
    s = info.image_size
    return {"name": "images", "shape": ["batch", s, s, 3] if embedded else ["batch", 3, s, s],
            "dtype": "uint8" if embedded else "float32", "layout": "NHWC" if embedded else "NCHW", "color": "RGB",
            "image_size": s, "crop_ratio": crop_ratio, "mean": list(info.mean), "std": list(info.std),
            "preprocessing_in_model": embedded,
            "decode": PIXELS_SPEC, "crop": CROP_SPEC.format(S=s),
            "preprocessing": f"resize the shorter side to round({s} / crop_ratio), centre crop {s}, "
                             + ("RGB uint8 as is (normalisation is in the model)" if embedded
                                else "x / 255, minus mean, divided by std, NCHW float32"),
            "model": info.to_json(), "classes": [{"index": i, "id": c, "name": n} for i, (c, n)
                                                 in enumerate(zip(info.class_ids(), info.class_names()))],
            "checkpoint": str(checkpoint) if checkpoint else None,
            "checkpoint_sha256": info.sha256() if checkpoint else None}


def conversion_failure(e: Exception) -> str:
    """The ops OpenVINO's frontend names in its failure report, else the message's first line."""
    text = str(e)
    ops = re.findall(r"(?:No conversion rule found for operations|Conversion is failed for): (.+)", text)
    ops = [o.strip() for line in ops for o in line.split(",") if o.strip() != "prim::Constant"]
    if ops:
        return f"no OpenVINO conversion for {', '.join(dict.fromkeys(ops))}"
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("Check ")]
    return f"{type(e).__name__}: {(lines or [''])[0][:300]}"


def convert_ir(model: torch.nn.Module, info: ModelInfo, spec: dict):
    """An ov.Model of `model` with a dynamic batch, named images -> logits, the spec in its rt_info, and with
    spec["preprocessing_in_model"] the PrePostProcessor steps that take uint8 NHWC RGB."""
    ov, = require("openvino")
    s = info.image_size
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's TracerWarnings are about Python-side asserts
            m = ov.convert_model(model, example_input=torch.randn(2, 3, s, s), input=[(-1, 3, s, s)])
    except Exception as e:  # the frontend raises OpConversionFailure and friends: all mean "does not convert"
        raise KdkitError(f"{info.source}: {info.model} does not convert to OpenVINO IR ({conversion_failure(e)}); "
                         "export to ONNX instead (--format onnx) or replace that layer") from None
    m.inputs[0].get_tensor().set_names({"images"})
    m.outputs[0].get_tensor().set_names({"logits"})
    if spec["preprocessing_in_model"]:
        from openvino.preprocess import ColorFormat, PrePostProcessor

        ppp = PrePostProcessor(m)
        ppp.input().tensor().set_element_type(ov.Type.u8).set_layout(ov.Layout("NHWC")) \
            .set_color_format(ColorFormat.RGB)
        ppp.input().model().set_layout(ov.Layout("NCHW"))
        ppp.input().preprocess().convert_element_type(ov.Type.f32) \
            .mean([255 * v for v in info.mean]).scale([255 * v for v in info.std])
        m = ppp.build()
    m.set_rt_info(json.dumps(spec), RT_KEY)
    return m


def check_output_folder(out: Path, sha256: str) -> None:
    """Refuse an output folder that holds anything but an earlier export of this same checkpoint."""
    if not out.exists():
        return
    if not out.is_dir():
        raise KdkitError(f"{out}: exists and is not a folder; give -o a new folder for the OpenVINO export")
    if not any(out.iterdir()):
        return
    try:
        prev = json.loads((out / SPEC).read_text())
    except (OSError, ValueError):
        raise KdkitError(f"{out}: holds other files, not a kdkit OpenVINO export; give -o a new or empty "
                         "folder") from None
    if prev.get("checkpoint_sha256") != sha256:
        raise KdkitError(f"{out}: holds the export of another checkpoint ({prev.get('checkpoint')}); give -o "
                         "another folder, or remove that one to replace it")


class EvalViews:
    """(normalised views, labels) batches of a split through kdkit's DALI eval pipeline; iterable again
    and again (NNCF's accuracy control validates several times)."""

    def __init__(self, data, split: str, info: ModelInfo, crop_ratio: float, batch_size: int, limit: int | None = None,
                 threads: int = 2):
        self.shards = open_eval_set(data, split, [info])
        self.info, self.crop_ratio, self.batch_size = info, crop_ratio, batch_size
        self.limit, self.threads = limit, threads
        self.source = f"{self.shards.folder or data}"

    def __iter__(self):
        from kdkit.pipelines import eval_loader

        seen = 0
        for b in eval_loader(self.shards, self.info.transform(self.crop_ratio), self.batch_size, self.threads):
            take = len(b.labels) if self.limit is None else min(len(b.labels), self.limit - seen)
            yield b.images[:take], b.labels[:take].cpu()
            seen += take
            if self.limit is not None and seen >= self.limit:
                return


def calibration_views(views: EvalViews) -> tuple[list[torch.Tensor], str]:
    """The single eval views (1, 3, S, S) NNCF calibrates on."""
    out = [v for images, _ in views for v in images.split(1)]
    if not out:
        raise KdkitError(f"{views.source}: no samples to calibrate on")
    return out, f"{len(out)} eval views of {views.source}"


def quantize(ov_model, calib: list[torch.Tensor], feed, validation: EvalViews | None, max_drop: float | None):
    """nncf.quantize, or with max_drop nncf.quantize_with_accuracy_control (top-1 in % on `validation`)."""
    nncf, = require("nncf")
    data = nncf.Dataset(calib, feed)
    if max_drop is None:
        return nncf.quantize(ov_model, data, subset_size=len(calib))

    def top1(compiled, items) -> float:
        correct = total = 0
        for images, labels in items:
            logits = compiled(feed(images))[0]
            correct += int((np.asarray(logits).argmax(1) == labels.numpy()).sum())
            total += len(labels)
        return 100.0 * correct / max(total, 1)

    return nncf.quantize_with_accuracy_control(
        ov_model, data, nncf.Dataset(validation, lambda item: feed(item[0])), validation_fn=top1,
        max_drop=max_drop, drop_type=nncf.DropType.ABSOLUTE, subset_size=len(calib))


@torch.no_grad()
def top1_on(models: dict, views: EvalViews) -> dict:
    """Top-1 (%) of each model on the same views, in one pass over the split."""
    correct, total = dict.fromkeys(models, 0), 0
    for images, labels in views:
        for name, m in models.items():
            correct[name] += int((m(images).argmax(1) == labels).sum())
        total += len(labels)
    return {"samples": total, **{f"{k}_top1": 100.0 * v / max(total, 1) for k, v in correct.items()}}


@torch.no_grad()
def check_ir_parity(model: torch.nn.Module, ir: OpenVINOModel, inputs: torch.Tensor, atol: float) -> dict:
    """OpenVINO vs PyTorch eager, one batch and batches of 1. An IR that takes uint8 gets the views
    rounded to uint8, and so does PyTorch (the same pixels on both sides)."""
    if ir.uint8:
        inputs = normalize_uint8(denormalize_uint8(inputs, ir.model_info), ir.model_info)
    return check_parity(model, lambda x: ir.run(ir.feed(x)), inputs, atol)


def export_openvino(cfg) -> dict:
    """The folder described above; returns the report (also written there as report.json)."""
    ov = require("openvino", *(["nncf"] if cfg.int8 else []))[0]
    if cfg.int8 and cfg.data is None:
        raise KdkitError("--int8 calibrates on eval views of a shard set: give --data SHARDS")
    if cfg.max_drop is not None and not cfg.int8:
        raise KdkitError("--max-drop bounds the top-1 drop of the int8 model: give --int8 too")
    model, info = load_model(cfg.checkpoint, prefer_ema=cfg.prefer_ema, model_name=cfg.model_name,
                             trust=cfg.trust_checkpoint)
    out = Path(cfg.output) if cfg.output else Path(cfg.checkpoint).with_name(Path(cfg.checkpoint).stem + "-openvino")
    spec = input_spec(info, cfg.crop_ratio, cfg.embed_preprocessing, Path(cfg.checkpoint))
    # one export of NAME at a time (kdkit.locks: no pid is trusted, pids are reused and belong to other
    # hosts on a shared file system), taken first and held to the end; under it, what a killed export left
    # is tidied first: its earlier export comes back before NAME is checked
    with locks.beside(out, f"the export folder {out}", "wait for that export to finish, or give another -o"):
        tidy_leftovers(out)
        check_output_folder(out, spec["checkpoint_sha256"])
        return _export(cfg, ov, model, info, spec, out, calibration_sets(cfg, info))


def calibration_sets(cfg, info: ModelInfo) -> list | None:
    """--int8: the calibration and evaluation views, both sets checked against the model (classes, stored
    size) before any work."""
    if not cfg.int8:
        return None
    dali_threads = cfg.threads or 2  # DALI's CPU threads, as `kdkit eval`'s default
    from kdkit.shards.reader import ShardError

    sets = []
    for flag, split, limit in (("--calibration-split", cfg.calibration_split, cfg.calibration_samples),
                               ("--split", cfg.split, None)):
        try:
            sets.append(EvalViews(cfg.data, split, info, cfg.crop_ratio, 32, limit, dali_threads))
        except ShardError as e:  # the split was a default the user may not know they chose
            raise KdkitError(f"{e}; --int8 reads {flag} {split} of --data: give {flag} with a split the "
                             "set has") from None
    return sets


def _export(cfg, ov, model, info: ModelInfo, spec: dict, out: Path, sets) -> dict:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    threads = cfg.threads or torch.get_num_threads()
    # everything is built in a temporary folder of kdkit's own and swapped in at the end: a failure leaves
    # the earlier export (or nothing) under NAME
    tmp = atomic.temp_path(out)
    tmp.mkdir(parents=True)
    try:
        report = _build(cfg, model, info, spec, tmp, out, threads, ov, sets)
        if out.exists():  # an earlier export of this checkpoint (check_output_folder): replaced whole
            old = out.with_name(f".{out.name}.{os.getpid()}{OLD_TAG}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


OLD_TAG = ".kdkit-old"  # an earlier export being replaced: `.NAME.<pid>.kdkit-old`


def tidy_leftovers(out: Path) -> None:
    """What killed exports of `out` left, and only that (names only kdkit makes); the caller holds `out`'s
    lock, so no export that made them is still running: a temporary folder is removed; an earlier export
    being replaced comes back if NAME is gone (killed between the two renames of the swap), else is removed."""
    for p in [*sorted(out.parent.glob(f".{glob.escape(out.name)}.*{OLD_TAG}")), *atomic.leftovers(out)]:
        if not p.is_dir():
            continue
        if p.name.endswith(OLD_TAG) and not out.exists():
            p.rename(out)
        else:
            shutil.rmtree(p, ignore_errors=True)


def _build(cfg, model, info: ModelInfo, spec: dict, tmp: Path, out: Path, threads: int, ov, sets) -> dict:
    ir_model = convert_ir(model, info, spec)
    ov.save_model(ir_model, str(tmp / IR), compress_to_fp16=False)  # fp32 weights: parity within 1e-3
    atomic.write_json(tmp / SPEC, spec)
    ir = OpenVINOModel(tmp / IR, threads)
    inputs, source = parity_inputs(cfg, info)
    report = {"checkpoint": str(cfg.checkpoint), "format": "openvino", "output": str(out),
              "ir": str(out / IR), "bytes": (tmp / IR).with_suffix(".bin").stat().st_size,
              "openvino": ov.__version__, "embed_preprocessing": cfg.embed_preprocessing, "model": info.to_json(),
              "input": {k: spec[k] for k in ("name", "shape", "dtype", "layout", "color", "mean", "std",
                                              "crop_ratio")},
              "parity": {"inputs": source, **check_ir_parity(model, ir, inputs, cfg.atol)}}
    runners = {"torch_eager": model, "openvino_fp32": ir}
    if cfg.int8:
        nncf, = require("nncf")
        calib, calib_source = calibration_views(sets[0])
        validation = sets[1]
        print(f"int8: calibrating on {calib_source}" + (f", accuracy control on {validation.source} "
                                                         f"(max drop {cfg.max_drop} top-1 points)"
                                                         if cfg.max_drop is not None else ""), flush=True)
        q = quantize(ir_model, calib, ir.feed, validation, cfg.max_drop)
        q.set_rt_info(json.dumps(spec), RT_KEY)
        ov.save_model(q, str(tmp / IR_INT8))
        runners["openvino_int8"] = OpenVINOModel(tmp / IR_INT8, threads)
        acc = top1_on(runners, validation)
        drop = acc["openvino_fp32_top1"] - acc["openvino_int8_top1"]
        report["int8"] = {"ir": str(out / IR_INT8), "bytes": (tmp / IR_INT8).with_suffix(".bin").stat().st_size,
                          "nncf": nncf.__version__, "calibration": calib_source,
                          "method": "quantize" if cfg.max_drop is None else "quantize_with_accuracy_control"}
        report["accuracy"] = {"split": cfg.split, "data": validation.source, **acc, "drop": drop,
                              "max_drop": cfg.max_drop, "ok": cfg.max_drop is None or drop <= cfg.max_drop}
    if cfg.benchmark:
        batch = inputs.repeat(-(-cfg.batch_size // len(inputs)), 1, 1, 1)[:cfg.batch_size].contiguous()
        calls = {"torch_eager": lambda: model(batch)}
        for name in ("openvino_fp32", "openvino_int8"):
            if name in runners:
                feed = runners[name].feed(batch)
                calls[name] = (lambda r, f: lambda: r.run(f))(runners[name], feed)
        with torch.no_grad():
            rates = time_runners(calls, cfg.batch_size, cfg.iterations, cfg.warmup)
        report["throughput"] = {"batch_size": cfg.batch_size, "iterations": cfg.iterations, "warmup": cfg.warmup,
                                "threads": threads, **{f"{k}_img_s": v for k, v in rates.items()}}
    atomic.write_json(tmp / REPORT, report)
    return report


def format_openvino(r: dict) -> str:
    p, m, i = r["parity"], r["model"], r["input"]
    lines = [f"{r['checkpoint']} ({m['model']}, {m['weights']} weights) -> {r['output']}/",
             f"{IR}: {r['bytes'] / 1e6:.2f} MB fp32, OpenVINO {r['openvino'].split('-')[0]}; input {i['name']} "
             f"{tuple(i['shape'])} {i['dtype']} {i['layout']} {i['color']}"
             + (" (normalisation inside)" if r["embed_preprocessing"] else ", normalised"),
             f"parity vs PyTorch on {p['inputs']}, batch sizes {p['batch_sizes']}: max |diff| {p['max_abs_diff']:.2e}, "
             f"top-1 agreement {100 * p['top1_agreement']:.1f} % -> {'OK' if p['ok'] else 'FAILED'} "
             f"(atol {p['atol']:g})"]
    if "int8" in r:
        q, a = r["int8"], r["accuracy"]
        lines += [f"{IR_INT8}: {q['bytes'] / 1e6:.2f} MB ({r['bytes'] / q['bytes']:.1f}x smaller), nncf "
                  f"{q['method']}, calibrated on {q['calibration']}",
                  f"top-1 on {a['samples']} {a['split']} views: PyTorch {a['torch_eager_top1']:.2f} %, OpenVINO fp32 "
                  f"{a['openvino_fp32_top1']:.2f} %, int8 {a['openvino_int8_top1']:.2f} % (drop {a['drop']:.2f} points"
                  + (f", max {a['max_drop']:g} -> {'OK' if a['ok'] else 'FAILED'})" if a["max_drop"] is not None
                     else ")")]
    if "throughput" in r:
        t = r["throughput"]
        names = {"torch_eager": "PyTorch eager", "openvino_fp32": "OpenVINO fp32", "openvino_int8": "OpenVINO int8"}
        lines.append(f"throughput, batch {t['batch_size']}, CPU threads {t['threads']}: " + ", ".join(
            f"{label} {t[k + '_img_s']:.1f} img/s" for k, label in names.items() if k + "_img_s" in t))
    return "\n".join(lines)
