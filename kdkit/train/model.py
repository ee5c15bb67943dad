"""Models as the trainer needs them: built by name (kdkit.models.factory), optionally with an
AM-softmax head, fine-tuned from a checkpoint with a new head, partly frozen, or loaded as a teacher.

No architecture code lives here: zero-gamma, EvoNorm, the assembled ResNets are the registry's
(`create_model(name, num_classes, **model_kwargs)`); the trainer only swaps the classifier.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kdkit.errors import KdkitError
from kdkit.models.checkpoint import extract_state_dict, is_kdkit_checkpoint, load_weights, read_checkpoint
from kdkit.models.factory import create_model
from kdkit.train.config import TrainConfig


class AMSoftmaxHead(torch.nn.Module):
    """Scaled cosine logits s * cos(w_c, x) (the OpenVINO seed's AM-softmax head); the margin m is
    applied in the loss, to the target class only (losses.am_softmax_margin). No bias: a bias would
    break the cosine geometry the margin relies on."""

    def __init__(self, in_features: int, num_classes: int, scale: float = 30.0):
        super().__init__()
        self.in_features, self.num_classes, self.scale = in_features, num_classes, scale
        self.weight = torch.nn.Parameter(torch.empty(num_classes, in_features))
        torch.nn.init.normal_(self.weight, std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * F.linear(F.normalize(x.float(), dim=-1), F.normalize(self.weight.float(), dim=-1))


def classifier_name(model: torch.nn.Module) -> str:
    """Dotted name of the model's classifier module (timm's get_classifier), e.g. "fc" or "head.fc"."""
    head = model.get_classifier()
    for name, module in model.named_modules():
        if module is head and name:
            return name
    raise KdkitError(f"{type(model).__name__}: cannot locate its classifier module")


def _replace_module(model: torch.nn.Module, name: str, new: torch.nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def build_model(cfg: TrainConfig, num_classes: int) -> torch.nn.Module:
    model = create_model(cfg.model, num_classes, **dict(cfg.model_kwargs))
    if cfg.am_softmax:
        name = classifier_name(model)
        head = model.get_submodule(name)
        if not isinstance(head, torch.nn.Linear):
            raise KdkitError(f"--am-softmax: {cfg.model}'s classifier {name} is a {type(head).__name__}, "
                             "not a Linear layer")
        _replace_module(model, name, AMSoftmaxHead(head.in_features, num_classes, cfg.am_scale))
    return model


def head_info(cfg: TrainConfig) -> dict | None:
    """The checkpoint's record of a non-standard head (consumers must rebuild it to load the weights)."""
    return {"type": "am_softmax", "scale": cfg.am_scale, "margin": cfg.am_margin} if cfg.am_softmax else None


def check_architecture(ckpt: dict, model_name: str, source: str) -> None:
    if is_kdkit_checkpoint(ckpt) and ckpt.get("model") and ckpt["model"] != model_name:
        raise KdkitError(f"{source}: a checkpoint of {ckpt['model']!r}, but this run builds {model_name!r}; "
                         "pass --model " + ckpt["model"] + " or another checkpoint")


def load_finetune(model: torch.nn.Module, path: str, cfg: TrainConfig) -> list[str]:
    """Load a checkpoint's backbone into `model` and keep the model's freshly initialised classifier.

    Every non-classifier weight must fit (else: another architecture, named by load_weights);
    returns the names of the re-initialised classifier tensors.
    """
    ckpt = read_checkpoint(path)
    check_architecture(ckpt, cfg.model, path)
    state = extract_state_dict(ckpt)
    prefix = classifier_name(model) + "."
    own = model.state_dict()
    head_keys = [k for k in own if k.startswith(prefix)]
    backbone = {k: v for k, v in state.items() if not k.startswith(prefix)}
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
    epoch leaves the backbone exactly as it was. Dropout and drop-path keep training behaviour."""
    prefix = classifier_name(model)
    for name, p in model.named_parameters():
        p.requires_grad_(not frozen or name.startswith(prefix + "."))
    if frozen:
        for name, m in model.named_modules():
            in_head = name == prefix or name.startswith(prefix + ".")
            if not in_head and any(True for _ in m.buffers(recurse=False)):
                m.eval()


def build_teacher(cfg: TrainConfig, num_classes: int, device: torch.device) -> torch.nn.Module:
    """The online teacher: model and weights from its kdkit checkpoint (name overridable), eval mode."""
    if not cfg.teacher_checkpoint:
        raise KdkitError("--kd online needs --teacher-checkpoint (kdkit never downloads weights)")
    ckpt = read_checkpoint(cfg.teacher_checkpoint)
    name = cfg.teacher_model or (ckpt.get("model") if is_kdkit_checkpoint(ckpt) else None)
    if not name:
        raise KdkitError(f"{cfg.teacher_checkpoint}: not a kdkit checkpoint; name its model with --teacher-model")
    check_teacher_classes(ckpt, num_classes, cfg.teacher_checkpoint)
    kwargs = ckpt.get("model_kwargs", {}) if is_kdkit_checkpoint(ckpt) else {}
    teacher = create_model(name, num_classes, **kwargs)
    load_weights(teacher, extract_state_dict(ckpt), cfg.teacher_checkpoint)
    fmt = torch.channels_last if cfg.channels_last else torch.preserve_format
    return teacher.to(device, memory_format=fmt).eval().requires_grad_(False)


def check_teacher_classes(ckpt: dict, num_classes: int, source: str) -> None:
    if is_kdkit_checkpoint(ckpt) and ckpt.get("num_classes") not in (None, num_classes):
        raise KdkitError(f"{source}: teacher has {ckpt['num_classes']} classes, the shards and the student "
                         f"{num_classes}; distill from a teacher trained on the same classes")
