"""kdkit export: ONNX with a dynamic batch, parity with PyTorch under ONNX Runtime, throughput."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from kdkit.evaluate.export import ExportConfig, export, format_export, ort_session
from kdkit.models.checkpoint import load_model
from test_eval import SIZE, ckpt, one_torch_thread, run_cli  # noqa: F401 (shared fixtures)


@pytest.fixture(scope="module")
def exported(ckpt, tiny_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "m.onnx"
    cfg = ExportConfig(ckpt, output=out, data=tiny_shards, parity_samples=3, batch_size=4, iterations=2, warmup=1,
                       atol=1e-4)
    return export(cfg)


@pytest.mark.slow
def test_onnx_parity_on_real_inputs_with_a_dynamic_batch(exported, ckpt):
    p = exported["parity"]
    assert exported["exporter"] == "dynamo" and exported["fallback_reason"] is None
    assert "eval views from" in p["inputs"] and p["samples"] == 3 and p["batch_sizes"] == [1, 3]
    assert p["max_abs_diff"] < 1e-4 and p["top1_agreement"] == 1.0 and p["ok"]
    session = ort_session(exported["onnx"])
    assert session.get_inputs()[0].name == "images" and isinstance(session.get_inputs()[0].shape[0], str)
    model, _ = load_model(ckpt)
    for batch in (1, 3, 5):  # batch sizes the export never saw
        x = torch.randn(batch, 3, SIZE, SIZE)
        with torch.no_grad():
            ref = model(x).numpy()
        got = session.run(["logits"], {"images": x.numpy()})[0]
        assert got.shape == (batch, 3) and np.abs(got - ref).max() < 1e-4


def test_onnx_metadata_carries_the_transform_and_classes(exported):
    meta = {p.key: p.value for p in onnx.load(exported["onnx"]).metadata_props}
    assert int(meta["kdkit.image_size"]) == SIZE and float(meta["kdkit.crop_ratio"]) == 0.875
    assert [c["id"] for c in json.loads(meta["kdkit.classes"])] == ["cat", "dog", "eel"]
    assert json.loads(meta["kdkit.mean"]) == pytest.approx([0.485, 0.456, 0.406])


def test_throughput_is_measured_for_both_runtimes(exported):
    t = exported["throughput"]
    assert t["batch_size"] == 4 and t["torch_eager_img_s"] > 0 and t["onnxruntime_img_s"] > 0
    assert t["speedup"] == pytest.approx(t["onnxruntime_img_s"] / t["torch_eager_img_s"])
    text = format_export(exported)
    assert "parity" in text and "OK" in text and "ONNX Runtime" in text


def test_torchscript_exporter_and_cli(ckpt, tmp_path, capsys):
    out = tmp_path / "ts.onnx"
    assert run_cli(["export", str(ckpt), "-o", str(out), "--exporter", "torchscript", "--no-benchmark",
                    "--parity-samples", "2", "--threads", "1"]) == 0
    text = capsys.readouterr().out
    assert "torchscript exporter" in text and "random inputs (synthetic" in text
    report = json.loads(out.with_suffix(".export.json").read_text())
    assert report["parity"]["ok"] and report["opset"] == 17 and "throughput" not in report


def test_a_set_without_val_is_read_from_its_only_split(ckpt, tiny_shards, tmp_path, capsys):
    import shutil

    root = tmp_path / "only-train"
    shutil.copytree(tiny_shards / "train", root / "train")
    out = tmp_path / "m.onnx"
    assert run_cli(["export", str(ckpt), "-o", str(out), "--data", str(root), "--exporter", "torchscript",
                    "--no-benchmark", "--parity-samples", "2", "--threads", "1"]) == 0
    said = capsys.readouterr()
    assert f"{root} holds no val split; reading its only split, train" in said.out + said.err
    report = json.loads(out.with_suffix(".export.json").read_text())
    assert f"eval views from {root / 'train'}" in report["parity"]["inputs"]
    shutil.copytree(tiny_shards / "train", root / "test")  # two splits, neither val: which one is for the user
    assert run_cli(["export", str(ckpt), "-o", str(out), "--data", str(root), "--no-benchmark"]) == 2
    said = capsys.readouterr()
    assert "holds no val split but test, train; name the one to read with --split" in said.out + said.err


def test_a_bare_tar_or_a_folder_of_tars_is_read_as_given(ckpt, tiny_shards, tmp_path, capsys):
    """No split to choose in one tar or a manifest-less folder of tars: read as given, nothing said about val."""
    import shutil

    loose = tmp_path / "loose"
    loose.mkdir()
    tar = sorted((tiny_shards / "train").glob("*.tar"))[0]
    shutil.copy(tar, loose / tar.name)
    shutil.copy(tar.with_suffix(".idx"), loose / tar.with_suffix(".idx").name)
    for data in (loose / tar.name, loose):
        out = tmp_path / f"{data.name}.onnx"
        assert run_cli(["export", str(ckpt), "-o", str(out), "--data", str(data), "--exporter", "torchscript",
                        "--no-benchmark", "--parity-samples", "2", "--threads", "1"]) == 0
        said = capsys.readouterr()
        assert "val split" not in said.out + said.err
        assert "eval views from" in json.loads(out.with_suffix(".export.json").read_text())["parity"]["inputs"]


def test_an_interrupted_re_export_never_leaves_a_report_of_another_model(ckpt, tiny_shards, tmp_path, monkeypatch):
    """The repro: re-exporting into a folder with an earlier export, Ctrl-C between "the new model.onnx is in
    place" and "its report is written" left the old checkpoint's "parity OK" beside the new model. Now the
    model is checked before it replaces the old one, and the report comes last: an interruption at any point
    leaves a report that describes the model beside it, or no report."""
    from kdkit import atomic
    from kdkit.evaluate import export as export_mod
    from test_eval import make_checkpoint

    out = tmp_path / "deploy" / "model.onnx"
    report = out.with_suffix(".export.json")
    argv = ["-o", str(out), "--no-benchmark", "--parity-samples", "2", "--exporter", "torchscript"]
    assert run_cli(["export", str(ckpt), *argv]) == 0
    other = make_checkpoint(tmp_path / "other.pth", tiny_shards, seed=5)
    x = torch.randn(2, 3, SIZE, SIZE)

    def described() -> bool:  # the report's checkpoint gives the logits of the model beside it
        model, _ = load_model(json.loads(report.read_text())["checkpoint"])
        with torch.no_grad():
            want = model(x).numpy()
        return np.abs(ort_session(out).run(["logits"], {"images": x.numpy()})[0] - want).max() < 1e-4

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    for where in ("while the new model is checked", "after it is in place, before its report"):
        if where.startswith("while"):
            monkeypatch.setattr(export_mod, "check_parity", interrupt)
        else:
            monkeypatch.setattr(export_mod.atomic, "write_json", interrupt)
        with pytest.raises(KeyboardInterrupt):
            run_cli(["export", str(other), *argv])
        monkeypatch.undo()
        assert not report.exists() or described(), where
        assert not list(out.parent.glob("*" + atomic.TMP_TAG)) and not list(out.parent.glob("*.tmp"))
    assert run_cli(["export", str(other), *argv]) == 0 and described()
