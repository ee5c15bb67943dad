"""Each option is declared once: its command-line flag, its recipe key, its config field and the DALI
roles that read it take one range and give one refusal. Walks every option of `kdkit train`, of
`kdkit bench-loader` and of the training roles."""
from __future__ import annotations

import math

import pytest

from kdkit.cli import build_parser
from kdkit.errors import OptionError
from kdkit.options import check_value, flag_of, kind_of, option_fields
from kdkit.pipelines.options import Augment, RandomCrop, StoredViews


def bad_values(cls, name) -> list:
    """Values the declaration of `name` refuses: just outside its range, not a number, not a choice, NaN."""
    meta = option_fields(cls)[name].metadata
    kind, optional, item, size = kind_of(cls, name)
    number = item if kind is tuple else kind
    out = []
    if number in (int, float):
        low, high = meta.get("low"), meta.get("high")
        if low is not None:
            out.append(low if meta.get("above") else low - 1)
        if high is not None:
            out.append(high + 1)
        if number is float:
            out.append(math.nan)
        if kind is tuple:
            out = [(v,) * (size or 1) for v in out]
    if kind is str and meta.get("choices"):
        out.append("nonsense")
    return out


def train_flags() -> list[str]:
    from kdkit.train.config import TrainConfig

    return [n for n in option_fields(TrainConfig) if n not in ("data", "recipe", "mutual", "resume")]


TRAIN_FLAGS = train_flags()


def parse(argv):
    return build_parser().parse_args(argv)


def subparser(*command):
    import argparse

    parser = build_parser()
    for word in command:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[word]
    return parser


def mode_flags(*command) -> set[str]:
    """The flags a (sub)command of the kdkit parser takes (not those it only refuses, naming the mode that
    takes them: hidden from its help)."""
    import argparse

    return {s for a in subparser(*command)._actions if a.help != argparse.SUPPRESS for s in a.option_strings}


def test_every_train_option_is_a_flag_of_the_modes_that_take_it(capsys):
    from kdkit.options import KD
    from kdkit.train.cli import MODE_OPTIONS
    from kdkit.train.config import TrainConfig

    fields = option_fields(TrainConfig)
    for mode in ("teacher", "student", "mutual"):
        flags = mode_flags("train", mode)
        for name in TRAIN_FLAGS:
            kd_only = fields[name].metadata["group"] == KD and name != "checkpoint_ema"
            assert (flag_of(TrainConfig, name) in flags) == (not kd_only or name in MODE_OPTIONS[mode]), (mode, name)
        parser = subparser("train", mode)
        formatter = parser._get_formatter()
        for action in parser._actions:  # each flag says its default once (not "(default: X) (default: None)")
            assert formatter._get_help_string(action).count("default:") <= 1, action.option_strings


@pytest.mark.parametrize("name", TRAIN_FLAGS)
@pytest.mark.slow
def test_cli_recipe_and_config_refuse_the_same_values(name, tmp_path, capsys):
    """A value outside an option's declared range is refused the same way wherever it comes from."""
    import yaml

    from kdkit.cli import main
    from kdkit.train.config import TrainConfig, make_config

    for bad in bad_values(TrainConfig, name):
        with pytest.raises(OptionError, match=f"^{name}="):
            TrainConfig(**{name: bad})
        recipe = tmp_path / "r.yaml"
        recipe.write_text(yaml.safe_dump({name: list(bad) if isinstance(bad, tuple) else bad}))
        with pytest.raises(OptionError, match=f"recipe {recipe}: {name}="):
            make_config({"data": "x"}, recipe=str(recipe))
        mode = "mutual" if name.startswith("peer_") else "student"
        values = [str(v) for v in bad] if isinstance(bad, tuple) else [str(bad)]
        with pytest.raises(SystemExit) as e:
            main(["train", mode, "d", flag_of(TrainConfig, name), *values])
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"argument {flag_of(TrainConfig, name)}" in err and err.count("\n") == 1, err


@pytest.mark.parametrize("cls_name", ["Augment", "RandomCrop", "StoredViews"])
def test_the_roles_and_the_configs_share_one_declaration(cls_name):
    """TrainConfig and BenchConfig hold the roles' options by inheritance: the same field, default and range."""
    from kdkit.bench import BenchConfig
    from kdkit.train.config import TrainConfig

    cls = {"Augment": Augment, "RandomCrop": RandomCrop, "StoredViews": StoredViews}[cls_name]
    for config in (TrainConfig, BenchConfig):
        if cls is StoredViews and config is BenchConfig:
            continue
        for name, f in option_fields(cls).items():
            assert option_fields(config)[name] is f or option_fields(config)[name].metadata == f.metadata, name


