"""Training role: random-resized-crop decode, flip, optional colour jitter and auto-augment, normalize.

Random-resized-crop is done by the decoder itself (fn.decoders.image_random_crop), which picks
the crop window first and decodes only that region of the JPEG (ROI decode): at the default
area range (8%..100%) that skips a large part of the decoding work. The crop is then resized and
normalized in one step (pipelines.resize, which on the CPU backend avoids DALI's slow horizontal
resampling pass) unless auto-augment must change the resized pixels in between.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from nvidia.dali import fn, types

from kdkit.pipelines import common
from kdkit.pipelines.config import Role, check, range_pair
from kdkit.pipelines.resize import native_available, resized_view

if TYPE_CHECKING:
    from kdkit.pipelines.config import Backend, Output

AUTO_AUGMENTS = ("autoaugment", "randaugment", "trivialaugment")


@dataclass(frozen=True)
class RandomCrop:
    """Random-resized-crop windows and flips (training crops, the teacher's random views)."""

    random_area: tuple[float, float] = (0.08, 1.0)  # share of the image area
    random_aspect_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # width / height
    flip: bool = True  # mirror half of them

    def check_crop(self) -> None:
        range_pair("random_area", self.random_area, 0.0, 1.0)
        range_pair("random_aspect_ratio", self.random_aspect_ratio, 0.0, None)
        object.__setattr__(self, "random_area", tuple(float(v) for v in self.random_area))
        object.__setattr__(self, "random_aspect_ratio", tuple(float(v) for v in self.random_aspect_ratio))


@dataclass(frozen=True)
class Augment:
    """Photometric and policy augmentation of training crops."""

    color_jitter: float = 0.0  # brightness/contrast/saturation strength, 0 = off
    auto_augment: str | None = None  # "autoaugment" | "randaugment" | "trivialaugment"
    randaugment_n: int = 2
    randaugment_m: int = 9

    def resizer(self, backend: Backend) -> str:
        """Training crops (train, replay) go through kdkit's CPU operator where it is available, except
        with an auto-augment policy: those need the resized uint8 pixels, so they keep fn.resize."""
        native = native_available(backend) and not self.auto_augment
        return "kdkit_resize_normalize" if native else "fn.resize"

    def conditionals(self) -> bool:
        """DALI's auto_aug policies need conditionals in the graph."""
        return bool(self.auto_augment)

    def check_augment(self) -> None:
        check(isinstance(self.color_jitter, (int, float)) and self.color_jitter >= 0, "color_jitter",
              self.color_jitter, "a strength >= 0 (0 = off)")
        check(self.auto_augment is None or self.auto_augment in AUTO_AUGMENTS, "auto_augment", self.auto_augment,
              f"None or one of {', '.join(AUTO_AUGMENTS)}")
        check(isinstance(self.randaugment_n, int) and self.randaugment_n >= 0, "randaugment_n", self.randaugment_n,
              "an integer >= 0")
        check(isinstance(self.randaugment_m, int) and 0 <= self.randaugment_m <= 30, "randaugment_m",
              self.randaugment_m, "0..30 (DALI's magnitude bins)")


def decode_train(jpegs, crop: RandomCrop, backend: Backend):
    """Encoded JPEGs to random-resized-crop windows, uint8 HWC at the source resolution (on the GPU
    with the GPU backend); train_views resizes them."""
    return fn.decoders.image_random_crop(
        jpegs, device=backend.decoder, output_type=types.RGB, random_area=list(crop.random_area),
        random_aspect_ratio=list(crop.random_aspect_ratio), **backend.decoder_args())


def jitter_factors(strength: float) -> tuple:
    """Per-sample (brightness, contrast, saturation) factors, each uniform in [1 - s, 1 + s]
    (torchvision's ColorJitter(s, s, s) without hue)."""
    def factor():
        return fn.random.uniform(range=[max(0.0, 1.0 - strength), 1.0 + strength])
    return factor(), factor(), factor()


def color_jitter(images, strength: float):
    """Colour jitter of uint8 images in one colour-twist pass (factors: jitter_factors)."""
    brightness, contrast, saturation = jitter_factors(strength)
    return fn.color_twist(images, brightness=brightness, contrast=contrast, saturation=saturation)


def auto_augment(images, policy: str, size: int, n: int = 2, m: int = 9):
    """DALI's auto_aug policies on uint8 HWC images (the pipeline needs enable_conditionals=True)."""
    from nvidia.dali.auto_aug import auto_augment as aa, rand_augment as ra, trivial_augment as ta

    shape = (size, size)  # translations scale with the image, as in timm
    if policy == "autoaugment":
        return aa.auto_augment(images, shape=shape)
    if policy == "randaugment":
        return ra.rand_augment(images, n=n, m=m, shape=shape)
    return ta.trivial_augment_wide(images, shape=shape)


def train_views(crops, augment: Augment, output: Output, native_op: bool, mirror=0):
    """Decoded crops -> augmented, normalized size x size training inputs, mirrored where `mirror`.

    With DALI's operators (GPU, no native operator, or auto-augment) the resize, the augmentation
    and the normalize are separate steps. With kdkit's CPU operator, colour jitter is folded into
    its one pass: the same transform as fn.color_twist (tested), though DALI seeds the two graphs'
    random operators differently, so the two routes draw different (equally distributed) factors.
    """
    if native_op:
        color = jitter_factors(augment.color_jitter) if augment.color_jitter else None
        return resized_view(crops, output, True, mirror=mirror, color=color)
    images = common.resize_square(crops, output.image_size, output.antialias)
    if augment.color_jitter:
        images = color_jitter(images, augment.color_jitter)
    if augment.auto_augment:
        images = auto_augment(images, augment.auto_augment, output.image_size, augment.randaugment_n,
                              augment.randaugment_m)
    return common.normalize(images, output, mirror=mirror)


@dataclass(frozen=True)
class Train(Augment, RandomCrop, Role):
    """(images, labels[, teacher logits as stored | top-k values, top-k indices]) for training."""

    name = "train"
    shuffles = True
    last_batch = "drop"  # a shuffled set drops different samples each epoch; DDP steps stay equal-sized

    def __post_init__(self):
        self.check_crop()
        self.check_augment()

    def graph(self, members, teacher, output, backend):
        jpegs, cls = members
        native_op = self.resizer(backend) == "kdkit_resize_normalize"
        images = train_views(decode_train(jpegs, self, backend), self, output, native_op,
                             mirror=common.random_flip(self.flip))
        return (images, backend.to_output(common.parse_label(cls)), *common.teacher_outputs(teacher, backend))
