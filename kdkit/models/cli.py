"""`kdkit models`: list kdkit's model variants (and timm baselines) with params and GMACs.

Kept import-light like kdkit.cli: torch and timm load only when the command runs.
"""
from __future__ import annotations

import argparse

from kdkit import options


def _run(a: argparse.Namespace) -> int:
    from kdkit.models.listing import ListingConfig, format_table, list_variants, rows_as_json

    cfg = ListingConfig(resolution=a.resolution, pattern=a.filter, baselines=a.baselines)
    rows = list_variants(cfg)
    print(rows_as_json(rows, cfg) if a.json else format_table(rows, cfg))
    return 0 if rows else 1


def add_parser(sub) -> argparse.ArgumentParser:
    """Register `models` on the `kdkit` subparsers object (sets `func`)."""
    p = sub.add_parser("models", help="list kdkit's model variants with params and GMACs",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="List the models kdkit registers with timm (the assembled ResNet family; the "
                                   "TF2 / Keras seeds' AlexNet, ZFNet-BN, GoogLeNet-BN; MNIST MLPs) and, for "
                                   "comparison, a few timm baselines: parameters (ImageNet head) and "
                                   "GMACs of one image at --resolution. GMACs = multiply-accumulates, what papers "
                                   "call GFLOPs (ResNet-50: 4.1). Any of these names works wherever kdkit takes "
                                   "a model, as does every timm model name.")
    p.add_argument("--resolution", type=options.integer(8), default=224, help="square input side for GMACs")
    p.add_argument("--filter", default=None, metavar="PATTERN",
                   help="only names matching this glob (e.g. 'assemble_*') or containing this text")
    p.add_argument("--baselines", action=argparse.BooleanOptionalAction, default=True,
                   help="also list timm baselines (resnet18, resnet50, resnet50d, skresnet50d, ...) and the "
                        "seeds' timm models (resnetv2_50, seresnet50, mobilenetv2_100, efficientnet_b0, ...)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_run)
    return p
