"""Options, declared once: what every stage's command line, recipe and config share.

An option is a dataclass field made by `option(default, help, group, low=, high=, choices=, ...)`:
its type is the field's annotation, its range, choices and help live in the field's metadata. From
that one declaration

    check_options(obj)       checks every field of a config or loader part (type, range, choices, finite
                             numbers) and then the combinations its class refuses (`refusals()`), raising
                             an OptionError that names the option: the one checking mechanism for flags,
                             recipe files and Python callers alike;
    add_options(parser, cls) builds the argparse flags (type, range, help with the default, group);
    option_type(...)         the argparse type of a flag that is not a config field (integer, number).

So TrainConfig, BenchConfig and the DALI roles (kdkit.pipelines.augment) hold one field per option,
and a class that uses another's options inherits them (TrainConfig is an Augment) instead of
declaring them again. Kept free of heavy imports, so `kdkit --help` stays fast.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import shlex
import sys
import typing
from pathlib import Path

from kdkit.errors import OptionError

# argument groups, in the order the help lists them (timm's train.py names)
DATA, MODEL, KD, AUGMENT, OPTIMIZER, SCHEDULE, EMA, DEVICE, RUN = (
    "Dataset parameters", "Model parameters", "Distillation parameters", "Augmentation and regularization parameters",
    "Optimizer parameters", "Learning rate schedule parameters", "Model EMA parameters",
    "Device and performance parameters", "Run parameters")
GROUPS = (DATA, MODEL, KD, AUGMENT, OPTIMIZER, SCHEDULE, EMA, DEVICE, RUN)
# --device of every command that runs a model ("gpu" and "cuda" mean the same: the CUDA device LOCAL_RANK;
# kdkit.runtime chooses it); here, not in kdkit.runtime, so that parsers and configs need no torch import
DEVICES = ("auto", "cpu", "gpu", "cuda")


def option(default, help: str, group: str | None = None, *, low=None, high=None, above: bool = False,
           choices: tuple | None = None, ordered: bool = False, flag: str | None = None, none: bool | None = None):
    """A dataclass field declaring one option. `low`/`high` bound numbers (and each item of a tuple;
    `above`: low itself excluded); `choices` for strings; `ordered`: a (min, max) pair; `flag`: the
    command-line name where it is not --field-name. `none`: whether the text none / null / '' means None on
    the command line (default: for optional numbers and optional strings with choices, never for other
    strings: a run name or a path "none" is taken as written)."""
    meta = {"help": help, "group": group, "low": low, "high": high, "above": above, "choices": choices,
            "ordered": ordered, "flag": flag, "none": none}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def same_as(cls: type, name: str, default=dataclasses.MISSING, **changes):
    """A field declaring the same option as `cls`'s field `name` (type, range, choices), for a config that
    reads it under its own name, help, group or flag (`changes`) or with another default; the range and
    choices stay the source's."""
    source = option_fields(cls)[name]
    meta = {**source.metadata, **changes}
    if default is not dataclasses.MISSING:
        return dataclasses.field(default=default, metadata=meta)
    if source.default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=source.default_factory, metadata=meta)
    return dataclasses.field(default=source.default, metadata=meta)


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict:
    return typing.get_type_hints(cls)


@functools.lru_cache(maxsize=None)
def option_fields(cls: type) -> dict[str, dataclasses.Field]:
    """The option fields of a dataclass (those made by option / same_as), by name, in declaration order."""
    return {f.name: f for f in dataclasses.fields(cls) if "help" in f.metadata}


def kind_of(cls: type, name: str) -> tuple[type, bool, type | None, int | None]:
    """(base type, None allowed, item type of a tuple, tuple length) of a field's annotation."""
    hint = _hints(cls)[name]
    args = typing.get_args(hint)
    optional = type(None) in args
    if optional:
        hint = next(a for a in args if a is not type(None))
    origin = typing.get_origin(hint) or hint
    if origin in (tuple, list):
        items = [a for a in typing.get_args(hint) if a is not Ellipsis]
        size = len(items) if items and Ellipsis not in typing.get_args(hint) else None
        return tuple, optional, (items[0] if items else float), size
    return origin, optional, None, None


