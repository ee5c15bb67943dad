"""kdkit export --format openvino [--int8]: the IR against PyTorch through the OpenVINO runtime, NNCF int8
accuracy on the eval split, predict from an IR, and bad input (one line, nothing under the final name)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("openvino")
pytest.importorskip("nncf")

from kdkit import locks  # noqa: E402
from kdkit.evaluate import deploy  # noqa: E402
from kdkit.evaluate.deploy import EvalViews, OpenVINOModel  # noqa: E402
from kdkit.evaluate.predict import PredictConfig, predict  # noqa: E402
from kdkit.models.checkpoint import load_model  # noqa: E402
from test_eval import ckpt, one_torch_thread, run_cli  # noqa: E402,F401 (shared fixtures)
from test_train_loop import RESNET, cfg_for, write_colour_shards  # noqa: E402

MAX_DROP = 5.0  # top-1 points int8 may lose on the 24 val views (one view is 4.2 points)


@pytest.fixture(scope="module")
def colour(tmp_path_factory):
    """3 colour classes, 8 train / 8 val images each: a model learns them in a few steps."""
    return write_colour_shards(tmp_path_factory.mktemp("colour"), per_class=(8, 8))


@pytest.fixture(scope="module")
def trained(colour, tmp_path_factory):
    """timm's test_resnet trained by kdkit for 4 epochs: accurate enough for an int8 drop to mean something."""
    from kdkit.train.loop import fit

    out = tmp_path_factory.mktemp("run")
    fit(cfg_for(colour, out, epochs=4, name="r", model=RESNET))
    return out / "r" / "best.pth"


@pytest.fixture(scope="module")
def exported(trained, colour, tmp_path_factory):
    """The CLI's OpenVINO export with the normalisation inside and an accuracy-controlled int8 IR."""
    out = tmp_path_factory.mktemp("ov") / "ir"
    rc = run_cli(["export", str(trained), "--format", "openvino", "-o", str(out), "--embed-preprocessing",
                  "--data", str(colour), "--parity-samples", "6", "--int8", "--calibration-samples", "24",
                  "--max-drop", str(MAX_DROP), "--batch-size", "4", "--iterations", "2", "--warmup", "1",
                  "--threads", "1"])
    return rc, out, json.loads((out / "report.json").read_text())


def test_ir_matches_eager_on_real_views_within_tolerance(exported, trained, colour):
    rc, out, r = exported
    assert rc == 0 and {p.name for p in out.iterdir()} == {"model.xml", "model.bin", "model_int8.xml",
                                                           "model_int8.bin", "input.json", "report.json"}
    p = r["parity"]
    assert "eval views from" in p["inputs"] and p["ok"] and p["max_abs_diff"] < 1e-3 and p["top1_agreement"] == 1
    spec = json.loads((out / "input.json").read_text())
    assert spec["dtype"] == "uint8" and spec["layout"] == "NHWC" and spec["color"] == "RGB"
    assert spec["image_size"] == 32 and spec["mean"] == pytest.approx([0.485, 0.456, 0.406])
    # independently of the export's own check: the IR on uint8 crops vs PyTorch on the same pixels
    ir = OpenVINOModel(out / "model.xml", threads=1)
    model, info = load_model(trained)
    assert ir.request.model_inputs[0].get_element_type().to_string() == "u8"
    images, _ = next(iter(EvalViews(colour, "val", info, 0.875, 5)))
    pixels = torch.from_numpy(ir.feed(images))  # uint8 (5, 32, 32, 3)
    assert pixels.dtype == torch.uint8 and pixels.shape == (5, 32, 32, 3)
    x = (pixels.permute(0, 3, 1, 2).float() / 255 - torch.tensor(info.mean).view(1, 3, 1, 1)) \
        / torch.tensor(info.std).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = model(x).numpy()
    for batch in (1, 5):  # the batch axis is dynamic
        got = np.concatenate([ir.run(pixels[i:i + batch].numpy()) for i in range(0, 5, batch)])
        assert np.abs(got - ref).max() < 1e-3


def test_int8_top1_is_within_the_max_drop_of_fp32(exported, colour):
    _, out, r = exported
    a, q = r["accuracy"], r["int8"]
    assert a["samples"] == 24 and a["split"] == "val" and q["method"] == "quantize_with_accuracy_control"
    assert a["openvino_fp32_top1"] >= 75 and a["torch_eager_top1"] == a["openvino_fp32_top1"]
    assert a["drop"] == pytest.approx(a["openvino_fp32_top1"] - a["openvino_int8_top1"])
    assert a["drop"] <= MAX_DROP and a["ok"]
    assert q["bytes"] < r["bytes"]  # int8 weights (layers accuracy control kept in fp32 keep theirs)
    # the report's int8 top-1 is what the written int8 IR gives
    int8 = OpenVINOModel(out / "model_int8.xml", threads=1)
    views = EvalViews(colour, "val", int8.model_info, 0.875, 8)
    correct = sum(int((int8(x).argmax(1) == y).sum()) for x, y in views)
    assert 100 * correct / 24 == pytest.approx(a["openvino_int8_top1"])
    t = r["throughput"]
    assert t["torch_eager_img_s"] > 0 and t["openvino_fp32_img_s"] > 0 and t["openvino_int8_img_s"] > 0


