"""The assembled ResNet family: timm's ResNet with the tricks of Assemble-ResNet as named variants.

Architecture tricks, each a constructor option of `AssembledResNet` (and so a `create_model` kwarg):

- ResNet-D (always on): deep 3x3 stem and average-pool projection shortcuts.
  He et al., "Bag of Tricks for Image Classification with CNNs", 2019, arXiv:1812.01187.
- `sk`: Selective Kernel blocks (timm's SelectiveKernel). Li et al., "Selective Kernel Networks",
  2019, arXiv:1903.06586. Default: timm's input-split SK, which keeps ResNet-50's size (~26M
  params). `sk_kwargs=ASSEMBLE_SK_KWARGS` gives the reference code's SK instead (two full 3x3
  paths, reduction 2, at least 32 attention channels; about +12M params on ResNet-50).
- `aa`: anti-aliased downsampling with a 3x3 binomial BlurPool2d. Zhang, "Making Convolutional
  Networks Shift-Invariant Again", 2019, arXiv:1904.11486. `True`/"sconv" blurs only the strided
  3x3 convs of residual branches (the Assemble paper's choice, cheaper); "full" also blurs the stem
  max-pool as timm's resnetblur models do.
- `drop_block_rate`: DropBlock in stages 3-4 (timm's placement). Ghiasi et al., "DropBlock",
  2018, arXiv:1810.12890. The paper ramps the rate 0 -> 0.1 over training: a trainer calls
  `set_drop_block_rate` each epoch; the modules exist only if the rate given at build is > 0.
- `drop_path_rate`: stochastic depth, rate rising linearly over the blocks. Huang et al., 2016,
  arXiv:1603.09382.
- `attn`: "se" (Hu et al., arXiv:1709.01507) or "eca" (Wang et al., arXiv:1910.03151) per block.
- `big_little`: Big-Little Net stem and stages 1-3 (kdkit.models.layers.big_little; timm has none).
  Chen et al., ICLR 2019, arXiv:1807.03848. Cuts GMACs by ~30%; with it the stem is a 7x7 conv
  unless `deep_stem=True`, as in the reference code.
- `zero_init_last` (zero-gamma, default on): the last norm of every residual branch starts at
  weight 0, so each block starts as its shortcut. Goyal et al., arXiv:1706.02677; bag of tricks.
  timm's own SK blocks support it but timm's skresnet* entrypoints turn it off; here it is on.
- `norm`: "batchnorm", or EvoNorm-B0 / -S0 (Liu et al., "Evolving Normalization-Activation
  Layers", 2020, arXiv:2004.02967) in place of every BatchNorm+ReLU pair.

Training-side parts of the papers (AutoAugment, mixup, label smoothing, knowledge distillation,
cosine schedule, warm-up) live in the trainer, not here. Single-trick ablation steps already in timm
are not duplicated: resnet50d (ResNet-D), skresnet50d (+SK), resnetblur50d (+blur pool),
ecaresnet50d (+ECA); `kdkit models` lists them next to these variants.
"""
from __future__ import annotations

from torch import nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import BlurPool2d, DropBlock2d, DropPath, EvoNorm2dB0, EvoNorm2dS0
from timm.layers.selective_kernel import SelectiveKernelAttn
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock, Bottleneck, ResNet, drop_blocks
from timm.models.sknet import SelectiveKernelBasic, SelectiveKernelBottleneck

from kdkit.errors import KdkitError
from kdkit.models.layers.big_little import BigLittleStage, BigLittleStem
from kdkit.models.layers.residual import residual_parts

__all__ = ["AssembledResNet", "ASSEMBLE_SK_KWARGS", "KD_VARIANTS", "set_drop_block_rate", "set_drop_path_rate"]

NORMS = ("batchnorm", "evonorm_b0", "evonorm_s0")
ATTNS = (None, "se", "eca")
AA_MODES = (False, True, "sconv", "full")
# the SK of clovaai/assembled-cnn: one 3x3 conv to 2x width split in two paths, d = max(C/2, 32)
ASSEMBLE_SK_KWARGS = dict(kernel_size=[3, 3], split_input=False, rd_ratio=1 / 2, rd_divisor=32)
_SK_BOTTLENECK = dict(split_input=True)  # timm's skresnet50d
_SK_BASIC = dict(rd_ratio=1 / 8, rd_divisor=16, split_input=True)  # timm's skresnet18
_BLOCKS = {(True, True): SelectiveKernelBottleneck, (True, False): Bottleneck,
           (False, True): SelectiveKernelBasic, (False, False): BasicBlock}

KD_VARIANTS: dict[str, str] = {}  # name -> one-line description (the entrypoint's first docstring line)


