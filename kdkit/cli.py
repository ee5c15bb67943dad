"""The `kdkit` command: each stage's parser (its own cli.py) assembled under one program.

Every subcommand parses options into a typed config and calls a library function a user could call
from Python with the same config. User-facing failures raise KdkitError and end here as one line on
stderr with exit status 2.
"""
from __future__ import annotations

import argparse
import os
import sys

from kdkit import __version__, atomic
from kdkit.errors import Interrupted, KdkitError
from kdkit.options import HelpFormatter, Parser


def build_parser() -> argparse.ArgumentParser:
    from kdkit.bench import cli as bench
    from kdkit.demo import cli as demo
    from kdkit.evaluate import cli as evaluate
    from kdkit.models import cli as models
    from kdkit.shards import cli as shards
    from kdkit.teach import cli as teach
    from kdkit.train import cli as train

    p = Parser(prog="kdkit", formatter_class=HelpFormatter,
                                description="Knowledge distillation and fast DALI image pipelines over "
                                            "WebDataset shards.")
    p.add_argument("--version", action="version", version=f"kdkit {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    shards.add_shard_parser(sub)
    shards.add_verify_parser(sub)
    bench.add_parser(sub)
    models.add_parser(sub)
    teach.add_parser(sub)
    train.add_parser(sub)
    train.add_lr_find_parser(sub)
    evaluate.add_parsers(sub)
    demo.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        code = _main(argv)
        sys.stdout.flush()  # here, so that a closed pipe is met inside the try and not at exit
        return code
    except BrokenPipeError:
        # `kdkit verify ... | head`: the reader has what it wanted. Python's recipe (docs: "Note on SIGPIPE"):
        # point stdout at devnull so the interpreter's final flush does not fail again, and exit as a
        # process killed by SIGPIPE would (128 + 13), without a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KdkitError as e:
        print(f"kdkit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(e.args[0] if isinstance(e, Interrupted) and e.args else
              "kdkit: interrupted; what was finished is kept, run the same command again to resume", file=sys.stderr)
        return 130
    except OSError as e:
        if e.errno in atomic.DISK_FULL:  # whatever was being written: one line, what to free, and that nothing was lost
            print(f"kdkit: error: {atomic.disk_full_message(e)}", file=sys.stderr)
            return 2
        if not e.filename:  # not about a file a user named: a bug, let the traceback say where
            raise
        print(f"kdkit: error: {e.filename}: {e.strerror or e} (check that the folder exists and is writable; "
              "nothing else was changed)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