def test_predict_gives_the_same_classes_from_the_ir_as_from_the_checkpoint(exported, trained, colour, capsys):
    _, out, _ = exported
    images = [colour.parent / "raw" / "val"]
    from_ckpt = predict(PredictConfig(trained, images, topk=3))
    for ir in (out, out / "model.xml"):  # the export folder or its model.xml
        from_ir = predict(PredictConfig(ir, images, topk=3))
        assert len(from_ir) == len(from_ckpt) == 24 and from_ir.info.model == RESNET
        for a, b in zip(from_ir, from_ckpt):
            assert a.path == b.path and [t["id"] for t in a.top] == [t["id"] for t in b.top]
            assert a.top[0]["prob"] == pytest.approx(b.top[0]["prob"], abs=0.02)  # uint8 rounding only
    assert run_cli(["predict", str(out / "model_int8.xml"), str(images[0]), "--topk", "1"]) == 0
    assert "model_int8.xml (test_resnet" in capsys.readouterr().out


def test_float_input_ir_without_data_uses_generated_inputs(ckpt, tmp_path, capsys):
    out = tmp_path / "plain"
    assert run_cli(["export", str(ckpt), "--format", "openvino", "-o", str(out), "--no-benchmark",
                    "--parity-samples", "3", "--threads", "1"]) == 0
    text = capsys.readouterr().out
    assert "random inputs (synthetic" in text and "float32 NCHW" in text and "OK" in text
    r = json.loads((out / "report.json").read_text())
    assert r["parity"]["max_abs_diff"] < 1e-3 and "int8" not in r and "throughput" not in r
    # exporting the same checkpoint again replaces the folder; another checkpoint's export is refused
    assert run_cli(["export", str(ckpt), "--format", "openvino", "-o", str(out), "--no-benchmark",
                    "--parity-samples", "2", "--threads", "1"]) == 0
    assert json.loads((out / "report.json").read_text())["parity"]["samples"] == 2


def one_line_error(capsys, *words) -> None:
    text = capsys.readouterr().out.strip().splitlines()[-1]
    assert text.startswith("kdkit: error:"), text
    for w in words:
        assert w in text, (w, text)


def test_bad_input_is_one_line_and_leaves_nothing(exported, trained, ckpt, colour, tmp_path, capsys, monkeypatch):
    _, ir_folder, _ = exported
    before = sorted(p.name for p in ir_folder.iterdir())
    base = ["--format", "openvino", "--no-benchmark", "--threads", "1"]
    # an output folder holding another checkpoint's export
    assert run_cli(["export", str(ckpt), "-o", str(ir_folder), *base]) == 2
    one_line_error(capsys, str(ir_folder), "another checkpoint", "-o")
    assert sorted(p.name for p in ir_folder.iterdir()) == before
    # calibration sets with another class count, or stored smaller than the model's input
    two = write_colour_shards(tmp_path / "two", num_classes=2, per_class=(2, 2))
    from kdkit.shards.images import ImageOptions
    from kdkit.shards.sources.folder import list_folder
    from kdkit.shards.writer import ShardConfig, write_dataset

    small = tmp_path / "small"
    write_dataset(list_folder(colour.parent / "raw"), small,
                  ShardConfig(samples_per_shard=10, workers=1, progress=False, image=ImageOptions(max_size=16)))
    out = tmp_path / "ir"
    for data, words in ((two, ["class"]), (small, ["16 px", "32 px", "--max-size"])):
        assert run_cli(["export", str(trained), "-o", str(out), *base, "--int8", "--data", str(data)]) == 2
        one_line_error(capsys, str(data.name), *words)
        assert not out.exists() and [p.name for p in tmp_path.glob(".ir.*")] == [".ir.kdkit-lock"]  # its lock only
    assert run_cli(["export", str(trained), "-o", str(out), *base, "--int8"]) == 2
    one_line_error(capsys, "--data")
    # a calibration split the set does not have: the flag that chose it is named
    assert run_cli(["export", str(trained), "-o", str(out), *base, "--int8", "--data", str(colour),
                    "--calibration-split", "nosuch"]) == 2
    one_line_error(capsys, "no shard set for split 'nosuch'", "--calibration-split nosuch")
    assert not out.exists()
    assert run_cli(["export", str(trained), "-o", str(out), *base, "--max-drop", "1"]) == 2
    one_line_error(capsys, "--int8")
    assert run_cli(["export", str(trained), "-o", str(out), "--int8", "--no-benchmark"]) == 2  # ONNX
    one_line_error(capsys, "--format openvino")
    # a model OpenVINO cannot convert: the op is named, nothing is written
    import kdkit.evaluate.deploy as deploy

    class Eigh(torch.nn.Module):
        def forward(self, x):
            y = x.flatten(1)[:, :4]
            return torch.linalg.eigh(y[:, :, None] * y[:, None, :]).eigenvalues

    real = deploy.load_model
    monkeypatch.setattr(deploy, "load_model", lambda *a, **k: (Eigh().eval(), real(*a, **k)[1]))
    assert run_cli(["export", str(trained), "-o", str(out), *base]) == 2
    one_line_error(capsys, "does not convert", "aten::linalg_eigh")
    assert not out.exists() and [p.name for p in tmp_path.glob(".ir.*")] == [".ir.kdkit-lock"]  # its lock only
    monkeypatch.undo()
    # the deploy extra missing: how to install it
    monkeypatch.setitem(sys.modules, "openvino", None)  # what `import openvino` sees when it is not installed
    assert run_cli(["export", str(trained), "-o", str(out), *base]) == 2
    one_line_error(capsys, "kdkit[deploy]", "openvino")
    assert run_cli(["predict", str(ir_folder), str(colour.parent / "raw" / "val")]) == 2
    one_line_error(capsys, "kdkit[deploy]")
    assert not out.exists()



