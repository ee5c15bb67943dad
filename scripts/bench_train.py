"""Training throughput fed by the DALI loader vs the same training step on tensors already in memory.

    .venv/bin/python scripts/bench_train.py                       # CPU: synthetic shards, tiny model
    .venv/bin/python scripts/bench_train.py --device cuda --model resnet50 --image-size 224 \
        --batch-size 256 --threads 8 --amp bf16 --channels-last   # GPU: DALI "mixed" decode

One process, one model, one optimizer, the trainer's own `train_step` (kdkit.train.loop) and its
own loader (kdkit.train.data.train_loader, DALI). Three measurements, alternated `--repeats`
times after warm-up, medians reported:
  loader only   images/s of the DALI train loader alone (what it can deliver)
  step only     images/s of train_step on one batch kept in memory on the device (what the model
                can consume; "synthetic tensors")
  loader + step images/s of real training: the loader's batches through train_step
The loader's cost is 1 - (loader + step) / (step only): the share of training throughput lost to
feeding the model. With no --shards, photo-like JPEGs (~440x350, ~50 KB, kdkit.bench.synthetic)
are written and sharded under bench-out/train first.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from kdkit.bench.sysinfo import machine, save_report
from kdkit.train.build import build
from kdkit.train.config import make_config
from kdkit.runtime import Runtime, pick_device
from kdkit.train.loop import train_step


def synthetic_shards(out: Path, images: int, max_size: int | None) -> Path:
    from kdkit.bench.synthetic import write_tree
    from kdkit.shards.sources.folder import list_folder
    from kdkit.shards.images import ImageOptions
    from kdkit.shards.writer import ShardConfig, write_dataset

    shards = out / f"shards-{images}-{max_size or 'full'}"
    if not (shards / "train" / "manifest.json").exists():
        raw = out / f"raw-{images}"
        if not raw.exists():
            write_tree(raw / "train", images=images, classes=10, seed=0)
        write_dataset(list_folder(raw), shards, ShardConfig(samples_per_shard=100, workers=2, progress=False,
                                                            image=ImageOptions(max_size=max_size)))
    return shards


def batches_forever(p):
    """The trainer's loader, epoch after epoch (one loader per run, as in training)."""
    while True:
        yield from p.loaders.train


def sync(p) -> None:
    if p.rt.device.type == "cuda":
        torch.cuda.synchronize()


def timed(p, n: int, body) -> float:
    """images/s of n calls of body() (each one batch)."""
    sync(p)
    t = time.perf_counter()
    images = sum(body() for _ in range(n))
    sync(p)
    return images / (time.perf_counter() - t)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=Path, default=None, help="dataset root (default: synthetic, written once)")
    ap.add_argument("--out", type=Path, default=Path("bench-out/train"), help="where synthetic shards go")
    ap.add_argument("--images", type=int, default=600, help="synthetic images")
    ap.add_argument("--max-size", type=int, default=None, help="shard the synthetic images downscaled to this")
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--image-size", type=int, default=112)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2, help="DALI threads")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"])
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--kd", default="none", choices=["none"], help="(stored KD needs shards with logits)")
    ap.add_argument("--steps", type=int, default=20, help="measured batches per measurement")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)

    data = a.shards or synthetic_shards(a.out, a.images, a.max_size)
    cfg = make_config(dict(data=str(data), val_split=None, model=a.model, image_size=a.image_size,
                           batch_size=a.batch_size, loader_threads=a.threads, device=a.device, amp=a.amp,
                           channels_last=a.channels_last, shuffle_buffer=256, sched="none", opt="sgd", lr=0.01,
                           progress=False, kd=a.kd))
    p = build(cfg, Runtime(device=pick_device(cfg.device)), start_run=False)
    p.student.model.train()
    feed = batches_forever(p)
    held = next(feed)  # one real batch, moved to the device once: the "synthetic tensors"
    held = type(held)(held.images.to(p.rt.device), held.labels.to(p.rt.device), held.teacher_logits)
    n = held.labels.shape[0]

    def loader_only():
        return next(feed).labels.shape[0]

    def step_only():
        train_step(p, held, 0, 1, False)
        return n

    def fed():
        b = next(feed)
        train_step(p, b, 0, 1, False)
        return b.labels.shape[0]

    for f in (loader_only, step_only, fed):  # warm-up: allocator, oneDNN / cuDNN autotuning, DALI buffers
        timed(p, a.warmup, f)
    runs = {"loader_only": [], "step_only": [], "loader_plus_step": []}
    for _ in range(a.repeats):
        runs["loader_only"].append(timed(p, a.steps, loader_only))
        runs["step_only"].append(timed(p, a.steps, step_only))
        runs["loader_plus_step"].append(timed(p, a.steps, fed))
    med = {k: statistics.median(v) for k, v in runs.items()}
    report = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
              "device": str(p.rt.device), "torch_threads": torch.get_num_threads(), "machine": machine(),
              "images_per_s": {k: round(v, 1) for k, v in med.items()},
              "runs": {k: [round(x, 1) for x in v] for k, v in runs.items()},
              "loader_cost": round(1 - med["loader_plus_step"] / med["step_only"], 3)}
    print(f"{a.model} {a.image_size}px batch {a.batch_size} on {p.rt.device} (torch threads "
          f"{torch.get_num_threads()}, DALI threads {a.threads}, amp {a.amp}); median of {a.repeats} x {a.steps} batches")
    for k, v in med.items():
        print(f"  {k:18s} {v:8.1f} img/s")
    print(f"  loader cost: {100 * report['loader_cost']:.0f}% of the step-only throughput")
    if a.json:
        save_report(a.json, report)
    return report


if __name__ == "__main__":
    main()
