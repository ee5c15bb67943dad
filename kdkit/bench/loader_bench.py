"""`kdkit bench-loader`: images/s of a DALI pipeline on a shard set, against the stock PyTorch way.

Both loaders do the same work on the same shards in the same invocation: read the tars, decode
the JPEGs, apply the augmentation named by `aug`, and hand over normalized float CHW batches of
`batch_size` as torch tensors (on the GPU with device="gpu"). The baseline is what a PyTorch user
writes without DALI: `torch.utils.data.DataLoader(num_workers=threads)` over stock
`webdataset.WebDataset(...).decode("pil")` and the equivalent torchvision transforms. DALI gets
`num_threads=threads`: equal parallelism. Timing starts after `warmup` batches (pipeline build,
worker start-up and shuffle-buffer fill excluded); CPU use counts this process and its children.

With `gpu_feed` (a timm model name), a training step (AMP on the GPU) is timed on a synthetic
batch (model only) and on the DALI loader's batches (loader-fed), which shows whether the loader
or the model limits training.
"""
from __future__ import annotations

import shlex
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from kdkit import runtime
from kdkit.bench import BenchConfig
from kdkit.bench.sysinfo import Stopwatch, machine
from kdkit.errors import KdkitError
from kdkit.options import as_dict, changed_flags


@dataclass
class RunResult:
    loader: str
    device: str
    images: int
    seconds: float
    images_per_s: float
    cpu_percent: float  # 100 = one core fully busy
    images_per_cpu_s: float

    @classmethod
    def from_watch(cls, loader: str, device: str, images: int, sw: Stopwatch) -> "RunResult":
        return cls(loader, device, images, round(sw.wall, 3), round(images / sw.wall, 1),
                   round(sw.cpu_percent, 1), round(images / sw.cpu, 1) if sw.cpu > 0 else 0.0)


# ---------------------------------------------------------------------------------------------
# the two loaders

def dali_loader(cfg: BenchConfig, rt):
    from kdkit.pipelines import DaliLoader, Train, loader_config
    from kdkit.pipelines.options import decoding

    # last_batch="partial": like the baseline, the end of an epoch yields a short batch (images are
    # counted, not batches) instead of a full one computed and dropped
    role = "eval" if cfg.aug == "eval" else Train(**cfg.crop_options(), **as_dict(cfg.augment()))
    lc = loader_config(role, image_size=cfg.size, dtype=cfg.dtype, antialias=cfg.antialias,
                       layout="channels_last" if cfg.gpu_feed else "CHW", batch_size=cfg.batch_size,
                       shuffle_buffer=cfg.shuffle_buffer, teacher_logits=False, last_batch="partial",
                       num_threads=cfg.threads, device=rt.dali_device, device_id=rt.device_id,
                       fast_idct=cfg.fast_idct, native_resize=cfg.native_resize, **decoding(cfg))
    return DaliLoader(cfg.shards, lc, split=cfg.split)


def baseline_transform(cfg: BenchConfig):
    """torchvision's counterpart of the DALI augmentation (BenchConfig.augment: --aug and the options)."""
    from torchvision import transforms as T

    from kdkit.pipelines.options import IMAGENET_MEAN, IMAGENET_STD

    finish = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if cfg.aug == "eval":
        return T.Compose([T.Resize(round(cfg.size / 0.875)), T.CenterCrop(cfg.size)] + finish)
    a = cfg.augment()
    geometric = [T.RandomResizedCrop(cfg.size, scale=cfg.random_area, ratio=cfg.random_aspect_ratio)]
    geometric += [T.RandomHorizontalFlip()] if cfg.flip else []
    colour = [T.ColorJitter(a.color_jitter, a.color_jitter, a.color_jitter, a.hue)] if a.color_jitter or a.hue else []
    policy = {None: [], "randaugment": [T.RandAugment(a.randaugment_n, a.randaugment_m)],
              "autoaugment": [T.AutoAugment()], "trivialaugment": [T.TrivialAugmentWide()]}[a.auto_augment]
    if a.augmix:
        policy = [T.AugMix(a.augmix_severity, a.augmix_width, a.augmix_depth, a.augmix_alpha)]
    rotation = []
    if a.rotate:  # after the resize, as DALI's graph does it (pipelines.train.rotate_views)
        fill = ([round(a.rotate_fill)] * 3 if a.rotate_fill is not None else [round(m * 255) for m in IMAGENET_MEAN])
        rotation = [T.RandomRotation(a.rotate, interpolation=T.InterpolationMode.BILINEAR, fill=fill)]
    return T.Compose(geometric + colour + policy + rotation + finish)


