"""kdkit.models.assembled, .layers, .listing and .cli: every variant builds, and every trick is really
there and behaves (zero-gamma blocks start as their shortcut, blur where strides were, EvoNorm
instead of BatchNorm and still trains, DropBlock / drop-path only in train mode, bL FLOPs down).

Small inputs (32-64 px) and the tiny variant keep the file in seconds on a CPU; ResNet-50-size
models are built once (module fixture) and run at 32 px only.
"""
from __future__ import annotations

import argparse
import json

import pytest
import timm
import torch
from timm.layers import BlurPool2d, DropBlock2d, DropPath, EcaModule, EvoNorm2dB0, EvoNorm2dS0, SEModule
from torch import nn

from kdkit.errors import KdkitError
from kdkit.models.assembled import KD_VARIANTS, set_drop_block_rate
from kdkit.models.factory import create_model
from kdkit.models.layers import BigLittleStage, BigLittleStem, residual_parts
from kdkit.models.layers.residual import last_norm
from kdkit.models.listing import ListingConfig, list_variants, measure_gmacs

TINY = "assemble_resnet_tiny"
DEEP = {n for n in KD_VARIANTS if "101" in n or "152" in n}  # built on "meta" below: 45-83M params each


def blocks(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if residual_parts(m) is not None]


def count(model: nn.Module, cls) -> int:
    return sum(isinstance(m, cls) for m in model.modules())


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # these small convs gain nothing from intra-op threads, and on a busy 2-core machine OpenMP's
    # spinning threads make them 10-100x slower; the other test modules get the count back
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def built():
    """Each kdkit variant, 7 classes, default options; built once for the whole file."""
    return {name: create_model(name, num_classes=7) for name in KD_VARIANTS if name not in DEEP}


def test_variants_are_registered_with_timm():
    assert set(KD_VARIANTS) == {"assemble_resnet_tiny", "assemble_resnet18", "assemble_resnet50",
                                "assemble_resnet50_bl", "assemble_resnet101", "assemble_resnet101_bl",
                                "assemble_resnet152", "assemble_resnet152_bl"}
    assert set(KD_VARIANTS) <= set(timm.list_models("assemble_*"))
    assert all(desc for desc in KD_VARIANTS.values())


@pytest.mark.parametrize("name", sorted(set(KD_VARIANTS) - DEEP))
@pytest.mark.slow
def test_every_variant_builds_and_classifies(built, name):
    model = built[name].eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 7) and torch.isfinite(out).all()


def test_tiny_trains_on_mnist_shaped_input():
    model = create_model(TINY, num_classes=10, in_chans=1)
    out = model(torch.randn(2, 1, 28, 28))
    out.sum().backward()
    assert out.shape == (2, 10)


@pytest.mark.parametrize("name,kwargs", [
    (TINY, {}),                                          # SK basic blocks
    (TINY, dict(sk=False, attn="se")),                   # plain basic blocks + SE
    (TINY, dict(big_little=True, deep_stem=True)),       # bL stages (big branch without last ReLU)
    (TINY, dict(norm="evonorm_b0", attn="eca")),         # EvoNorm layout
    ("assemble_resnet50", {}),                           # SK bottlenecks: timm's SK models leave this off
])
def test_zero_gamma_blocks_start_as_their_shortcut(name, kwargs):
    model = create_model(name, num_classes=7, **kwargs).eval()
    for block in blocks(model):
        assert torch.count_nonzero(last_norm(block).weight) == 0
    seen = []
    hooks = [b.register_forward_hook(lambda m, i, o: seen.append((m, i[0].clone(), o.clone()))) for b in blocks(model)]
    with torch.no_grad():
        model(torch.randn(2, 3, 64 if name == TINY else 32, 64 if name == TINY else 32))
    for h in hooks:
        h.remove()
    assert len(seen) == len(blocks(model))
    for block, x, out in seen:  # residual branch adds exactly zero: output = post-add act(shortcut)
        shortcut = block.downsample(x) if block.downsample is not None else x
        expected = getattr(block, residual_parts(block)[1])(shortcut.clone())
        assert torch.equal(out, expected)


def test_zero_gamma_can_be_turned_off():
    model = create_model(TINY, num_classes=7, zero_init_last=False)
    assert all(torch.count_nonzero(last_norm(b).weight) > 0 for b in blocks(model))


