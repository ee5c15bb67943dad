"""Training augmentations of issue 17 (pipelines.train, pipelines.augmix): rotation with its fill, AugMix
and its three JSD views, and the combinations the pipelines refuse."""
from __future__ import annotations

import os
import re
import warnings

import numpy as np
import pytest
import torch
from nvidia.dali import fn, types
from PIL import Image, ImageFilter

from kdkit.errors import OptionError
from kdkit.pipelines import DaliLoader, loader_config
from kdkit.pipelines.config import Output
from kdkit.pipelines.train import Augment

SIZE = 32
MEAN, STD = (0.5, 0.4, 0.3), (1 / 255,) * 3  # outputs in grey levels, shifted by the mean colour


def asymmetric(rng) -> np.ndarray:
    """An image whose rotation is easy to see: a bright bar in the upper left, a gradient, noise."""
    img = np.zeros((SIZE, SIZE, 3), np.uint8)
    img[..., 0] = np.linspace(0, 255, SIZE, dtype=np.uint8)[None, :]
    img[..., 1] = np.linspace(255, 0, SIZE, dtype=np.uint8)[:, None]
    img[4:10, 3:20] = 250
    img[..., 2] = rng.integers(0, 60, (SIZE, SIZE))
    return img


def run(graph, images, batch=None, conditionals=False):
    """Outputs of `graph(x)` on a batch of uint8 HWC images, as float arrays."""
    from nvidia.dali import pipeline_def

    @pipeline_def(batch_size=batch or len(images), num_threads=1, device_id=None, seed=7,
                  enable_conditionals=conditionals)
    def pipe():
        x = fn.external_source(source=lambda: images, batch=True, layout="HWC") if images else None
        out = graph(x)
        return out if isinstance(out, tuple) else (out,)

    with warnings.catch_warnings(record=True):  # DALI's auto_aug: its own deprecated aliases, forced to show
        p = pipe()
        p.build()
    n = batch or len(images)
    return [np.stack([np.asarray(o.at(i), np.float32) for i in range(n)]) for o in p.run()]


def loader(shards, **kw):
    return DaliLoader(shards, loader_config("train", batch_size=4, num_threads=2, image_size=SIZE, shuffle_buffer=16,
                                            **kw))


# ---------------------------------------------------------------------------------------------
# rotation

@pytest.mark.parametrize("native_op", [True, False])
@pytest.mark.parametrize("fill", [None, 200.0])
def test_rotation_is_pils_rotation_with_the_fill_asked_for(native_op, fill):
    from kdkit.pipelines import common
    from kdkit.pipelines.resize import native_available, resized_view
    from kdkit.pipelines.config import Backend
    from kdkit.pipelines.train import rotate_views, rotation_input

    if native_op and not native_available(Backend()):
        pytest.skip("no C++ compiler: the CPU pipelines use fn.resize")
    images = [asymmetric(np.random.default_rng(i)) for i in range(2)]
    angles = [25.0, -70.0]
    augment, output = Augment(rotate=90, rotate_fill=fill), Output(image_size=SIZE, mean=MEAN, std=STD, layout="HWC")

    def graph(x):
        angle = fn.external_source(source=lambda: [np.float32(a) for a in angles], batch=True)
        normalized = rotation_input(augment, output)
        views = resized_view(x, normalized, True) if native_op else common.normalize(x, normalized)
        return rotate_views(views, angle, augment, output)

    (got,) = run(graph, images)
    colour = np.array([fill] * 3 if fill is not None else [m * 255 for m in MEAN], np.float32)
    for img, angle, out in zip(images, angles, got):
        pil = Image.fromarray(img).rotate(angle, Image.BILINEAR, fillcolor=tuple(int(round(c)) for c in colour))
        want = np.asarray(pil, np.float32) - np.array(MEAN, np.float32) * 255
        inside = np.asarray(Image.fromarray(np.full((SIZE, SIZE), 255, np.uint8)).rotate(angle, Image.NEAREST)) == 255
        assert out.shape == (SIZE, SIZE, 3)
        # the same rotation (direction and centre): pixels within a few grey levels but at the rotated
        # image's edges, where the two interpolate between image and fill differently
        core = np.asarray(Image.fromarray(inside.astype(np.uint8) * 255).filter(ImageFilter.MinFilter(5))) > 0
        assert np.abs(out - want)[core].mean() < 3, angle
        assert np.abs(out - np.asarray(img, np.float32) + np.array(MEAN) * 255)[core].mean() > 10  # it did rotate
        # the corners the rotation uncovers hold the fill colour, in Output's normalization
        corner = out[0, 0] if not inside[0, 0] else out[-1, -1]
        np.testing.assert_allclose(corner, colour - np.array(MEAN) * 255, atol=0.5)


def test_drawn_angles_stay_within_the_range_and_use_both_directions():
    from kdkit.pipelines.train import rotation_angles

    (angles,) = run(lambda _: rotation_angles(12.5), [], batch=256)
    assert angles.min() >= -12.5 and angles.max() <= 12.5
    assert angles.min() < -6 and angles.max() > 6  # spread over the range, not one side


@pytest.mark.parametrize("native_resize", [True, False])
def test_training_loader_rotates_and_hands_over_the_usual_batch(tiny_shards, native_resize):
    kw = dict(native_resize=native_resize, seed=3, flip=False, random_area=(1.0, 1.0), random_aspect_ratio=(1.25, 1.25))
    plain = next(iter(loader(tiny_shards, **kw))).images
    rotated = next(iter(loader(tiny_shards, rotate=40, hue=0.1, **kw))).images
    assert rotated.shape == plain.shape == (4, 3, SIZE, SIZE) and rotated.dtype == plain.dtype
    # whole images, same samples (same seed and reader order): the rotation and hue moved the pixels
    assert (rotated - plain).abs().mean() > 0.1