def refused_alike(role: str, name: str, bad) -> None:
    """A loader of `role` and TrainConfig refuse option `name` = `bad` with the same message."""
    from kdkit.pipelines import loader_config
    from kdkit.train.config import TrainConfig

    with pytest.raises(OptionError) as loader:
        loader_config(role, **{name: bad})
    with pytest.raises(OptionError) as config:
        TrainConfig(**{name: bad})
    assert str(loader.value) == str(config.value)


@pytest.mark.parametrize("name", list(option_fields(Augment)))
def test_a_train_role_refuses_what_the_config_refuses(name):
    for bad in bad_values(Augment, name):
        refused_alike("train", name, bad)


def test_bench_flags_come_from_its_config(tiny_shards, capsys):
    from kdkit.bench import BenchConfig

    with pytest.raises(SystemExit):
        parse(["bench-loader", "--help"])
    text = capsys.readouterr().out
    for name in option_fields(BenchConfig):
        assert flag_of(BenchConfig, name) in text, name
        for bad in bad_values(BenchConfig, name):
            with pytest.raises(OptionError, match=f"^{name}="):
                BenchConfig(tiny_shards, **{name: bad})
    a = parse(["bench-loader", str(tiny_shards), "--hue", "0.2", "--random-area", "0.3", "1"])
    from kdkit.options import given_options

    cfg = BenchConfig(a.shards, **given_options(a, BenchConfig))
    assert cfg.hue == 0.2 and cfg.random_area == (0.3, 1.0)


def test_nonfinite_numbers_are_refused_everywhere():
    from kdkit.train.config import TrainConfig

    for name in ("lr", "momentum", "weight_decay", "kd_alpha", "kd_temperature"):
        for bad in (math.nan, math.inf):
            with pytest.raises(OptionError, match=f"{name}=(nan|inf): expected a finite number"):
                TrainConfig(**{name: bad})
            with pytest.raises(SystemExit):
                parse(["train", "student", "d", flag_of(TrainConfig, name), str(bad)])


def test_names_the_trainer_implements_are_the_ones_it_offers():
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    from kdkit.pipelines.options import IMAGENET_MEAN, IMAGENET_STD
    from kdkit.train.config import KD_LOSSES, KD_MODES
    from kdkit.train.kd import KD_MODES as IMPLEMENTED
    from kdkit.train.losses import KD_LOSSES as LOSSES

    assert set(KD_MODES) == set(IMPLEMENTED)
    assert set(KD_LOSSES) == set(LOSSES)
    assert IMAGENET_MEAN == tuple(IMAGENET_DEFAULT_MEAN) and IMAGENET_STD == tuple(IMAGENET_DEFAULT_STD)


def test_check_value_names_the_option():
    from kdkit.train.config import TrainConfig

    assert check_value(TrainConfig, "lr", 1) == 1.0 and isinstance(check_value(TrainConfig, "lr", 1), float)
    assert check_value(TrainConfig, "random_area", [0.2, 0.9]) == (0.2, 0.9)
    with pytest.raises(OptionError, match=r"random_area=\[0.9, 0.2\]: expected \(min, max\) with min <= max"):
        check_value(TrainConfig, "random_area", [0.9, 0.2])


def every_parser():
    """The kdkit parser and each of its sub-commands' parsers, with their command words."""
    import argparse

    todo = [((), build_parser())]
    while todo:
        words, parser = todo.pop()
        yield words, parser
        for a in parser._actions:
            if isinstance(a, argparse._SubParsersAction):
                todo += [((*words, w), p) for w, p in a.choices.items()]


def test_every_numeric_flag_of_every_command_refuses_nan_and_inf():
    """Wherever a number is read from the command line: TrainConfig's flags, and the plain flags of eval,
    shard, teach, demo, bench, lr-find (kdkit.options.integer / number)."""
    import argparse

    checked = 0
    for words, parser in every_parser():
        assert parser.allow_abbrev is False, words  # no prefix matching: `--kd` never means `--kd-alpha`
        for a in parser._actions:
            if a.type is None or not callable(a.type) or a.type in (str,) or getattr(a.type, "__name__", "") in (
                    "Path", "csv_list", "csv_paths", "part", "_key_value", "str", "location_arg"):
                continue
            try:
                a.type("1")
            except (argparse.ArgumentTypeError, ValueError):
                pass  # a range that excludes 1: still a numeric flag
            for bad in ("nan", "inf", "-inf", "NaN"):
                with pytest.raises((argparse.ArgumentTypeError, ValueError)):
                    a.type(bad)
            checked += 1
    assert checked > 100


