"""Plain multi-layer perceptrons: the nets of Hinton, Vinyals & Dean (2015, 1503.02531) on MNIST.

Written here because timm has no plain MLP classifier (its `mlp_mixer` is a token-mixing vision
model). The paper's teacher is 2x1200 ReLU units with dropout, its student 2x800 without
regularisation; `kdkit demo` uses the 2x800 net as the student so its numbers read like the
paper's table. Input: any C x H x W image, flattened (the demo feeds 3 x 28 x 28).
"""
from __future__ import annotations

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from kdkit.errors import KdkitError

__all__ = ["MLP", "MLP_VARIANTS"]

MLP_VARIANTS = ("mlp_800", "mlp_1200")


class MLP(torch.nn.Module):
    """Flatten -> [Linear -> ReLU -> Dropout] x len(hidden) -> Linear (named `fc`, timm's classifier
    convention, so heads can be swapped and AM-softmax applied like any timm model)."""

    def __init__(self, hidden=(800, 800), num_classes: int = 1000, in_chans: int = 3,
                 img_size: int = 28, drop_rate: float = 0.0, **kwargs):
        super().__init__()
        if kwargs:
            raise KdkitError(f"MLP: unknown options {sorted(kwargs)}")
        self.num_classes = num_classes
        self.num_features = hidden[-1]
        self.in_features = in_chans * img_size * img_size
        self.img_size = img_size
        layers, width = [torch.nn.Flatten()], self.in_features
        for h in hidden:
            layers += [torch.nn.Linear(width, h), torch.nn.ReLU(inplace=True), torch.nn.Dropout(drop_rate)]
            width = h
        self.body = torch.nn.Sequential(*layers)
        self.fc = torch.nn.Linear(width, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if x[0].numel() != self.in_features:
            raise KdkitError(f"this MLP takes {self.img_size}x{self.img_size} images ({self.in_features} values), "
                             f"got {tuple(x.shape[1:])}: use --image-size {self.img_size}, or build it for your "
                             f"size with --model-kwargs img_size={x.shape[-1]}")
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))

    def get_classifier(self) -> torch.nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool=None) -> None:
        self.num_classes = num_classes
        self.fc = torch.nn.Linear(self.num_features, num_classes)


def _cfg(**kwargs):
    return {"url": "", "num_classes": 10, "input_size": (3, 28, 28), "pool_size": None, "crop_pct": 1.0,
            "interpolation": "bilinear", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
            "first_conv": "body.1", "classifier": "fc", **kwargs}


default_cfgs = generate_default_cfgs({"mlp_800.untrained": _cfg(), "mlp_1200.untrained": _cfg()})


def _make(name: str, hidden, pretrained: bool, kwargs: dict) -> MLP:
    if pretrained:
        raise KdkitError(f"{name}: there are no pretrained weights; load a kdkit checkpoint instead")
    size, chans = kwargs.get("img_size", 28), kwargs.get("in_chans", 3)
    overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {}, input_size=(chans, size, size))
    return build_model_with_cfg(MLP, name, False, hidden=hidden, pretrained_cfg_overlay=overlay, **kwargs)


@register_model
def mlp_800(pretrained: bool = False, **kwargs) -> MLP:
    """MLP 2x800 ReLU: Hinton et al.'s MNIST student (146 test errors alone, 74 distilled in the paper).

    Inputs of img_size=28 by default (pass img_size=N for other sizes)."""
    return _make("mlp_800", (800, 800), pretrained, kwargs)


@register_model
def mlp_1200(pretrained: bool = False, **kwargs) -> MLP:
    """MLP 2x1200 ReLU with dropout 0.5: Hinton et al.'s MNIST teacher (67 test errors in the paper)."""
    kwargs.setdefault("drop_rate", 0.5)
    return _make("mlp_1200", (1200, 1200), pretrained, kwargs)


def mlp_variants() -> dict[str, str]:
    """name -> one-line description, for `kdkit models` (kept apart from the ResNet variants, which
    are all built and tested at one resolution)."""
    return {fn.__name__: fn.__doc__.strip().splitlines()[0] for fn in (mlp_800, mlp_1200)}
