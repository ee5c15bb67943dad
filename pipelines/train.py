"""Training role: random-resized-crop decode, flip, optional colour / hue jitter, auto-augment or AugMix,
normalize, optional rotation.

Random-resized-crop is done by the decoder itself (fn.decoders.image_random_crop), which picks
the crop window first and decodes only that region of the JPEG (ROI decode): at the default
area range (8%..100%) that skips a large part of the decoding work. The crop is then resized and
normalized in one step (pipelines.resize, which on the CPU backend avoids DALI's slow horizontal
resampling pass) unless auto-augment or AugMix must change the resized pixels in between. A rotation
comes after that step, on the normalized square views (rotate_views says why).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from nvidia.dali import fn, types

from kdkit.options import check_options
from kdkit.pipelines import common
from kdkit.pipelines.options import AUTO_AUGMENTS, Augment, RandomCrop
from kdkit.pipelines.config import Role, as_nchw
from kdkit.pipelines.resize import resized_view

if TYPE_CHECKING:
    from kdkit.pipelines.config import Backend, Output

JSD_VIEWS = ("images_augmix1", "images_augmix2")  # iterator outputs of the two AugMix views
__all__ = ["AUTO_AUGMENTS", "Augment", "RandomCrop", "Train"]


def decode_train(jpegs, crop: RandomCrop, backend: Backend):
    """Encoded JPEGs to random-resized-crop windows, uint8 HWC at the source resolution (on the GPU
    with the GPU backend); train_views resizes them."""
    return fn.decoders.image_random_crop(
        jpegs, device=backend.decoder, output_type=types.RGB, random_area=list(crop.random_area),
        random_aspect_ratio=list(crop.random_aspect_ratio), **backend.decoder_args())


def jitter_ranges(strength: float, hue: float = 0.0) -> list[list[float]]:
    """The ranges colour jitter draws from, uniformly: brightness, contrast and saturation factors in
    [1 - s, 1 + s] (torchvision's ColorJitter(s, s, s)), the hue in [-hue, hue] of a turn, in degrees."""
    return [[max(0.0, 1.0 - strength), 1.0 + strength]] * 3 + [[-360.0 * hue, 360.0 * hue]]


def jitter_factors(strength: float, hue: float = 0.0) -> tuple:
    """Per-sample (brightness, contrast, saturation, hue in degrees) drawn from jitter_ranges; 1 or 0
    where off."""
    ranges, off = jitter_ranges(strength, hue), (1.0, 1.0, 1.0, 0.0)
    on = (strength,) * 3 + (hue,)
    return tuple(fn.random.uniform(range=r) if v else o for r, v, o in zip(ranges, on, off))


def color_jitter(images, strength: float, hue: float = 0.0):
    """Colour jitter of uint8 images in one colour-twist pass (factors: jitter_factors). DALI's hue is a
    rotation in YIQ space, not torchvision's HSV shift: the same idea, slightly different colours."""
    brightness, contrast, saturation, hue_degrees = jitter_factors(strength, hue)
    return fn.color_twist(images, brightness=brightness, contrast=contrast, saturation=saturation, hue=hue_degrees)


def rotation_angles(degrees: float):
    """Per-sample rotation angle, uniform in [-degrees, degrees] (counter-clockwise positive)."""
    return fn.random.uniform(range=[-float(degrees), float(degrees)])


def fill_colour(augment: Augment, output: Output) -> list[float]:
    """The 0..255 RGB colour of the corners a rotation uncovers: the grey level asked for, else the mean."""
    return [float(augment.rotate_fill)] * 3 if augment.rotate_fill is not None else output.mean255


def rotation_input(augment: Augment, output: Output) -> Output:
    """What the resize + normalize step produces when a rotation follows: HWC float32 normalized around
    the fill colour, so that fn.rotate's one scalar fill value (0) is that colour in every channel."""
    fill = tuple(c / 255 for c in fill_colour(augment, output))
    return dataclasses.replace(output, layout="HWC", dtype="float32", mean=fill)


def rotate_views(views, angles, augment: Augment, output: Output):
    """Rotate normalized HWC views (from rotation_input) by `angles` degrees about their centre, keeping
    their size, then shift them to Output's mean and hand them over in its layout and dtype.

    Why here, after the resize: a random-resized crop of another aspect ratio is stretched to a square,
    and a rotation before that stretch would come out sheared; torchvision's RandomRotation (and Keras')
    also rotates the final-size image. Rotating the normalized floats keeps the CPU operator's fused
    resize + jitter + normalize as it is; training without rotation does not pass through here.
    """
    rotated = fn.rotate(views, angle=angles, keep_size=True, fill_value=0.0, interp_type=types.INTERP_LINEAR)
    fill = fill_colour(augment, output)
    # (x - fill) / std -> (x - mean) / std, with the transpose and cast in the same pass
    shift = [(m - f) / s for f, m, s in zip(fill, output.mean255, output.std255)]
    dtype = types.FLOAT if output.dtype == "float32" else types.FLOAT16
    return fn.crop_mirror_normalize(rotated, dtype=dtype, output_layout="CHW" if output.planar else "HWC",
                                    mean=shift, std=[1.0, 1.0, 1.0])


def auto_augment(images, policy: str, size: int, n: int = 2, m: int = 9):
    """DALI's auto_aug policies on uint8 HWC images (the pipeline needs enable_conditionals=True)."""
    from nvidia.dali.auto_aug import auto_augment as aa, rand_augment as ra, trivial_augment as ta

    shape = (size, size)  # translations scale with the image, as in timm
    if policy == "autoaugment":
        return aa.auto_augment(images, shape=shape)
    if policy == "randaugment":
        return ra.rand_augment(images, n=n, m=m, shape=shape)
    return ta.trivial_augment_wide(images, shape=shape)


def augment_resized(images, augment: Augment, size: int):
    """DALI's operators on resized uint8 HWC crops: colour jitter, then an auto-augment policy or AugMix
    (whose output is float)."""
    if augment.color_jitter or augment.hue:
        images = color_jitter(images, augment.color_jitter, augment.hue)
    if augment.auto_augment:
        images = auto_augment(images, augment.auto_augment, size, augment.randaugment_n, augment.randaugment_m)
    if augment.augmix:
        from kdkit.pipelines.augmix import augment_and_mix

        images = augment_and_mix(images, augment, size)
    return images


def train_views(crops, augment: Augment, output: Output, native_op: bool, mirror=0, resized=None):
    """Decoded crops -> augmented, normalized size x size training inputs, mirrored where `mirror`.

    With DALI's operators (GPU, no native operator, or a policy) the resize, the augmentation and the
    normalize are separate steps (`resized`: the crops already resized, to share them between views).
    With kdkit's CPU operator, colour and hue jitter are folded into its one pass: the same transform
    as fn.color_twist (tested), though DALI seeds the two graphs' random operators differently, so the
    two routes draw different (equally distributed) factors. A rotation follows either (rotate_views).
    """
    normalized = rotation_input(augment, output) if augment.rotate else output
    if native_op:
        jitter = augment.color_jitter or augment.hue
        color = jitter_factors(augment.color_jitter, augment.hue) if jitter else None
        views = resized_view(crops, normalized, True, mirror=mirror, color=color)
    else:
        if resized is None:
            resized = common.resize_square(crops, output.image_size, output.antialias)
        views = common.normalize(augment_resized(resized, augment, output.image_size), normalized, mirror=mirror)
    if augment.rotate:
        views = rotate_views(views, rotation_angles(augment.rotate), augment, output)
    return views


def jsd_views(crops, augment: Augment, output: Output, mirror=0) -> tuple:
    """AugMix with the Jensen-Shannon loss: three views of one crop and flip, as timm's AugMixDataset
    makes them: the clean one (resized, flipped, normalized) and two drawn independently with every
    augmentation asked for."""
    resized = common.resize_square(crops, output.image_size, output.antialias)
    clean = common.normalize(resized, output, mirror=mirror)
    return (clean, *(train_views(crops, augment, output, False, mirror, resized=resized) for _ in range(2)))


@dataclass(frozen=True)
class Train(Augment, RandomCrop, Role):
    """(images, labels[, teacher logits as stored | top-k values, top-k indices]) for training."""

    name = "train"
    shuffles = True
    last_batch = "drop"  # a shuffled set drops different samples each epoch; DDP steps stay equal-sized

    def __post_init__(self):
        check_options(self)

    def graph(self, members, teacher, output, backend):
        jpegs, cls = members
        crops, mirror = decode_train(jpegs, self, backend), common.random_flip(self.flip)
        labels, logits = backend.to_output(common.parse_label(cls)), common.teacher_outputs(teacher, backend)
        if self.augmix_jsd:
            clean, *augmixed = jsd_views(crops, self, output, mirror)
            return (clean, labels, *logits, *augmixed)
        native_op = self.resizer(backend) == "kdkit_resize_normalize"
        return (train_views(crops, self, output, native_op, mirror=mirror), labels, *logits)

    def output_names(self, teacher_kind):
        return Role.output_names(self, teacher_kind) + (list(JSD_VIEWS) if self.augmix_jsd else [])

    def batch(self, outputs, teacher_kind, channels_last):
        """With augmix_jsd the images are the clean views, then the first and the second AugMix views of
        the same samples (3 B images for B labels): the split-major order timm's JsdCrossEntropy reads."""
        b = Role.batch(self, outputs, teacher_kind, channels_last)
        if not self.augmix_jsd:
            return b
        views = [b.images, *(as_nchw(outputs[name], channels_last) for name in JSD_VIEWS)]
        return b._replace(images=torch.cat(views))
