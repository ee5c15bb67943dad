"""The checkpoint format `kdkit train` writes and every later stage reads (teacher pass, eval,
export, fine-tuning). One dict, saved with torch.save:

    {"format": "kdkit-checkpoint", "version": 1,
     "model": "resnet18",               # timm / kdkit registry name, rebuilt with create_model
     "model_kwargs": {...},             # extra kwargs for create_model (drop rates, norm, ...)
     "num_classes": 10, "classes": [{"index", "id", "name"}],   # from the shard manifest
     "image_size": 224, "crop_ratio": 0.875, "mean": [...], "std": [...],   # the eval transform it expects
     "head": {"type": "am_softmax", "scale", "margin"},         # only where the registry's head was replaced
     "state_dict": {...}, "ema_state_dict": {...} | None,
     "epoch": 3, "metrics": {...}, "kdkit_version": "0.1.0",
     "train_state": {...} | None}       # optimizer/scheduler/scaler/RNG/loader position (resume only)

Plain timm/torchvision state dicts (a bare {name: tensor} mapping, or {"state_dict": ...} /
{"model": ...} wrappers) load too when the model name is given separately; their transform is timm's
pretrained config for that name.

Every stage that needs a model from a file (teacher pass, online KD, fine-tuning, eval, predict,
export) calls `load_model`, the one way from a checkpoint to a model and its metadata:

    model, info = load_model("runs/r18/best.pth")                  # kdkit checkpoint (EMA weights if any)
    model, info = load_model("r50.pth", model_name="resnet50", num_classes=1000)   # bare state dict
"""
from __future__ import annotations

import pickle
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from kdkit import atomic
from kdkit.errors import KdkitError
from kdkit.models.factory import create_model
from kdkit.models.heads import apply_head, classifier_width
from kdkit.shards.tario import sha256_file

FORMAT = "kdkit-checkpoint"
VERSION = 1


