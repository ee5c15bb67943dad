"""`kdkit eval`, `kdkit predict` and `kdkit export`: options parsed into the configs of
kdkit.evaluate, and the library called. `add_parsers(sub)` registers the three subcommands.
Heavy imports (torch, DALI) happen when a command runs, so `kdkit --help` stays fast.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from kdkit.errors import KdkitError
from kdkit.options import (COUNT, FRACTION, POSITIVE, SEED, HelpFormatter, add_options, command_line, csv_paths,
                           integer, number)
from kdkit.pipelines.options import DECODING, Backend, decoding
from kdkit.shards.location import location_arg

EXPORT_EPILOG = """next steps (see kdkit/evaluate/EXPORT.md):
  TensorRT:  trtexec --onnx=model.onnx --fp16 --minShapes=images:1x3xSxS \\
                     --optShapes=images:32x3xSxS --maxShapes=images:256x3xSxS --saveEngine=model.plan
  OpenVINO:  kdkit export CKPT --format openvino [--int8 --data SHARDS]   (model.xml/.bin, NNCF int8)"""


def _add_model_args(p: argparse.ArgumentParser, device: bool = True) -> None:
    g = p.add_argument_group("Model")
    g.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                   help="use the checkpoint's EMA weights where it has them; --no-ema: the raw weights (one rule "
                        "for every command that loads a checkpoint)")
    g.add_argument("--model", default=None, metavar="NAME",
                   help="timm model name for a bare timm/torchvision state dict (default: the name a kdkit checkpoint "
                        "holds)")
    g.add_argument("--trust-checkpoint", action="store_true",
                   help="load checkpoints that hold pickled Python objects besides weights (that runs their code: only "
                        "for files you trust; default: data only)")
    g.add_argument("--crop-ratio", type=FRACTION, default=0.875,
                   help="image_size / resized shorter side of the eval transform (224/256)")
    if device:
        g.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto",
                       help="where decoding and the model run (auto: the GPU where torch sees one)")


# ---------------------------------------------------------------------------------------------
# kdkit eval

def _run_eval(a: argparse.Namespace) -> int:
    from kdkit.evaluate.corruptions import parse_corruptions, parse_severities

    try:
        corruptions = parse_corruptions(a.corruptions)
        severities = parse_severities(a.severities)
    except ValueError as e:
        raise KdkitError(str(e)) from None
    if a.write_corrupted:
        from kdkit.evaluate.corrupted_shards import write_corrupted
        from kdkit.models.checkpoint import load_model

        if not 1 <= a.store_quality <= 100:
            raise KdkitError(f"--store-quality {a.store_quality}: written sets are JPEGs, give 1..100")
        size = a.image_size or 224
        if a.checkpoints and not a.image_size:
            size = load_model(a.checkpoints[0], model_name=a.model, trust=a.trust_checkpoint)[1].image_size
        folders = write_corrupted(a.data, a.write_corrupted, size, corruptions or parse_corruptions("all"), severities,
                                  split=a.split, crop_ratio=a.crop_ratio, seed=a.corruption_seed,
                                  quality=a.store_quality,
                                  frost_dir=a.frost_dir, batch_size=a.batch_size, num_threads=a.threads or 2,
                                  workers=a.workers, command=command_line(), progress=not a.quiet)
        print(f"wrote {len(folders)} corrupted shard sets ({size} px) under {a.write_corrupted}; "
              f"check them with `kdkit verify {a.write_corrupted}`")
        if not a.checkpoints:
            return 0
    if not a.checkpoints:
        raise KdkitError("give at least one CHECKPOINT (or only --write-corrupted OUT)")
    from kdkit.evaluate.eval import EvalConfig, evaluate, format_report, write_outputs
    from kdkit.evaluate.robustness import RobustnessConfig

    corrupted = a.corrupted or a.write_corrupted  # just written: evaluate on those
    if corrupted and not corruptions:  # every corruption with a set there
        corruptions = [c for c in parse_corruptions("all")
                       if any((corrupted / f"{c}-{s}").is_dir() for s in severities)]
        if not corruptions:
            raise KdkitError(f"{corrupted}: no <corruption>-<severity> shard sets for severities {severities}")
    robust = None
    if corruptions:
        robust = RobustnessConfig(corruptions=corruptions, severities=severities,
                                  reference=a.reference, corrupted=corrupted, seed=a.corruption_seed,
                                  store_quality=a.store_quality or None, frost_dir=a.frost_dir, workers=a.workers,
                                  progress=not a.quiet)
    elif a.reference:
        raise KdkitError("--reference normalises corruption errors: give --corruptions too (e.g. all)")
    cfg = EvalConfig(checkpoints=a.checkpoints, data=a.data, split=a.split, views=a.views, crop_ratio=a.crop_ratio,
                     batch_size=a.batch_size, num_threads=a.threads, device=a.device, amp=a.amp, prefer_ema=a.ema,
                     model_name=a.model, trust_checkpoint=a.trust_checkpoint, robustness=robust,
                     extra={"command": command_line()}, **decoding(a))
    report = evaluate(cfg)
    print(format_report(report))
    # one folder per checkpoint, split and views: evaluations of other settings never overwrite each other
    first = Path(a.checkpoints[0])
    out = a.out or first.parent / "eval" / f"{first.stem}-{a.split}-{a.views}"
    files = write_outputs(report, out, a.json, plots=a.plots)
    print("\nwrote " + ", ".join(map(str, files)))
    return 0


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="accuracy, mAP, calibration and corruption robustness (mCE) on a shard set",
                       formatter_class=HelpFormatter,
                       description="Evaluate checkpoints on a shard set with the DALI eval pipeline: top-1/top-5, "
                                   "per-class accuracy and average precision, mAP (one-vs-rest on the softmax "
                                   "scores; classes without samples left out and listed), confusion matrix, "
                                   "calibration (ECE, 15 bins, reliability plot). Several checkpoints are averaged "
                                   "as an ensemble (mean of softmax probabilities, as are test-time views). "
                                   "--corruptions adds ImageNet-C "
                                   "corruption errors and mCE against --reference (kdkit/evaluate/CORRUPTIONS.md).")
    p.add_argument("checkpoints", nargs="*", type=Path, metavar="CHECKPOINT",
                   help="kdkit checkpoint(s); several are averaged as an ensemble (default: none, only with "
                        "--write-corrupted)")
    p.add_argument("--data", type=location_arg, required=True,
                   help="a shard-set folder, or a dataset root holding --split; local or a bucket URL "
                        "(default: required)")
    p.add_argument("--split", default="val", help="split to read from a dataset root")
    p.add_argument("--views", choices=["center", "flip", "tencrop"], default="center",
                   help="test-time views: centre crop, + its mirror image, or ten crops (corners + centre, mirrored)")
    p.add_argument("--batch-size", type=COUNT, default=64, help="images per batch (x views with --views)")
    p.add_argument("--threads", type=COUNT, default=None,
                   help="DALI threads (default: the cores on the GPU, 2 on the CPU)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                   help="on the GPU: fp16 autocast and channels-last, as in training")
    _add_model_args(p)
    add_options(p, Backend, include=DECODING, group=p.add_argument_group("GPU decoder"))
    g = p.add_argument_group("Output")
    g.add_argument("--out", type=Path, default=None,
                   help="folder for metrics.json, confusion.png, reliability.png (default: eval/CKPT-SPLIT-VIEWS/ "
                        "beside the first checkpoint, so other evaluations are kept)")
    g.add_argument("--json", type=Path, default=None, metavar="FILE",
                   help="write the JSON report here (default: OUT/metrics.json)")
    g.add_argument("--plots", action=argparse.BooleanOptionalAction, default=True, help="write the two PNGs")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    g = p.add_argument_group("Robustness (ImageNet-C corruptions, mCE)")
    g.add_argument("--corruptions", default=None,
                   help="'all', a group (noise, blur, weather, digital) or a comma list of corruption names "
                        "(default: no corruption evaluation)")
    g.add_argument("--severities", default="1-5", help="e.g. 1-5, 3 or 1,3,5")
    g.add_argument("--reference", default=None, metavar="CKPT|JSON|alexnet",
                   help="normalise corruption errors by this model: a checkpoint (evaluated in this run on the "
                        "same images), an earlier metrics.json, or 'alexnet' (published ImageNet-C errors) "
                        "(default: none, unnormalised errors only)")
    g.add_argument("--corrupted", type=Path, default=None, metavar="DIR",
                   help="read corrupted sets written by --write-corrupted; without --corruptions, every "
                        "set found there (default: corrupt on the fly)")
    g.add_argument("--write-corrupted", type=Path, default=None, metavar="OUT",
                   help="write OUT/<corruption>-<severity>/ shard sets of --data, then evaluate if checkpoints "
                        "are given (default: not written)")
    g.add_argument("--image-size", type=integer(8), default=None,
                   help="image size of --write-corrupted (default: the checkpoint's, else 224)")
    g.add_argument("--corruption-seed", type=SEED, default=0, help="seed of the random corruptions (per sample key)")
    g.add_argument("--store-quality", type=integer(0, 100), default=85,
                   help="JPEG quality of corrupted images, as ImageNet-C stored them (0: no round trip on the fly)")
    g.add_argument("--frost-dir", type=Path, default=None,
                   help="folder with the reference's frost1.png..frost6.jpg (default: procedural frost, an "
                        "approximation)")
    g.add_argument("--workers", type=COUNT, default=1, help="processes applying corruptions")
    p.set_defaults(func=_run_eval)


# ---------------------------------------------------------------------------------------------
# kdkit predict

def _run_predict(a: argparse.Namespace) -> int:
    from kdkit.evaluate.predict import PredictConfig, format_predictions, predict

    results = predict(PredictConfig(checkpoint=a.checkpoint, inputs=a.images, topk=a.topk, crop_ratio=a.crop_ratio,
                                    batch_size=a.batch_size, prefer_ema=a.ema, model_name=a.model, device=a.device,
                                    trust_checkpoint=a.trust_checkpoint))
    print(format_predictions(results, results.info))
    failed = [r for r in results if r.error]
    for r in failed:
        print(f"kdkit: error: {r.error}", file=sys.stderr)
    if a.json:
        a.json.write_text(json.dumps([r.__dict__ for r in results], indent=1) + "\n")
    if failed:
        print(f"kdkit: {len(failed)} of {len(results)} images failed", file=sys.stderr)
        return 1
    return 0


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="top-k classes with names and probabilities for images", formatter_class=HelpFormatter,
                       description="Predict images (files, or folders searched recursively) with a checkpoint's eval "
                                   "transform (Pillow + torch; equal to the DALI eval view up to the resize "
                                   "filter). An image that does not decode is reported on stderr and the others are "
                                   "still predicted; the exit status is then 1.")
    p.add_argument("checkpoint", type=Path, metavar="CHECKPOINT",
                   help="kdkit checkpoint (or a bare state dict with --model), or an OpenVINO IR from `kdkit export "
                        "--format openvino` (model.xml, model_int8.xml or the export folder; needs kdkit[deploy])")
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="image files or folders")
    p.add_argument("--topk", type=COUNT, default=5, help="classes shown per image")
    p.add_argument("--batch-size", type=COUNT, default=32, help="images per forward pass")
    p.add_argument("--json", type=Path, default=None, metavar="FILE",
                   help="also write the predictions as JSON (default: not written)")
    _add_model_args(p)
    p.set_defaults(func=_run_predict)


# ---------------------------------------------------------------------------------------------
# kdkit export

def _run_export(a: argparse.Namespace) -> int:
    from kdkit.evaluate.export import ExportConfig, export, format_export, report_path

    report = export(ExportConfig(checkpoint=a.checkpoint, output=a.output, exporter=a.exporter, opset=a.opset,
                                 data=a.data, images=a.images or [], split=a.split, crop_ratio=a.crop_ratio,
                                 parity_samples=a.parity_samples, atol=a.atol, benchmark=a.benchmark,
                                 batch_size=a.batch_size, iterations=a.iterations, warmup=a.warmup,
                                 threads=a.threads, prefer_ema=a.ema, model_name=a.model,
                                 trust_checkpoint=a.trust_checkpoint, format=a.format,
                                 embed_preprocessing=a.embed_preprocessing, int8=a.int8,
                                 calibration_samples=a.calibration_samples, calibration_split=a.calibration_split,
                                 max_drop=a.max_drop))
    if a.format == "openvino":
        from kdkit.evaluate.deploy import format_openvino

        print(format_openvino(report))
        print(f"wrote {report['output']}/ (model.xml/.bin, input.json, report.json"
              + (", model_int8.xml/.bin)" if "int8" in report else ")"))
        return 0 if report["parity"]["ok"] and report.get("accuracy", {"ok": True})["ok"] else 1
    print(format_export(report))
    print(f"wrote {report['onnx']}, {report_path(report['onnx'])}")
    return 0 if report["parity"]["ok"] else 1


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="ONNX or OpenVINO IR (+ NNCF int8) export, checked against PyTorch",
                       formatter_class=HelpFormatter, epilog=EXPORT_EPILOG,
                       description="Export a checkpoint to ONNX (dynamic batch axis; input 'images' normalised "
                                   "float32 NCHW, output 'logits'; eval transform and classes in the metadata), "
                                   "compare ONNX Runtime with PyTorch on real inputs (max |diff|, top-1 agreement; "
                                   "exit status 1 if above --atol), and time both on the CPU. --format openvino: an "
                                   "OpenVINO IR folder (model.xml/.bin, input.json), checked through the OpenVINO "
                                   "runtime; --int8 adds an NNCF int8 IR and top-1 before/after on --split.")
    p.add_argument("checkpoint", type=Path, metavar="CHECKPOINT", help="kdkit checkpoint (or a bare state dict "
                                                                       "with --model)")
    p.add_argument("-o", "--output", type=Path, default=None,
                   help="ONNX file (default: CHECKPOINT with .onnx; the report beside it as .export.json), or with "
                        "--format openvino a folder (default: CHECKPOINT-openvino/)")
    p.add_argument("--format", choices=["onnx", "openvino"], default="onnx",
                   help="openvino: OpenVINO IR through openvino.convert_model (needs kdkit[deploy])")
    p.add_argument("--embed-preprocessing", action="store_true",
                   help="openvino: normalisation inside the IR (PrePostProcessor), which then takes uint8 NHWC RGB "
                        "crops (default: normalised float32 NCHW, as the ONNX model)")
    p.add_argument("--exporter", choices=["auto", "dynamo", "torchscript"], default="auto",
                   help="auto: torch.export-based (dynamo), falling back to the TorchScript-based one")
    p.add_argument("--opset", type=integer(7), default=18, help="ONNX opset (the TorchScript exporter uses at most 17)")
    g = p.add_argument_group("Parity check")
    g.add_argument("--data", type=location_arg, default=None,
                   help="shard set (folder or bucket URL) whose first eval views are the test inputs "
                        "(default: --images)")
    g.add_argument("--images", type=csv_paths, default=None, metavar="A.jpg,B.jpg|DIR",
                   help="or these image files / folders, comma-separated (default: random inputs if neither)")
    g.add_argument("--split", default=None,
                   help="split of --data to read (default: val, or the only split --data holds)")
    g.add_argument("--parity-samples", type=COUNT, default=16, help="inputs compared (as one batch and one by one)")
    g.add_argument("--atol", type=POSITIVE, default=1e-3, help="largest allowed |ONNX Runtime - PyTorch| on the logits")
    g = p.add_argument_group("int8 (OpenVINO, NNCF post-training quantization)")
    g.add_argument("--int8", action="store_true",
                   help="also write model_int8.xml, calibrated on eval views of --calibration-split of --data, and "
                        "report top-1 of PyTorch, OpenVINO fp32 and int8 on --split")
    g.add_argument("--calibration-samples", type=COUNT, default=300, help="eval views NNCF calibrates on")
    g.add_argument("--calibration-split", default="train", help="split of --data to calibrate on")
    g.add_argument("--max-drop", type=number(0), default=None, metavar="POINTS",
                   help="largest allowed top-1 drop (percentage points) of int8 vs fp32 on --split: NNCF's "
                        "quantize_with_accuracy_control keeps sensitive layers in fp32 to meet it; exit status 1 if "
                        "missed (default: plain nncf.quantize, drop only reported)")
    g = p.add_argument_group("Throughput (same run, same batch)")
    g.add_argument("--benchmark", action=argparse.BooleanOptionalAction, default=True,
                   help="time PyTorch eager and ONNX Runtime (OpenVINO fp32/int8 with --format openvino)")
    g.add_argument("--batch-size", type=COUNT, default=32, help="batch of the timing runs")
    g.add_argument("--iterations", type=COUNT, default=20, help="timed batches per runtime")
    g.add_argument("--warmup", type=integer(0), default=3, help="untimed batches first")
    g.add_argument("--threads", type=COUNT, default=os.cpu_count() or 1, help="intra-op threads of both runtimes")
    _add_model_args(p, device=False)  # export, parity and timing run on the CPU
    p.set_defaults(func=_run_export)


def add_parsers(sub) -> None:
    """Register `eval`, `predict` and `export` on the `kdkit` command's subparsers."""
    _add_eval(sub)
    _add_predict(sub)
    _add_export(sub)
