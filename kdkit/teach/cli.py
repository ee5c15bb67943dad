"""`kdkit add-teacher-logits`: options -> TeacherPassConfig -> add_teacher_logits. Nothing else.

kdkit/cli.py registers it with `add_parser(sub)`; the heavy imports (torch, DALI, timm) happen
only when the command runs, so `kdkit --help` stays fast.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from kdkit.errors import KdkitError
from kdkit.options import COUNT, FRACTION, SEED, HelpFormatter, add_options, command_line, csv_list, integer
from kdkit.pipelines.options import DECODING, Backend, RandomCrop, decoding
from kdkit.shards.location import location_arg


DESCRIPTION = """\
Run a teacher (a timm model + a local checkpoint, or several averaged) once over a shard set and
store its outputs beside every sample: fp16 logits of the centre crop (default), or of K random
views with each view's crop box and flip (--views K) for the replay pipeline, in full or top-k.
The result is a new set (--out) or the same set replaced shard by shard (--in-place); rerun the
same command to resume. Under torchrun each rank takes its part of the shards.

examples:
  kdkit add-teacher-logits data/ --checkpoint runs/t/best.pth --out data-kd/
  kdkit add-teacher-logits data/train --model resnet50 --checkpoint r50.pth --views 8 --topk 20 --in-place
  kdkit add-teacher-logits data/ --checkpoint a.pth --checkpoint b.pth --out data-ens/ --export-h5 ens.h5
  kdkit add-teacher-logits data/ --import-h5 logits.h5 --out data-kd/
  kdkit add-teacher-logits data-kd-old/ --repack --in-place     # a set written by kdkit before 2026-12
"""


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("add-teacher-logits", help="store a teacher's outputs (logits, views) in a shard set",
                       formatter_class=HelpFormatter, description=DESCRIPTION)
    p.add_argument("shards", type=location_arg,
                   help="a shard-set folder, or a dataset root holding one per split (local, or a bucket URL)")
    g = p.add_argument_group("Teacher (repeat --checkpoint for an ensemble: probabilities are averaged)")
    g.add_argument("--checkpoint", type=Path, action="append", default=[],
                   help="local checkpoint: written by `kdkit train`, or a timm/torchvision state dict (default: none)")
    g.add_argument("--model", action="append", default=[],
                   help="timm model name per --checkpoint, in the same order (needed for bare state dicts; "
                        "a kdkit checkpoint names its own) (default: none)")
    g.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                   help="use a checkpoint's EMA weights where it has them; --no-ema: the raw weights (one rule "
                        "for every command that loads a checkpoint)")
    g.add_argument("--trust-checkpoint", action="store_true",
                   help="load checkpoints that hold pickled Python objects besides weights (that runs their code: only "
                        "for files you trust; default: data only)")
    g = p.add_argument_group("Views")
    g.add_argument("--views", type=COUNT, default=None, metavar="K",
                   help="K seeded random-resized-crop views per sample, stored with their boxes "
                        "(default: the centre crop only)")
    g.add_argument("--image-size", type=integer(8), default=None, help="view size (default: from the checkpoint / timm)")
    g.add_argument("--crop-ratio", type=FRACTION, default=None,
                   help="centre crop: image size / resized shorter side (default: timm's crop_pct, else 0.875)")
    add_options(p, RandomCrop, group=g)  # the random views' crop and flip: the training role's options
    g.add_argument("--seed", type=SEED, default=0, help="seed of the random views (each shard derives its own)")
    g = p.add_argument_group("Storage")
    g.add_argument("--topk", type=COUNT, default=None, metavar="k",
                   help="store the k largest logits and their class indices instead of all (default: all)")
    where = g.add_mutually_exclusive_group()
    where.add_argument("--out", type=location_arg, default=None,
                       help="write a new set (or dataset root) here: a folder or a bucket URL (default: none)")
    where.add_argument("--in-place", action="store_true", help="replace each shard of the input atomically")
    g.add_argument("--split", type=csv_list, default=None,
                   help="comma-separated splits of a dataset root (default: all)")
    g.add_argument("--export-h5", type=Path, default=None, metavar="FILE",
                   help="write the outputs keyed by sample key to this HDF5 file (alone: export what the set holds) "
                        "(default: none)")
    g.add_argument("--import-h5", type=Path, default=None, metavar="FILE",
                   help="take the outputs from this HDF5 file (joined by key) instead of running a teacher "
                        "(default: none)")
    g.add_argument("--repack", action="store_true",
                   help="convert a set written before kdkit stored one packed .teacher member per sample (a .npy "
                        "member per array) into it: the same outputs, smaller; with --out or --in-place")
    g = p.add_argument_group("Run")
    g.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto",
                   help="where DALI and the teacher run (gpu: device LOCAL_RANK; auto: the GPU where torch sees one)")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True, help="fp16 autocast on the GPU")
    g.add_argument("--batch-size", type=COUNT, default=64, help="images per teacher forward (x K with --views)")
    g.add_argument("--threads", type=COUNT, default=None,
                   help="DALI threads (default: the cores / local ranks on the GPU, min(8, cores) on the CPU)")
    add_options(p, Backend, include=DECODING, group=g)  # the GPU decoder's options (TeacherPassConfig's too)
    g.add_argument("--torch-threads", type=COUNT, default=None,
                   help="CPU teacher: torch threads (default: the cores DALI's --threads leave, at least 1)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def config_from_args(a: argparse.Namespace):
    from kdkit.teach.config import TeacherPassConfig, TeacherSpec

    if a.model and len(a.model) != len(a.checkpoint):
        raise KdkitError(f"{len(a.model)} --model for {len(a.checkpoint)} --checkpoint: give one --model per "
                         "--checkpoint, in the same order, or none (kdkit checkpoints name their model)")
    models = a.model or [None] * len(a.checkpoint)
    teachers = [TeacherSpec(checkpoint=c, model=m, prefer_ema=a.ema, trust=a.trust_checkpoint)
                for c, m in zip(a.checkpoint, models)]
    return TeacherPassConfig(
        shards=a.shards, teachers=teachers, splits=a.split, out=a.out, in_place=a.in_place, views=a.views,
        topk=a.topk, import_h5=a.import_h5, export_h5=a.export_h5, repack=a.repack, image_size=a.image_size, crop_ratio=a.crop_ratio,
        random_area=tuple(a.random_area), random_aspect_ratio=tuple(a.random_aspect_ratio), flip=a.flip,
        seed=a.seed, device=a.device, amp=a.amp, batch_size=a.batch_size, threads=a.threads,
        torch_threads=a.torch_threads, **decoding(a),
        progress=not a.quiet, command=command_line())


def run(a: argparse.Namespace) -> int:
    from kdkit.teach.add_logits import add_teacher_logits, format_report

    reports = add_teacher_logits(config_from_args(a))
    if reports:
        print(format_report(reports))
    return 0  # a part that leaves the manifest to another part (torchrun rank > 0) has succeeded too
