"""The classic backbones of the TF2 and Keras seeds, registered with timm like kdkit's other variants.

timm has none of them; torchvision has AlexNet and GoogLeNet, so those are torchvision's modules
with timm's classifier API added (get_classifier / reset_classifier, `in_chans`, a pretrained_cfg
that says what input they need). The BN variants of AlexNet and ZFNet are written here: torchvision
has neither.

- `alexnet`: torchvision's AlexNet, the "one weird trick" widths 64-192-384-256-256 without LRN
  (Krizhevsky 2014, arXiv:1404.5997), 61.1M params.
- `alexnet_bn`: AlexNet of the paper (Krizhevsky et al., NIPS 2012; widths 96-256-384-384-256) with
  each Local Response Normalization replaced by BatchNorm at the same place (after the ReLU of
  conv1 and conv2), as the TF2 seed's AlexNet-BN did. That seed's code also gives conv2 a stride
  of 2 (ZFNet's change); here conv2 keeps the paper's stride 1, so the two nets differ as the papers do.
- `zfnet_bn`: ZFNet (Zeiler & Fergus 2013, arXiv:1311.2901: 7x7/2 conv1, 5x5/2 conv2; feature maps
  110-55-26-13-13-13-6 at 224 px) with BatchNorm in place of its contrast normalization, as the TF2
  seed's ZFNet-BN.
- `googlenet_bn`: torchvision's GoogLeNet (Inception v1, Szegedy et al. 2014, arXiv:1409.4842) with
  BatchNorm after every conv - the Keras seed's googlenet_bn - aux classifiers off. Its "5x5"
  branches are 3x3 convs (torchvision keeps that to match its weights), hence 6.62M params against
  the seed's 7.02M (5x5 there: +0.38M; Keras also counts BN moving statistics: +0.015M).
- `inception_v2`: BN-Inception (Ioffe & Szegedy 2015, arXiv:1502.03167) as the Keras seed defines it
  (jkjung-avt/keras_imagenet models/inception_v2.py, after TF-slim's inception_v2): 5x5 branches as
  two 3x3 convs, stride-2 modules 4a / 5a, average-pool projections in every stride-1 module. Like
  the seed and unlike slim, the 7x7 stem conv is a plain conv (slim: depthwise-separable) and module
  5c pools by average (the paper's last module: max). Written here: neither timm nor torchvision has
  it. Same size as the seed's (11,214,888 in Keras = these 11.19M params + BN moving statistics).

All three AlexNet-style nets end in torchvision's adaptive 6x6 average pool and the 4096-4096
classifier, so they take any input from their minimum size up (MIN_SIZE; below it a pooling
window no longer fits and the forward says so in one line).
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import ConvNormAct
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn
from torchvision.models import AlexNet as _TvAlexNet
from torchvision.models import GoogLeNet as _TvGoogLeNet

from kdkit.errors import KdkitError

__all__ = ["AlexNet", "GoogLeNet", "InceptionV2", "CLASSIC_VARIANTS", "MIN_SIZE"]

CLASSIC_VARIANTS: dict[str, str] = {}  # name -> one-line description (the entrypoint's first docstring line)
# smallest square input each one runs at (found by running it: below, a max-pool window no longer fits)
MIN_SIZE = {"alexnet": 63, "alexnet_bn": 63, "zfnet_bn": 21, "googlenet_bn": 15, "inception_v2": 1}


def _check_size(model: nn.Module, x: torch.Tensor) -> None:
    if min(x.shape[-2:]) < model.min_size:
        raise KdkitError(f"{model.arch} needs inputs of at least {model.min_size} px, got "
                         f"{tuple(x.shape[-2:])}: use --image-size {model.min_size} or more")


def _first_conv(conv: nn.Conv2d, in_chans: int) -> nn.Conv2d:
    return nn.Conv2d(in_chans, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                     bias=conv.bias is not None)


def _bn_features(conv1: dict, conv2: dict, pool_padding: int) -> nn.Sequential:
    """AlexNet-family features with BatchNorm where the paper had LRN (after the ReLU, before the pool)."""
    pool = dict(kernel_size=3, stride=2, padding=pool_padding)
    return nn.Sequential(
        nn.Conv2d(3, 96, **conv1), nn.ReLU(inplace=True), nn.BatchNorm2d(96), nn.MaxPool2d(**pool),
        nn.Conv2d(96, 256, **conv2), nn.ReLU(inplace=True), nn.BatchNorm2d(256), nn.MaxPool2d(**pool),
        nn.Conv2d(256, 384, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(384, 384, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(**pool))


_FEATURES = {
    "alexnet_bn": lambda: _bn_features(dict(kernel_size=11, stride=4, padding=2), dict(kernel_size=5, padding=2), 0),
    "zfnet_bn": lambda: _bn_features(dict(kernel_size=7, stride=2, padding=1), dict(kernel_size=5, stride=2), 1),
}


class AlexNet(_TvAlexNet):
    """torchvision's AlexNet (features -> adaptive 6x6 pool -> dropout/4096/4096 classifier) with the
    features of `arch` and timm's classifier API."""

    def __init__(self, arch: str = "alexnet", num_classes: int = 1000, in_chans: int = 3,
                 drop_rate: float = 0.5):
        super().__init__(num_classes=num_classes, dropout=drop_rate)
        if arch in _FEATURES:
            self.features = _FEATURES[arch]()  # PyTorch's default init, as torchvision's AlexNet
        if in_chans != 3:
            self.features[0] = _first_conv(self.features[0], in_chans)
        self.arch, self.min_size = arch, MIN_SIZE[arch]
        self.num_classes, self.num_features = num_classes, self.classifier[-1].in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_size(self, x)
        return super().forward(x)

    def get_classifier(self) -> nn.Module:
        return self.classifier[-1]

    def reset_classifier(self, num_classes: int, global_pool=None) -> None:
        self.num_classes = num_classes
        self.classifier[-1] = nn.Linear(self.num_features, num_classes)


