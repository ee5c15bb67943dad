"""Bad input as a new user meets it: every refusal is one line on stderr naming the option or file and
what to do, exit status 2, and nothing written."""
from __future__ import annotations

import pytest

from kdkit.cli import main
from kdkit.errors import KdkitError


def refused(capsys, argv: list[str], *expected: str) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1, err
    for text in expected:
        assert text in err, err
    return err


@pytest.mark.parametrize("flag,value,expected", [
    ("--max-size", "-5", "expected an integer >= 8"), ("--max-size", "0", "expected an integer >= 8"),
    ("--samples-per-shard", "-3", "expected an integer >= 1"), ("--samples-per-shard", "0", ">= 1"),
    ("--shard-size-mb", "0", "expected a number > 0"), ("--workers", "0", ">= 1"), ("--quality", "101", "1 <= x <= 100"),
    ("--seed", "-1", ">= 0")])
def test_nonsense_shard_options_are_refused_before_anything_is_written(class_tree, tmp_path, capsys, flag, value,
                                                                       expected):
    root, _ = class_tree
    refused(capsys, ["shard", "folder", str(root), str(tmp_path / "out"), flag, value], f"argument {flag}", expected)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv,expected", [
    (["eval", "c.pth", "--data", "d", "--batch-size", "0"], "argument --batch-size: expected an integer >= 1"),
    (["eval", "c.pth", "--data", "d", "--crop-ratio", "0"], "argument --crop-ratio: expected a number with 0 < x <= 1"),
    (["predict", "c.pth", "x.jpg", "--topk", "0"], "argument --topk: expected an integer >= 1"),
    (["add-teacher-logits", "d", "--checkpoint", "c", "--out", "o", "--views", "0"], "argument --views"),
    (["bench-loader", "d", "--threads", "0"], "argument --threads"),
    (["lr-find", "d", "--num-steps", "1"], "argument --num-steps: expected an integer >= 5"),
    (["shard", "folder", "a"], "required: out")])
def test_nonsense_values_of_other_commands_are_one_line(capsys, argv, expected):
    refused(capsys, argv, expected, f"see `kdkit {argv[0]}")


@pytest.mark.parametrize("flags,expected", [
    (["--label-smoothing", "2"], "label_smoothing=2.0: expected a number 0 <= label_smoothing <= 0.999"),
    (["--image-size", "0"], "image_size=0: expected an integer >= 8"),
    (["--kd-alpha", "1.5"], "kd_alpha=1.5"), (["--random-area", "0.9", "0.2"], "random_area")])
def test_nonsense_training_options_are_refused_naming_the_option(tiny_shards, tmp_path, capsys, flags, expected):
    assert main(["train", "teacher", str(tiny_shards), "--output", str(tmp_path), *flags]) == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1, err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("line,expected", [
    ("lr: fast", "lr='fast': expected a number"), ("epochs: '2'", "epochs='2': expected an integer"),
    ("random_area: 0.5", "random_area=0.5: expected a list of 2 numbers"), ("flip: 1", "flip=1: expected true or false"),
    ("sched: sometimes", "sched='sometimes': expected one of cosine")])
def test_recipe_values_are_type_checked_with_the_key_and_file_named(tmp_path, line, expected):
    from kdkit.train.config import make_config

    recipe = tmp_path / "mine.yaml"
    recipe.write_text(line + "\n")
    with pytest.raises(KdkitError, match=rf"recipe .*mine\.yaml: {expected}".replace("(", r"\(").replace(")", r"\)")):
        make_config({"data": "x"}, recipe=str(recipe))
