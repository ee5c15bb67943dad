"""Training images/s with stored KD, several views per decoded image, vs no KD: same shards, same model.

    .venv/bin/python scripts/bench_views.py                       # CPU: synthetic shards, resnet18 at 112 px
    .venv/bin/python scripts/bench_views.py --device cuda --model resnet50 --image-size 224 \
        --batch-size 256 --threads 8 --amp bf16                   # GPU: DALI "mixed" decode

Photo-like JPEGs (~440x350, kdkit.bench.synthetic) are sharded and given K stored teacher views
(`kdkit add-teacher-logits --views K`, a small random-init teacher: its outputs do not matter here,
the stored boxes do). Then, in one process with one model, the trainer's own loader and train_step
(as scripts/bench_train.py) run on the same shards for each configuration, alternated `--repeats`
times after warm-up, medians reported:
  none          --kd none: random-resized-crop, the whole JPEG region decoded per training image
  replay N=1    --kd replay: one stored view per decoded sample (ROI decode of the view)
  replay N=n    --kd replay --views-per-load n: each sample decoded once, n stored views cut from it
Every configuration trains on the same number of images per step (--batch-size): replay N=n reads
batch-size / n samples per step. Reported: training images/s (loader + step) and the loader alone.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

# bench_train beside this file (also when loaded by path); never the repository root: the source kdkit/ has no
# pipelines subpackage (that is a package-dir mapping), so it must not shadow the installed package
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_train import batches_forever, synthetic_shards, timed  # noqa: E402
from kdkit.bench.sysinfo import machine, save_report  # noqa: E402
from kdkit.models.checkpoint import save_checkpoint  # noqa: E402
from kdkit.models.factory import create_model  # noqa: E402
from kdkit.runtime import Runtime, pick_device  # noqa: E402
from kdkit.teach import TeacherPassConfig, TeacherSpec, add_teacher_logits  # noqa: E402
from kdkit.train.build import build  # noqa: E402
from kdkit.train.config import make_config  # noqa: E402
from kdkit.train.loop import train_step  # noqa: E402


def with_views(shards: Path, out: Path, views: int, threads: int, device: str) -> Path:
    """`shards` plus K stored views per train sample (written once)."""
    kd = out / f"{shards.name}-kd{views}"
    manifest = kd / "train" / "manifest.json"
    if manifest.exists() and json.loads(manifest.read_text()).get("teacher"):
        return kd  # an interrupted pass has no teacher block yet: add_teacher_logits resumes it
    model = create_model("test_efficientnet", num_classes=10).eval()
    ckpt = out / "teacher.pth"
    save_checkpoint(ckpt, {"model": "test_efficientnet", "model_kwargs": {}, "num_classes": 10, "image_size": 112,
                           "mean": list(model.pretrained_cfg["mean"]), "std": list(model.pretrained_cfg["std"]),
                           "state_dict": model.state_dict()})
    add_teacher_logits(TeacherPassConfig(shards=shards, teachers=[TeacherSpec(ckpt)], out=kd, views=views,
                                         device=device, threads=threads, progress=False, splits=["train"]))
    return kd


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("bench-out/views"), help="where the synthetic shards go")
    ap.add_argument("--data", type=Path, default=None,
                    help="a dataset root whose train split already holds K stored views (`kdkit add-teacher-logits "
                         "--views K`) instead of synthetic shards; take a sample count that is a multiple of "
                         "--batch-size, so no configuration drops a partial batch of decoded images")
    ap.add_argument("--images", type=int, default=400, help="synthetic images")
    ap.add_argument("--views", type=int, default=4, help="K: stored views per sample")
    ap.add_argument("--per-load", type=int, nargs="+", default=[4], help="views per load to time besides 1")
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--image-size", type=int, default=112)
    ap.add_argument("--batch-size", type=int, default=32, help="training images per step, in every configuration")
    ap.add_argument("--threads", type=int, default=2, help="DALI threads")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"])
    ap.add_argument("--steps", type=int, default=10, help="measured batches per measurement")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)

    device = pick_device(a.device)
    if a.data is not None:
        manifest = json.loads((a.data / "train" / "manifest.json").read_text())
        data, a.views, a.images = a.data, manifest["teacher"]["views"], manifest["num_samples"]
    else:
        data = with_views(synthetic_shards(a.out, a.images, None), a.out, a.views, a.threads,
                          "gpu" if device.type == "cuda" else "cpu")
    # the last partial batch of an epoch is decoded and dropped: a sample count that is not a multiple of
    # the samples per step would charge that waste unevenly (batch 256 vs 64 samples with 4 views per load)
    dropped = {n: a.images % (a.batch_size // n) for n in [1, *a.per_load]}
    if any(dropped.values()):
        print(f"note: {a.images} images leave {dropped} decoded samples per epoch out of the batches (views per "
              "load: samples); a multiple of the batch size compares the configurations evenly", file=sys.stderr)
    configs = {"none": dict(kd="none"), "replay N=1": dict(kd="replay")}
    configs.update({f"replay N={n}": dict(kd="replay", views_per_load=n, batch_size=a.batch_size // n)
                    for n in a.per_load})
    torch.manual_seed(0)
    model_state = None
    parts, feeds = {}, {}
    for name, extra in configs.items():
        cfg = make_config(dict(dict(data=str(data), val_split=None, model=a.model, image_size=a.image_size,
                                    batch_size=a.batch_size, loader_threads=a.threads, device=a.device, amp=a.amp,
                                    shuffle_buffer=256, sched="none", opt="sgd", lr=0.01, progress=False), **extra))
        p = build(cfg, Runtime(device=device), start_run=False)
        if model_state is None:
            model_state = {k: v.clone() for k, v in p.student.model.state_dict().items()}
        p.student.model.load_state_dict(model_state)  # the same model, the same weights
        p.student.model.train()
        parts[name], feeds[name] = p, batches_forever(p)

    def loader_only(name):
        return lambda: next(feeds[name]).labels.shape[0]

    def fed(name):
        def step():
            b = next(feeds[name])
            train_step(parts[name], b, 0, 1, False)
            return b.labels.shape[0]
        return step

    for name in configs:  # warm-up: allocator, oneDNN / cuDNN autotuning, DALI buffers
        timed(parts[name], a.warmup, loader_only(name))
        timed(parts[name], a.warmup, fed(name))
    runs = {name: {"loader_only": [], "training": []} for name in configs}
    for _ in range(a.repeats):  # alternated: a shared machine's load changes from minute to minute
        for name in configs:
            runs[name]["loader_only"].append(timed(parts[name], a.steps, loader_only(name)))
            runs[name]["training"].append(timed(parts[name], a.steps, fed(name)))
    med = {name: {k: statistics.median(v) for k, v in r.items()} for name, r in runs.items()}
    report = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
              "device": str(device), "torch_threads": torch.get_num_threads(), "machine": machine(),
              "images_per_s": {n: {k: round(v, 1) for k, v in m.items()} for n, m in med.items()},
              "runs": {n: {k: [round(x, 1) for x in v] for k, v in r.items()} for n, r in runs.items()}}
    print(f"{a.model} {a.image_size}px, {a.batch_size} training images per step, on {device} (torch threads "
          f"{torch.get_num_threads()}, DALI threads {a.threads}); K={a.views} stored views; {a.images} images; "
          f"median of {a.repeats} alternating rounds x {a.steps} steps\n")
    print("| configuration | samples per step | training img/s (loader + step) | vs none | loader alone img/s "
          "| vs none |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    base = med["none"]
    for name, m in med.items():
        per_step = configs[name].get("batch_size", a.batch_size)
        print(f"| {name} | {per_step} | {m['training']:.1f} | {m['training'] / base['training']:.2f}x "
              f"| {m['loader_only']:.0f} | {m['loader_only'] / base['loader_only']:.2f}x |")
    if a.json:
        save_report(a.json, report)
    return report


if __name__ == "__main__":
    main()