def is_kdkit_checkpoint(obj) -> bool:
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def _array_globals() -> list:
    """numpy's array reconstruction: plain data (older kdkit checkpoints stored numpy RNG states). Object
    arrays would need more globals, and are refused."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    dtypes = [type(np.dtype(t)) for t in ("uint8", "uint32", "int32", "int64", "float16", "float32", "float64")]
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, *dtypes]


def read_checkpoint(path: Path | str, trust: bool = False) -> dict:
    """The raw checkpoint dict; a clear KdkitError for a missing or unreadable file.

    Loaded with torch.load(weights_only=True): tensors, numbers, strings, lists and dicts (and numpy
    arrays of plain numbers) only, so a crafted file cannot run code. A file that needs more (pickled
    classes or functions) is refused with the global it names, unless the caller trusts it (`trust`,
    the commands' --trust-checkpoint).
    """
    path = Path(path)
    if not path.exists():
        raise KdkitError(f"{path}: checkpoint does not exist")
    try:
        with torch.serialization.safe_globals(_array_globals()):
            obj = torch.load(path, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError:
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception:  # noqa: BLE001 - not even a checkpoint archive
            names = []
        if not names:
            raise KdkitError(f"{path}: not a readable PyTorch checkpoint (no torch.save archive or state dict "
                             "in it)") from None
        raise KdkitError(f"{path}: holds Python objects ({', '.join(names[:3])}) besides weights, and loading them "
                         "could run code; kdkit loads checkpoints as data only. If you trust where the file comes "
                         "from, pass --trust-checkpoint") from None
    except Exception as e:
        raise KdkitError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from None
    if is_kdkit_checkpoint(obj) and int(obj.get("version", 0)) > VERSION:
        raise KdkitError(f"{path}: checkpoint version {obj['version']} is newer than this kdkit; upgrade kdkit")
    return obj


def extract_state_dict(obj, prefer_ema: bool = False) -> dict:
    """A {name: tensor} state dict from a kdkit checkpoint or the usual timm/torchvision wrappers."""
    if is_kdkit_checkpoint(obj):
        if prefer_ema and obj.get("ema_state_dict"):
            return obj["ema_state_dict"]
        return obj["state_dict"]
    if isinstance(obj, dict):
        keys = ("state_dict_ema", "model_ema", "state_dict", "model") if prefer_ema else ("state_dict", "model")
        for key in keys:
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise KdkitError("checkpoint holds no state dict (expected a kdkit checkpoint or a {name: tensor} mapping)")
    # DDP / torch.compile wrappers prefix every key; strip them so plain models load
    for prefix in ("module.", "_orig_mod."):
        if obj and all(k.startswith(prefix) for k in obj):
            obj = {k[len(prefix):]: v for k, v in obj.items()}
    return obj


def load_weights(model: torch.nn.Module, state: dict, source: str) -> None:
    """Load strictly; on mismatch name the file and the first mismatching keys/shapes."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
              for k, v in own.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches (e.g. {'; '.join(shapes[:3])})")
        if missing:
            parts.append(f"{len(missing)} keys missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
        raise KdkitError(f"{source}: does not fit the model: " + "; ".join(parts)
                         + " - is it a checkpoint of another architecture or class count?")
    model.load_state_dict(state, strict=True)


def save_checkpoint(path: Path | str, obj: dict) -> None:
    """Atomic (kdkit.atomic): a crash or a full disk while saving leaves the previous file, and no partial one."""
    with atomic.writing(Path(path)) as f:
        torch.save({"format": FORMAT, "version": VERSION, **obj}, f)


@dataclass
class ModelInfo:
    """What a loaded checkpoint says besides its weights."""

    source: str  # the checkpoint's path
    model: str  # registry name
    model_kwargs: dict
    num_classes: int
    classes: list[dict] | None  # [{"index", "id", "name"}] from the shard manifest; None for bare state dicts
    image_size: int  # its eval transform: resize the shorter side to image_size / crop_ratio, centre crop
    crop_ratio: float | None  # None: the checkpoint does not say (kdkit checkpoints before crop_ratio was saved)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    head: dict | None  # a classifier head the registry does not build (kdkit.models.heads)
    weights: str  # "ema" or "model": which weights were loaded

    def class_ids(self) -> list[str]:
        return [c["id"] for c in self.classes] if self.classes else [str(i) for i in range(self.num_classes)]

    def class_names(self) -> list[str]:
        """Human-readable names where the manifest has them, else ids."""
        if not self.classes:
            return self.class_ids()
        return [c.get("name") or c["id"] for c in self.classes]

    def sha256(self) -> str:
        return sha256_file(self.source)

    def transform(self, crop_ratio: float | None = None):
        """Its input transform (kdkit.pipelines.options.Transform: what the eval loaders read), with the
        centre crop `crop_ratio` where one is given, else its own (0.875 where it names none)."""
        from kdkit.pipelines.options import Transform

        ratio = crop_ratio if crop_ratio is not None else self.crop_ratio if self.crop_ratio is not None else 0.875
        return Transform(self.image_size, ratio, tuple(self.mean), tuple(self.std))

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("classes")
        return d


def load_model(checkpoint: Path | str, *, model_name: str | None = None, model_kwargs: dict | None = None,
               num_classes: int | None = None, prefer_ema: bool = True,
               trust: bool = False) -> tuple[torch.nn.Module, ModelInfo]:
    """(model in eval mode on the CPU, ModelInfo) from any checkpoint kdkit writes or a bare state dict.

    A kdkit checkpoint names its model, kwargs, head, classes and eval transform; `model_name`, when
    given, must agree with it. A bare timm/torchvision state dict needs `model_name` (+ `model_kwargs`);
    its class count is read off its classifier weight, and its transform comes from timm's pretrained
    config for that name. `num_classes`, when given, is the count the caller's data has: a checkpoint
    predicting another count is refused as such before any weight is loaded. EMA weights are used when
    `prefer_ema` and the checkpoint has them (info.weights says which were loaded). The file is read as
    data only unless `trust` (read_checkpoint).
    """
    path = Path(checkpoint)
    obj = read_checkpoint(path, trust)
    state = extract_state_dict(obj, prefer_ema=prefer_ema)
    if is_kdkit_checkpoint(obj):
        name = obj.get("model")
        if not name:
            raise KdkitError(f"{path}: kdkit checkpoint without a model name; it cannot be rebuilt")
        if model_name and model_name != name:
            raise KdkitError(f"{path}: a checkpoint of {name!r}, but {model_name!r} was asked for; leave the model "
                             f"name out (the checkpoint names its model) or give a checkpoint of {model_name!r}")
        kwargs = dict(obj.get("model_kwargs") or {})
        n = int(obj.get("num_classes") or 0) or num_classes or 1000
        _refuse_class_count(path, n, num_classes)
        model = apply_head(create_model(name, num_classes=n, **kwargs), obj.get("head"), str(path))
        weights = "ema" if prefer_ema and obj.get("ema_state_dict") else "model"
        classes, head, crop_ratio = obj.get("classes") or None, obj.get("head"), obj.get("crop_ratio")
    else:
        if not model_name:
            raise KdkitError(f"{path}: a bare state dict (not a kdkit checkpoint) does not say which model it is; "
                             "give its timm name (--model NAME, e.g. resnet18)")
        name, kwargs = model_name, dict(model_kwargs or {})
        model = create_model(name, num_classes=num_classes or 1000, **kwargs)
        # the class count of the file itself: a 1000-class state dict for a 3-class set is refused as a
        # class-count problem, not as a soup of mismatched shapes
        n = classifier_width(model, state) or num_classes or 1000
        _refuse_class_count(path, n, num_classes)
        if n != getattr(model, "num_classes", n):
            model.reset_classifier(n)
        weights = "ema" if prefer_ema and isinstance(obj, dict) and any(
            k in obj for k in ("state_dict_ema", "model_ema")) else "model"
        classes, head = None, None
        crop_ratio = (getattr(model, "pretrained_cfg", None) or {}).get("crop_pct")
    load_weights(model, state, f"{path} ({name}, {weights} weights)")
    model.eval()
    cfg = getattr(model, "pretrained_cfg", None) or {}
    own = obj if is_kdkit_checkpoint(obj) else {}
    image_size = int(own.get("image_size") or cfg.get("input_size", (3, 224, 224))[-1])
    mean = own.get("mean") or cfg.get("mean") or IMAGENET_DEFAULT_MEAN
    std = own.get("std") or cfg.get("std") or IMAGENET_DEFAULT_STD
    if classes is not None and len(classes) != n:
        raise KdkitError(f"{path}: lists {len(classes)} classes but the model has {n} outputs")
    info = ModelInfo(source=str(path), model=name, model_kwargs=kwargs, num_classes=n, classes=classes,
                     image_size=image_size, crop_ratio=None if crop_ratio is None else float(crop_ratio),
                     mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std), head=head,
                     weights=weights)
    return model, info


def _refuse_class_count(path: Path, classes: int, wanted: int | None) -> None:
    if wanted is not None and classes != wanted:
        raise KdkitError(f"{path}: the model predicts {classes} classes, the data has {wanted}; use a model "
                         "trained on these classes (class indices must mean the same)")


def check_classes(info: ModelInfo, set_classes, data: str) -> None:
    """The set's classes must be the model's, by id and in order (labels are indices). A checkpoint
    without a class list (bare state dict) is only checked for the class count."""
    set_ids = [c["id"] if isinstance(c, dict) else c.id for c in set_classes]
    if info.classes is None:
        if len(set_ids) != info.num_classes:
            raise KdkitError(f"{data} has {len(set_ids)} classes but {info.source} ({info.model}) predicts "
                             f"{info.num_classes}; use the set the model was trained for")
        return
    own = info.class_ids()
    if own == set_ids:
        return
    missing = [c for c in own if c not in set_ids]
    extra = [c for c in set_ids if c not in own]
    first = next((i for i, (a, b) in enumerate(zip(set_ids, own)) if a != b), min(len(set_ids), len(own)))
    if not missing and not extra:
        why = (f"the same classes in another order (the class indices disagree; first at index {first}: set "
               f"{set_ids[first]!r}, model {own[first]!r})")
    else:
        why = (f"{len(missing)} of the model's classes missing from the set (e.g. {', '.join(missing[:3]) or '-'}), "
               f"{len(extra)} classes the model does not know (e.g. {', '.join(extra[:3]) or '-'})")
    raise KdkitError(f"{data}: its classes are not the ones {info.source} was trained on: {why}. "
                     f"Set: {preview(set_ids)}; model: {preview(own)}")


def preview(ids: list[str], n: int = 5) -> str:
    return f"{len(ids)} classes [{', '.join(ids[:n])}{', ...' if len(ids) > n else ''}]"
