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


def test_the_kd_loss_and_its_options_are_flags_of_every_distilling_mode_and_a_recipe_key():
    for mode in ("student", "mutual"):
        cfg = config_from_args(parse(["train", mode, "d", "--kd", "online", "--kd-loss", "dkd-ls", "--dkd-beta", "2",
                                      "--dkd-alpha", "0.5", "--dkd-warmup", "3"]), mode)
        assert (cfg.kd_loss, cfg.dkd_alpha, cfg.dkd_beta, cfg.dkd_warmup) == ("dkd-ls", 0.5, 2.0, 3)
    dkd = config_from_args(parse(["train", "student", "d", "-c", "resnet18-dkd"]), "student")
    assert (dkd.kd, dkd.kd_loss, dkd.dkd_beta, dkd.kd_temperature) == ("replay", "dkd", 0.5, 1.0)
    with pytest.raises(SystemExit):  # a teacher distills nothing
        parse(["train", "teacher", "d", "--kd-loss", "dkd"])


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


def test_run_name_is_taken_as_written_and_a_student_is_named_student():
    cfg = config_from_args(parse(["train", "student", "d", "--kd", "none", "--name", "none"]), "student")
    assert cfg.name == "none" and str(cfg.run_dir) == "runs/none"
    assert config_from_args(parse(["train", "student", "d", "--kd", "none", "--model", "resnet18"]),
                            "student").run_name == "student-resnet18"
    assert config_from_args(parse(["train", "student", "d", "--model", "resnet18"]), "student").run_name == \
        "student-resnet18"
    assert config_from_args(parse(["train", "teacher", "d"]), "teacher").run_name == "teacher-resnet50"
    assert config_from_args(parse(["train", "mutual", "d"]), "mutual").run_name == "mutual-resnet50"
    for flag in ("--teacher-checkpoint", "--finetune", "--val-data"):  # paths: "none" is a file name
        value = config_from_args(parse(["train", "student", "d", flag, "none"]), "student")
        assert getattr(value, flag[2:].replace("-", "_")) == "none"
    # where none means "no value" on purpose, it still does: documented, or one of the choices
    cfg = config_from_args(parse(["train", "teacher", "d", "--val-split", "none", "--auto-augment", "none"]), "teacher")
    assert cfg.val_split is None and cfg.auto_augment is None


@pytest.mark.parametrize("mode,argv,said", [
    ("teacher", ["--kd", "stored"], "`kdkit train teacher` takes no --kd: it trains without a teacher"),
    ("teacher", ["--kd-alpha", "0.9"], "`kdkit train teacher` takes no --kd-alpha: it trains without a teacher"),
    ("teacher", ["--teacher-checkpoint", "t.pth"], "takes no --teacher-checkpoint: it trains without a teacher"),
    ("student", ["--peer-model", "resnet18"], "`kdkit train student` takes no --peer-model: only mutual learning"),
])
def test_a_flag_of_another_mode_is_refused_naming_the_mode(mode, argv, said, capsys):
    from kdkit.cli import main

    with pytest.raises(SystemExit) as e:
        main(["train", mode, "d", *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and said in err, err
    assert "use `kdkit train " in err and "ambiguous" not in err


def test_teacher_help_shows_only_its_own_options(capsys):
    from kdkit.cli import main

    with pytest.raises(SystemExit):
        main(["train", "teacher", "--help"])
    out = capsys.readouterr().out
    for flag in ("--kd ", "--kd-alpha", "--kd-temperature", "--teacher-model", "--views-per-load", "--peer-model"):
        assert flag not in out, flag
    assert "--lr" in out and "--finetune" in out


def test_a_recipe_setting_another_modes_option_is_refused(tmp_path):
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("kd: none\nkd_alpha: 0.5\nlr: 0.2\n")
    with pytest.raises(KdkitError, match=r"recipe .*mine\.yaml sets kd_alpha: 0\.5; `kdkit train teacher` takes no "
                                         r"--kd-alpha: it trains without a teacher"):
        config_from_args(parse(["train", "teacher", "d", "-c", str(recipe)]), "teacher")
    assert config_from_args(parse(["train", "student", "d", "-c", str(recipe)]), "student").kd_alpha == 0.5


def test_a_short_run_draws_its_curves_once(tmp_path, monkeypatch):
    """curves.png is redrawn at most every 30 s and after the last epoch: a run shorter than that draws
    it once (a demo student drew it after its first epoch too)."""
    from kdkit.train import runs

    drawn = []
    monkeypatch.setattr(runs, "plot_curves", lambda rows, out: drawn.append(len(rows)))
    run = runs.RunDir(make_config({"data": "d", "output": str(tmp_path), "name": "r"}))
    run.start(make_config({"data": "d", "output": str(tmp_path), "name": "r"}), resuming=False)
    for epoch in (1, 2, 3):
        run.log_epoch({"epoch": epoch, "train_loss": 1.0}, final=epoch == 3)
    assert drawn == [3]


def test_cuda_trains_in_bf16_channels_last_unless_told_and_the_cpu_as_before(monkeypatch):
    """An H100 run of a recipe that says nothing about precision gets bf16 autocast and channels-last
    (about twice the images/s of fp32 NCHW); --amp none / --no-channels-last win; the CPU keeps fp32 NCHW.
    The opening line says which the device chose."""
    from types import SimpleNamespace

    import torch

    from kdkit.runtime import Runtime
    from kdkit.train.loop import precision

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    cpu, gpu = Runtime(), Runtime(device=torch.device("cuda", 0))
    for recipe in (None, "assemble-resnet50-kd"):
        cfg = make_config({"data": "x"}, recipe=recipe)
        assert (cfg.on(cpu).amp, cfg.on(cpu).channels_last) == ("none", False)
        assert (cfg.on(gpu).amp, cfg.on(gpu).channels_last) == ("bf16", True)
    told = make_config({"data": "x", "amp": "none", "channels_last": False})
    assert (told.on(gpu).amp, told.on(gpu).channels_last) == ("none", False) and told.auto_options() == []
    fp16 = make_config({"data": "x", "amp": "fp16"})
    assert (fp16.on(gpu).amp, fp16.on(gpu).channels_last) == ("fp16", True)

    cfg = make_config({"data": "x"})
    t = SimpleNamespace(rt=gpu, cfg=cfg.on(gpu), device_defaults=cfg.auto_options())
    assert precision(t) == "; bf16 autocast, channels-last (the CUDA defaults; --amp none / --no-channels-last to " \
                           "turn off)"
    t = SimpleNamespace(rt=gpu, cfg=told.on(gpu), device_defaults=told.auto_options())
    assert precision(t) == "; no autocast, NCHW"
    assert precision(SimpleNamespace(rt=cpu, cfg=cfg.on(cpu), device_defaults=cfg.auto_options())) == ""