def test_resnet_d_stem_and_avg_pool_shortcuts(built):
    model = built["assemble_resnet50"]
    stem_convs = [m for m in model.conv1 if isinstance(m, nn.Conv2d)]
    assert [c.kernel_size for c in stem_convs] == [(3, 3)] * 3 and stem_convs[0].stride == (2, 2)
    downs = [b.downsample for b in blocks(model) if b.downsample is not None]
    assert len(downs) == 4
    strided = [d for d in downs if isinstance(d[0], nn.AvgPool2d)]
    assert len(strided) == 3  # stages 2-4; stage 1 only widens (1x1 conv, no pooling)
    assert all(d[1].kernel_size == (1, 1) and d[1].stride == (1, 1) for d in downs)


def test_big_little_layout(built):
    model = built["assemble_resnet50_bl"]
    assert isinstance(model.maxpool, BigLittleStem)
    assert isinstance(model.conv1, nn.Conv2d) and model.conv1.kernel_size == (7, 7)  # as the reference
    assert all(isinstance(getattr(model, f"layer{i}"), BigLittleStage) for i in (1, 2, 3))
    assert isinstance(model.layer4, nn.Sequential)
    stage = model.layer3  # depth 6: 5 big blocks, 1 little, 1 merge
    assert (len(stage.big), len(stage.little), len(stage.merge)) == (5, 1, 1)
    assert isinstance(stage.big[-1].act, nn.Identity) and isinstance(stage.merge[0].act, nn.ReLU)
    assert any(isinstance(d[0], nn.AvgPool2d) for d in (b.downsample for b in blocks(model)) if d is not None)


def test_big_little_features_match_feature_info():
    model = create_model(TINY, num_classes=7, big_little=True, features_only=True)
    feats = model(torch.randn(2, 3, 64, 64))
    assert model.feature_info.reduction() == [2, 8, 16, 16, 32]
    assert [64 // f.shape[-1] for f in feats] == model.feature_info.reduction()
    assert [f.shape[1] for f in feats] == model.feature_info.channels()


def test_big_little_with_gradient_checkpointing():
    model = create_model(TINY, num_classes=7, big_little=True)
    model.set_grad_checkpointing(True)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert model.layer1.big[0].conv1.paths[0].conv.weight.grad is not None


def test_anti_aliasing_replaces_every_strided_conv():
    model = create_model(TINY, num_classes=7)
    for block in blocks(model):
        if block.downsample is not None and isinstance(block.downsample[0], nn.AvgPool2d):
            assert any(isinstance(m, BlurPool2d) for m in block.modules())
    convs = [m for b in blocks(model) for m in b.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.stride == (1, 1) for c in convs)  # the stride went to the blur pools
    assert isinstance(model.maxpool, nn.MaxPool2d)  # "sconv": the stem pool stays plain
    full = create_model(TINY, num_classes=7, aa="full")
    assert any(isinstance(m, BlurPool2d) for m in full.maxpool.modules())
    off = create_model(TINY, num_classes=7, aa=False)
    assert count(off, BlurPool2d) == 0
    assert any(c.stride == (2, 2) for b in blocks(off) for c in b.modules() if isinstance(c, nn.Conv2d))


@pytest.mark.parametrize("attn,cls", [("se", SEModule), ("eca", EcaModule)])
def test_channel_attention_in_every_block(attn, cls):
    model = create_model(TINY, num_classes=7, attn=attn)
    assert count(model, cls) == len(blocks(model)) > 0
    assert count(create_model(TINY, num_classes=7), cls) == 0


@pytest.mark.parametrize("norm,cls", [("evonorm_b0", EvoNorm2dB0), ("evonorm_s0", EvoNorm2dS0),
                                      ("batchnorm", nn.BatchNorm2d)])
@pytest.mark.slow
def test_norm_option_and_the_model_still_trains(norm, cls):
    torch.manual_seed(0)
    model = create_model(TINY, num_classes=7, norm=norm, big_little=True, deep_stem=True, drop_block_rate=0)
    assert count(model, cls) > 0
    if norm != "batchnorm":
        assert count(model, nn.BatchNorm2d) == 0
        for block in blocks(model):  # branch ends linear, the addition is still rectified
            assert last_norm(block).v is None
            assert isinstance(getattr(block, residual_parts(block)[1]), (nn.ReLU, nn.Identity))
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 7, (8,))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(map(lambda v: v == v, losses)) and losses[-1] < 0.9 * losses[0], losses


@pytest.mark.parametrize("kwargs,cls", [(dict(drop_block_rate=0.5, drop_path_rate=0), DropBlock2d),
                                        (dict(drop_block_rate=0, drop_path_rate=0.9), DropPath)])
