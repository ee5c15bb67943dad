"""`kdkit predict`: the top-k classes, with names and probabilities, for image files or folders.

Images are decoded with Pillow and given the checkpoint's eval transform (EvalTransform): resize
the shorter side to round(image_size / crop_ratio) (bilinear, antialiased), centre crop, normalise
with the checkpoint's mean/std. That is the DALI eval pipeline's centre view up to the resize
filter (Pillow's and DALI's antialiased bilinear kernels differ by about one grey level on
average), so a prediction here matches `kdkit eval` on the same image to within that.

A file that does not decode gives a one-line error naming it; the other images are still predicted.
CHECKPOINT may also be an OpenVINO IR (model.xml, or its folder) written by `kdkit export --format
openvino`: the same transform, run through the OpenVINO runtime (fp32 or int8).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from kdkit.errors import KdkitError
from kdkit.evaluate.ensemble import ensemble_probs
from kdkit.models.checkpoint import ModelInfo, load_model
from kdkit.shards.sources.base import IMAGE_SUFFIXES


@dataclass
class PredictConfig:
    checkpoint: Path  # or an OpenVINO IR (model.xml / its export folder)
    inputs: list[Path]  # image files and/or folders (searched recursively)
    topk: int = 5
    crop_ratio: float = 0.875
    batch_size: int = 32
    prefer_ema: bool = True
    model_name: str | None = None  # for bare timm/torchvision state dicts
    device: str = "cpu"
    trust_checkpoint: bool = False  # load pickled Python objects too (runs their code: trusted files only)


@dataclass
class Prediction:
    path: str
    top: list[dict] = field(default_factory=list)  # [{"index", "id", "name", "prob"}], most probable first
    error: str | None = None


def list_images(inputs: list[Path]) -> list[Path]:
    """Files as given (whatever their suffix: a bad one fails to decode, with its name), and the
    image files under folders, recursively, in sorted order."""
    out: list[Path] = []
    for p in map(Path, inputs):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise KdkitError(f"{p}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in this folder")
            out += found
        else:
            out.append(p)  # a missing file is reported per image, like an undecodable one
    return out


# The centre view in words, with every rounding, for input.json and the docs: another runtime that
# follows it (and kdkit.shards.images.PIXELS_SPEC for the file) gets EvalTransform's pixels.
CROP_SPEC = ("resize so the shorter side is round({S} / crop_ratio) and the longer side in proportion, "
             "round(side * that / shorter) (at least {S}; Python's round, half to even), bilinear, antialiased "
             "when shrinking (Pillow's resize); crop {S} x {S} with its top-left corner at "
             "floor((H - {S}) / 2 + 0.5), floor((W - {S}) / 2 + 0.5) of the resized H x W (half up, as DALI's "
             "crop_pos 0.5)")


class EvalTransform:
    """The DALI eval centre view in Pillow + torch: resize the shorter side to
    round(image_size / crop_ratio) (the longer side rounded in proportion), cut image_size x
    image_size from the middle, normalise. Where the margin is odd the crop starts half a pixel
    lower/righter, rounded up, as DALI's crop_pos 0.5 does (torchvision's CenterCrop rounds half to
    even, one pixel off DALI on such images). The remaining difference is the resize filter
    (Pillow's vs DALI's antialiased bilinear): about one grey level on average.
    """

    def __init__(self, info: ModelInfo, crop_ratio: float = 0.875):
        if not 0 < crop_ratio <= 1:
            raise KdkitError(f"crop ratio {crop_ratio}: expected 0 < ratio <= 1")
        self.size = info.image_size
        self.shorter = int(round(info.image_size / crop_ratio))
        self.mean = torch.tensor(info.mean).view(3, 1, 1)
        self.std = torch.tensor(info.std).view(3, 1, 1)

    def __call__(self, img) -> torch.Tensor:
        from PIL import Image

        w, h = img.size
        scale = self.shorter / min(w, h)
        nw, nh = max(self.size, round(w * scale)), max(self.size, round(h * scale))
        img = img.resize((nw, nh), Image.Resampling.BILINEAR)  # Pillow antialiases when shrinking
        top, left = int((nh - self.size) / 2 + 0.5), int((nw - self.size) / 2 + 0.5)
        x = torch.from_numpy(np.asarray(img.crop((left, top, left + self.size, top + self.size)), np.float32))
        return (x.permute(2, 0, 1) / 255 - self.mean) / self.std


def eval_transform(info: ModelInfo, crop_ratio: float = 0.875) -> EvalTransform:
    return EvalTransform(info, crop_ratio)


def load_image(path: Path):
    """The RGB Pillow image a viewer shows (kdkit.shards.images.to_rgb: EXIF orientation, high bit depths and
    transparency as the shard writers store them, so training and prediction see the same pixels), or a
    KdkitError naming the file and why it does not decode."""
    from kdkit.errors import BadImage
    from kdkit.shards.images import load_rgb

    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise KdkitError(f"{path}: {'does not exist' if not Path(path).exists() else e.strerror or e}") from None
    try:
        return load_rgb(raw)[0]
    except BadImage as e:
        raise KdkitError(f"{path}: {e}") from None


def top_classes(probs: torch.Tensor, info: ModelInfo, k: int) -> list[dict]:
    p, idx = probs.topk(min(k, probs.numel()))
    ids, names = info.class_ids(), info.class_names()
    return [{"index": int(i), "id": ids[i], "name": names[i], "prob": float(v)} for v, i in zip(p, idx.tolist())]


class Predictions(list):
    """The Predictions of one run, in input order, with `info`: the model and the weights that made them."""

    info: ModelInfo


def predict(cfg: PredictConfig) -> Predictions:
    """One Prediction per image, in input order; undecodable images carry `error` instead of `top`."""
    from kdkit.evaluate.openvino import is_ir, load_ir
    from kdkit.runtime import pick_device

    if is_ir(cfg.checkpoint):  # an OpenVINO IR from `kdkit export --format openvino`: runs on the CPU
        model, info = load_ir(cfg.checkpoint)
        dev = torch.device("cpu")
    else:
        model, info = load_model(cfg.checkpoint, prefer_ema=cfg.prefer_ema, model_name=cfg.model_name,
                                 trust=cfg.trust_checkpoint)
        dev = pick_device(cfg.device)
        model.to(dev)
    transform = eval_transform(info, cfg.crop_ratio)
    paths = list_images(cfg.inputs)
    results = Predictions(Prediction(str(p)) for p in paths)
    results.info = info
    for start in range(0, len(paths), cfg.batch_size):
        chunk, tensors = [], []
        for i in range(start, min(start + cfg.batch_size, len(paths))):
            try:
                tensors.append(transform(load_image(paths[i])))
                chunk.append(i)
            except KdkitError as e:
                results[i].error = str(e)
        if tensors:
            probs = ensemble_probs([model], torch.stack(tensors).to(dev)).cpu()
            for i, p in zip(chunk, probs):
                results[i].top = top_classes(p, info, cfg.topk)
    return results


def format_predictions(results: list[Prediction], info: ModelInfo | None = None) -> str:
    """The model and the weights used, then per image its path and one line per class: probability %,
    index, name (id)."""
    lines = [f"# {info.source} ({info.model}, {info.weights} weights)"] if info else []
    for r in results:
        if r.error:
            continue  # errors go to stderr, one line each
        lines.append(r.path)
        for t in r.top:
            label = t["name"] if t["name"] == t["id"] else f"{t['name']} ({t['id']})"
            lines.append(f"  {100 * t['prob']:6.2f} %  {t['index']:>5}  {label}")
    return "\n".join(lines)
