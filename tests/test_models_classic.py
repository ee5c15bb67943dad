"""kdkit.models.classic and the seeds' timm names: each builds with kdkit's class count, trains a step at
small sizes, has the layers its seed describes, swaps its head, and refuses too-small inputs in one line;
one of the seeds' timm names trains an epoch through the `kdkit` CLI."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from kdkit.errors import KdkitError
from kdkit.models.classic import CLASSIC_VARIANTS, MIN_SIZE
from kdkit.models.factory import create_model
from kdkit.models.heads import am_softmax
from kdkit.models.listing import SEED_BASELINES


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()  # small convs on a busy 2-core box: one thread is fastest
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def train_step(model: nn.Module, size: int, classes: int) -> torch.Tensor:
    model.train()
    out = model(torch.randn(2, 3, size, size))
    nn.functional.cross_entropy(out, torch.tensor([0, classes - 1])).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    return out


@pytest.mark.parametrize("name", sorted(CLASSIC_VARIANTS))
@pytest.mark.slow
def test_classic_backbone_trains_swaps_its_head_and_names_its_minimum_size(name):
    model = create_model(name, num_classes=7)
    assert train_step(model, max(32, MIN_SIZE[name]), 7).shape == (2, 7)
    model.reset_classifier(4)
    assert model.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 4)
    am_softmax(model, 30.0)  # the AM-softmax head finds the Linear classifier
    assert model(torch.randn(1, 3, 64, 64)).abs().max() <= 30.0 + 1e-4
    if MIN_SIZE[name] > 1:
        with pytest.raises(KdkitError, match=f"at least {MIN_SIZE[name]} px"):
            model(torch.randn(1, 3, MIN_SIZE[name] - 1, MIN_SIZE[name] - 1))
    gray = create_model(name, num_classes=3, in_chans=1)
    assert gray.eval()(torch.randn(1, 1, 64, 64)).shape == (1, 3)


def test_bn_variants_have_batch_norm_where_the_papers_had_lrn():
    features = {n: list(create_model(n, num_classes=10).features) for n in ("alexnet_bn", "zfnet_bn")}
    convs = {n: [m for m in f if isinstance(m, nn.Conv2d)] for n, f in features.items()}
    for name, layers in convs.items():
        feats = features[name]
        assert [c.out_channels for c in layers] == [96, 256, 384, 384, 256]  # the papers' widths
        assert not any(isinstance(m, nn.LocalResponseNorm) for m in feats)
        bn = [i for i, m in enumerate(feats) if isinstance(m, nn.BatchNorm2d)]
        # two norms, each after conv1 / conv2's ReLU and before the pool: where LRN was
        assert len(bn) == 2 and all(isinstance(feats[i - 1], nn.ReLU) and isinstance(feats[i + 1], nn.MaxPool2d)
                                    for i in bn)
    assert (convs["alexnet_bn"][0].kernel_size, convs["alexnet_bn"][0].stride) == ((11, 11), (4, 4))
    assert (convs["zfnet_bn"][0].kernel_size, convs["zfnet_bn"][0].stride) == ((7, 7), (2, 2))
    assert convs["zfnet_bn"][1].stride == (2, 2)  # ZFNet's second change to AlexNet


def bn_channels(model: nn.Module) -> int:
    return sum(m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def test_googlenet_bn_is_the_keras_seeds_up_to_its_5x5_branches():
    model = create_model("googlenet_bn", num_classes=1000)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == len(convs)
    assert model.aux1 is None and model.aux2 is None
    # the Keras seed's 7,020,392 params: its "5x5" branches are 5x5 (torchvision's: 3x3, 9/25 of the
    # weights) and Keras counts BatchNorm's moving mean and variance as parameters
    branch_3x3 = [m.branch3[1].conv.weight.numel() for m in model.modules() if type(m).__name__ == "Inception"]
    assert len(branch_3x3) == 9
    assert params(model) + sum(n * 25 // 9 - n for n in branch_3x3) + 2 * bn_channels(model) == 7_020_392


def test_inception_v2_is_the_keras_seeds():
    model = create_model("inception_v2", num_classes=1000)
    # the seed's table: 11,214,888 params in Keras = ours + BatchNorm's moving mean and variance
    assert params(model) + 2 * bn_channels(model) == 11_214_888
    assert len(model.blocks) == 10  # modules 3b-3c, 4a-4e, 5a-5c
    assert model.num_features == 1024 and not any(m.kernel_size == (5, 5) for m in model.modules()
                                                   if isinstance(m, nn.Conv2d))


@pytest.mark.parametrize("name", sorted(SEED_BASELINES))
@pytest.mark.slow
def test_seed_timm_names_build_and_train_at_small_sizes(name):
    assert train_step(create_model(name, num_classes=3), 32, 3).shape == (2, 3)


@pytest.mark.slow
def test_a_seed_model_trains_an_epoch_and_evaluates_through_the_cli(tiny_shards, tmp_path, capsys):
    from kdkit.cli import main

    common = ["--image-size", "32", "--batch-size", "8", "--loader-threads", "1", "--no-progress", "--epochs", "1",
              "--output", str(tmp_path)]
    assert main(["train", "teacher", str(tiny_shards), "--model", "mobilenetv3_large_100", "--name", "mnv3",
                 *common]) == 0
    run = tmp_path / "mnv3"
    assert (run / "best.pth").exists() and (run / "metrics.jsonl").read_text().strip()
    assert main(["eval", str(run / "best.pth"), "--data", str(tiny_shards), "--threads", "1", "--out",
                 str(tmp_path / "ev"), "--json", str(tmp_path / "ev.json"), "--no-plots", "--quiet"]) == 0
    report = json.loads((tmp_path / "ev.json").read_text())
    assert report["models"][0]["model"] == "mobilenetv3_large_100"
    assert 0 <= report["metrics"]["map"] <= 1 and all(c["ap"] is not None for c in report["metrics"]["per_class"])
    assert main(["train", "teacher", str(tiny_shards), "--model", "alexnet_bn", "--name", "small", *common]) == 2
    assert "at least 63 px" in capsys.readouterr().err
