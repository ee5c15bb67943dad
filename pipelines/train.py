"""Training pipeline: random-resized-crop decode, flip, optional colour jitter and auto-augment,
normalize.

Random-resized-crop is done by the decoder itself (fn.decoders.image_random_crop), which picks
the crop window first and decodes only that region of the JPEG (ROI decode): at the default
area range (8%..100%) that skips a large part of the decoding work. The crop is then resized and
normalized in one step (pipelines.resize, which on the CPU backend avoids DALI's slow horizontal
resampling pass) unless colour jitter or auto-augment must change the pixels in between.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from nvidia.dali import fn, pipeline_def, types

from kdkit.pipelines import common, resize

if TYPE_CHECKING:
    from kdkit.pipelines.loader import LoaderConfig
    from kdkit.pipelines.shardset import ShardSet

AUTO_AUGMENTS = ("autoaugment", "randaugment", "trivialaugment")


def decode_train(jpegs, cfg: LoaderConfig):
    """Encoded JPEGs to random-resized-crop windows, uint8 HWC at the source resolution (on the GPU
    when cfg.device == "gpu"); train_views resizes them."""
    return fn.decoders.image_random_crop(
        jpegs, device=common.decoder_device(cfg), output_type=types.RGB,
        random_area=list(cfg.random_area), random_aspect_ratio=list(cfg.random_aspect_ratio),
        **common.decoder_args(cfg))


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


def auto_augment(images, cfg: LoaderConfig):
    """DALI's auto_aug policies on uint8 HWC images (the pipeline needs enable_conditionals=True)."""
    from nvidia.dali.auto_aug import auto_augment as aa, rand_augment as ra, trivial_augment as ta

    shape = (cfg.image_size, cfg.image_size)  # translations scale with the image, as in timm
    if cfg.auto_augment == "autoaugment":
        return aa.auto_augment(images, shape=shape)
    if cfg.auto_augment == "randaugment":
        return ra.rand_augment(images, n=cfg.randaugment_n, m=cfg.randaugment_m, shape=shape)
    if cfg.auto_augment == "trivialaugment":
        return ta.trivial_augment_wide(images, shape=shape)
    raise ValueError(f"auto_augment={cfg.auto_augment!r}: expected one of {AUTO_AUGMENTS} or None")


def augment_train(images, cfg: LoaderConfig):
    """Photometric and policy augmentation on the resized crops; flipping is left to normalize()."""
    if cfg.color_jitter:
        images = color_jitter(images, cfg.color_jitter)
    if cfg.auto_augment:
        images = auto_augment(images, cfg)
    return images


def train_views(crops, cfg: LoaderConfig, mirror=0):
    """Decoded crops -> augmented, normalized size x size training inputs, mirrored where `mirror`.

    With DALI's operators (GPU, no native operator, or auto-augment: resize.resizer decides) the
    resize, the augmentation and the normalize are separate steps. With kdkit's CPU operator,
    colour jitter is folded into its one pass: the same transform as fn.color_twist (tested),
    though DALI seeds the two graphs' random operators differently, so the two routes draw
    different (equally distributed) factors.
    """
    if resize.resizer(cfg, "train") == "fn.resize":
        return common.normalize(augment_train(common.resize_square(crops, cfg), cfg), cfg, mirror=mirror)
    color = jitter_factors(cfg.color_jitter) if cfg.color_jitter else None
    return resize.resized_view(crops, cfg, mirror=mirror, color=color)


def needs_conditionals(cfg: LoaderConfig) -> bool:
    return bool(cfg.auto_augment)


@pipeline_def
def train_pipeline(shards: ShardSet, cfg: LoaderConfig, shard_id: int = 0, num_shards: int = 1,
                   with_logits: bool | str = False):
    """(images, labels[, teacher logits as stored | top-k values, top-k indices]) for training a student."""
    exts = [common.IMAGE_EXT, common.LABEL_EXT] + common.teacher_exts(with_logits)
    members = common.read_shards(shards, exts, cfg, shard_id, num_shards, shuffle=cfg.shuffle,
                                 missing=cfg.missing)
    images = train_views(decode_train(members[0], cfg), cfg, mirror=common.random_flip(cfg))
    labels = common.to_output_device(common.parse_label(members[1]), cfg)
    if not with_logits:
        return images, labels
    return (images, labels, *common.teacher_outputs(members[2:], cfg))