class GoogLeNet(_TvGoogLeNet):
    """torchvision's GoogLeNet (BatchNorm after every conv), aux classifiers off, timm's classifier API."""

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, drop_rate: float = 0.2):
        super().__init__(num_classes=num_classes, aux_logits=False, transform_input=False, init_weights=True,
                         dropout=drop_rate)
        if in_chans != 3:
            self.conv1.conv = _first_conv(self.conv1.conv, in_chans)
        self.arch, self.min_size = "googlenet_bn", MIN_SIZE["googlenet_bn"]
        self.num_classes, self.num_features = num_classes, self.fc.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_size(self, x)
        return super().forward(x)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool=None) -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes)


class InceptionModule(nn.Module):
    """BN-Inception module: 1x1 | 1x1 -> 3x3 | 1x1 -> 3x3 -> 3x3 | 3x3 pool -> 1x1, concatenated.

    With stride 2 (modules 4a, 5a): no 1x1 branch, the 3x3 convs that end a branch take the stride and
    the pool branch is a plain 3x3 max pool passing its input through.
    """

    def __init__(self, in_chs: int, c1: int, c3: tuple[int, int], c33: tuple[int, int], pool_proj: int,
                 stride: int = 1):
        super().__init__()
        self.b1 = ConvNormAct(in_chs, c1, 1) if stride == 1 else None
        self.b3 = nn.Sequential(ConvNormAct(in_chs, c3[0], 1), ConvNormAct(c3[0], c3[1], 3, stride))
        self.b33 = nn.Sequential(ConvNormAct(in_chs, c33[0], 1), ConvNormAct(c33[0], c33[1], 3),
                                 ConvNormAct(c33[1], c33[1], 3, stride))
        if stride == 1:  # Keras' 'same' average pool leaves the padding out of the mean
            self.pool = nn.Sequential(nn.AvgPool2d(3, 1, 1, count_include_pad=False), ConvNormAct(in_chs, pool_proj, 1))
        else:
            self.pool = nn.MaxPool2d(3, stride, 1)
        self.out_chs = (c1 if stride == 1 else 0) + c3[1] + c33[1] + (pool_proj if stride == 1 else in_chs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = [self.b3(x), self.b33(x), self.pool(x)]
        return torch.cat(parts if self.b1 is None else [self.b1(x), *parts], 1)


# (1x1, (3x3 reduce, 3x3), (double 3x3 reduce, double 3x3), pool projection, stride): the Keras seed's table
_INCEPTION_V2 = {
    "3b": (64, (64, 64), (64, 96), 32, 1), "3c": (64, (64, 96), (64, 96), 64, 1),
    "4a": (0, (128, 160), (64, 96), 0, 2), "4b": (224, (64, 96), (96, 128), 128, 1),
    "4c": (192, (96, 128), (96, 128), 128, 1), "4d": (160, (128, 160), (128, 160), 96, 1),
    "4e": (96, (128, 192), (160, 192), 96, 1),
    "5a": (0, (128, 192), (192, 256), 0, 2), "5b": (352, (192, 320), (160, 224), 128, 1),
    "5c": (352, (192, 320), (192, 224), 128, 1),
}


class InceptionV2(nn.Module):
    """BN-Inception / Inception v2 of the Keras seed (see the module docstring), timm's classifier API."""

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, drop_rate: float = 0.4):
        super().__init__()
        self.stem = nn.Sequential(ConvNormAct(in_chans, 64, 7, 2), nn.MaxPool2d(3, 2, 1),
                                  ConvNormAct(64, 64, 1), ConvNormAct(64, 192, 3), nn.MaxPool2d(3, 2, 1))
        modules, chs = {}, 192
        for name, spec in _INCEPTION_V2.items():
            modules[f"mixed_{name}"] = m = InceptionModule(chs, *spec)
            chs = m.out_chs
        self.blocks = nn.Sequential(OrderedDict(modules))
        self.global_pool, self.drop = nn.AdaptiveAvgPool2d(1), nn.Dropout(drop_rate)
        self.arch, self.min_size = "inception_v2", MIN_SIZE["inception_v2"]
        self.num_classes, self.num_features = num_classes, chs
        self.fc = nn.Linear(chs, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.stem(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.global_pool(self.forward_features(x)).flatten(1)))

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool=None) -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes)