def test_drop_block_and_drop_path_only_in_train_mode(kwargs, cls):
    torch.manual_seed(0)
    # zero-gamma off: with it, every residual branch is 0 at init and dropping parts of 0 changes nothing
    model = create_model(TINY, num_classes=7, zero_init_last=False, **kwargs)
    assert count(model, cls) > 0
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        model.train()
        assert not torch.equal(model(x), model(x))
        model.eval()
        assert torch.equal(model(x), model(x))


def test_drop_block_rate_can_be_scheduled():
    model = create_model(TINY, num_classes=7, drop_block_rate=0.5, zero_init_last=False).train()
    set_drop_block_rate(model, 0.0)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


def test_parameter_counts_near_resnet50d(built):
    reference = params(timm.create_model("resnet50d", num_classes=7))
    for name in ("assemble_resnet50", "assemble_resnet50_bl"):
        assert abs(params(built[name]) / reference - 1) < 0.15, name
    assert params(built[TINY]) < 500_000


def test_big_little_matches_the_paper_and_cuts_gmacs():
    # bL-ResNet-50 (alpha 2, beta 4) in Chen et al. 2019: 26.69M params, 2.85 GMACs at 224
    bl = create_model("assemble_resnet50", num_classes=1000, big_little=True, sk=False, aa=False)
    assert abs(params(bl) / 26.69e6 - 1) < 0.05
    bl_gmacs = measure_gmacs(bl, 224)
    assert abs(bl_gmacs / 2.85 - 1) < 0.1
    plain = measure_gmacs(create_model("assemble_resnet50", num_classes=1000, sk=False, aa=False), 224)
    assert plain == pytest.approx(4.33, abs=0.05)  # = timm resnet50d
    assert bl_gmacs < 0.75 * plain


def _stage_blocks(stage: nn.Module) -> int:
    return len(blocks(stage))


@pytest.mark.parametrize("depth", [101, 152])
@pytest.mark.slow
def test_deeper_variants_have_resnet_depths_and_the_same_tricks(depth):
    with torch.device("meta"):  # layout only: no memory, no init arithmetic
        plain = create_model(f"assemble_resnet{depth}", num_classes=1000)
        bl = create_model(f"assemble_resnet{depth}_bl", num_classes=1000)
        ref = timm.create_model(f"resnet{depth}d", num_classes=1000)
    stages = {101: [3, 4, 23, 3], 152: [3, 8, 36, 3]}[depth]  # He et al. 2015, table 1
    assert [_stage_blocks(getattr(plain, f"layer{i}")) for i in range(1, 5)] == stages
    assert all(type(b).__name__ == "SelectiveKernelBottleneck" for b in blocks(plain) + blocks(bl))
    assert min(count(m, BlurPool2d) for m in (plain, bl)) > 0 and count(plain, DropBlock2d) > 0
    assert isinstance(bl.layer3, BigLittleStage) and isinstance(bl.maxpool, BigLittleStem)
    # the same -50 tricks add about as much to resnet{depth}d as they add to resnet50d (timm's input-split SK)
    assert abs(params(plain) / params(ref) - 1) < 0.15


def test_assemble_resnet152_bl_is_the_seeds_evaluation_network():
    # clovaai/assembled-cnn README: --resnet_size=152 --bl_alpha=1 --bl_beta=2 --use_sk_block=True
    # --anti_alias_type=sconv --anti_alias_filter_size=3
    with torch.device("meta"):
        model = create_model("assemble_resnet152_bl", num_classes=1000)
    stage = model.layer3  # 36 blocks: big 35, little 36 // beta - 1 = 17 at full width (alpha = 1), merge 1
    assert (len(stage.big), len(stage.little), len(stage.merge)) == (35, 17, 1)
    assert stage.little[0].conv1.out_channels == stage.big[0].conv1.out_channels
    blurs = [m for m in model.modules() if isinstance(m, BlurPool2d)]
    assert blurs and all(b.filt_size == 3 for b in blurs)
    assert isinstance(model.maxpool, BigLittleStem)


@pytest.mark.slow
def test_deep_big_little_trains_and_costs_less():
    model = create_model("assemble_resnet101_bl", num_classes=5).train()
    out = model(torch.randn(2, 3, 32, 32))
    out.sum().backward()
    assert out.shape == (2, 5) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    with torch.device("meta"):
        gmacs = {n: measure_gmacs(create_model(n, num_classes=1000), 224)
                 for n in ("assemble_resnet101", "assemble_resnet101_bl", "assemble_resnet152", "assemble_resnet152_bl")}
    assert gmacs["assemble_resnet101_bl"] < 0.7 * gmacs["assemble_resnet101"]
    assert gmacs["assemble_resnet152_bl"] < gmacs["assemble_resnet152"]  # alpha=1 keeps the little branch wide


