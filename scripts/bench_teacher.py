"""Teacher-pass throughput vs the same teacher's plain forward on preloaded tensors, in one run.

    python scripts/bench_teacher.py                      # resnet18 at 112 px on 200 synthetic images
    python scripts/bench_teacher.py --device gpu --images 2000 --size 224 --model resnet50

The plain forward is the ceiling: the same model, batch size, image size, device and AMP setting,
on tensors already in memory. The pass adds everything a real run pays: reading the tars, DALI
decode + resize + crop (K views), fp16 conversion, rewriting the shards with their new members.
On a CPU both compete for the same cores, so the pass is expected below the ceiling; on a GPU the
DALI work runs beside the model and the ratio shows what is left. The teacher is a randomly
initialised timm model saved as a kdkit checkpoint (no download); images are synthetic photo-like
JPEGs (kdkit.bench.synthetic), so the numbers are reproducible anywhere.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from kdkit.bench.synthetic import write_tree
from kdkit.models.checkpoint import save_checkpoint
from kdkit.models.factory import create_model
from kdkit.runtime import cores, pick_device
from kdkit.shards.sources.folder import list_folder
from kdkit.shards.writer import ShardConfig, write_dataset
from kdkit.teach import TeacherPassConfig, TeacherSpec, add_teacher_logits


def best_plain_forward(model, images, batch_size, device, amp, thread_counts) -> float:
    """The ceiling: the faster of the plain forward with each torch thread count (CPU: all cores,
    and the count the pass gives torch beside DALI; on a loaded machine fewer can be faster)."""
    if device.type == "cuda":
        return plain_forward(model, images, batch_size, device, amp)
    before, rates = torch.get_num_threads(), []
    for n in thread_counts:
        torch.set_num_threads(n)
        rates.append(plain_forward(model, images, batch_size, device, amp))
    torch.set_num_threads(before)
    return max(rates)


def plain_forward(model, images: torch.Tensor, batch_size: int, device: torch.device, amp: bool) -> float:
    """images/s of model(x) over preloaded batches (already on the device)."""
    batches = [b.to(device) for b in images.split(batch_size)]
    if device.type == "cuda":
        batches = [b.contiguous(memory_format=torch.channels_last) for b in batches]
        model = model.to(memory_format=torch.channels_last)
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.float16, enabled=amp):
        for b in batches:
            model(b).float().cpu()  # the pass too brings every output back to the host
    if device.type == "cuda":
        torch.cuda.synchronize()
    return len(images) / (time.perf_counter() - t0)


def teacher_pass(shards: Path, ckpt: Path, out: Path, a, views: int | None) -> tuple[float, float]:
    """(images/s over the whole call, images/s of the shard loop) for one pass into a new folder."""
    cfg = TeacherPassConfig(shards=shards, teachers=[TeacherSpec(ckpt)], out=out, views=views, device=a.device,
                            batch_size=a.batch_size, threads=a.threads, progress=False, splits=["train"])
    t0 = time.perf_counter()
    report = add_teacher_logits(cfg)[0]
    return report.samples / (time.perf_counter() - t0), report.images_per_s


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="DALI threads")
    p.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto", help="auto: the GPU where one is visible")
    p.add_argument("--views", type=int, nargs="*", default=[4], help="also time multi-view passes with these K")
    p.add_argument("--repeats", type=int, default=3, help="alternating rounds of forward and pass (medians)")
    p.add_argument("--work", type=Path, default=None, help="folder for the data (default: a temporary one)")
    p.add_argument("--shards", type=Path, default=None,
                   help="an existing dataset root to read (its train split; --images and --classes from its "
                        "manifest) instead of writing synthetic images")
    a = p.parse_args(argv)

    work = Path(a.work or tempfile.mkdtemp(prefix="bench-teacher-"))
    raw, shards = work / "raw", a.shards or work / "shards"
    if a.shards is not None:
        manifest = json.loads((a.shards / "train" / "manifest.json").read_text())
        a.images, a.classes = manifest["num_samples"], len(manifest["classes"])
    elif not shards.exists():
        write_tree(raw / "train", images=a.images, classes=a.classes, seed=0)
        write_dataset(list_folder(raw), shards, ShardConfig(samples_per_shard=max(1, a.images // 4), workers=1,
                                                            progress=False))
    device = pick_device(a.device)
    a.device = "gpu" if device.type == "cuda" else "cpu"
    amp = device.type == "cuda"
    torch.manual_seed(0)
    model = create_model(a.model, num_classes=a.classes).eval()
    ckpt = work / "teacher.pth"
    save_checkpoint(ckpt, {"model": a.model, "model_kwargs": {}, "num_classes": a.classes, "image_size": a.size,
                           "mean": list(model.pretrained_cfg["mean"]), "std": list(model.pretrained_cfg["std"]),
                           "state_dict": model.state_dict()})

    # A K-view pass feeds the teacher batch x K views at once, so it is compared with the plain
    # forward at that same teacher batch (bigger batches alone are faster on a CPU). The two are
    # measured alternately, `repeats` times, and medians reported: on a shared machine the load
    # changes from minute to minute, and alternating keeps both sides under the same conditions.
    rows = []
    counts = sorted({torch.get_num_threads(), max(1, cores() - a.threads)})  # see kdkit.teach.compute.cpu_threads
    images = torch.randn(a.images, 3, a.size, a.size)
    model = model.to(device)
    for views in [None, *a.views]:
        k, tb = views or 1, a.batch_size * (views or 1)
        plain_forward(model, images, tb, device, amp)  # warm-up: allocator, oneDNN / cuDNN kernel choice
        fwd, loop, wall = [], [], []
        for r in range(a.repeats):
            fwd.append(best_plain_forward(model, images, tb, device, amp, counts))
            w, lp = teacher_pass(shards, ckpt, work / f"out-{views or 'center'}-{r}", a, views)
            wall.append(w * k)
            loop.append(lp * k)
        med = statistics.median
        rows.append(("plain forward, preloaded tensors", tb, a.images, med(fwd), med(fwd), 1.0))
        label = "teacher pass, centre crop" if views is None else f"teacher pass, {views} random views"
        rows.append((label, tb, a.images * k, med(loop), med(wall), med(lp / f for lp, f in zip(loop, fwd))))

    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "none"
    print(f"\n{a.model} at {a.size} px, batch {a.batch_size}, {a.images} images, device {a.device}"
          f"{' (AMP fp16)' if amp else ''}, DALI threads {a.threads}; {os.cpu_count()} CPU cores "
          f"({platform.processor() or platform.machine()}), GPU: {gpu}; torch {torch.__version__}\n")
    print("| what | teacher batch | teacher images | images/s (shard loop) | images/s (whole call) "
          "| vs plain forward |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for label, tb, n, loop, wall, ratio in rows:
        print(f"| {label} | {tb} | {n} | {loop:.0f} | {wall:.0f} | {ratio:.2f} |")
    print("\nimages/s counts teacher inputs (samples x views); 'whole call' includes loading the checkpoint,"
          " checks and writing the manifest; medians of", a.repeats, "alternating rounds."
          + (f" Plain forward: the faster of torch threads {counts}." if device.type == "cpu" else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
