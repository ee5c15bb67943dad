"""Models to judge: a checkpoint rebuilt in eval mode, with what its eval transform and class
names need, and the checks that keep a model, its ensemble partners and an eval set consistent.

    model, info = load_model("runs/r18/best.pt")             # kdkit checkpoint, EMA weights if any
    model, info = load_model("resnet18.pth", model_name="resnet18")   # bare timm/torchvision dict
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from kdkit.errors import KdkitError
from kdkit.models.checkpoint import extract_state_dict, is_kdkit_checkpoint, load_weights, read_checkpoint
from kdkit.models.factory import create_model

DEFAULT_MEAN = (0.485, 0.456, 0.406)
DEFAULT_STD = (0.229, 0.224, 0.225)


@dataclass
class ModelInfo:
    source: str  # checkpoint path
    model: str  # registry name
    num_classes: int
    classes: list[dict] | None  # [{"index", "id", "name"}] from the shard manifest; None for bare state dicts
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    weights: str  # "ema" or "model": which weights were loaded

    def class_ids(self) -> list[str]:
        return [c["id"] for c in self.classes] if self.classes else [str(i) for i in range(self.num_classes)]

    def class_names(self) -> list[str]:
        """Human-readable names where the manifest has them, else ids."""
        if not self.classes:
            return self.class_ids()
        return [c.get("name") or c["id"] for c in self.classes]

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("classes")
        return d


def _classifier_width(model: torch.nn.Module, state: dict) -> int | None:
    """Classes in a bare state dict, read off the weight of the model's classifier layer."""
    key = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    w = state.get(f"{key}.weight") if key else None
    return int(w.shape[0]) if w is not None and w.ndim >= 1 else None


def _rebuild_head(model: torch.nn.Module, head: dict, path: Path) -> None:
    """Checkpoints record a classifier the registry does not build (`head`, written by the trainer);
    put the same module in place so the weights load. Only the trainer's AM-softmax head exists."""
    if head.get("type") != "am_softmax":
        raise KdkitError(f"{path}: unknown classifier head {head.get('type')!r}; this kdkit cannot rebuild it")
    from kdkit.train.model import AMSoftmaxHead, classifier_name  # the trainer owns this head

    name = classifier_name(model)
    old = model.get_submodule(name)
    parent, _, leaf = name.rpartition(".")
    new = AMSoftmaxHead(old.in_features, old.out_features, float(head.get("scale", 30.0)))
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def load_model(checkpoint: Path | str, prefer_ema: bool = True, model_name: str | None = None,
               num_classes: int | None = None) -> tuple[torch.nn.Module, ModelInfo]:
    """(model in eval mode on the CPU, ModelInfo) from a kdkit checkpoint or a bare state dict.

    A kdkit checkpoint names its model, class list and eval transform; `model_name` overrides the
    name (e.g. to check a file against another architecture). A bare timm/torchvision state dict
    needs `model_name`; its class count comes from `num_classes` or the classifier weight, and its
    mean/std/image size from timm's pretrained config for that name. EMA weights are used when
    `prefer_ema` and the checkpoint has them (info.weights says which were loaded).
    """
    path = Path(checkpoint)
    obj = read_checkpoint(path)
    state = extract_state_dict(obj, prefer_ema=prefer_ema)
    if is_kdkit_checkpoint(obj):
        name = model_name or obj.get("model")
        if not name:
            raise KdkitError(f"{path}: kdkit checkpoint without a model name; pass --model NAME")
        n = int(obj.get("num_classes") or num_classes or 0) or None
        model = create_model(name, num_classes=n or 1000, **(obj.get("model_kwargs") or {}))
        weights = "ema" if prefer_ema and obj.get("ema_state_dict") else "model"
        cfg = getattr(model, "pretrained_cfg", None) or {}
        image_size = int(obj.get("image_size") or cfg.get("input_size", (3, 224, 224))[-1])
        mean, std = obj.get("mean") or cfg.get("mean", DEFAULT_MEAN), obj.get("std") or cfg.get("std", DEFAULT_STD)
        classes = obj.get("classes") or None
        if obj.get("head"):
            _rebuild_head(model, obj["head"], path)
    else:
        if not model_name:
            raise KdkitError(f"{path}: a bare state dict (not a kdkit checkpoint) does not say which model it "
                             "is; pass --model NAME (a timm name, e.g. resnet18)")
        name = model_name
        model = create_model(name, num_classes=num_classes or 1000)
        n = num_classes or _classifier_width(model, state) or 1000
        if n != getattr(model, "num_classes", n):
            model.reset_classifier(n)
        cfg = getattr(model, "pretrained_cfg", None) or {}
        image_size = int(cfg.get("input_size", (3, 224, 224))[-1])
        mean, std = cfg.get("mean", DEFAULT_MEAN), cfg.get("std", DEFAULT_STD)
        weights = "ema" if prefer_ema and isinstance(obj, dict) and any(
            k in obj for k in ("state_dict_ema", "model_ema")) else "model"
        classes = None
    load_weights(model, state, f"{path} ({name}, {weights} weights)")
    model.eval()
    num = int(getattr(model, "num_classes", 0) or n or 0)
    if classes is not None and len(classes) != num:
        raise KdkitError(f"{path}: lists {len(classes)} classes but the model has {num} outputs")
    info = ModelInfo(source=str(path), model=name, num_classes=num, classes=classes, image_size=image_size,
                     mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std), weights=weights)
    return model, info