# ---------------------------------------------------------------------------------------------
# checking: one mechanism for flags, recipes, configs and loader parts

def _span(what: str, name: str, low, high, above: bool) -> str:
    if low is not None and high is not None:
        return f"{what} {low} {'<' if above else '<='} {name} <= {high}"
    if low is not None:
        return f"{what} {'>' if above else '>='} {low}"
    return f"{what} <= {high}" if high is not None else what


def _number(name: str, value, kind: type, meta: dict):
    what = "an integer" if kind is int else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise OptionError(f"{name}={value!r}: expected {what}")
    if not math.isfinite(value):
        raise OptionError(f"{name}={value!r}: expected a finite number")
    low, high, above = meta.get("low"), meta.get("high"), meta.get("above", False)
    if (low is not None and (value <= low if above else value < low)) or (high is not None and value > high):
        raise OptionError(f"{name}={value!r}: expected {_span(what, name, low, high, above)}")
    return float(value) if kind is float else value


def check_value(cls: type, name: str, value):
    """One option's value, checked against its declaration and normalised (ints to float where a float is
    declared, lists to tuples); an OptionError naming the option otherwise."""
    f = option_fields(cls)[name]
    meta = f.metadata
    kind, optional, item, size = kind_of(cls, name)
    if value is None and optional:
        return None
    if kind in (int, float):
        return _number(name, value, kind, meta)
    if kind is bool:
        if not isinstance(value, bool):
            raise OptionError(f"{name}={value!r}: expected true or false")
        return value
    if kind is str:
        if not isinstance(value, str):
            raise OptionError(f"{name}={value!r}: expected a string")
        if meta.get("choices") and value not in meta["choices"]:
            raise OptionError(f"{name}={value!r}: expected one of {', '.join(meta['choices'])}")
        return value
    if kind is tuple:
        what = f"a list of {size} numbers" if size else "a list of numbers"
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)) or (size and len(value) != size):
            raise OptionError(f"{name}={value!r}: expected {what}")
        out = tuple(_number(name, v, item, meta) for v in value)
        if meta.get("ordered") and out[0] > out[1]:
            raise OptionError(f"{name}={value!r}: expected (min, max) with min <= max")
        return out
    if kind is dict and not isinstance(value, dict):
        raise OptionError(f"{name}={value!r}: expected a mapping of KEY: VALUE")
    return value


def check_options(obj) -> None:
    """Every option field of a dataclass instance against its declaration (normalised in place, frozen
    or not), then the combinations its class refuses: `obj.refusals()` -> [(refused, why), ...], the first
    refused one raised as an OptionError."""
    cls = type(obj)
    for name in option_fields(cls):
        value = getattr(obj, name)
        checked = check_value(cls, name, value)
        if checked is not value:
            object.__setattr__(obj, name, checked)
    refusals = getattr(obj, "refusals", None)
    for refused, why in (refusals() if refusals else ()):
        if refused:
            raise OptionError(why)


def changed_flags(obj) -> list[str]:
    """The flags that give `obj` its option values where they differ from the declared defaults (the
    command line that makes the same config again)."""
    out = []
    for name, f in option_fields(type(obj)).items():
        value = getattr(obj, name)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if plain(value) == plain(default):
            continue
        flag = flag_of(type(obj), name)
        if isinstance(value, bool):
            out.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, tuple):
            out += [flag, *(str(v) for v in value)]
        elif value is None:
            out += [flag, "none"]
        else:
            out += [flag, str(value)]
    return out


def plain(value):
    """An option value as YAML and JSON write it (tuples as lists)."""
    if isinstance(value, tuple):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def as_dict(obj) -> dict:
    """The option fields of a config as plain values, in declaration order."""
    return {name: plain(getattr(obj, name)) for name in option_fields(type(obj))}


# ---------------------------------------------------------------------------------------------
# the command line

