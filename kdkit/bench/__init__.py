"""Benchmarks: `kdkit bench-loader` (DALI pipelines against a DataLoader + Pillow baseline).

BenchConfig is every option of the command, declared once (kdkit.options): its own, and the
training augmentation it inherits from the DALI roles' declarations (kdkit.pipelines.options), so a
new augmentation is measurable here as soon as the baseline knows its torchvision counterpart
(loader_bench.baseline_transform). Kept import-light: the CLI builds its parser from it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kdkit.options import AUGMENT, DATA, DEVICE, RUN, check_options, option, option_fields, same_as
from kdkit.pipelines.options import Augment, Backend, Output, RandomCrop, Reading

# augmentation presets both loaders implement (DALI graph / torchvision transforms); "eval": the centre crop
AUGS = ("rrc-flip", "rrc-flip-jitter", "randaugment", "autoaugment", "trivialaugment", "augmix", "eval")
JITTER = 0.4  # colour jitter strength of "rrc-flip-jitter" (timm's default color_jitter)
PRESETS = {"rrc-flip-jitter": {"color_jitter": JITTER}, "randaugment": {"auto_augment": "randaugment"},
           "autoaugment": {"auto_augment": "autoaugment"}, "trivialaugment": {"auto_augment": "trivialaugment"},
           "augmix": {"augmix": True}}


@dataclass(frozen=True)
class BenchConfig(Augment, RandomCrop):
    shards: Path  # a shard-set folder, or a dataset root holding `split`
    split: str = option("train", "split to read from a dataset root", DATA)
    batch_size: int = same_as(Reading, "batch_size", help="batch size of both loaders")
    threads: int = same_as(Backend, "num_threads", default=2, help="DALI num_threads and DataLoader num_workers "
                                                                   "(equal parallelism)")
    size: int = same_as(Output, "image_size", help="output resolution (square)")
    aug: str = option("rrc-flip", "augmentation preset of both loaders: random-resized crop + flip, with colour "
                                  "jitter, a policy or AugMix; eval: the centre crop. The augmentation options below "
                                  "add to it", AUGMENT, choices=AUGS)
    device: str = option("auto", "DALI backend (auto: the GPU where torch sees one; the table says which ran)",
                         DEVICE, choices=("auto", "cpu", "gpu"))
    dtype: str = same_as(Output, "dtype", help="DALI output type", group=DEVICE)
    batches: int = option(50, "measured batches per loader", RUN, low=1)
    warmup: int = option(5, "batches run before timing starts", RUN, low=0)
    repeats: int = option(1, "measurements per loader, alternating DALI and baseline; the median is reported", RUN,
                          low=1)
    shuffle_buffer: int = same_as(Reading, "shuffle_buffer", default=1024, help="shuffle buffer of both loaders")
    baseline: bool = option(True, "also run the DataLoader + Pillow baseline", RUN)
    antialias: bool = same_as(Output, "antialias", help="antialiased DALI resize (Pillow always antialiases: off is "
                                                        "faster, not equivalent)")
    fast_idct: bool = same_as(Backend, "fast_idct", help="DALI decodes with libjpeg-turbo's fast IDCT (Pillow uses "
                                                         "the exact one: faster, not bit-equal)")
    native_resize: bool = same_as(Backend, "native_resize", group=DEVICE)
    hw_decoder_load: float | None = same_as(Backend, "hw_decoder_load")  # the GPU decoder (DECODING)
    preallocate_width_hint: int | None = same_as(Backend, "preallocate_width_hint")
    preallocate_height_hint: int | None = same_as(Backend, "preallocate_height_hint")
    gpu_feed: str | None = option(None, "also time a training step of this timm model (AMP on GPU), e.g. resnet50 "
                                        "(default: none)", DEVICE, none=True)

    def __post_init__(self):
        check_options(self)

    def refusals(self):
        extra = [n for n in ("rotate", "hue", "color_jitter") if getattr(self, n)]
        return [
            (self.aug == "eval" and bool(extra), f"{extra[0] if extra else 'rotate'}: a training augmentation; use "
                                                 "a train --aug with it, not eval"),
            (self.augmix_jsd, "augmix_jsd=True: the benchmark measures one view per image; leave --augmix-jsd out"),
        ] + Augment.refusals(self.augment())

    def augment(self) -> Augment:
        """The training augmentation measured: the options given, with --aug's preset where they left the
        default (an explicit option wins; a contradiction, e.g. --aug randaugment --augmix, is refused)."""
        values = {name: getattr(self, name) for name in option_fields(Augment)}
        for name, value in PRESETS.get(self.aug, {}).items():
            if values[name] == option_fields(Augment)[name].default:
                values[name] = value
        return Augment(**values)

    def crop_options(self) -> dict:
        return {name: getattr(self, name) for name in option_fields(RandomCrop)}