@pytest.mark.parametrize("kwargs", [dict(norm="layernorm"), dict(attn="cbam"), dict(aa="max"),
                                    dict(pretrained=True), dict(big_little=True, output_stride=16)])
def test_bad_options_are_user_errors(kwargs):
    with pytest.raises(KdkitError):
        create_model(TINY, num_classes=7, **kwargs)


@pytest.mark.slow
def test_listing_rows_and_resnet50_gmacs():
    rows = {r.name: r for r in list_variants(ListingConfig(pattern="*resnet50"))}
    assert set(rows) == {"assemble_resnet50", "resnet50", "seresnet50"}
    assert all(r.params > 0 and r.gmacs > 0 and r.description for r in rows.values())
    assert rows["resnet50"].gmacs == pytest.approx(4.1, abs=0.05)  # the well-known "4.1 GFLOPs"
    assert rows["resnet50"].params == pytest.approx(25.56e6, rel=0.01)
    assert rows["assemble_resnet50"].source == "kdkit" and rows["resnet50"].source == "timm"
    with pytest.raises(KdkitError):
        list_variants(ListingConfig(resolution=16))


def test_listing_names_the_minimum_size_instead_of_failing(capsys):
    rows = {r.name: r for r in list_variants(ListingConfig(pattern="alexnet*", resolution=32))}
    assert set(rows) == {"alexnet", "alexnet_bn"}
    assert all(r.gmacs is None and r.min_size == 63 and r.params > 60e6 for r in rows.values())
    assert _models_cli(["--filter", "googlenet_bn", "--resolution", "32"]) == 0  # runs from 15 px
    out = capsys.readouterr().out
    assert "googlenet_bn" in out and "(>= " not in out
    assert _models_cli(["--filter", "alexnet_bn", "--resolution", "32"]) == 0
    assert "- (>= 63 px)" in capsys.readouterr().out


def _models_cli(argv: list[str]) -> int:
    from kdkit.models.cli import add_parser

    parser = argparse.ArgumentParser(prog="kdkit")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["models", *argv])
    return args.func(args)


def test_models_cli_prints_a_table(capsys):
    assert _models_cli(["--filter", "assemble_resnet_t*", "--no-baselines", "--resolution", "64"]) == 0
    out = capsys.readouterr().out
    assert "GMACs@64" in out and "assemble_resnet_tiny" in out and "resnet50d" not in out
    assert "FlopCounterMode FLOPs / 2" in out


def test_models_cli_json_and_no_match(capsys):
    assert _models_cli(["--filter", TINY, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["resolution"] == 224 and [m["name"] for m in doc["models"]] == [TINY]
    assert doc["models"][0]["gmacs"] > 0 and "GMACs" in doc["unit"]
    assert _models_cli(["--filter", "no_such_model"]) == 1


def test_listing_counts_an_architecture_once(tmp_path, monkeypatch):
    """`kdkit models` built every model and ran a counting forward on every call; the counts of an
    architecture are remembered (per timm / torch version and kdkit's model code), so a second listing
    builds nothing and gives the same rows."""
    from kdkit.models import listing

    monkeypatch.setenv("KDKIT_CACHE", str(tmp_path))
    cfg = ListingConfig(pattern="mlp_*", resolution=32)
    first = list_variants(cfg)
    assert len(first) == 2 and len(list((tmp_path / "models").glob("*.json"))) == 2

    def no_build(*a, **k):
        raise AssertionError("counted again")

    monkeypatch.setattr(listing, "_row", no_build)
    assert list_variants(cfg) == first
    (next((tmp_path / "models").glob("*.json"))).write_text("{broken")  # a damaged entry: counted again
    monkeypatch.undo()
    monkeypatch.setenv("KDKIT_CACHE", str(tmp_path))
    assert list_variants(cfg) == first


@pytest.mark.slow
def test_the_command_line_needs_no_torch_to_parse():
    """Every command's parser is built for `kdkit --help` and before any command runs: torch (seconds to
    import) loads only when a command needs it."""
    import subprocess
    import sys

    code = "import sys; from kdkit.cli import build_parser; build_parser(); print(sorted({'torch', 'timm'} & set(sys.modules)))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr
