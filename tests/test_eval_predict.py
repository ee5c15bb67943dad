"""kdkit predict: top-k names and probabilities, folders, undecodable files, the eval transform."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import jpeg_bytes
from kdkit.models.checkpoint import load_model
from kdkit.evaluate.predict import PredictConfig, eval_transform, predict
from kdkit.shards import tario
from test_eval import MEAN, SIZE, STD, ckpt, one_torch_thread, run_cli  # noqa: F401 (shared fixtures)


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    paths = [tmp_path / "imgs" / "a.jpg", tmp_path / "imgs" / "sub" / "b.jpg", tmp_path / "imgs" / "sub" / "c.png"]
    for p in paths[:2]:
        p.write_bytes(jpeg_bytes(rng, 64, 80))
    Image.open(io.BytesIO(jpeg_bytes(rng, 50, 40))).save(paths[2])
    (tmp_path / "imgs" / "notes.txt").write_text("not an image, and not picked up from a folder")
    return paths


def test_topk_names_and_probabilities(ckpt, images):
    results = predict(PredictConfig(ckpt, [images[0].parent], topk=2))
    assert [r.path for r in results] == [str(p) for p in sorted(images)]  # recursive, images only, sorted
    model, info = load_model(ckpt)
    tf = eval_transform(info)
    for r in results:
        assert r.error is None and len(r.top) == 2
        assert {t["name"] for t in r.top} <= {"cat", "dog", "eel"}
        with torch.no_grad():
            probs = torch.softmax(model(tf(Image.open(r.path).convert("RGB"))[None]), 1)[0]
        assert [t["index"] for t in r.top] == probs.argsort(descending=True)[:2].tolist()
        assert [t["prob"] for t in r.top] == pytest.approx(probs.sort(descending=True).values[:2].tolist(), abs=1e-6)
    full = predict(PredictConfig(ckpt, [images[0]], topk=10))[0]
    assert len(full.top) == 3 and sum(t["prob"] for t in full.top) == pytest.approx(1.0, abs=1e-5)


def test_undecodable_image_is_named_and_the_others_still_predicted(ckpt, images, tmp_path, capsys):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0" + b"garbage" * 50)
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(images[0].read_bytes()[:300])
    results = predict(PredictConfig(ckpt, [images[0], bad, truncated, tmp_path / "missing.jpg", images[1]]))
    assert [r.error is None for r in results] == [True, False, False, False, True]
    assert results[1].error.startswith(f"{bad}: cannot decode: ")
    assert results[2].error.startswith(f"{truncated}: cannot decode: ")
    assert results[3].error == f"{tmp_path / 'missing.jpg'}: does not exist"
    assert run_cli(["predict", str(ckpt), str(images[0]), str(bad), "--topk", "1"]) == 1
    out, err = capsys.readouterr()
    assert str(images[0]) in out and "%" in out
    lines = err.strip().splitlines()
    assert lines[0].startswith(f"kdkit: error: {bad}: cannot decode: ") and len(lines) == 2
    assert "1 of 2 images failed" in lines[1]
    assert run_cli(["predict", str(ckpt), str(bad)]) == 1  # a single bad image: still a non-zero exit


def test_predict_transform_matches_the_dali_eval_view_up_to_resize(ckpt, tiny_shards):
    from kdkit.pipelines import DaliLoader, loader_config

    loader = DaliLoader(tiny_shards, loader_config("eval", batch_size=12, num_threads=2, image_size=SIZE, mean=MEAN,
                                                   std=STD), split="val")
    dali = next(iter(loader)).images
    tars = {t: dict(tario.iter_tar_samples(t)) for t, _ in loader.keys()}
    _, info = load_model(ckpt)
    tf = eval_transform(info)
    ours = torch.stack([tf(Image.open(io.BytesIO(tars[t][k]["jpg"])).convert("RGB")) for t, k in loader.keys()])
    # same geometry (37 x 46 resized, odd margin rounded like DALI) and normalisation; only Pillow's
    # and DALI's antialiased bilinear filters differ: about a grey level (~0.017 normalised)
    assert ours.shape == dali.shape and (ours - dali).abs().mean() < 0.03