def test_no_usage_data_is_sent_without_a_consent_file(tmp_path, monkeypatch):
    """openvino_telemetry sends when no consent file exists; through kdkit, no file means declined."""
    oc = pytest.importorskip("openvino_telemetry.utils.opt_in_checker")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("CI", raising=False)
    checker = oc.OptInChecker()
    monkeypatch.setattr(oc.OptInChecker, "consent_file_base_dir", lambda self: str(tmp_path))
    assert not os.path.exists(checker.consent_file())
    monkeypatch.setattr(oc.OptInChecker, "check", oc.OptInChecker.check)  # undone after the test
    deploy.require("openvino")
    assert checker.check(enable_opt_in_dialog=False, disable_in_ci=True) == oc.ConsentCheckResult.DECLINED
    Path(checker.consent_file()).parent.mkdir(parents=True, exist_ok=True)
    Path(checker.consent_file()).write_text("1")  # a user who opted in keeps their choice
    assert checker.check(enable_opt_in_dialog=False, disable_in_ci=True) == oc.ConsentCheckResult.ACCEPTED


def test_a_re_export_touches_nothing_beside_its_folder_and_recovers_a_killed_swap(ckpt, tmp_path, capsys):
    """The repro: `-o DIR` removed DIR.tmp at every start and DIR.old on a re-export, a user's backup among them.
    kdkit's own temporary and previous folders have names no user chooses (.DIR.<pid>.kdkit-tmp / -old); a swap
    killed between its two renames gets the earlier export back. Which leftovers are dead is decided by the
    export's lock, not by their pid: the pid of a killed export may be a live process's now."""
    import shutil

    out = tmp_path / "ir"
    for mine, text in (("ir.old", "last week's model, my only copy"), ("ir.tmp", "my notes")):
        (tmp_path / mine).mkdir()
        (tmp_path / mine / "file.txt").write_text(text)
    argv = ["export", str(ckpt), "--format", "openvino", "-o", str(out), "--no-benchmark", "--threads", "1"]
    for _ in range(2):  # an export, then a re-export over it
        assert run_cli(argv) == 0
    assert (tmp_path / "ir.old" / "file.txt").read_text() == "last week's model, my only copy"
    assert (tmp_path / "ir.tmp" / "file.txt").read_text() == "my notes"
    mine = ["ir", "ir.old", "ir.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([".ir.kdkit-lock", *mine])
    # killed between "the earlier export moved aside" and "the new one renamed in": NAME is missing; its pid
    # is reused by a live process (this one)
    reused = os.getpid()
    shutil.move(out, tmp_path / f".ir.{reused}.kdkit-old")
    (tmp_path / f".ir.{reused}.kdkit-tmp").mkdir()  # and its half-built folder
    spec = json.loads((tmp_path / f".ir.{reused}.kdkit-old" / "input.json").read_text())
    with locks.beside(out, "export", ""):  # another export running: refused, nothing touched
        assert run_cli(argv) == 2
        assert f"the export folder {out} is being written by another process (pid {os.getpid()}" in capsys.readouterr().out
        assert not out.exists() and (tmp_path / f".ir.{reused}.kdkit-tmp").is_dir()
    deploy.tidy_leftovers(out)  # what the next export does first, under its lock
    assert json.loads((out / "input.json").read_text()) == spec  # the earlier export is back under its name
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([".ir.kdkit-lock", *mine])
