"""Models as the trainer needs them: built by name (kdkit.models.factory), optionally with an
AM-softmax head, fine-tuned from a checkpoint with a new head, or partly frozen (the online teacher
is the KD mode's: kdkit.train.kd).

No architecture code lives here: zero-gamma, EvoNorm, the assembled ResNets are the registry's
(`create_model(name, num_classes, **model_kwargs)`); heads are kdkit.models.heads'; every
checkpoint is read by kdkit.models.checkpoint.load_model.
"""
from __future__ import annotations

import torch

from kdkit.errors import KdkitError
from kdkit.models.checkpoint import load_model, load_weights
from kdkit.models.factory import create_model
from kdkit.models.heads import am_softmax, classifier_name
from kdkit.train.config import TrainConfig


def build_model(cfg: TrainConfig, num_classes: int) -> torch.nn.Module:
    try:
        model = create_model(cfg.model, num_classes, **model_kwargs(cfg))
    except TypeError as e:
        if cfg.drop_rate is None or "drop_rate" not in str(e):
            raise
        raise KdkitError(f"drop_rate={cfg.drop_rate}: model {cfg.model} takes no drop_rate; leave --drop-rate out "
                         "or pick a timm / kdkit model that has one") from None
    return am_softmax(model, cfg.am_scale) if cfg.am_softmax else model


def model_kwargs(cfg: TrainConfig) -> dict:
    """create_model's kwargs: --model-kwargs, with --drop-rate as drop_rate (timm's dropout before the
    classifier; kdkit's MLPs drop after each hidden layer, the last of which feeds the classifier)."""
    kwargs = dict(cfg.model_kwargs)
    if cfg.drop_rate is not None:
        if kwargs.get("drop_rate", cfg.drop_rate) != cfg.drop_rate:
            raise KdkitError(f"drop_rate={cfg.drop_rate} and model_kwargs drop_rate={kwargs['drop_rate']} disagree: "
                             "give one of them")
        kwargs["drop_rate"] = cfg.drop_rate
    return kwargs


def head_info(cfg: TrainConfig) -> dict | None:
    """The checkpoint's record of a non-standard head (kdkit.models.heads.apply_head rebuilds it)."""
    return {"type": "am_softmax", "scale": cfg.am_scale, "margin": cfg.am_margin} if cfg.am_softmax else None


def load_finetune(model: torch.nn.Module, path: str, cfg: TrainConfig) -> list[str]:
    """Load a checkpoint's backbone into `model` and keep the model's freshly initialised classifier.

    The checkpoint is any kdkit checkpoint of cfg.model (any head, any class count) or a bare state
    dict of it; every non-classifier weight must fit (else: another architecture, named by
    load_weights). Returns the names of the re-initialised classifier tensors.
    """
    source, _ = load_model(path, model_name=cfg.model, model_kwargs=model_kwargs(cfg),
                           prefer_ema=cfg.checkpoint_ema, trust=cfg.trust_checkpoint)
    prefix = classifier_name(model) + "."
    head_keys = [k for k in model.state_dict() if k.startswith(prefix)]
    backbone = {k: v for k, v in source.state_dict().items() if not k.startswith(prefix)}
    load_weights(_Without(model, prefix), backbone, path)
    return head_keys


class _Without:
    """`model` seen without the keys under `prefix`, so load_weights checks the backbone strictly."""

    def __init__(self, model: torch.nn.Module, prefix: str):
        self.model, self.prefix = model, prefix

    def state_dict(self):
        return {n: v for n, v in self.model.state_dict().items() if not n.startswith(self.prefix)}

    def load_state_dict(self, state, strict=True):
        return self.model.load_state_dict(state, strict=False)  # the head keys are absent on purpose


def set_backbone_frozen(model: torch.nn.Module, frozen: bool) -> None:
    """Frozen: only the classifier trains, and the backbone's running statistics (BatchNorm, EvoNorm-B:
    every module holding buffers of its own) stay as loaded, those modules in eval mode; so a frozen
    epoch leaves the backbone exactly as it was. Dropout and drop-path keep training behaviour.

    Not timm.utils.freeze/unfreeze: freezing BatchNorm there swaps each BatchNorm2d for a
    FrozenBatchNorm2d (a state dict without num_batches_tracked, so a checkpoint saved during a frozen
    epoch would not load into the thawed model), and it does not know EvoNorm's running statistics.
    """
    prefix = classifier_name(model)
    for name, p in model.named_parameters():
        p.requires_grad_(not frozen or name.startswith(prefix + "."))
    if frozen:
        for name, m in model.named_modules():
            in_head = name == prefix or name.startswith(prefix + ".")
            if not in_head and any(True for _ in m.buffers(recurse=False)):
                m.eval()
