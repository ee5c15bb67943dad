"""kdkit eval: metrics against a hand computation, test-time views, ensembles, EMA, bad input, CLI."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from kdkit.errors import KdkitError
from kdkit.evaluate.eval import EvalConfig, collect_probs, evaluate, format_report, load_models, write_outputs
from kdkit.models.checkpoint import load_model
from kdkit.models.checkpoint import save_checkpoint
from kdkit.models.factory import create_model
from kdkit.shards.verify import load_manifest
from kdkit.pipelines import DaliLoader, loader_config

SIZE = 32  # model input size: tiny, so every forward pass takes milliseconds
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ---------------------------------------------------------------------------------------------
# helpers shared with the other test_eval_* files

def tiny_model(seed: int) -> torch.nn.Module:
    """timm's test_resnet with random, spread-out BN statistics and a sharp classifier, so its
    predictions differ between images (a freshly initialised net predicts one class everywhere)."""
    torch.manual_seed(seed)
    m = create_model("test_resnet", num_classes=3)
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.normal_(0, 0.2)
            mod.running_var.uniform_(0.3, 3)
    with torch.no_grad():
        m.get_classifier().weight.mul_(30)
    return m.eval()


def make_checkpoint(path: Path, shards: Path, seed: int = 0, ema_seed: int | None = None, **over) -> Path:
    man = load_manifest(shards / "val")
    obj = {"model": "test_resnet", "model_kwargs": {}, "num_classes": 3,
           "classes": [c.to_json() for c in man.classes], "image_size": SIZE, "mean": list(MEAN), "std": list(STD),
           "state_dict": tiny_model(seed).state_dict(),
           "ema_state_dict": tiny_model(ema_seed).state_dict() if ema_seed is not None else None}
    save_checkpoint(path, {**obj, **over})
    return path


def add_parsers_parser() -> argparse.ArgumentParser:
    from kdkit.evaluate.cli import add_parsers

    p = argparse.ArgumentParser(prog="kdkit")
    add_parsers(p.add_subparsers(dest="command", required=True))
    return p


def run_cli(argv: list[str]) -> int:
    """What kdkit.cli.main does with a subcommand: run it, KdkitError -> exit 2."""
    args = add_parsers_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KdkitError as e:
        print(f"kdkit: error: {e}")
        return 2


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models run fastest on one thread, and torch's thread pool spinning against DALI's
    decoder threads on a 2-core machine turns 3 ms forward passes into 100s of ms."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def ckpt(tiny_shards, tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "a.pt", tiny_shards, seed=0)


@pytest.fixture(scope="session")
def ckpt_b(tiny_shards, tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "b.pt", tiny_shards, seed=1)


def views(shards, eval_views: str):
    """(images, labels) of the val set as the DALI eval pipeline gives them."""
    cfg = loader_config("eval", batch_size=5, num_threads=2, image_size=SIZE, views=eval_views, mean=MEAN, std=STD)
    batches = list(DaliLoader(shards, cfg, split="val"))
    return torch.cat([b.images for b in batches]), torch.cat([b.labels for b in batches]).numpy()


# ---------------------------------------------------------------------------------------------

def test_metrics_equal_a_hand_computation(ckpt, tiny_shards, tmp_path):
    report = evaluate(EvalConfig([ckpt], tiny_shards, batch_size=5))
    m = report["metrics"]
    images, labels = views(tiny_shards, "center")
    model, _ = load_model(ckpt)
    with torch.no_grad():
        probs = torch.softmax(model(images), 1).numpy().astype(np.float64)
    pred = probs.argmax(1)
    assert m["num_samples"] == len(labels) == 12
    assert m["top1"] == pytest.approx((pred == labels).mean())
    assert 0 < m["top1"] < 1  # the model is neither useless nor perfect: the numbers mean something
    assert m["top5_k"] == 3 and m["top5"] == 1.0  # three classes: the true one is always among the top 3
    top2 = np.argsort(-probs, 1)[:, :2]
    from kdkit.evaluate.metrics import topk_correct
    assert topk_correct(probs, labels, 2).mean() == pytest.approx(np.mean([y in t for y, t in zip(labels, top2)]))
    cm = np.zeros((3, 3), int)
    for y, p in zip(labels, pred):
        cm[y, p] += 1
    assert m["confusion"] == cm.tolist()
    assert [c["top1"] for c in m["per_class"]] == pytest.approx([cm[i, i] / 4 for i in range(3)])
    assert [c["id"] for c in m["per_class"]] == ["cat", "dog", "eel"]
    # ECE, 15 bins ((m-1)/15, m/15]: sum over bins of |B|/n * |accuracy - mean confidence|
    conf = probs.max(1)
    ece = 0.0
    for b in range(15):
        sel = (conf > b / 15) & (conf <= (b + 1) / 15)
        if sel.any():
            ece += sel.sum() / len(conf) * abs((pred[sel] == labels[sel]).mean() - conf[sel].mean())
    assert m["ece"] == pytest.approx(ece) and m["ece_bins"] == 15
    assert m["nll"] == pytest.approx(-np.log(probs[np.arange(12), labels]).mean(), rel=1e-5)
    # AP without tied scores: the mean, over the class's samples, of the precision at each one's rank
    ap = []
    for c in range(3):
        hits = labels[np.argsort(-probs[:, c])] == c
        ap.append(np.mean([hits[:k + 1].mean() for k in np.flatnonzero(hits)]))
    assert [c["ap"] for c in m["per_class"]] == pytest.approx(ap)
    assert m["map"] == pytest.approx(np.mean(ap)) and m["map_classes"] == 3 and m["ap_undefined"] == []
    files = write_outputs(report, tmp_path / "out")
    assert [f.name for f in files] == ["metrics.json", "confusion.png", "reliability.png"]
    assert json.loads(files[0].read_text())["metrics"]["top1"] == m["top1"]
    text = format_report(report)
    assert "top-1" in text and "ECE" in text and "cat" in text and "mAP" in text and "AP %" in text


def test_average_precision_by_hand_with_ties_and_an_absent_class():
    from kdkit.evaluate.metrics import average_precision, classification_metrics

    # scores 0.9 0.8 0.8 0.3 0.1 for positives 1 0 1 0 1; thresholds from the top (the tie is one):
    #   >= 0.9: P 1/1, R 1/3;  >= 0.8: P 2/3, R 2/3;  >= 0.3: P 2/4, R 2/3;  >= 0.1: P 3/5, R 3/3
    # AP = sum (R_n - R_n-1) P_n = 1/3 * 1 + 1/3 * 2/3 + 0 * 1/2 + 1/3 * 3/5 = 34/45
    scores = np.array([0.1, 0.8, 0.9, 0.3, 0.8])  # shuffled: the order of samples must not matter
    positive = np.array([1, 1, 1, 0, 0], bool)
    assert average_precision(scores, positive) == pytest.approx(34 / 45)
    assert average_precision(scores, np.ones(5, bool)) == pytest.approx(1.0)
    assert average_precision(scores, np.zeros(5, bool)) is None

    # three classes, no "eel" sample: its AP is undefined, left out of the mean and listed
    probs = np.array([[0.7, 0.2, 0.1], [0.3, 0.6, 0.1], [0.5, 0.4, 0.1], [0.2, 0.3, 0.5]])
    labels = np.array([0, 1, 1, 0])
    m = classification_metrics(probs, labels, ["cat", "dog", "eel"], ["cat", "dog", "eel"])
    # cat: scores 0.7 0.3 0.5 0.2 -> ranks: 0.7 (cat), 0.5 (dog), 0.3 (dog), 0.2 (cat): AP = (1 + 2/4) / 2
    # dog: scores 0.2 0.6 0.4 0.3 -> ranks: 0.6 (dog), 0.4 (dog): AP = 1
    assert [c["ap"] for c in m["per_class"]] == pytest.approx([0.75, 1.0, None])
    assert m["map"] == pytest.approx(0.875) and m["map_classes"] == 2 and m["ap_undefined"] == ["eel"]
    report = {"models": [{"source": "x", "model": "m", "weights": "model"}], "ensemble": False,
              "data": {"path": "p"}, "transform": {"views": "center", "num_views": 1, "image_size": 32,
                                                   "crop_ratio": 0.875}, "metrics": m}
    text = format_report(report)
    assert "mAP" in text and "87.50 %" in text and "over 2 classes" in text and "left out: eel" in text


@pytest.mark.parametrize("eval_views,n", [("flip", 2), ("tencrop", 10)])
def test_test_time_views_average_softmax_over_views(ckpt, tiny_shards, eval_views, n):
    images, labels = views(tiny_shards, eval_views)
    assert images.shape == (12, n, 3, SIZE, SIZE)
    if eval_views == "flip":
        assert torch.allclose(images[:, 1], images[:, 0].flip(-1))
    models, infos = load_models([ckpt])
    cfg = EvalConfig([ckpt], tiny_shards, views=eval_views, batch_size=5)
    probs, got_labels = collect_probs(models, infos, open_set(tiny_shards, infos), cfg)
    with torch.no_grad():
        per_view = torch.softmax(models[0](images.flatten(0, 1)), 1).view(12, n, 3)
    assert np.allclose(probs, per_view.mean(1).numpy(), atol=1e-6)
    assert (got_labels == labels).all()


def test_probabilities_are_read_back_once_not_per_batch(ckpt, tiny_shards, host_reads):
    """Evaluation waits for the device once, at the end, however many batches the set has (on a GPU each
    read of a value per batch stalls the queue); the probabilities are the same whatever the batch."""
    models, infos = load_models([ckpt])
    out, reads = {}, {}
    for batch in (2, 12):
        counter = host_reads()
        out[batch] = collect_probs(models, infos, open_set(tiny_shards, infos), EvalConfig([ckpt], tiny_shards,
                                                                                         batch_size=batch))
        reads[batch] = counter.count
    assert reads[2] == reads[12] <= 2
    assert np.allclose(out[2][0], out[12][0], atol=1e-6) and (out[2][1] == out[12][1]).all()


def open_set(shards, infos):
    from kdkit.evaluate.eval import open_eval_set

    return open_eval_set(shards, "val", infos)


def test_ensemble_is_the_mean_of_the_members_probabilities(ckpt, ckpt_b, tiny_shards):
    cfg = EvalConfig([ckpt], tiny_shards, batch_size=5)

    def probs(paths):
        models, infos = load_models(paths)
        return collect_probs(models, infos, open_set(tiny_shards, infos), cfg)[0]

    a, b, both = probs([ckpt]), probs([ckpt_b]), probs([ckpt, ckpt_b])
    assert not np.allclose(a, b)
    assert np.allclose(both, (a + b) / 2, atol=1e-6)
    report = evaluate(EvalConfig([ckpt, ckpt_b], tiny_shards, batch_size=5))
    assert report["ensemble"] and len(report["models"]) == 2


def test_ema_weights_are_used_when_present(tiny_shards, tmp_path):
    path = make_checkpoint(tmp_path / "ema.pt", tiny_shards, seed=0, ema_seed=7)
    ema_model, info = load_model(path)
    raw_model, raw_info = load_model(path, prefer_ema=False)
    assert (info.weights, raw_info.weights) == ("ema", "model")
    key = "conv1.weight" if "conv1.weight" in ema_model.state_dict() else next(iter(ema_model.state_dict()))
    assert torch.equal(ema_model.state_dict()[key], tiny_model(7).state_dict()[key])
    assert torch.equal(raw_model.state_dict()[key], tiny_model(0).state_dict()[key])
    assert evaluate(EvalConfig([path], tiny_shards, batch_size=12))["models"][0]["weights"] == "ema"


def test_eval_set_with_other_classes_is_a_clear_error(tiny_shards, tmp_path):
    other = [{"index": i, "id": c, "name": c} for i, c in enumerate(["cat", "dog", "fox"])]
    path = make_checkpoint(tmp_path / "fox.pt", tiny_shards, classes=other)
    with pytest.raises(KdkitError, match=r"not the ones .*fox\.pt.*1 of the model's classes missing.*fox.*"
                                         r"1 classes the model does not know.*eel"):
        evaluate(EvalConfig([path], tiny_shards))
    shuffled = [{"index": i, "id": c, "name": c} for i, c in enumerate(["dog", "cat", "eel"])]
    path = make_checkpoint(tmp_path / "order.pt", tiny_shards, classes=shuffled)
    with pytest.raises(KdkitError, match="same classes in another order"):
        evaluate(EvalConfig([path], tiny_shards))


def test_checkpoint_of_another_architecture_or_class_count_is_a_clear_error(tiny_shards, tmp_path):
    path = make_checkpoint(tmp_path / "arch.pt", tiny_shards, model="resnet10t")
    with pytest.raises(KdkitError, match=r"arch\.pt \(resnet10t, model weights\): does not fit the model.*"
                                         r"another architecture or class count"):
        load_model(path)
    five = [{"index": i, "id": str(i), "name": ""} for i in range(5)]
    path = make_checkpoint(tmp_path / "five.pt", tiny_shards, num_classes=5, classes=five)
    with pytest.raises(KdkitError, match=r"shape mismatch.*\(3, .*\) vs model \(5, "):
        load_model(path)


def test_bare_state_dict_needs_a_model_name(tiny_shards, tmp_path):
    path = tmp_path / "bare.pth"
    torch.save(tiny_model(0).state_dict(), path)
    with pytest.raises(KdkitError, match="bare state dict.*--model NAME"):
        load_model(path)
    model, info = load_model(path, model_name="test_resnet")
    assert info.num_classes == 3 and info.classes is None  # class count read off the classifier
    evaluate(EvalConfig([path], tiny_shards, model_name="test_resnet", batch_size=12))  # counts agree: no error
    torch.save(create_model("test_resnet", num_classes=4).state_dict(), path)
    with pytest.raises(KdkitError, match="has 3 classes but .*predicts 4"):
        evaluate(EvalConfig([path], tiny_shards, model_name="test_resnet"))


def test_ensemble_members_must_agree_on_classes(ckpt, tiny_shards, tmp_path):
    other = [{"index": i, "id": c, "name": c} for i, c in enumerate(["ant", "bee", "cow"])]
    path = make_checkpoint(tmp_path / "abc.pt", tiny_shards, classes=other)
    with pytest.raises(KdkitError, match="cannot average .*same classes in the same order"):
        load_models([ckpt, path])


def test_cli_eval_writes_table_json_and_plots(ckpt, tiny_shards, tmp_path, capsys):
    out = tmp_path / "ev"
    assert run_cli(["eval", str(ckpt), "--data", str(tiny_shards), "--views", "flip", "--out", str(out),
                    "--batch-size", "6", "--json", str(tmp_path / "m.json")]) == 0
    text = capsys.readouterr().out
    assert "flip (2 views)" in text and "top-1" in text
    report = json.loads((tmp_path / "m.json").read_text())
    assert report["transform"]["views"] == "flip" and report["extra"]["command"].startswith("kdkit ")
    assert (out / "confusion.png").stat().st_size > 1000 and (out / "reliability.png").exists()
    assert run_cli(["eval", str(tmp_path / "nope.pt"), "--data", str(tiny_shards)]) == 2
    assert "nope.pt: checkpoint does not exist" in capsys.readouterr().out


def test_am_softmax_head_is_rebuilt_from_the_checkpoint(tiny_shards, tmp_path):
    from kdkit.models.heads import AMSoftmaxHead

    model = tiny_model(0)
    head = AMSoftmaxHead(model.get_classifier().in_features, 3, scale=16.0)
    model.fc = head
    path = make_checkpoint(tmp_path / "am.pt", tiny_shards, state_dict=model.state_dict(),
                           head={"type": "am_softmax", "scale": 16.0, "margin": 0.35})
    loaded, info = load_model(path)
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-5)
    assert loaded(x).abs().max() <= 16.0 + 1e-4  # scaled cosines
