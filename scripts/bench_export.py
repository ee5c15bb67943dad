"""PyTorch eager vs ONNX Runtime vs OpenVINO fp32 vs OpenVINO int8 on the CPU, for a model exported
the way `kdkit export` does it.

    .venv/bin/python scripts/bench_export.py                       # resnet18, 224 px, batch 8 and 32
    .venv/bin/python scripts/bench_export.py --model resnet50 --batches 1,8,32 --threads 16 --json out.json

A randomly initialised timm model (no weights are downloaded: speed does not depend on them) is
exported with kdkit.evaluate.export.export_onnx (dynamo exporter, dynamic batch) and, when the
deploy extra is installed, with kdkit.evaluate.deploy.convert_ir (openvino.convert_model, fp32
weights) and quantised to int8 with nncf.quantize on `--calibration-samples` random inputs (random
weights: the int8 model's accuracy means nothing here, `kdkit export --int8 --data` measures it;
its speed is what int8 kernels give). Each runtime is checked for parity against PyTorch, then
all are timed in the same process: per batch size, `--warmup` untimed and `--iterations` timed
forward passes of each, alternating `--repeats` times (median reported), all with `--threads`
intra-op threads, on the same input batch. Prints a markdown table of images/s and the file sizes.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from kdkit.bench.sysinfo import machine
from kdkit.evaluate.export import check_parity, export_onnx, ort_runner, ort_session, time_runners
from kdkit.models.factory import create_model

LABELS = {"torch_eager": "PyTorch eager", "onnxruntime": "ONNX Runtime", "openvino_fp32": "OpenVINO fp32",
          "openvino_int8": "OpenVINO int8"}


def openvino_models(model, a, tmp: Path, sample: torch.Tensor) -> tuple[dict, dict, dict]:
    """({name: OpenVINOModel}, {name: parity}, {name: bytes}) for the fp32 IR and its int8 version."""
    import openvino as ov
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    from kdkit.evaluate.deploy import OpenVINOModel, check_ir_parity, convert_ir, input_spec, quantize
    from kdkit.models.checkpoint import ModelInfo

    info = ModelInfo(source=a.model, model=a.model, model_kwargs={}, num_classes=a.classes, classes=None,
                     image_size=a.size, crop_ratio=0.875, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
                     head=None, weights="random")
    ir_model = convert_ir(model, info, input_spec(info, 0.875, False, None))
    ov.save_model(ir_model, str(tmp / "model.xml"), compress_to_fp16=False)
    fp32 = OpenVINOModel(tmp / "model.xml", a.threads)
    g = torch.Generator().manual_seed(1)
    calib = [torch.randn(1, 3, a.size, a.size, generator=g) for _ in range(a.calibration_samples)]
    ov.save_model(quantize(ir_model, calib, fp32.feed, None, None), str(tmp / "model_int8.xml"))
    int8 = OpenVINOModel(tmp / "model_int8.xml", a.threads)
    models = {"openvino_fp32": fp32, "openvino_int8": int8}
    parity = {"openvino_fp32": check_ir_parity(model, fp32, sample, 1e-3)}
    sizes = {"openvino_fp32": (tmp / "model.bin").stat().st_size,
             "openvino_int8": (tmp / "model_int8.bin").stat().st_size}
    return models, parity, sizes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="resnet18", help="timm model name")
    p.add_argument("--size", type=int, default=224, help="input resolution")
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--batches", default="8,32", help="comma-separated batch sizes")
    p.add_argument("--iterations", type=int, default=10, help="timed forward passes per runtime and batch size")
    p.add_argument("--warmup", type=int, default=3, help="untimed passes before each timing")
    p.add_argument("--repeats", type=int, default=3,
                   help="timings per runtime, the runtimes alternating; the median is reported")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="intra-op threads of all runtimes")
    p.add_argument("--exporter", default="auto", choices=["auto", "dynamo", "torchscript"])
    p.add_argument("--openvino", action=argparse.BooleanOptionalAction, default=True,
                   help="also OpenVINO fp32 and NNCF int8 (needs the deploy extra)")
    p.add_argument("--calibration-samples", type=int, default=32, help="random inputs NNCF calibrates int8 on")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    a = p.parse_args(argv)

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = create_model(a.model, num_classes=a.classes).eval()
    sample = torch.randn(4, 3, a.size, a.size, generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        t0 = time.perf_counter()
        how = export_onnx(model, a.size, path, exporter=a.exporter)
        export_s = time.perf_counter() - t0
        session = ort_session(path, a.threads)
        parity = {"onnxruntime": check_parity(model, ort_runner(session), sample, atol=1e-3)}
        sizes = {"torch_eager": sum(t.numel() * t.element_size() for t in model.state_dict().values()),
                 "onnxruntime": sum(f.stat().st_size for f in Path(tmp).glob("model.onnx*"))}  # + .data
        ov_models = {}
        if a.openvino:
            ov_models, ov_parity, ov_sizes = openvino_models(model, a, Path(tmp), sample)
            parity.update(ov_parity)
            sizes.update(ov_sizes)
        rows = []
        for b in map(int, a.batches.split(",")):
            batch = sample.repeat(-(-b // len(sample)), 1, 1, 1)[:b].contiguous()
            feed = {"images": batch.numpy()}
            calls = {"torch_eager": lambda: model(batch), "onnxruntime": lambda: session.run(["logits"], feed)}
            for name, m in ov_models.items():
                calls[name] = (lambda m, x: lambda: m.run(x))(m, m.feed(batch))
            with torch.no_grad():
                rows.append({"batch_size": b, **time_runners(calls, b, a.iterations, a.warmup, a.repeats)})
    m = machine()
    versions = f"torch {m['torch']}, onnxruntime {__import__('onnxruntime').__version__}"
    if ov_models:
        import nncf
        import openvino

        versions += f", openvino {openvino.__version__.split('-')[0]}, nncf {nncf.__version__}"
    print(f"{a.model}, {a.size} px, {a.classes} classes, random weights; {how['exporter']} ONNX exporter "
          f"({export_s:.1f} s); parity on 4 random inputs (max |diff| vs PyTorch): "
          + ", ".join(f"{LABELS[k]} {v['max_abs_diff']:.1e}" for k, v in parity.items()))
    print(f"machine: {m['cpu']} ({m['cpu_cores']} cores), {a.threads} threads; {versions}; median of {a.repeats} "
          f"alternating timings of {a.iterations} passes (after {a.warmup} warm-up)\n")
    names = [k for k in LABELS if k in rows[0]]
    print("| batch | " + " | ".join(f"{LABELS[k]} img/s" for k in names) + " | best / eager |")
    print("|------:|" + "".join("-" * (len(LABELS[k]) + 7) + ":|" for k in names) + "-------------:|")
    for r in rows:
        best = max(r[k] for k in names)
        print(f"| {r['batch_size']} | " + " | ".join(f"{r[k]:.1f}" for k in names)
              + f" | {best / r['torch_eager']:.2f}x |")
    print("| size MB | " + " | ".join(f"{sizes[k] / 1e6:.1f}" for k in names) + " | |")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()}, "machine": m, **how,
                                      "export_seconds": export_s, "parity": parity, "bytes": sizes,
                                      "results": rows}, indent=1))
    return 0 if all(v["ok"] for v in parity.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
