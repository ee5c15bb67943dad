"""ONNX Runtime vs PyTorch eager on the CPU, for a model exported the way `kdkit export` does it.

    .venv/bin/python scripts/bench_export.py                       # resnet18, 224 px, batch 8 and 32
    .venv/bin/python scripts/bench_export.py --model resnet50 --batches 1,8,32 --threads 16 --json out.json

A randomly initialised timm model (no weights are downloaded: speed does not depend on them) is
exported with kdkit.evaluate.export.export_onnx (dynamo exporter, dynamic batch), checked for
parity against PyTorch, then timed in the same process: per batch size, `--warmup` untimed and
`--iterations` timed forward passes of PyTorch eager (no_grad) and then of ONNX Runtime's
CPU provider, both with `--threads` intra-op threads, on the same input batch. Prints a markdown
table of images/s and the ratio.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from kdkit.bench.sysinfo import machine  # noqa: E402
from kdkit.evaluate.export import check_parity, export_onnx, ort_runner, ort_session, throughput  # noqa: E402
from kdkit.models.factory import create_model  # noqa: E402


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
                   help="timings per runtime, alternating eager and ORT; the median is reported")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="intra-op threads of both runtimes")
    p.add_argument("--exporter", default="auto", choices=["auto", "dynamo", "torchscript"])
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    a = p.parse_args(argv)

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = create_model(a.model, num_classes=a.classes).eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        t0 = time.perf_counter()
        how = export_onnx(model, a.size, path, exporter=a.exporter)
        export_s = time.perf_counter() - t0
        session = ort_session(path, a.threads)
        sample = torch.randn(4, 3, a.size, a.size, generator=torch.Generator().manual_seed(0))
        parity = check_parity(model, ort_runner(session), sample, atol=1e-3)
        rows = [throughput(model, session, sample, int(b), a.iterations, a.warmup, a.repeats)
                for b in a.batches.split(",")]
    m = machine()
    print(f"{a.model}, {a.size} px, {a.classes} classes, random weights; {how['exporter']} exporter "
          f"({export_s:.1f} s); parity on 4 random inputs: max |diff| {parity['max_abs_diff']:.1e}, "
          f"top-1 agreement {100 * parity['top1_agreement']:.0f} %")
    print(f"machine: {m['cpu']} ({m['cpu_cores']} cores), {a.threads} threads; torch {m['torch']}, "
          f"onnxruntime {__import__('onnxruntime').__version__}; median of {a.repeats} alternating timings of "
          f"{a.iterations} passes (after {a.warmup} warm-up)\n")
    print("| batch | PyTorch eager img/s | ONNX Runtime img/s | ORT / eager |")
    print("|------:|--------------------:|-------------------:|------------:|")
    for r in rows:
        print(f"| {r['batch_size']} | {r['torch_eager_img_s']:.1f} | {r['onnxruntime_img_s']:.1f} "
              f"| {r['speedup']:.2f}x |")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()}, "machine": m, **how,
                                      "export_seconds": export_s, "parity": parity, "results": rows}, indent=1))
    return 0 if parity["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
