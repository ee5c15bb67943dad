"""`kdkit bench-loader`: options -> BenchConfig -> run_bench. Import-light: the benchmark itself
(torch, DALI) is imported when it runs."""
from __future__ import annotations

import argparse
from pathlib import Path

from kdkit.options import COUNT, POSITIVE, HelpFormatter, integer, number


def add_parser(sub) -> None:
    from kdkit.bench import AUGS  # light: the benchmark itself (torch, DALI) is imported when it runs

    def run(a: argparse.Namespace) -> int:
        from kdkit.bench.loader_bench import BenchConfig, format_table, run_bench
        from kdkit.bench.sysinfo import save_report

        cfg = BenchConfig(shards=a.shards, split=a.split, batch_size=a.batch_size, threads=a.threads,
                          size=a.size, aug=a.aug, device=a.device, batches=a.batches, warmup=a.warmup,
                          repeats=a.repeats, baseline=a.baseline, gpu_feed=a.gpu_feed, shuffle_buffer=a.shuffle_buffer,
                          dtype=a.dtype, antialias=a.antialias, fast_idct=a.fast_idct,
                          native_resize=a.native_resize, rotate=a.rotate, rotate_fill=a.rotate_fill, hue=a.hue,
                          augmix_severity=a.augmix_severity, augmix_width=a.augmix_width,
                          augmix_depth=a.augmix_depth, augmix_alpha=a.augmix_alpha)
        report = run_bench(cfg)
        print(format_table(report))
        if a.json:
            save_report(a.json, report)
        return 0

    p = sub.add_parser("bench-loader", help="images/s of a DALI pipeline vs a DataLoader + Pillow baseline",
                       formatter_class=HelpFormatter,
                       description="Measure images/s of the DALI train (or eval) pipeline on a shard set after "
                                   "warm-up, then the same work through torch's DataLoader over stock webdataset "
                                   "with Pillow and torchvision (workers = DALI threads), and report the ratio and "
                                   "CPU use. --gpu-feed also times a model training step to show the bottleneck.")
    p.add_argument("shards", type=Path, help="a shard-set folder, or a dataset root holding --split")
    p.add_argument("--split", default="train", help="split to read from a dataset root")
    p.add_argument("--batch-size", type=COUNT, default=64)
    p.add_argument("--threads", type=COUNT, default=2, help="DALI num_threads and DataLoader num_workers")
    p.add_argument("--size", type=integer(8), default=224, help="output resolution (square)")
    p.add_argument("--aug", choices=AUGS, default="rrc-flip", help="augmentation (both loaders)")
    g = p.add_argument_group("augmentation added to --aug (train augmentations; as `kdkit train`)")
    g.add_argument("--rotate", type=number(0, 180), default=0.0, metavar="DEG",
                   help="random rotation in [-DEG, DEG] (baseline: RandomRotation)")
    g.add_argument("--rotate-fill", type=number(0, 255), default=None, metavar="GREY",
                   help="grey level of the corners a rotation uncovers (default: the mean colour)")
    g.add_argument("--hue", type=number(0, 0.5), default=0.0,
                   help="hue jitter in [-H, H] of a turn (baseline: ColorJitter)")
    g.add_argument("--augmix-severity", type=integer(1, 10), default=3, help="--aug augmix: magnitude 1..10")
    g.add_argument("--augmix-width", type=COUNT, default=3, help="--aug augmix: chains mixed")
    g.add_argument("--augmix-depth", type=integer(-1, 3), default=-1, help="--aug augmix: ops per chain (-1: 1..3)")
    g.add_argument("--augmix-alpha", type=POSITIVE, default=1.0, help="--aug augmix: Dirichlet / Beta parameter")
    p.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto",
                   help="DALI backend (auto: the GPU where torch sees one; the table says which ran)")
    p.add_argument("--dtype", choices=["float32", "float16"], default="float32", help="DALI output type")
    p.add_argument("--batches", type=COUNT, default=50, help="measured batches per loader")
    p.add_argument("--warmup", type=integer(0), default=5, help="batches run before timing starts")
    p.add_argument("--repeats", type=COUNT, default=1,
                   help="measurements per loader, alternating DALI and baseline; the median is reported")
    p.add_argument("--shuffle-buffer", type=COUNT, default=1024, help="shuffle buffer of both loaders")
    p.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                   help="also run the DataLoader + Pillow baseline")
    p.add_argument("--antialias", action=argparse.BooleanOptionalAction, default=True,
                   help="antialiased DALI resize (Pillow always antialiases: off is faster, not equivalent)")
    p.add_argument("--fast-idct", action=argparse.BooleanOptionalAction, default=False,
                   help="DALI decodes with libjpeg-turbo's fast IDCT (Pillow uses the exact one: faster, "
                        "not bit-equal)")
    p.add_argument("--native-resize", action=argparse.BooleanOptionalAction, default=True,
                   help="CPU backend: kdkit's resize + normalize DALI operator (--no-native-resize: DALI's "
                        "fn.resize, same pixels, slower)")
    p.add_argument("--gpu-feed", default=None, metavar="MODEL",
                   help="also time a training step of this timm model (AMP on GPU), e.g. resnet50")
    p.add_argument("--json", type=Path, default=None, metavar="FILE", help="write the results as JSON")
    p.set_defaults(func=run)