# ---------------------------------------------------------------------------------------------
# AugMix

@pytest.mark.slow
def test_augmix_changes_the_images_and_stays_in_range():
    from kdkit.pipelines.augmix import augment_and_mix

    images = [asymmetric(np.random.default_rng(i)) for i in range(8)]
    augment = Augment(augmix=True, augmix_width=2, augmix_depth=1, augmix_severity=10)
    (got,) = run(lambda x: augment_and_mix(x, augment, SIZE), images, conditionals=True)
    assert got.shape == (8, SIZE, SIZE, 3)
    assert got.min() >= 0 and got.max() <= 255
    diff = np.abs(got - np.stack(images).astype(np.float32)).mean(axis=(1, 2, 3))
    assert (diff > 0.5).mean() >= 0.5  # most samples changed (a Beta(1, 1) skip weight near 0 leaves a few)


def test_augmix_weights_are_dirichlet():
    from kdkit.pipelines.augmix import dirichlet_weights

    (w1, w2, w3) = run(lambda _: tuple(fn.cast(w, dtype=types.FLOAT) for w in dirichlet_weights(3, 1.0)), [], batch=512)
    w = np.stack([w1, w2, w3], axis=1)
    assert (w >= 0).all() and np.allclose(w.sum(axis=1), 1, atol=1e-5)
    # Dirichlet(1, 1, 1): each weight has mean 1/3, and the stick-breaking order does not show
    assert np.abs(w.mean(axis=0) - 1 / 3).max() < 0.05


@pytest.mark.slow
def test_jsd_loader_yields_clean_and_two_augmix_views_of_one_crop(tiny_shards):
    kw = dict(augmix=True, augmix_width=1, augmix_depth=1, augmix_severity=10, seed=5)
    batch = next(iter(loader(tiny_shards, augmix_jsd=True, **kw)))
    assert batch.images.shape == (12, 3, SIZE, SIZE) and batch.labels.shape[0] == 4
    clean, a1, a2 = batch.images.split(4)
    assert torch.isfinite(batch.images).all()
    # the same crop and flip: the views differ by AugMix alone, so they stay close to the clean view
    # and to each other far more than different samples do
    same = (clean - a1).abs().mean() + (clean - a2).abs().mean()
    other = (clean - clean.roll(1, 0)).abs().mean() * 2
    assert 0 < same < other and (a1 - a2).abs().mean() > 0


@pytest.mark.parametrize("options,named", [
    (dict(rotate=-5), "rotate=-5: expected a number 0 <= rotate <= 180"), (dict(rotate=200), "rotate=200"),
    (dict(rotate_fill=300), "rotate_fill=300"), (dict(hue=0.6), "hue=0.6: expected a number 0 <= hue <= 0.5"),
    (dict(hue=-0.1), "hue=-0.1"), (dict(augmix_severity=0), "augmix_severity=0: expected an integer 1 <= augmix_severity <= 10"),
    (dict(augmix_width=0), "augmix_width=0"), (dict(augmix_depth=4), "augmix_depth=4"),
    (dict(augmix_alpha=0), "augmix_alpha=0"), (dict(augmix_jsd=True), "augmix_jsd=True: expected augmix=True"),
    (dict(augmix=True, auto_augment="randaugment"), "AugMix and auto_augment='randaugment' exclude each other")])
def test_nonsense_augmentation_options_are_refused(options, named):
    with pytest.raises(OptionError, match=re.escape(named)):
        loader_config("train", **options)


@pytest.mark.parametrize("options,named", [(dict(rotate=10), "rotate=10.0: expected 0 with replay"),
                                           (dict(augmix=True, augmix_jsd=True), "augmix_jsd=True")])
def test_replay_refuses_what_would_break_crop_exactness(options, named):
    with pytest.raises(OptionError, match=re.escape(named)):
        loader_config("replay", **options)
    with pytest.raises(OptionError, match="rotate: not a loader option of role 'teacher_views'"):
        loader_config("teacher_views", rotate=10)


@pytest.mark.parametrize("extra", [dict(rotate=20, hue=0.1, color_jitter=0.4),
                                   dict(augmix=True, augmix_jsd=True, augmix_width=2, rotate=10, rotate_fill=0)])
@pytest.mark.slow
def test_gpu_graphs_are_well_formed_without_a_gpu(tiny_shards, extra):
    from kdkit.pipelines.config import loader_config as make
    from kdkit.pipelines.loader import build_pipeline
    from kdkit.shards.reader import resolve_shards

    # defining the graph checks every CPU/GPU placement (the AugMix weights drawn on the CPU, used on the GPU)
    with warnings.catch_warnings(record=True):
        pipe = build_pipeline(make("train", device="gpu", device_id=0, batch_size=4, image_size=SIZE, **extra),
                              resolve_shards(tiny_shards), teacher_kind=False)
    assert pipe.device_id == 0


from conftest import cuda_only as gpu  # noqa: E402


@gpu
def test_gpu_training_views_rotate_and_augmix_on_the_device(tiny_shards):
    device_id = int(os.environ.get("LOCAL_RANK", 0))
    for extra in (dict(rotate=30, hue=0.2), dict(augmix=True, augmix_jsd=True)):
        batch = next(iter(loader(tiny_shards, device="gpu", device_id=device_id, **extra)))
        assert batch.images.is_cuda and torch.isfinite(batch.images).all()
        assert batch.images.shape[0] == (12 if extra.get("augmix_jsd") else 4)