def _cfg(name: str, first_conv: str, classifier: str):
    size = MIN_SIZE[name]
    return {"url": "", "num_classes": 1000, "input_size": (3, 224, 224), "min_input_size": (3, size, size),
            "pool_size": None, "crop_pct": 0.875, "interpolation": "bilinear", "mean": IMAGENET_DEFAULT_MEAN,
            "std": IMAGENET_DEFAULT_STD, "first_conv": first_conv, "classifier": classifier}


default_cfgs = generate_default_cfgs({
    f"{n}.untrained": _cfg(n, "features.0", "classifier.6") for n in ("alexnet", "alexnet_bn", "zfnet_bn")
} | {"googlenet_bn.untrained": _cfg("googlenet_bn", "conv1.conv", "fc"),
     "inception_v2.untrained": _cfg("inception_v2", "stem.0.conv", "fc")})


def _variant(fn):
    CLASSIC_VARIANTS[fn.__name__] = fn.__doc__.strip().splitlines()[0]
    return register_model(fn)


def _create(cls, variant: str, pretrained: bool, kwargs: dict, **defaults):
    if pretrained:
        raise KdkitError(f"{variant}: kdkit never downloads weights; load a kdkit checkpoint instead")
    return build_model_with_cfg(cls, variant, False, **dict(defaults, **kwargs))


@_variant
def alexnet(pretrained: bool = False, **kwargs) -> AlexNet:
    """AlexNet as torchvision builds it (64-192-384-256-256, no LRN; 1404.5997), inputs >= 63 px."""
    return _create(AlexNet, "alexnet", pretrained, kwargs, arch="alexnet")


@_variant
def alexnet_bn(pretrained: bool = False, **kwargs) -> AlexNet:
    """AlexNet-BN (TF2 seed): the NIPS 2012 AlexNet with BatchNorm in place of LRN, inputs >= 63 px."""
    return _create(AlexNet, "alexnet_bn", pretrained, kwargs, arch="alexnet_bn")


@_variant
def zfnet_bn(pretrained: bool = False, **kwargs) -> AlexNet:
    """ZFNet-BN (TF2 seed): ZFNet (1311.2901) with BatchNorm in place of its normalization, inputs >= 21 px."""
    return _create(AlexNet, "zfnet_bn", pretrained, kwargs, arch="zfnet_bn")


@_variant
def googlenet_bn(pretrained: bool = False, **kwargs) -> GoogLeNet:
    """GoogLeNet-BN (Keras seed): torchvision's Inception v1 with BatchNorm (1409.4842), no aux heads."""
    return _create(GoogLeNet, "googlenet_bn", pretrained, kwargs)


@_variant
def inception_v2(pretrained: bool = False, **kwargs) -> InceptionV2:
    """Inception v2 / BN-Inception (Keras seed; 1502.03167): 5x5 as two 3x3, BatchNorm everywhere."""
    return _create(InceptionV2, "inception_v2", pretrained, kwargs)