class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown in the help, except where the help already says in words what the default is."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default:" in text or action.default in (None, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """kdkit's argument parser: a bad flag or value is one line on stderr (the option, what it takes,
    where the help is) and exit status 2, as every other refusal of kdkit's. No prefix matching: a flag
    is written out (`--kd` never means `--kd-alpha`), so a flag a command does not take is refused."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"kdkit: error: {message} (see `{self.prog} --help`)\n")


def none_words(cls: type, name: str) -> bool:
    """Whether option `name` reads none / null / '' as None (option()'s `none`)."""
    meta = option_fields(cls)[name].metadata
    kind, optional, _, _ = kind_of(cls, name)
    if not optional:
        return False
    if meta.get("none") is not None:
        return meta["none"]
    return kind is not str or bool(meta.get("choices"))


def _parse_text(text: str, kind: type, optional: bool):
    if optional and text.lower() in ("none", "null", ""):
        return None
    if kind is int:
        return int(text)
    if kind is float:
        return float(text)
    return text


def option_type(cls: type, name: str, kind: type | None = None):
    """The argparse type of option `name` of `cls` (of its tuple items where `kind` is given): the text
    read as the declared type, then check_value, whose refusal argparse reports with the flag."""
    base, optional, item, _ = kind_of(cls, name)
    kind = kind or base

    def parse(text: str):
        try:
            value = _parse_text(text, kind, kind is base and none_words(cls, name))
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        try:
            if kind is not base:  # one item of a tuple
                return _number(name, value, kind, option_fields(cls)[name].metadata)
            return check_value(cls, name, value)
        except OptionError as e:
            raise argparse.ArgumentTypeError(str(e).split(": ", 1)[1] + f", got {text!r}") from None
    parse.__name__ = getattr(kind, "__name__", "value")
    return parse


def flag_of(cls: type, name: str) -> str:
    return option_fields(cls)[name].metadata.get("flag") or "--" + name.replace("_", "-")


def _key_value(text: str) -> tuple[str, object]:
    import yaml

    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    k, v = text.split("=", 1)
    return k, yaml.safe_load(v)  # numbers, true/false, null, lists as YAML reads them


def add_options(parser, cls: type, include=None, exclude=(), suppress: bool = False,
                defaults: dict | None = None, groups: dict | None = None, group=None) -> None:
    """One flag per option field of `cls` (those in `include`, if given, less `exclude`), in its
    argument group (or all in `group`, an argparse group). suppress=True: flags get no argparse default
    (the namespace holds what was typed, a recipe fills the rest); the help still shows the declared
    default, or `defaults[name]`."""
    groups = {} if groups is None else groups
    fields = option_fields(cls)
    names = [n for n in fields if (include is None or n in include) and n not in exclude]
    names.sort(key=lambda n: GROUPS.index(fields[n].metadata["group"]) if fields[n].metadata.get("group") in GROUPS
               else len(GROUPS))
    for name in names:
        f, meta = fields[name], fields[name].metadata
        default = (defaults or {}).get(name, f.default_factory() if f.default_factory is not dataclasses.MISSING
                                       else f.default)
        shown = default if not isinstance(default, tuple) else " ".join(str(v) for v in default)
        help_text = meta["help"] if "default:" in meta["help"] else f"{meta['help']} (default: {shown})"
        kw = dict(dest=name, help=help_text.replace("%", "%%"),
                  default=argparse.SUPPRESS if suppress else default)
        name_of_group = meta.get("group")
        target = group or (parser if not name_of_group else
                           groups.setdefault(name_of_group, parser.add_argument_group(name_of_group)))
        kind, optional, item, size = kind_of(cls, name)
        flag = flag_of(cls, name)
        if kind is bool:
            target.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif kind is dict:
            target.add_argument(flag, nargs="*", type=_key_value, metavar="KEY=VALUE", **kw)
        elif kind is tuple:
            target.add_argument(flag, nargs=size or "+", type=option_type(cls, name, item),
                                metavar=name.split("_")[-1].upper(), **kw)
        else:
            choices = meta.get("choices")
            target.add_argument(flag, type=option_type(cls, name), metavar="{" + ",".join(choices) + "}" if choices
                                else name.upper(), **kw)


def given_options(args: argparse.Namespace, cls: type) -> dict:
    """The option fields of `cls` the command line gave (tuples checked as a whole: ordered pairs)."""
    out = {k: v for k, v in vars(args).items() if k in option_fields(cls)}
    for name, value in out.items():
        if kind_of(cls, name)[0] is tuple and value is not None:
            out[name] = tuple(value)
        elif kind_of(cls, name)[0] is dict and value is not None:
            out[name] = dict(value)
    return out


# ---------------------------------------------------------------------------------------------
# flags that are not config fields (eval, shard, teach, demo, lr-find): the same checks

def _bounded(kind: str, low, high, above: bool):
    meta = {"low": low, "high": high, "above": above}
    what = "an integer" if kind == "integer" else "a number"
    py = int if kind == "integer" else float

    def parse(text: str):
        try:
            value = py(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        try:
            return _number("x", value, py, meta)
        except OptionError as e:
            raise argparse.ArgumentTypeError(str(e).split(": ", 1)[1] + f", got {text!r}") from None
    parse.__name__ = kind
    return parse


def integer(low: int | None = None, high: int | None = None):
    """An argparse type: an integer in [low, high]."""
    return _bounded("integer", low, high, False)


def number(low: float | None = None, high: float | None = None, above: bool = False):
    """An argparse type: a finite number in [low, high] (or (low, high] with above=True)."""
    return _bounded("number", low, high, above)


def env_integer(name: str, default: int, low: int | None = None, high: int | None = None) -> int:
    """An integer environment variable kdkit reads (KDKIT_MAX_PIXELS, torchrun's LOCAL_RANK, ...), checked as
    an integer flag is: unset or empty gives `default`, anything else not an integer in range (abc, nan,
    0 where 1 is the least) is an OptionError naming the variable, not a traceback."""
    import os

    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        return integer(low, high)(text)
    except argparse.ArgumentTypeError as e:
        raise OptionError(f"environment variable {name}={text}: {e}; set it to a valid value or unset it") from None


COUNT = integer(1)  # batch sizes, threads, workers, epochs, steps: at least one
SEED = integer(0)
FRACTION = number(0, 1, above=True)  # crop ratios, areas: 0 < x <= 1
POSITIVE = number(0, above=True)


# ---------------------------------------------------------------------------------------------
# small argument types and the command line as typed

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


# array-job schedulers that tell a task both its index and the number of tasks: (name, index, first,
# step, count-or-last, count given as "last"). PBS (PBS_ARRAY_INDEX), LSF (LSB_JOBINDEX), Kubernetes
# indexed Jobs (JOB_COMPLETION_INDEX) and AWS Batch (AWS_BATCH_JOB_ARRAY_INDEX) tell only the index: there,
# pass --part $INDEX/N
_ARRAY_JOBS = (("SLURM", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_STEP",
                "SLURM_ARRAY_TASK_COUNT", False),
               ("SGE", "SGE_TASK_ID", "SGE_TASK_FIRST", "SGE_TASK_STEPSIZE", "SGE_TASK_LAST", True))


def scheduler_part(env=None) -> tuple[int, int, str] | None:
    """(i, N, where from) when this process is task i of an N-task array job of SLURM or SGE/UGE (task ids
    first, first+step, ...), so `--part` needs no arithmetic in the job script; None elsewhere. A sparse
    array (ids that are not first + k * step) is refused: it cannot be a part of N."""
    import os

    env = os.environ if env is None else env
    for name, index, first, step, count, is_last in _ARRAY_JOBS:
        try:
            i, lo, st, c = int(env[index]), int(env.get(first, 0)), int(env.get(step) or 1), int(env[count])
        except (KeyError, ValueError):  # not this scheduler, or not an array job (SGE says "undefined")
            continue
        n = (c - lo) // st + 1 if is_last else c
        if st < 1 or (i - lo) % st or not 0 <= (i - lo) // st < n:
            raise OptionError(f"{index}={i} is not one of {n} evenly spaced tasks ({first}={lo}, {step}={st}, "
                              f"{count}={c}); give --part i/N")
        return (i - lo) // st, n, f"{name} array task {index}={i} of {n}"
    return None


def command_line() -> str:
    """This process's kdkit command, as typed."""
    return "kdkit " + " ".join(shlex.quote(a) for a in sys.argv[1:])
