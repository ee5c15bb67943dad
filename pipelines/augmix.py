"""AugMix (Hendrycks et al., 2020) in the DALI graph, as timm defines it (timm.data.auto_augment,
AugMixAugment with augment_and_mix_transform's defaults), from DALI's auto_aug operations:

    chain_i  = op_d(...op_1(x)), d = depth or drawn from 1..3, each op drawn uniformly from
               timm's 13 AugMix operations at a magnitude drawn uniformly from 0..severity
    mixed    = clip(sum_i w_i chain_i, 0, 255),  w ~ Dirichlet(alpha, ..., alpha) over width chains
    out      = (1 - m) x + m mixed,              m ~ Beta(alpha, alpha)

DALI provides the operations (nvidia.dali.auto_aug.augmentations, given timm's magnitude ranges)
and draws op and magnitude as its TrivialAugment does (apply_trivial_augment: one uniformly chosen op
at a uniformly chosen magnitude bin, sign at random), so a chain is that step repeated. What DALI
lacks is the mix: it has no Dirichlet draw, so the weights come from Beta draws by stick-breaking
(w_i = v_i * prod_{j<i} (1 - v_j), v_i ~ Beta(alpha, (width - 1 - i) alpha): exactly Dirichlet),
and the weighted sum is plain graph arithmetic. Differences from timm, all small: magnitudes are
drawn from 31 bins instead of a continuous range, the fill of geometric ops is grey 128 (timm's
default fill without an image mean), and the result stays float (timm rounds to uint8 twice).

Needs a pipeline with enable_conditionals=True (the depth and the op choice are per-sample branches).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import nvidia.dali.math as dmath
from nvidia.dali import fn, types

if TYPE_CHECKING:
    from kdkit.pipelines.train import Augment

MAGNITUDE_BINS = 31
FILL = 128  # grey, as timm's AugMix ops fill without hparams["img_mean"]


def augmix_ops(severity: int) -> list:
    """timm's _AUGMIX_TRANSFORMS at magnitude `severity` (level = severity / 10 of each op's maximum)."""
    from nvidia.dali.auto_aug import augmentations as a

    level = severity / 10
    enhance = (0.0, 0.9 * level)  # timm: factor 1 +- 0.9 level ("Increasing" variants)
    return [
        a.auto_contrast, a.equalize,
        a.color.augmentation(mag_range=enhance), a.contrast.augmentation(mag_range=enhance),
        a.brightness.augmentation(mag_range=enhance), a.sharpness.augmentation(mag_range=enhance),
        a.rotate.augmentation(mag_range=(0.0, 30.0 * level)),
        a.posterize.augmentation(mag_range=(4.0, 4.0 - 4.0 * level)),  # bits kept: 4 - 4 level
        a.solarize.augmentation(mag_range=(256.0, 256.0 - 256.0 * level)),  # threshold
        a.shear_x.augmentation(mag_range=(0.0, 0.3 * level)), a.shear_y.augmentation(mag_range=(0.0, 0.3 * level)),
        a.translate_x.augmentation(mag_range=(0.0, 0.45 * level)),  # share of the width
        a.translate_y.augmentation(mag_range=(0.0, 0.45 * level)),
    ]


def augmix_chain(images, ops: list, depth: int, size: int):
    """One chain: `depth` random ops (depth -1: 1, 2 or 3, drawn per sample)."""
    from nvidia.dali.auto_aug.trivial_augment import apply_trivial_augment

    def step(x):
        return apply_trivial_augment(ops, x, num_magnitude_bins=MAGNITUDE_BINS, shape=(size, size),
                                     fill_value=FILL)

    x = step(images)
    if depth > 0:
        for _ in range(depth - 1):
            x = step(x)
        return x
    drawn = fn.random.uniform(values=[1, 2, 3], dtype=types.INT32)
    if drawn > 1:
        x = step(x)
    if drawn > 2:
        x = step(x)
    return x


def dirichlet_weights(width: int, alpha: float) -> list:
    """`width` per-sample weights ~ Dirichlet(alpha, ..., alpha), by stick-breaking with Beta draws."""
    weights, rest = [], 1.0
    for i in range(width - 1):
        v = fn.random.beta(alpha=float(alpha), beta=float((width - 1 - i) * alpha))
        weights.append(rest * v)
        rest = rest * (1.0 - v)
    return weights + [rest]


def augment_and_mix(images, augment: Augment, size: int):
    """AugMix of resized uint8 HWC images (size x size): float HWC images in 0..255."""
    ops = augmix_ops(augment.augmix_severity)
    on_gpu = images.device == "gpu"

    def here(node):  # per-sample weights are drawn on the CPU; GPU arithmetic wants them there
        return node.gpu() if on_gpu and not isinstance(node, float) else node

    original = fn.cast(images, dtype=types.FLOAT)
    mixed = None
    for w in dirichlet_weights(augment.augmix_width, augment.augmix_alpha):
        term = here(w) * fn.cast(augmix_chain(images, ops, augment.augmix_depth, size), dtype=types.FLOAT)
        mixed = term if mixed is None else mixed + term
    mixed = dmath.clamp(mixed, 0.0, 255.0)
    m = here(fn.random.beta(alpha=float(augment.augmix_alpha), beta=float(augment.augmix_alpha)))
    return original + m * (mixed - original)
