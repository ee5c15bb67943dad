"""One entry point for every model kdkit builds: timm's registry, which kdkit's own variants join.

kdkit's variants (`kdkit.models.assembled`) register themselves with timm's `register_model`, so
`create_model("assemble_resnet50", ...)` and `create_model("resnet50", ...)` go the same way, and
timm's own tools (its train.py, `timm.list_models`) see them too.
"""
from __future__ import annotations

import timm

from kdkit.errors import KdkitError


def _register_variants() -> None:
    try:
        import kdkit.models.assembled  # noqa: F401  (registers the assembled ResNet family)
        import kdkit.models.classic  # noqa: F401  (registers the TF2 / Keras seeds' AlexNet, ZFNet, GoogLeNet)
        import kdkit.models.mlp  # noqa: F401  (registers Hinton et al.'s MNIST MLPs)
    except ModuleNotFoundError as e:
        if e.name != "kdkit.models.assembled":
            raise


def create_model(name: str, num_classes: int, pretrained: bool = False, **kwargs):
    """timm.create_model with kwargs that are None dropped, so a model keeps its own defaults.

    pretrained=False by default: kdkit never downloads weights; load local checkpoints instead
    (kdkit.models.checkpoint).
    """
    _register_variants()
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
        raise KdkitError(f"unknown model {name!r}" + (f"; similar: {', '.join(close)}" if close else "")
                         + "; `kdkit models` lists kdkit's variants, timm.list_models() all")
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **kwargs)
