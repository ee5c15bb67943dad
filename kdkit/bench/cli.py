"""`kdkit bench-loader`: options -> BenchConfig -> run_bench. Import-light: the benchmark itself
(torch, DALI) is imported when it runs; the flags come from BenchConfig's declarations."""
from __future__ import annotations

import argparse
from pathlib import Path

from kdkit.options import HelpFormatter, add_options, given_options
from kdkit.shards.location import location_arg


def add_parser(sub) -> None:
    from kdkit.bench import BenchConfig

    def run(a: argparse.Namespace) -> int:
        from kdkit.bench.loader_bench import format_table, run_bench
        from kdkit.bench.sysinfo import save_report

        report = run_bench(BenchConfig(a.shards, **given_options(a, BenchConfig)))
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
    p.add_argument("shards", type=location_arg,
                   help="a shard-set folder, or a dataset root holding --split; local or a bucket URL")
    add_options(p, BenchConfig)
    p.add_argument("--json", type=Path, default=None, metavar="FILE", help="write the results as JSON (default: none)")
    p.set_defaults(func=run)
