"""TrainConfig, recipes and the `kdkit train` / `kdkit lr-find` command lines (no training)."""
from __future__ import annotations

import argparse

import pytest
import yaml

from kdkit.errors import KdkitError
from kdkit.train.cli import add_lr_find_parser, add_parser, config_from_args
from kdkit.train.config import TrainConfig, list_recipes, load_recipe, make_config, save_config


def parse(argv: list[str]):
    p = argparse.ArgumentParser(prog="kdkit")
    sub = p.add_subparsers(dest="command", required=True)
    add_parser(sub)
    add_lr_find_parser(sub)
    return p.parse_args(argv)


def test_bundled_recipes_load_and_name_known_options():
    names = list_recipes()
    assert {"baseline", "bag-of-tricks", "assemble-resnet50-kd", "finetune-food101", "lamb-large-batch"} <= set(names)
    for name in names:
        cfg = make_config({"data": "x"}, recipe=name)
        assert cfg.recipe == name
    tricks = make_config(recipe="bag-of-tricks")
    assert (tricks.sched, tricks.warmup_epochs, tricks.label_smoothing, tricks.mixup) == ("cosine", 5, 0.1, 0.2)


def test_unknown_recipe_key_names_the_key_and_the_file(tmp_path):
    bad = tmp_path / "mine.yaml"
    bad.write_text("lr: 0.1\nlearning_rate: 0.3\n")
    with pytest.raises(KdkitError, match=r"recipe .*mine\.yaml: unknown key 'learning_rate'"):
        load_recipe(str(bad))
    with pytest.raises(KdkitError, match="unknown recipe 'nope'; bundled recipes: .*bag-of-tricks"):
        load_recipe("nope")
    with pytest.raises(KdkitError, match=r"unknown key 'mixup_alpha' \(did you mean .*mixup"):
        make_config({"mixup_alpha": 0.2})


def test_flags_override_the_recipe_which_overrides_defaults(tmp_path):
    a = parse(["train", "teacher", "data/x", "-c", "bag-of-tricks", "--lr", "0.3", "--bias-decay",
               "--model-kwargs", "drop_rate=0.2", "zero_init_last=false", "--random-area", "0.2", "1.0"])
    cfg = config_from_args(a, "teacher")
    assert cfg.lr == 0.3 and cfg.bias_decay is True  # flags
    assert cfg.warmup_epochs == 5 and cfg.mixup == 0.2  # recipe
    assert cfg.batch_size == 64 and cfg.kd == "none" and cfg.ema is False  # defaults
    assert cfg.model_kwargs == {"drop_rate": 0.2, "zero_init_last": False} and cfg.random_area == (0.2, 1.0)
    assert cfg.data == "data/x" and cfg.recipe == "bag-of-tricks"
    # the resolved config round-trips as a recipe
    save_config(cfg, tmp_path / "config.yaml")
    again = config_from_args(parse(["train", "teacher", "-c", str(tmp_path / "config.yaml")]), "teacher")
    assert again.to_dict() == {**cfg.to_dict(), "recipe": cfg.recipe}
    assert "resume" not in yaml.safe_load((tmp_path / "config.yaml").read_text())


def test_student_distills_by_default_and_teacher_refuses_kd_recipes():
    s = config_from_args(parse(["train", "student", "d", "--teacher-checkpoint", "t.pth"]), "student")
    assert s.kd == "stored" and s.teacher_checkpoint == "t.pth"
    assert config_from_args(parse(["train", "student", "d", "--kd", "online"]), "student").kd == "online"
    assert config_from_args(parse(["train", "student", "d", "-c", "assemble-resnet50-kd"]), "student").kd == "stored"
    with pytest.raises(KdkitError, match="use `kdkit train student`"):
        config_from_args(parse(["train", "teacher", "d", "-c", "assemble-resnet50-kd"]), "teacher")
    with pytest.raises(SystemExit):  # a teacher has no --kd flag at all
        parse(["train", "teacher", "d", "--kd", "stored"])


def test_resume_flag_and_optional_values():
    a = parse(["train", "teacher", "d", "--name", "r1", "--resume", "--auto-augment", "none", "--clip-grad", "1"])
    cfg = config_from_args(a, "teacher")
    assert cfg.resume == "last" and cfg.auto_augment is None and cfg.clip_grad == 1.0
    assert config_from_args(parse(["train", "teacher", "d", "--resume", "x/last.pth"]), "teacher").resume == "x/last.pth"
    lf = parse(["lr-find", "d", "--model", "resnet18", "--num-steps", "30"])
    assert lf.num_steps == 30 and config_from_args(lf, "lr-find").kd == "none"


def test_help_lists_groups_and_defaults(capsys):
    with pytest.raises(SystemExit):
        parse(["train", "student", "--help"])
    out = capsys.readouterr().out
    for text in ("Optimizer parameters", "Distillation parameters", "--kd-temperature", "(default: 4.0)",
                 "--grad-accum", "--sam-rho", "--ema-decay", "--channels-last", "-c RECIPE"):
        assert text in out, text


def test_val_split_none():
    assert TrainConfig(val_split="none").val_split is None
