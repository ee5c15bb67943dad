"""`kdkit shard imagenet | folder | list | tfrecord | hdf5` and `kdkit verify`: options -> ShardConfig ->
write_dataset / verify_set. Heavy imports happen when a command runs, so `kdkit --help` stays fast.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
from pathlib import Path

from kdkit.errors import KdkitError
from kdkit.options import COUNT, POSITIVE, SEED, HelpFormatter, command_line, csv_list, integer, part, scheduler_part
from kdkit.shards.location import location_arg


def _add_shard_common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Shard layout")
    g.add_argument("--shard-size-mb", type=POSITIVE, default=256.0, help="target size of one shard in MB")
    g.add_argument("--samples-per-shard", type=COUNT, default=None,
                   help="samples per shard (overrides --shard-size-mb)")
    g.add_argument("--seed", type=SEED, default=0, help="seed of the sample order (classes interleave across shards)")
    g.add_argument("--part", type=part, default=None, metavar="i/N",
                   help="write only shards i, i+N, ... so N machines can write one set together (default: the "
                        "array task of a SLURM or SGE array job, else 0/1, all)")
    g = p.add_argument_group("Image encoding (the biggest levers on later decode speed)")
    g.add_argument("--max-size", type=integer(8), default=None,
                   help="downscale images so the --resize-side is at most this many pixels (default: keep)")
    g.add_argument("--resize-side", choices=["shorter", "longer"], default="shorter", help="side --max-size applies to")
    g.add_argument("--quality", type=integer(1, 100), default=None,
                   help="re-encode every image as JPEG at this quality (default: keep JPEG bytes, "
                        "encode others at 95)")
    g = p.add_argument_group("Run")
    g.add_argument("--workers", type=COUNT, default=os.cpu_count() or 1, help="image-processing processes")
    g.add_argument("--strict", action="store_true",
                   help="stop at the first bad image (or bad list line) instead of skipping it")
    g.add_argument("--quiet", action="store_true", help="no progress bars")


def _shard_config(a: argparse.Namespace):
    from kdkit.shards.images import ImageOptions
    from kdkit.shards.writer import ShardConfig

    if a.quality is not None and not 1 <= a.quality <= 100:
        raise KdkitError(f"--quality {a.quality}: expected 1..100")
    part_of = a.part
    if part_of is None and (task := scheduler_part()) is not None:
        part_of = task[:2]
        if not a.quiet:
            print(f"--part {part_of[0]}/{part_of[1]}, from the {task[2]} (give --part to choose)", file=sys.stderr)
    return ShardConfig(
        samples_per_shard=a.samples_per_shard, shard_size_mb=a.shard_size_mb,
        image=ImageOptions(max_size=a.max_size, resize_side=a.resize_side, quality=a.quality),
        workers=a.workers, seed=a.seed, part=part_of or (0, 1), strict=a.strict,
        command=command_line(),
        progress=not a.quiet)


def _run_shard(a: argparse.Namespace) -> int:
    from kdkit.shards.writer import write_dataset

    cfg = _shard_config(a)
    if a.source == "folder":
        from kdkit.shards.sources.folder import list_folder

        ds = list_folder(a.root, splits=a.splits, name=a.name, layout=a.layout)
    elif a.source == "imagenet":
        from kdkit.shards.sources.imagenet import list_imagenet

        ds = list_imagenet(a.root, splits=a.splits, val_labels=a.val_labels, devkit=a.devkit,
                           class_names=a.class_names)
    elif a.source == "list":
        from kdkit.shards.sources.listfile import list_listfile

        ds = list_listfile(a.lists, a.root, classes_file=a.classes, split=a.split, strict=a.strict)
    elif a.source == "tfrecord":
        from kdkit.shards.sources.tfrecord import list_tfrecords

        ds = list_tfrecords(a.inputs, label_offset=a.label_offset, split=a.split, remap_labels=a.remap_labels,
                            layout=a.layout, compression=a.compression, scratch=gunzipped(a.out))
    elif a.source == "hdf5":
        from kdkit.shards.sources.hdf5 import list_hdf5

        ds = list_hdf5(a.file, images_key=a.images_key, labels_key=a.labels_key, split=a.split,
                       class_names=a.class_names)
    else:  # pragma: no cover - argparse restricts the choices
        raise KdkitError(f"unknown source {a.source}")
    manifests = write_dataset(ds, a.out, cfg)
    if a.source == "tfrecord" and all(manifests.values()):
        shutil.rmtree(gunzipped(a.out), ignore_errors=True)  # every split is written: the copies are done with
        with contextlib.suppress(OSError):
            gunzipped(a.out).parent.rmdir()  # only if nothing else is in it
    return 0 if manifests else 1


def gunzipped(out) -> Path:
    """Where `kdkit shard tfrecord` keeps plain copies of GZIP-compressed records while writing OUT (for a
    bucket OUT: in this machine's scratch)."""
    from kdkit.shards import contract
    from kdkit.shards.location import local_side

    return local_side(out) / contract.STATE_DIR / "gunzipped"


def add_shard_parser(sub) -> None:
    p = sub.add_parser("shard", help="convert a raw dataset into WebDataset shards", formatter_class=HelpFormatter,
                       description="Convert a raw dataset into a kdkit shard set (WebDataset tars + DALI "
                                   "indexes + manifest.json), one folder per split under OUT.")
    s = p.add_subparsers(dest="source", required=True, metavar="SOURCE")

    q = s.add_parser("imagenet", formatter_class=HelpFormatter,
                     help="an ILSVRC2012 folder tree",
                     description="ILSVRC2012: ROOT/train/<wnid>/*.JPEG and ROOT/val/ (class folders, or flat with "
                                 "a label file). Class index = position of the wnid in sorted order.")
    q.add_argument("root", type=Path, help="ImageNet root (holding train/ and val/, or the Kaggle ILSVRC/ tree)")
    q.add_argument("out", type=location_arg,
                   help="output folder or bucket URL s3://BUCKET/PREFIX (one sub-folder per split)")
    q.add_argument("--splits", type=csv_list, default=None, help="comma-separated splits to write (default: all found)")
    q.add_argument("--val-labels", type=Path, default=None,
                   help="labels of a flat val/: the devkit's ILSVRC2012_validation_ground_truth.txt, a "
                        "one-wnid-per-line synset file, or LOC_val_solution.csv (default: looked up under ROOT)")
    q.add_argument("--devkit", type=Path, default=None,
                   help="ILSVRC2012_devkit_t12 folder (its data/meta.mat maps devkit ids to wnids)")
    q.add_argument("--class-names", type=Path, default=None,
                   help="'wnid name' per line (e.g. LOC_synset_mapping.txt) for readable class names")
    _add_shard_common(q)

    q = s.add_parser("folder", formatter_class=HelpFormatter,
                     help="class folders (ROOT/<class>/*, optional split folders)",
                     description="ROOT/<class>/<image>, or ROOT/<split>/<class>/<image> with split folders "
                                 "named in any case train/training, val/valid/validation/eval, test/testing (also "
                                 "as a word of the name: seg_train; also wrapped in a folder of the same name: "
                                 "seg_train/seg_train/), or Food-101 as downloaded (images/<class>/ + "
                                 "meta/train.txt, meta/test.txt). An ambiguous tree is refused, naming "
                                 "--layout and --splits. Any format Pillow reads; non-images are ignored with a "
                                 "note in the skip report.")
    q.add_argument("root", type=Path)
    q.add_argument("out", type=location_arg, help="output folder or bucket URL (one sub-folder per split)")
    q.add_argument("--splits", type=csv_list, default=None,
                   help="comma-separated split folders to write (default: every split folder found)")
    q.add_argument("--layout", choices=["auto", "splits", "classes"], default="auto",
                   help="what ROOT's folders are: split folders, or classes (default: auto, from their names)")
    q.add_argument("--name", default="train", help="split name when ROOT holds class folders directly")
    _add_shard_common(q)

    q = s.add_parser("list", formatter_class=HelpFormatter,
                     help="list files of 'relative/path label' lines (train_labels.txt, valid_labels.txt)",
                     description="List files as the TF2 ImageNet trainer reads them: one 'relative/path label' "
                                 "per line (the label is the last field, so paths may hold spaces; # comments and "
                                 "blank lines are skipped), labels as class indices or class names. A bad line "
                                 "(malformed, missing file, label out of range, unknown class) is listed in the "
                                 "skip report as LIST:LINE. Split from each file's name (train*, val*/valid*, "
                                 "test*) unless --split is given.")
    q.add_argument("lists", nargs="+", type=Path, metavar="LIST_FILE",
                   help="list files; several (train and valid) share one class list")
    q.add_argument("out", type=location_arg, help="output folder or bucket URL (one sub-folder per split)")
    q.add_argument("--root", type=Path, required=True, metavar="IMAGE_ROOT",
                   help="folder the listed paths are relative to (default: none, required)")
    q.add_argument("--classes", type=Path, default=None, metavar="NAMES_FILE",
                   help="class names, one per line (index = line position) (default: sorted label names, or "
                        "largest integer label + 1 classes)")
    q.add_argument("--split", default=None,
                   help="put every listed image in this split (default: from each list file's name)")
    _add_shard_common(q)

    q = s.add_parser("tfrecord", formatter_class=HelpFormatter,
                     help="TF-slim or tensorflow-datasets ImageNet TFRecords, plain or GZIP (no TensorFlow)",
                     description="TFRecords as TF-slim's build_imagenet_data.py writes them (image/encoded, "
                                 "image/class/label, optional image/class/synset), or as tensorflow-datasets' "
                                 "imagenet2012 builder does (image, label, file_name; classes from the "
                                 "label.labels.txt beside them). Split from the file name (train-*, validation-*, "
                                 "imagenet2012-train.tfrecord-*) unless --split is given. GZIP-compressed files "
                                 "are decompressed once into OUT/.kdkit-state/gunzipped/ (disk for their uncompressed "
                                 "size), removed when every split is written.")
    q.add_argument("inputs", nargs="+", type=Path, metavar="INPUT", help="TFRecord files or a folder of them")
    q.add_argument("out", type=location_arg, help="output folder or bucket URL (one sub-folder per split)")
    q.add_argument("--layout", choices=["auto", "slim", "tfds"], default="auto",
                   help="feature names: slim (image/encoded, image/class/label) or tfds (image, label) "
                        "(default: auto, from the first record)")
    q.add_argument("--compression", choices=["auto", "none", "gzip"], default="auto",
                   help="record file compression (default: auto, GZIP recognised by its magic bytes)")
    q.add_argument("--label-offset", type=integer(0), default=None,
                   help="subtracted from the label (default: 1 for slim, whose labels are 1..1000 with 0 = "
                        "background; 0 for tfds)")
    q.add_argument("--remap-labels", action="store_true",
                   help="index the classes by sorted image/class/synset (the order of other ImageNet shard sets) "
                        "where the records' labels order them otherwise")
    q.add_argument("--split", default=None, help="put every record in this split (default: from file names)")
    _add_shard_common(q)

    q = s.add_parser("hdf5", formatter_class=HelpFormatter,
                     help="an HDF5 file of images (arrays or encoded bytes) + labels",
                     description="An HDF5 file with an image dataset, (N,H,W[,C]) uint8 pixels or N encoded "
                                 "images (variable-length bytes), and an (N,) integer label dataset.")
    q.add_argument("file", type=Path)
    q.add_argument("out", type=location_arg, help="output folder or bucket URL (one sub-folder per split)")
    q.add_argument("--images-key", default="images", help="dataset holding the images")
    q.add_argument("--labels-key", default="labels", help="dataset holding the integer labels")
    q.add_argument("--split", default="train", help="split name of this file's samples")
    q.add_argument("--class-names", default=None,
                   help="dataset in the file, or a text file (one name per line), naming the classes")
    _add_shard_common(q)
    p.set_defaults(func=_run_shard)


def _run_verify(a: argparse.Namespace) -> int:
    from kdkit.shards import contract
    from kdkit.shards.verify import find_sets, fix_indexes, unfinished_sets, verify_set

    bad = 0
    for folder in unfinished_sets(a.path):
        print(f"PROBLEM {folder}: holds shards but no {contract.MANIFEST} (writing did not finish, or the "
              "manifest was lost): run the command that wrote it again to finish it")
        bad += 1
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


def add_verify_parser(sub) -> None:
    p = sub.add_parser("verify", help="check a shard set against its manifest", formatter_class=HelpFormatter,
                       description="Check shards are present with the manifest's sizes, checksums and sample "
                                   "counts, labels are valid, DALI indexes match; --decode also decodes every "
                                   "image. Exit status 1 if anything is wrong.")
    p.add_argument("path", type=location_arg, help="a shard-set folder, or a dataset root holding one per split "
                   "(local or a bucket URL)")
    p.add_argument("--decode", action="store_true", help="decode every image (slow; catches corrupt images)")
    p.add_argument("--fix-index", action="store_true", help="rewrite the DALI indexes from the tars first")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_run_verify)