def _s0_groups(channels: int, max_groups: int = 32) -> int:
    # the paper's 32 groups, but never single-channel groups: those divide by the std of one value
    # on 1x1 maps (late stages of small inputs) and blow activations up
    for groups in range(min(max_groups, channels // 2), 0, -1):
        if channels % groups == 0:
            return groups
    return 1


def evonorm_layer(kind: str):
    """A norm-layer factory timm's ResNet, ConvNormAct and SelectiveKernel all accept.

    EvoNorm-B0/S0 are norm *and* activation; `apply_act=False` gives the affine-only form for the
    ends of residual branches and shortcuts. timm's ConvNormAct passes DropBlock in as `drop_layer`,
    which EvoNorm would silently ignore, so it is applied after the norm here.
    """
    def norm_layer(num_features: int, apply_act: bool = True, drop_layer=None, **kwargs):
        kwargs = {k: v for k, v in kwargs.items() if k in ("device", "dtype")}
        if kind == "evonorm_b0":
            layer = EvoNorm2dB0(num_features, apply_act=apply_act, **kwargs)
        else:
            layer = EvoNorm2dS0(num_features, groups=_s0_groups(num_features), apply_act=apply_act, **kwargs)
        return nn.Sequential(layer, drop_layer()) if drop_layer is not None else layer
    return norm_layer


def _evonorm_layout(model: nn.Module, norm_layer) -> None:
    """Residual branches and shortcuts end linear; the ReLU after each addition stays.

    The model was built with activations = Identity (EvoNorm brings its own non-linearity); this is
    the layout of timm's EvoNorm ByobNets. SK attention works on pooled 1x1 vectors where EvoNorm's
    statistics degenerate, so its BatchNorm goes and it keeps FC-ReLU-FC, like an SE module.
    """
    for m in list(model.modules()):
        if isinstance(m, SelectiveKernelAttn):
            m.bn = nn.Identity()
        parts = residual_parts(m)
        if parts is None:
            continue
        last, post_act = parts
        if last is not None:
            setattr(m, last, norm_layer(getattr(m, last).weight.numel(), apply_act=False))
        if m.downsample is not None:
            m.downsample[-1] = norm_layer(m.downsample[-1].weight.numel(), apply_act=False)
        setattr(m, post_act, nn.Identity() if getattr(m, "linear_out", False) else nn.ReLU(inplace=True))


def set_drop_path_rate(model: nn.Module, rate: float) -> None:
    """Stochastic depth over the residual blocks in build order, 0 for the first, `rate` for the last."""
    blocks = [m for m in model.modules() if residual_parts(m) is not None]
    for i, block in enumerate(blocks):
        r = rate * i / max(1, len(blocks) - 1)
        block.drop_path = DropPath(r) if r > 0 else None


def set_drop_block_rate(model: nn.Module, rate: float) -> None:
    """Change the DropBlock rate in place (for a schedule); only models built with a rate > 0 have any."""
    for m in model.modules():
        if isinstance(m, DropBlock2d):
            m.drop_prob = rate


class AssembledResNet(ResNet):
    """timm's ResNet-D with the assembled tricks as options (see the module docstring).

    Stays a timm ResNet: same stage names, feature_info, classifier API and state-dict layout for
    the parts it shares, so timm's tooling (features_only, reset_classifier, ...) works unchanged.
    """

    def __init__(self, layers=(3, 4, 6, 3), bottleneck: bool = True, channels=(64, 128, 256, 512),
                 stem_width: int = 32, sk: bool = True, sk_kwargs: dict | None = None, aa: bool | str = True,
                 attn: str | None = None, norm: str = "batchnorm", big_little: bool = False,
                 bl_alpha: int = 2, bl_beta: int = 4, deep_stem: bool | None = None,
                 drop_block_rate: float = 0.0, drop_path_rate: float = 0.0, zero_init_last: bool = True,
                 **kwargs):
        if isinstance(attn, str) and attn.lower() == "none":  # as `model_kwargs attn=none` arrives
            attn = None
        if norm not in NORMS:
            raise KdkitError(f"norm={norm!r}: expected one of {', '.join(NORMS)}")
        if attn not in ATTNS:
            raise KdkitError(f"attn={attn!r}: expected one of {ATTNS}")
        if aa not in AA_MODES:
            raise KdkitError(f"aa={aa!r}: expected one of {AA_MODES}")
        if big_little and kwargs.get("output_stride", 32) != 32:
            raise KdkitError("big_little=True supports output_stride=32 only")
        block = _BLOCKS[bool(bottleneck), bool(sk)]
        block_args = {"attn_layer": attn}
        if sk:
            block_args["sk_kwargs"] = dict(sk_kwargs if sk_kwargs is not None else
                                           _SK_BOTTLENECK if bottleneck else _SK_BASIC)
        if norm == "batchnorm":
            norm_layer, act_layer = nn.BatchNorm2d, nn.ReLU
        else:
            norm_layer, act_layer = evonorm_layer(norm), nn.Identity
        aa_layer = BlurPool2d if aa else None
        if deep_stem is None:  # the reference drops the deep stem under bL (it found it hurt there)
            deep_stem = not big_little
        super().__init__(
            block=block, layers=layers, channels=channels, stem_width=stem_width,
            stem_type="deep" if deep_stem else "",
            avg_down=True, norm_layer=norm_layer, act_layer=act_layer, aa_layer=aa_layer,
            drop_block_rate=drop_block_rate, zero_init_last=False, block_args=block_args, **kwargs)
        if aa_layer is not None and aa != "full":
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        if big_little:
            stage_kwargs = dict(block_args, norm_layer=norm_layer, act_layer=act_layer, aa_layer=aa_layer,
                                cardinality=kwargs.get("cardinality", 1), base_width=kwargs.get("base_width", 64))
            inplanes = self.feature_info[0]["num_chs"]
            self.maxpool = BigLittleStem(inplanes, bl_alpha, norm_layer=norm_layer, act_layer=act_layer)
            reduction = 4
            for i, (stride, drop_block) in enumerate(zip((2, 2, 1), drop_blocks(drop_block_rate))):
                stage = BigLittleStage(block, inplanes, channels[i], layers[i], stride, alpha=bl_alpha, beta=bl_beta,
                                       block_kwargs=dict(stage_kwargs, drop_block=drop_block))
                setattr(self, f"layer{i + 1}", stage)
                inplanes = channels[i] * block.expansion
                reduction *= stride
                self.feature_info[i + 1]["reduction"] = reduction
        if norm != "batchnorm":
            _evonorm_layout(self, norm_layer)
        set_drop_path_rate(self, drop_path_rate)
        # again, after the surgery above: new convs need Kaiming init and new last norms zero-gamma
        self.init_weights(zero_init_last=zero_init_last)


def _cfg(**kwargs):
    return {"url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7),
            "crop_pct": 0.875, "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN,
            "std": IMAGENET_DEFAULT_STD, "first_conv": "conv1.0", "classifier": "fc", **kwargs}


# no weights anywhere: kdkit trains these itself ('untrained' as timm tags its weightless configs)
default_cfgs = generate_default_cfgs({
    "assemble_resnet_tiny.untrained": _cfg(input_size=(3, 32, 32), pool_size=(1, 1)),
    "assemble_resnet18.untrained": _cfg(),
    "assemble_resnet50.untrained": _cfg(),
    "assemble_resnet50_bl.untrained": _cfg(first_conv="conv1"),
    "assemble_resnet101.untrained": _cfg(),
    "assemble_resnet101_bl.untrained": _cfg(first_conv="conv1"),
    "assemble_resnet152.untrained": _cfg(),
    "assemble_resnet152_bl.untrained": _cfg(first_conv="conv1"),
})


def _variant(fn):
    KD_VARIANTS[fn.__name__] = fn.__doc__.strip().splitlines()[0]
    return register_model(fn)


def _create(variant: str, pretrained: bool, defaults: dict, kwargs: dict) -> AssembledResNet:
    if pretrained:
        raise KdkitError(f"{variant}: there are no pretrained weights; load a kdkit checkpoint instead")
    return build_model_with_cfg(AssembledResNet, variant, False, **dict(defaults, **kwargs))


@_variant
def assemble_resnet_tiny(pretrained: bool = False, **kwargs) -> AssembledResNet:
    """Tiny Assemble-ResNet (widths 16-128, 1 SK basic block a stage) for CPU tests and MNIST demos.

    ResNet-D (1812.01187) + SK (1903.06586) + blur-pool anti-aliasing (1904.11486) + DropBlock 0.1
    (1810.12890) + zero-gamma. About 0.3M params with a 10-class head; inputs of 28 px and up
    (`in_chans=1` for MNIST).
    """
    defaults = dict(layers=(1, 1, 1, 1), bottleneck=False, channels=(16, 32, 64, 128), stem_width=8,
                    drop_block_rate=0.1)
    return _create("assemble_resnet_tiny", pretrained, defaults, kwargs)


@_variant
def assemble_resnet18(pretrained: bool = False, **kwargs) -> AssembledResNet:
    """Assemble-ResNet-18: ResNet-D + SK basic blocks + anti-aliasing + DropBlock + zero-gamma.

    ResNet-D (1812.01187), SK (1903.06586, timm's input-split form), BlurPool in strided convs
    (1904.11486), DropBlock 0.1 in stages 3-4 (1810.12890), zero-gamma (1706.02677).
    """
    defaults = dict(layers=(2, 2, 2, 2), bottleneck=False, drop_block_rate=0.1)
    return _create("assemble_resnet18", pretrained, defaults, kwargs)


@_variant
def assemble_resnet50(pretrained: bool = False, **kwargs) -> AssembledResNet:
    """Assemble-ResNet-50 without bL: ResNet-D + SK + anti-aliasing + DropBlock + zero-gamma.

    Lee et al. 2020 (2001.06268) minus Big-Little: ResNet-D (1812.01187), SK bottlenecks
    (1903.06586), BlurPool in strided convs (1904.11486), DropBlock 0.1 in stages 3-4 (1810.12890),
    zero-gamma (1706.02677). Options: attn="se"/"eca", norm="evonorm_b0"/"evonorm_s0", ...
    """
    defaults = dict(layers=(3, 4, 6, 3), bottleneck=True, drop_block_rate=0.1)
    return _create("assemble_resnet50", pretrained, defaults, kwargs)


@_variant
def assemble_resnet50_bl(pretrained: bool = False, **kwargs) -> AssembledResNet:
    """Assemble-ResNet-50 as in the paper: Big-Little + SK + anti-aliasing + DropBlock + avg-pool shortcuts.

    Lee et al. 2020 (2001.06268), the network of its train_assemble_from_scratch.sh: 7x7 conv + bL
    stem and bL stages 1-3 with alpha=2, beta=4 (1807.03848) - the reference drops ResNet-D's deep
    stem under bL (`deep_stem=True` puts it back) but keeps average-pool shortcuts (1812.01187) -,
    SK bottlenecks (1903.06586), BlurPool in strided convs (1904.11486), DropBlock 0.1
    (1810.12890), zero-gamma (1706.02677). Fewer GMACs than ResNet-50-D despite SK and blur.
    """
    defaults = dict(layers=(3, 4, 6, 3), bottleneck=True, big_little=True, drop_block_rate=0.1)
    return _create("assemble_resnet50_bl", pretrained, defaults, kwargs)


# Deeper: ResNet-101 / -152 depths (He et al. 2015, 1512.03385), the same blocks and tricks as -50.
_DEPTHS = {101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}


@_variant
def assemble_resnet101(pretrained: bool = False, **kwargs) -> AssembledResNet:
    """Assemble-ResNet-101 without bL: assemble_resnet50's blocks and tricks at ResNet-101 depth (3-4-23-3).

    ResNet-D (1812.01187), SK bottlenecks (1903.06586), BlurPool in strided convs (1904.11486),
    DropBlock 0.1 in stages 3-4 (1810.12890), zero-gamma (1706.02677).
    """
    defaults = dict(layers=_DEPTHS[101], bottleneck=True, drop_block_rate=0.1)
    return _create("assemble_resnet101", pretrained, defaults, kwargs)


@_variant
def assemble_resnet101_bl(pretrained: bool = False, **kwargs) -> AssembledResNet:
    """Assemble-ResNet-101 with Big-Little (alpha=2, beta=4 as assemble_resnet50_bl) + SK + anti-aliasing.

    assemble_resnet50_bl at ResNet-101 depth. The Assemble paper publishes no ResNet-101; alpha=2,
    beta=4 are bL-ResNet-101's in Chen et al. (1807.03848). `bl_alpha` / `bl_beta` change them.
    """
    defaults = dict(layers=_DEPTHS[101], bottleneck=True, big_little=True, drop_block_rate=0.1)
    return _create("assemble_resnet101_bl", pretrained, defaults, kwargs)


@_variant
def assemble_resnet152(pretrained: bool = False, **kwargs) -> AssembledResNet:
    """Assemble-ResNet-152 without bL: assemble_resnet101 at ResNet-152 depth (3-8-36-3)."""
    return _create("assemble_resnet152", pretrained, dict(layers=_DEPTHS[152], bottleneck=True,
                                                          drop_block_rate=0.1), kwargs)


@_variant
def assemble_resnet152_bl(pretrained: bool = False, **kwargs) -> AssembledResNet:
    """Assemble-ResNet-152 of the seed's evaluation example (84.19 % top-1): bL alpha=1, beta=2 + SK + AA.

    The network of clovaai/assembled-cnn's README and eval_assemble152_mCE_on_imagenet.sh:
    `--resnet_size=152 --bl_alpha=1 --bl_beta=2 --use_sk_block=True --anti_alias_type=sconv
    --anti_alias_filter_size=3`, i.e. Big-Little (1807.03848) with a full-width little branch,
    SK bottlenecks (1903.06586), 3x3 BlurPool in strided convs (1904.11486), average-pool
    shortcuts (1812.01187); plus DropBlock 0.1 (1810.12890) and zero-gamma as the -50.
    """
    defaults = dict(layers=_DEPTHS[152], bottleneck=True, big_little=True, bl_alpha=1, bl_beta=2,
                    drop_block_rate=0.1)
    return _create("assemble_resnet152_bl", pretrained, defaults, kwargs)
