"""What an evaluation reads: its models (an ensemble: the checks that let several be averaged, and
the average itself) and its shard set (checked against the models), for eval, robustness, export
and the OpenVINO export alike.

Models come from kdkit.models.checkpoint.load_model (one way from a file to a model for every stage).
"""
from __future__ import annotations

import torch

from kdkit.errors import KdkitError
from kdkit.models.checkpoint import ModelInfo, check_classes, load_model, preview
from kdkit.shards import contract


def check_same_classes(infos: list[ModelInfo]) -> None:
    """Models averaged as an ensemble must predict the same classes in the same order."""
    first = infos[0]
    for other in infos[1:]:
        if other.num_classes != first.num_classes or (
                first.classes and other.classes and other.class_ids() != first.class_ids()):
            raise KdkitError(f"cannot average {first.source} ({preview(first.class_ids())}) and {other.source} "
                             f"({preview(other.class_ids())}): an ensemble needs the same classes in the same order")


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


def denormalize_uint8(images: torch.Tensor, info: ModelInfo) -> torch.Tensor:
    """The inverse of normalize_uint8: normalised float (B, C, H, W) views back to uint8 (B, H, W, C)
    pixels, rounded (exact for views that came from uint8 pixels)."""
    mean = torch.tensor(info.mean, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(info.std, device=images.device).view(1, 3, 1, 1)
    return ((images * std + mean) * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def load_models(checkpoints, prefer_ema: bool = True, model_name: str | None = None,
                device: torch.device | str = "cpu", trust: bool = False) -> tuple[list[torch.nn.Module], list[ModelInfo]]:
    """Load every checkpoint of an ensemble and check they can be averaged."""
    if not checkpoints:
        raise KdkitError("no checkpoint given")
    loaded = [load_model(c, prefer_ema=prefer_ema, model_name=model_name, trust=trust) for c in checkpoints]
    models, infos = [m.to(device) for m, _ in loaded], [i for _, i in loaded]
    check_same_classes(infos)
    check_same_transform(infos)
    return models, infos


def default_split(data, what: str = "kdkit export") -> str:
    """The split to read where none was named: val, or the only split a dataset root holds (said, so that a
    number is never read off another split unawares)."""
    import sys

    from kdkit.shards.location import location
    from kdkit.shards.verify import find_sets

    if data is None or isinstance(data, (list, tuple)):
        return "val"  # tars named one by one: read as given, no split (kdkit.shards.reader.resolve_shards)
    path = location(data)  # a local path or a bucket URL, as every reader takes it
    if (path.suffix == ".tar" or (path / contract.MANIFEST).exists() or (path / "val").is_dir()
            or (path.is_dir() and any(path.glob("*.tar")))):  # one set (a tar, a set, a folder of tars): no split
        return "val"
    found = [s.name for s in find_sets(path)]
    if len(found) != 1:
        raise KdkitError(f"{data}: holds no val split but {', '.join(found)}; name the one to read with --split")
    print(f"{what}: {data} holds no val split; reading its only split, {found[0]} (--split names another)",
          file=sys.stderr)
    return found[0]


def open_eval_set(data, split: str, infos: list[ModelInfo]):
    """The ShardSet, after checking its classes against the model's (by id and order) and that its
    images are stored at least as large as the model's crops."""
    from kdkit.shards.reader import resolve_shards

    shards = resolve_shards(data, split)
    if shards.manifest is not None:
        for info in infos:
            check_classes(info, shards.manifest.classes, str(shards.folder or data))
            check_image_size(shards, info, data)
    return shards


def check_image_size(shards, info: ModelInfo, data) -> None:
    """Shards stored smaller than the model's crop would be upscaled: statistics of other images."""
    opts = shards.manifest.options if shards.manifest is not None else {}
    if opts.get("max_size") and opts.get("resize_side", "shorter") == "shorter" and opts["max_size"] < info.image_size:
        raise KdkitError(f"{shards.folder or data}: stores images of at most {opts['max_size']} px (shorter side) "
                         f"but the model takes {info.image_size} px crops; use a shard set written for this size "
                         f"(kdkit shard --max-size >= {info.image_size})")
