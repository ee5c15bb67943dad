"""What every export checks its result with: real inputs, parity of a runtime with PyTorch, and the
runtimes' throughput timed side by side (ONNX Runtime in kdkit.evaluate.export, OpenVINO in
kdkit.evaluate.deploy).
"""
from __future__ import annotations

import time

import numpy as np
import torch

from kdkit.evaluate.ensemble import open_eval_set
from kdkit.models.checkpoint import ModelInfo


def parity_inputs(cfg, info: ModelInfo) -> tuple[torch.Tensor, str]:
    """Real inputs for the parity check of an export (cfg: ExportConfig): eval views from shards, or image
    files; noise otherwise."""
    n = cfg.parity_samples
    if cfg.data is not None:
        from kdkit.pipelines import eval_loader

        shards = open_eval_set(cfg.data, cfg.split, [info])
        images = next(iter(eval_loader(shards, info.transform(cfg.crop_ratio), n, 2))).images
        return images, f"{len(images)} eval views from {shards.folder or cfg.data}"
    if cfg.images:
        from kdkit.evaluate.predict import eval_transform, list_images, load_image

        tf = eval_transform(info, cfg.crop_ratio)
        paths = list_images(cfg.images)[:n]
        return torch.stack([tf(load_image(p)) for p in paths]), f"{len(paths)} image files"
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, info.image_size, info.image_size, generator=g), \
        f"{n} random inputs (synthetic: give --data or --images for real ones)"


@torch.no_grad()
def check_parity(model: torch.nn.Module, run, inputs: torch.Tensor, atol: float) -> dict:
    """A runtime (`run`: normalised float batch -> logits array, e.g. ort_runner) vs PyTorch on `inputs`,
    run as one batch and as batches of 1 (the dynamic axis)."""
    ref = model(inputs).float().numpy()
    full = run(inputs)
    single = np.concatenate([run(inputs[i:i + 1]) for i in range(len(inputs))])
    diff = max(float(np.abs(full - ref).max()), float(np.abs(single - ref).max()))
    agree = float((full.argmax(1) == ref.argmax(1)).mean())
    return {"samples": len(inputs), "batch_sizes": [1, len(inputs)], "max_abs_diff": diff,
            "top1_agreement": agree, "atol": atol, "ok": diff <= atol and agree == 1.0}


def time_runners(calls: dict, batch_size: int, iterations: int, warmup: int, repeats: int = 1) -> dict:
    """{name: images/s} of each call (one forward pass of `batch_size` images). With repeats > 1 the
    calls alternate and the median of each is reported, so load from other processes hits all alike."""
    import statistics

    def timed(fn):
        for _ in range(warmup):
            fn()
        t0 = time.perf_counter()
        for _ in range(iterations):
            fn()
        return batch_size * iterations / (time.perf_counter() - t0)

    rates: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            rates[name].append(timed(fn))
    return {name: statistics.median(r) for name, r in rates.items()}
