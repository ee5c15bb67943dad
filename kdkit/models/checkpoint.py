"""The checkpoint format `kdkit train` writes and every later stage reads (teacher pass, eval,
export, fine-tuning). One dict, saved with torch.save:

    {"format": "kdkit-checkpoint", "version": 1,
     "model": "resnet18",               # timm / kdkit registry name, rebuilt with create_model
     "model_kwargs": {...},             # extra kwargs for create_model (drop rates, norm, ...)
     "num_classes": 10, "classes": [{"index", "id", "name"}],   # from the shard manifest
     "image_size": 224, "mean": [...], "std": [...],            # the eval transform it expects
     "state_dict": {...}, "ema_state_dict": {...} | None,
     "epoch": 3, "metrics": {...}, "kdkit_version": "0.1.0",
     "train_state": {...} | None}       # optimizer/scheduler/scaler/RNG/loader position (resume only)

Plain timm/torchvision state dicts (a bare {name: tensor} mapping, or {"state_dict": ...} /
{"model": ...} wrappers) load too when the model name is given separately.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from kdkit.errors import KdkitError

FORMAT = "kdkit-checkpoint"
VERSION = 1


def file_sha256(path: Path | str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def is_kdkit_checkpoint(obj) -> bool:
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def read_checkpoint(path: Path | str) -> dict:
    """The raw checkpoint dict; a clear KdkitError for a missing or unreadable file."""
    path = Path(path)
    if not path.exists():
        raise KdkitError(f"{path}: checkpoint does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
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
    """Atomic: a crash while saving never leaves a half-written file under the real name."""
    path = Path(path)
    obj = {"format": FORMAT, "version": VERSION, **obj}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)