def _ids(classes) -> list[str]:
    return [c["id"] if isinstance(c, dict) else c.id for c in classes]


def check_eval_classes(info: ModelInfo, manifest_classes, data: str) -> None:
    """The eval set's classes must be the model's, by id and in order (labels are indices).

    A checkpoint without a class list (bare state dict) is only checked for the class count.
    """
    set_ids = _ids(manifest_classes)
    if info.classes is None:
        if len(set_ids) != info.num_classes:
            raise KdkitError(f"{data} has {len(set_ids)} classes but {info.source} ({info.model}) predicts "
                             f"{info.num_classes}; evaluate on the set the model was trained for")
        return
    own = info.class_ids()
    if own == set_ids:
        return
    missing = [c for c in own if c not in set_ids]
    extra = [c for c in set_ids if c not in own]
    if not missing and not extra:
        why = "the same classes in another order (the class indices disagree)"
    else:
        why = (f"{len(missing)} of the model's classes missing from the set (e.g. {', '.join(missing[:3]) or '-'}), "
               f"{len(extra)} classes the model does not know (e.g. {', '.join(extra[:3]) or '-'})")
    raise KdkitError(f"{data}: its classes are not the ones {info.source} was trained on: {why}. "
                     f"Set: {_preview(set_ids)}; model: {_preview(own)}")


def _preview(ids: list[str], n: int = 5) -> str:
    return f"{len(ids)} classes [{', '.join(ids[:n])}{', ...' if len(ids) > n else ''}]"


def check_same_classes(infos: list[ModelInfo]) -> None:
    """Models averaged as an ensemble must predict the same classes in the same order."""
    first = infos[0]
    for other in infos[1:]:
        if other.num_classes != first.num_classes or (
                first.classes and other.classes and other.class_ids() != first.class_ids()):
            raise KdkitError(f"cannot average {first.source} ({_preview(first.class_ids())}) and {other.source} "
                             f"({_preview(other.class_ids())}): an ensemble needs the same classes in the same order")


def check_same_transform(infos: list[ModelInfo]) -> None:
    """Ensemble members see one batch of views, so they must agree on image size and normalisation."""
    first = infos[0]
    for other in infos[1:]:
        for field in ("image_size", "mean", "std"):
            a, b = getattr(first, field), getattr(other, field)
            if (a != b) if field == "image_size" else any(abs(x - y) > 1e-6 for x, y in zip(a, b)):
                raise KdkitError(f"cannot average {first.source} and {other.source}: {field} differs ({a} vs {b}); "
                                 "evaluate them separately")


@torch.no_grad()
def ensemble_probs(models: list[torch.nn.Module], images: torch.Tensor) -> torch.Tensor:
    """Class probabilities (B, K) for a batch of views.

    `images` is (B, C, H, W), or (B, V, C, H, W) for test-time views (flip, ten-crop). Softmax
    probabilities are averaged over the V views and then over the models: the TF2 seed's ten-crop
    and two-model average, and what keeps calibration meaningful (averaging logits would not
    give a probability average).
    """
    views = images.ndim == 5
    b = images.shape[0]
    flat = images.flatten(0, 1) if views else images
    total = None
    for model in models:
        p = torch.softmax(model(flat).float(), dim=1)
        p = p.view(b, -1, p.shape[1]).mean(dim=1) if views else p
        total = p if total is None else total + p
    return total / len(models)


def normalize_uint8(images: torch.Tensor, info: ModelInfo) -> torch.Tensor:
    """uint8 (B, H, W, C) views to the model's normalised float (B, C, H, W) input, as DALI's
    crop_mirror_normalize does it (x - 255 mean) / (255 std)."""
    mean = torch.tensor(info.mean, device=images.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(info.std, device=images.device).view(1, 3, 1, 1) * 255
    return (images.permute(0, 3, 1, 2).float() - mean) / std