@pytest.mark.parametrize("value", ["nan", "inf", "abc", "-1", "1.5"])
def test_numeric_environment_variables_are_checked(value, monkeypatch):
    from kdkit.options import env_integer

    monkeypatch.setenv("KDKIT_TEST_VAR", value)
    with pytest.raises(OptionError, match=f"^environment variable KDKIT_TEST_VAR={value}: expected an integer"):
        env_integer("KDKIT_TEST_VAR", 5, low=0)
    monkeypatch.setenv("KDKIT_TEST_VAR", " 7 ")
    assert env_integer("KDKIT_TEST_VAR", 5, low=0) == 7
    monkeypatch.delenv("KDKIT_TEST_VAR")
    assert env_integer("KDKIT_TEST_VAR", 5, low=0) == 5


def test_torchrun_variables_are_checked(monkeypatch):
    from kdkit import runtime

    monkeypatch.setenv("WORLD_SIZE", "nan")
    with pytest.raises(OptionError, match="WORLD_SIZE=nan"):
        with runtime.start("cpu"):
            pass


def test_every_flag_of_every_command_says_its_default_once():
    """Not "(default: from the shard manifest) (default: None)"."""
    for words, parser in every_parser():
        formatter = parser._get_formatter()
        for action in parser._actions:  # argparse's "(default: %(default)s)" only where the help names none
            added = "%(default)" in (formatter._get_help_string(action) or "")
            assert not (added and "default:" in (action.help or "")), (words, action.option_strings, action.help)


def test_the_gpu_decoder_options_reach_every_command_that_decodes_on_the_gpu(tmp_path, capsys):
    """hw_decoder_load (the hardware JPEG decoder's share: about 0.9 suits an H100) and the preallocation
    hints are Backend's options, re-declared by train, add-teacher-logits, eval and bench-loader: one flag
    each, one range, and the values end up in DALI's decoder arguments."""
    from kdkit.bench import BenchConfig
    from kdkit.evaluate.eval import EvalConfig
    from kdkit.options import given_options
    from kdkit.pipelines import loader_config
    from kdkit.pipelines.options import DECODING, Backend, decoding
    from kdkit.teach.cli import config_from_args
    from kdkit.train.cli import config_from_args as train_config

    given = ["--hw-decoder-load", "0.9", "--preallocate-width-hint", "4000", "--preallocate-height-hint", "3000"]
    wanted = {"hw_decoder_load": 0.9, "preallocate_width_hint": 4000, "preallocate_height_hint": 3000}
    teach = config_from_args(parse(["add-teacher-logits", "d", "--checkpoint", "c", "--out", "o", *given]))
    train = train_config(parse(["train", "teacher", "d", *given]), "teacher")
    a = parse(["eval", "c", "--data", "d", *given])
    b = parse(["bench-loader", str(tmp_path), *given])
    bench = BenchConfig(b.shards, **given_options(b, BenchConfig))
    for cfg in (teach, train, EvalConfig([a.checkpoints[0]], a.data, **decoding(a)), bench):
        assert decoding(cfg) == wanted
    args = loader_config("eval", device="gpu", device_id=0, **decoding(train)).backend.decoder_args()
    assert args == {"jpeg_fancy_upsampling": True, **wanted}
    assert loader_config("eval", device="cpu", **decoding(train)).backend.decoder_args() == {}  # the CPU decoder
    for name in DECODING:  # one range: the flags, the configs and the loaders refuse the same values
        for bad in bad_values(Backend, name):
            refused_alike("eval", name, bad)
            with pytest.raises(OptionError, match=f"^{name}="):
                decoding(EvalConfig([tmp_path], tmp_path, **{name: bad}))
            for command in (["add-teacher-logits", "d", "--checkpoint", "c", "--out", "o"],
                            ["eval", "c", "--data", "d"], ["train", "teacher", "d"], ["bench-loader", "d"]):
                with pytest.raises(SystemExit):
                    parse([*command, flag_of(Backend, name), str(bad)])
                assert flag_of(Backend, name) in capsys.readouterr().err


def test_dali_threads_default_to_the_cores_each_local_rank_gets_on_the_gpu(monkeypatch):
    from kdkit import runtime

    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert runtime.dali_threads(None, gpu=True) == 2  # 16 cores, 8 GPUs
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert runtime.dali_threads(None, gpu=True) == 16
    assert runtime.dali_threads(None, gpu=False) == runtime.CPU_DALI_THREADS == 4  # the CPU as before
    assert runtime.dali_threads(None, gpu=False, cpu=2) == 2 and runtime.dali_threads(3, gpu=True) == 3
