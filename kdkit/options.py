"""What every stage's command line shares: the help formatter, list and part arguments, and the
command line as it was typed (recorded in manifests, reports and run folders).

Each stage owns its cli.py (shards, teach, train, evaluate, bench, models, demo); kdkit/cli.py
only assembles them. Kept free of heavy imports, so `kdkit --help` stays fast.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown in the help, except where the help already says in words what the default is."""

    def _get_help_string(self, action):
        text = action.help or ""
        return text if "(default" in text else super()._get_help_string(action)


def csv_list(text: str) -> list[str]:
    """A comma-separated list: "train,val" -> ["train", "val"]."""
    return [t for t in text.split(",") if t]


def csv_paths(text: str) -> list[Path]:
    return [Path(t) for t in csv_list(text)]


def part(text: str) -> tuple[int, int]:
    """--part i/N: this machine's part of N."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected i/N (e.g. 0/4), got {text!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise argparse.ArgumentTypeError(f"expected 0 <= i < N, got {text!r}")
    return i, n


def command_line() -> str:
    """This process's kdkit command, as typed."""
    return "kdkit " + " ".join(shlex.quote(a) for a in sys.argv[1:])