def _label(x) -> int:
    return int(x)


def baseline_loader(cfg: BenchConfig, tars: list[Path], rt):
    """DataLoader over stock webdataset with Pillow decode; repeats the shards forever."""
    import webdataset as wds

    from kdkit.shards.location import webdataset_url

    ds = (wds.WebDataset([webdataset_url(t) for t in tars], shardshuffle=False, repeat=True, empty_check=False)
          .shuffle(cfg.shuffle_buffer).decode("pil").to_tuple("jpg", "cls")
          .map_tuple(baseline_transform(cfg), _label))
    # spawned workers: forking this process, which already runs DALI's threads (and CUDA), is unsafe
    return torch.utils.data.DataLoader(ds, batch_size=cfg.batch_size, num_workers=cfg.threads,
                                       pin_memory=rt.device.type == "cuda", persistent_workers=cfg.threads > 0,
                                       multiprocessing_context="spawn" if cfg.threads > 0 else None)


def _median(runs: list[RunResult]) -> RunResult:
    return sorted(runs, key=lambda r: r.images_per_s)[len(runs) // 2]


def _forever(loader):
    while True:
        n = 0
        for batch in loader:
            n += 1
            yield batch
        if n == 0:
            raise KdkitError("the loader yields no batches (fewer samples than one batch?)")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_loader(batches, cfg: BenchConfig, device: torch.device, on_batch=None) -> tuple[int, Stopwatch]:
    """Images and time for cfg.batches batches of an endless batch iterator, after cfg.warmup."""
    it = iter(batches)  # an endless generator resumes where the previous measurement stopped
    for _ in range(cfg.warmup):
        b = next(it)
        if on_batch:
            on_batch(b)
    _sync(device)
    sw, images = Stopwatch().start(), 0
    for _ in range(cfg.batches):
        b = next(it)
        if on_batch:
            on_batch(b)
        images += len(b[0])
    _sync(device)
    return images, sw.stop()


# ---------------------------------------------------------------------------------------------
# the model step (GPU-feed mode)

def train_step(model_name: str, num_classes: int, device: torch.device):
    """A closure running one AMP training step of a timm model on (images, labels)."""
    import timm

    model = timm.create_model(model_name, num_classes=num_classes).to(device, memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=amp)

    def step(images, labels):
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            loss = torch.nn.functional.cross_entropy(model(images), labels)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    return step


def gpu_feed(cfg: BenchConfig, loader, num_classes: int, loader_only: RunResult, device: torch.device) -> dict:
    step = train_step(cfg.gpu_feed, num_classes, device)
    fake = (torch.randn(cfg.batch_size, 3, cfg.size, cfg.size, device=device).contiguous(
        memory_format=torch.channels_last), torch.randint(0, num_classes, (cfg.batch_size,), device=device))
    n, sw = time_loader(iter(lambda: fake, None), cfg, device, on_batch=lambda b: step(*b))
    model_only = RunResult.from_watch(f"{cfg.gpu_feed} step, synthetic batch", device.type, n, sw)
    n, sw = time_loader(_forever(loader), cfg, device, on_batch=lambda b: step(b.images, b.labels))
    fed = RunResult.from_watch(f"{cfg.gpu_feed} step, fed by DALI", device.type, n, sw)
    limit = "loader" if loader_only.images_per_s < model_only.images_per_s else "model"
    return {"model": cfg.gpu_feed, "amp": device.type == "cuda", "model_only": asdict(model_only),
            "loader_fed": asdict(fed), "loader_only_images_per_s": loader_only.images_per_s, "bottleneck": limit}


# ---------------------------------------------------------------------------------------------

def run_bench(cfg: BenchConfig, command: str | None = None) -> dict:
    """Measure DALI (and the baseline); returns the report `format_table` prints and --json writes."""
    with runtime.start(cfg.device, announce="kdkit bench-loader", distributed=False) as rt:
        return _measure(cfg, rt, command)


def _measure(cfg: BenchConfig, rt: runtime.Runtime, command: str | None) -> dict:
    loader = dali_loader(cfg, rt)
    dali_batches = _forever(loader)
    runs: dict[str, list[RunResult]] = {"dali": [], "dataloader+pillow": []}
    base_batches = _forever(baseline_loader(cfg, loader.shards.tars, rt)) if cfg.baseline else None
    move = (lambda b: b[0].to(rt.device, non_blocking=True)) if rt.device.type == "cuda" else None
    where = rt.dali_device
    # Alternating the two loaders spreads any background load on the machine over both.
    for _ in range(cfg.repeats):
        n, sw = time_loader(dali_batches, cfg, rt.device)
        runs["dali"].append(RunResult.from_watch("dali", where, n, sw))
        if base_batches is not None:
            n, sw = time_loader(base_batches, cfg, rt.device, on_batch=move)
            runs["dataloader+pillow"].append(RunResult.from_watch("dataloader+pillow", where, n, sw))
    base_batches = None  # lets the DataLoader's workers stop before the GPU-feed part
    results = [_median(r) for r in runs.values() if r]
    report = {"config": {**as_dict(cfg), "shards": str(cfg.shards), "device": where}, "machine": machine(),
              "command": command if command is not None else command_line(cfg),
              "shard_folder": str(loader.shards.folder or loader.shards.tars[0].parent),
              "samples": loader.scan.num_samples, "resize": loader.role.resizer(loader.cfg.backend),
              "results": [asdict(r) for r in results],
              "runs": {k: [r.images_per_s for r in v] for k, v in runs.items() if v},
              "speedup": round(results[0].images_per_s / results[1].images_per_s, 2) if cfg.baseline else None}
    if cfg.gpu_feed:
        man = loader.shards.manifest
        # the model runs on the GPU where there is one, whichever backend feeds it
        feed_device = runtime.pick_device("auto", rt.local_rank)
        report["gpu_feed"] = gpu_feed(cfg, loader, len(man.classes) if man else 1000, results[0], feed_device)
    return report


def command_line(cfg: BenchConfig) -> str:
    """The `kdkit bench-loader` command that reruns this configuration (for the tables in docs/loader.md)."""
    return shlex.join(["kdkit", "bench-loader", str(cfg.shards), *changed_flags(cfg)])


def extra_augs(c: dict) -> str:
    """The augmentation added to --aug, as the table's head names it."""
    extra = [f" + {name} {c[name]:g}" for name in ("rotate", "hue") if c.get(name)]
    return "".join(extra)


def format_table(report: dict) -> str:
    c, m = report["config"], report["machine"]
    head = (f"{report['shard_folder']}: {report['samples']} samples; batch {c['batch_size']}, "
            f"{c['threads']} threads/workers, {c['size']}px, aug {c['aug']}{extra_augs(c)}"
            f"{'' if c['antialias'] else ' (DALI resize without antialiasing)'}, {c['batches']} batches "
            f"after {c['warmup']} warm-up, median of {c['repeats']} run(s); "
            f"DALI resize: {report.get('resize', '?')}\n"
            f"machine: {m['cpu']} ({m['cpu_cores']} cores), "
            f"GPU: {m['gpu'] or 'none'}, torch {m['torch']}, DALI {m['dali']}")
    rows = list(report["results"])
    if report.get("gpu_feed"):
        rows += [report["gpu_feed"]["model_only"], report["gpu_feed"]["loader_fed"]]
    width = max(len(r["loader"]) for r in rows) + 2
    lines = [head, "", f"{'loader':<{width}}{'device':>7}{'images':>8}{'seconds':>9}{'img/s':>9}{'CPU %':>8}"
                       f"{'img/CPU-s':>11}"]
    for r in rows:
        lines.append(f"{r['loader']:<{width}}{r['device']:>7}{r['images']:>8}{r['seconds']:>9.2f}"
                     f"{r['images_per_s']:>9.1f}{r['cpu_percent']:>8.0f}{r['images_per_cpu_s']:>11.1f}")
    if report.get("speedup") is not None:
        lines.append(f"\nDALI / DataLoader+Pillow: {report['speedup']:.2f}x images/s at equal parallelism "
                     f"({c['threads']} DALI threads vs {c['threads']} DataLoader workers)")
    if report.get("gpu_feed"):
        g = report["gpu_feed"]
        lines.append(f"GPU feed ({g['model']}, AMP {'on' if g['amp'] else 'off'}): the {g['bottleneck']} is the "
                     f"bottleneck (loader alone {g['loader_only_images_per_s']:.0f} img/s, model step alone "
                     f"{g['model_only']['images_per_s']:.0f} img/s)")
    return "\n".join(lines)
