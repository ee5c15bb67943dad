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


class Parser(argparse.ArgumentParser):
    """kdkit's argument parser: a bad flag or value is one line on stderr (the option, what it takes,
    where the help is) and exit status 2, as every other refusal of kdkit's."""

    def error(self, message: str):
        self.exit(2, f"kdkit: error: {message} (see `{self.prog} --help`)\n")


def integer(low: int | None = None, high: int | None = None):
    """An argparse type: an integer in [low, high]."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or (low is not None and value < low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {_range('an integer', low, high)}, got {text!r}")
        return value
    parse.__name__ = "integer"
    return parse


def number(low: float | None = None, high: float | None = None, above: bool = False):
    """An argparse type: a number in [low, high] (or (low, high] with above=True)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = None
        if (value is None or value != value or (low is not None and (value <= low if above else value < low))
                or (high is not None and value > high)):
            raise argparse.ArgumentTypeError(f"expected {_range('a number', low, high, above)}, got {text!r}")
        return value
    parse.__name__ = "number"
    return parse


def _range(what: str, low, high, above: bool = False) -> str:
    if low is not None and high is not None:
        return f"{what} with {low} {'<' if above else '<='} x <= {high}"
    if low is not None:
        return f"{what} {'>' if above else '>='} {low}"
    return f"{what} <= {high}" if high is not None else what


COUNT = integer(1)  # batch sizes, threads, workers, epochs, steps: at least one
SEED = integer(0)
FRACTION = number(0, 1, above=True)  # crop ratios, areas: 0 < x <= 1
POSITIVE = number(0, above=True)
