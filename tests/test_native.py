"""kdkit's DALI CPU operator (pipelines/native): Pillow's pixels, the layouts and dtypes the
pipelines ask for, the fallback to DALI's operators, and a clear warning when it cannot be built."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kdkit.pipelines import native
from kdkit.pipelines import DaliLoader, loader_config

SIZE = 32
# odd shapes on purpose: 1 pixel, one-pixel-wide strips, exact size, shrink 5x, enlarge 10x
SHAPES = [(1, 1), (1, 90), (70, 1), (32, 32), (160, 120), (3, 5), (41, 59), (20, 200)]


@pytest.fixture(scope="module")
def plugin():
    """The built plugin; skipped only where there is no C++ compiler at all (as CUDA tests skip
    without CUDA), a failed build with a compiler present is a failure."""
    if not native.available():
        if not native.compiler():
            pytest.skip("no C++ compiler: the CPU pipelines use fn.resize")
        pytest.fail(f"the native operator did not build: {native._state['why']}")
    return native._state["path"]


def smooth_and_sharp(rng, h, w):
    """Half noise (worst case for a resize filter), half smooth gradient."""
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    img[:, : w // 2] = np.linspace(0, 255, max(1, w // 2), dtype=np.uint8)[None, :, None]
    return img


def run_op(images, flips, **kw):
    from nvidia.dali import fn, pipeline_def

    @pipeline_def(batch_size=len(images), num_threads=2, device_id=None)
    def pipe():
        x = fn.external_source(source=lambda: images, batch=True, layout="HWC")
        m = fn.external_source(source=lambda: [np.int32(f) for f in flips], batch=True)
        return fn.kdkit_resize_normalize(x, size=SIZE, mirror=m, **kw)

    p = pipe()
    p.build()
    out = p.run()[0]
    return [np.asarray(out.at(i), np.float32) for i in range(len(images))], out.layout()


def test_matches_pillow_within_its_rounding(plugin):
    # Pillow rounds to uint8 after each of its two passes; the operator keeps floats, so <= 1 level
    rng = np.random.default_rng(0)
    images = [smooth_and_sharp(rng, h, w) for h, w in SHAPES]
    flips = [i % 2 for i in range(len(images))]
    got, layout = run_op(images, flips, planar=False)
    assert layout == "HWC"
    for img, flip, out in zip(images, flips, got):
        want = np.asarray(Image.fromarray(img).resize((SIZE, SIZE), Image.BILINEAR), np.float32)
        want = want[:, ::-1] if flip else want
        assert out.shape == (SIZE, SIZE, 3)
        assert np.abs(out - want).max() <= 1.0, img.shape


def test_layout_dtype_and_normalization(plugin):
    rng = np.random.default_rng(1)
    images = [smooth_and_sharp(rng, 50, 70), smooth_and_sharp(rng, 20, 25)]
    mean, std = [10.0, 100.0, 200.0], [2.0, 50.0, 0.5]
    hwc, _ = run_op(images, [0, 1], planar=False)
    chw16, layout = run_op(images, [0, 1], planar=True, half=True, mean=mean, std=std)
    assert layout == "CHW"
    for raw, out in zip(hwc, chw16):
        want = (raw.transpose(2, 0, 1) - np.array(mean)[:, None, None]) / np.array(std)[:, None, None]
        assert out.shape == (3, SIZE, SIZE)
        np.testing.assert_allclose(out, want, rtol=2e-3, atol=2e-3)  # float16 resolution


@pytest.mark.parametrize("factors", [(1.3, 1.0, 1.0, 0.0), (1.0, 0.6, 1.0, 0.0), (1.0, 1.0, 0.3, 0.0),
                                     (0.7, 1.4, 1.6, 0.0), (1.0, 1.0, 1.0, 40.0), (1.0, 1.0, 1.0, -180.0),
                                     (0.8, 1.2, 1.5, -72.0)])
def test_colour_jitter_is_dalis_color_twist(plugin, factors):
    from nvidia.dali import fn, pipeline_def, types

    rng = np.random.default_rng(3)
    images = [smooth_and_sharp(rng, 45, 61), smooth_and_sharp(rng, 20, 26)]
    brightness, contrast, saturation, hue = factors

    @pipeline_def(batch_size=2, num_threads=1, device_id=None)
    def pipe():
        x = fn.external_source(source=lambda: images, batch=True, layout="HWC")
        resized = fn.resize(x, size=[SIZE, SIZE], interp_type=types.INTERP_LINEAR, antialias=True)
        twisted = fn.color_twist(resized, brightness=brightness, contrast=contrast, saturation=saturation, hue=hue)
        ours = fn.kdkit_resize_normalize(x, size=SIZE, planar=False, brightness=brightness, contrast=contrast,
                                         saturation=saturation, hue=hue)
        plain = fn.kdkit_resize_normalize(x, size=SIZE, planar=False)
        return twisted, ours, plain, fn.hue(resized, hue=hue)

    p = pipe()
    p.build()
    twisted, ours, plain, hued = (np.stack([np.asarray(o.at(i), np.float32) for i in range(2)]) for o in p.run())
    assert ours.min() >= 0 and ours.max() <= 255  # clamped like the uint8 result
    # fn.color_twist works on fn.resize's rounded uint8 pixels and rounds again: within 2 levels
    assert np.abs(ours - twisted)[:, 2:-2, 2:-2].max() <= 2.0
    assert np.abs(ours - plain).mean() > 5  # and the factors do change the pixels
    if factors[:3] == (1.0, 1.0, 1.0):  # a hue change alone is fn.hue's too
        assert np.abs(ours - hued)[:, 2:-2, 2:-2].max() <= 2.0


def test_without_antialias_is_dalis_bilinear(plugin):
    from nvidia.dali import fn, pipeline_def, types

    rng = np.random.default_rng(2)
    images = [smooth_and_sharp(rng, 160, 120), smooth_and_sharp(rng, 12, 20)]

    @pipeline_def(batch_size=2, num_threads=1, device_id=None)
    def pipe():
        x = fn.external_source(source=lambda: images, batch=True, layout="HWC")
        return fn.resize(x, size=[SIZE, SIZE], interp_type=types.INTERP_LINEAR, antialias=False)

    p = pipe()
    p.build()
    ref = p.run()[0]
    got, _ = run_op(images, [0, 0], planar=False, antialias=False)
    for i, out in enumerate(got):
        # away from the border (where DALI repeats the edge pixel) the same bilinear samples
        diff = np.abs(out - np.asarray(ref.at(i), np.float32))[2:-2, 2:-2]
        assert diff.max() <= 1.0
    # shrinking 5x without antialiasing is not the antialiased result: the switch does something
    smooth, _ = run_op(images[:1], [0], planar=False)
    assert np.abs(got[0] - smooth[0]).mean() > 5


def loader_images(shards, role, **kw):
    cfg = loader_config(role, batch_size=8, num_threads=2, image_size=SIZE, shuffle=False, seed=3,
                        last_batch="partial", mean=(0.0, 0.0, 0.0), std=(1 / 255,) * 3, **kw)
    batches = list(DaliLoader(shards, cfg))
    if role == "teacher_views":  # centre view and the K random views, side by side
        return torch.cat([torch.cat([b.center[:, None], b.views], 1) for b in batches])
    return torch.cat([b.images for b in batches])


@pytest.mark.parametrize("role,kw", [
    ("train", {}), ("eval", dict(crop_ratio=0.8)), ("eval", dict(crop_ratio=0.7, views="tencrop")),
    ("eval", dict(crop_ratio=1.0, views="flip")), ("teacher_views", dict(crop_ratio=0.8, num_views=2))])
def test_pipelines_fall_back_to_dalis_operators(plugin, tiny_shards, monkeypatch, role, kw):
    fast = loader_images(tiny_shards, role, **kw)
    monkeypatch.setitem(native._state, "ok", False)  # as where the operator cannot be built
    slow = loader_images(tiny_shards, role, **kw)
    assert fast.shape == slow.shape and fast.shape[0] == 24 and fast.shape[-2:] == (SIZE, SIZE)
    diff = (fast - slow).abs()
    # same crops and windows, same flips, same filter: fn.resize differs only by its rounding to
    # uint8 and at the image borders (it repeats the edge pixel, Pillow cuts the filter window)
    assert diff[..., 2:-2, 2:-2].max() <= 1.01 and diff.mean() < 0.5


def test_build_failure_warns_and_falls_back(tmp_path, monkeypatch):
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("KDKIT_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.warns(RuntimeWarning, match="no-such-compiler.*install g\\+\\+.*fn.resize"):
        assert native.available() is False
    assert native.available() is False  # decided once per process, warned once
    assert not list(tmp_path.rglob("*.so"))


def test_a_failing_compiler_is_quoted_and_its_output_kept(tmp_path, monkeypatch):
    fake = tmp_path / "cxx"
    fake.write_text("#!/bin/sh\necho 'resize_normalize.cc:7:1: error: something broke' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("KDKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", str(fake))
    with pytest.warns(RuntimeWarning, match="error: something broke.*full output: .*build.log"):
        assert native.available() is False
    log = next((tmp_path / "cache").rglob("build.log"))
    assert "something broke" in log.read_text() and str(fake) in log.read_text()
    assert not list((tmp_path / "cache").rglob("*.so"))


def test_an_unwritable_cache_is_named(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("KDKIT_CACHE", str(blocker))
    with pytest.warns(RuntimeWarning, match="cannot create the build folder .*KDKIT_CACHE"):
        assert native.available() is False


def test_built_once_and_reused(plugin, monkeypatch):
    assert plugin == native.library_path() and plugin.is_file()
    built = plugin.stat().st_mtime_ns
    monkeypatch.setattr(native, "build", lambda path: pytest.fail("rebuilt although the library exists"))
    assert native._load()["ok"]
    assert plugin.stat().st_mtime_ns == built


def test_the_build_is_portable(plugin, monkeypatch):
    # no -march=native: one build serves every CPU of the architecture, so the cache folder is not
    # keyed by this CPU's flags (a cache shared by other machines finds the same build)
    command = native._command(plugin)
    assert not [f for f in command if f.startswith(("-march", "-mcpu", "-mtune", "-mavx", "-mf16c", "-mfma"))]
    read_text = Path.read_text

    def no_cpuinfo(self, *args, **kwargs):
        assert "cpuinfo" not in str(self), "library_path() reads the CPU's flags"
        return read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", no_cpuinfo)
    assert native.library_path() == plugin


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86's runtime dispatch")
def test_the_vector_loops_are_dispatched_at_run_time(plugin):
    # the speed of the portable build: the hot loops have an AVX2 + FMA version taken where the CPU
    # has them, and the float16 conversion an F16C one (resize_normalize.cc, KDKIT_VERSIONS)
    binary = plugin.read_bytes()
    for name in (b"ResampleRowsAvx2", b"ResampleColsAvx2", b"NormalizeAvx2", b"ToHalfF16C"):
        assert name in binary, f"no {name.decode()} in the plugin"


@pytest.mark.slow
def test_a_damaged_cached_build_is_rebuilt(tmp_path):
    # in a fresh interpreter: the plugin registers its operator once per process
    script = ("from kdkit.pipelines import native; p = native.library_path(); p.parent.mkdir(parents=True); "
              "p.write_bytes(b'not a library'); assert native.available(), native._state; "
              "assert p.read_bytes()[:4] == b'\\x7fELF'; print('rebuilt')")
    env = {**os.environ, "KDKIT_CACHE": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    if not native.compiler():
        pytest.skip("no C++ compiler")
    assert done.returncode == 0 and "rebuilt" in done.stdout, done.stderr[-2000:]


def run_boxes(images, boxes, **kw):
    """The operator's N-views-per-image call next to its one-view call on each box cut out by fn.slice."""
    from nvidia.dali import fn, pipeline_def, types

    n, columns = boxes[0].shape

    @pipeline_def(batch_size=len(images), num_threads=2, device_id=None)
    def pipe():
        x = fn.external_source(source=lambda: images, batch=True, layout="HWC")
        b = fn.external_source(source=lambda: boxes, batch=True)
        singles = []
        for r in range(n):
            cut = fn.slice(x, fn.cast(b[r, 0:2], dtype=types.INT32), fn.cast(b[r, 2:4], dtype=types.INT32),
                           axis_names="WH")
            colour = {} if columns == 5 else dict(brightness=b[r, 5], contrast=b[r, 6], saturation=b[r, 7],
                                                       hue=b[r, 8])
            singles.append(fn.kdkit_resize_normalize(cut, size=SIZE, mirror=fn.cast(b[r, 4] > 0.5, dtype=types.INT32),
                                                     **colour, **kw))
        return (fn.kdkit_resize_normalize(x, size=SIZE, boxes=b, **kw), *singles)

    p = pipe()
    p.build()
    out = p.run()
    return out[0], [[np.asarray(o.at(i)) for o in out[1:]] for i in range(len(images))]


@pytest.mark.parametrize("kw", [dict(planar=True), dict(planar=False, half=True, mean=[10.0, 100.0, 200.0])])
@pytest.mark.parametrize("columns", [5, 9])
def test_boxes_give_n_views_each_as_if_cut_out_first(plugin, kw, columns):
    # what replay's views per load rely on: one call for N windows of a decoded region, bit for bit
    # the pixels of cutting each window out and resizing it alone (the one-view route)
    rng = np.random.default_rng(4)
    images = [smooth_and_sharp(rng, 47, 63), smooth_and_sharp(rng, 130, 90)]
    rows = [[0, 0, 63, 47, 0], [5, 7, 20, 31, 1], [62, 46, 1, 1, 0]], [[0, 0, 90, 130, 1], [30, 3, 60, 9, 0],
                                                                      [11, 100, 70, 30, 1]]
    colour = [[1.0, 1.0, 1.0, 0.0], [1.3, 0.7, 1.5, 30.0], [0.8, 1.2, 0.5, -90.0]]
    boxes = [np.asarray([r + colour[j] if columns == 9 else r for j, r in enumerate(b)], np.float32) for b in rows]
    many, singles = run_boxes(images, boxes, **kw)
    assert many.layout() == ("FCHW" if kw["planar"] else "FHWC")
    for i, one_by_one in enumerate(singles):
        got = np.asarray(many.at(i))
        assert got.shape[0] == 3 and got.dtype == (np.float16 if kw.get("half") else np.float32)
        for j, single in enumerate(one_by_one):
            assert np.array_equal(got[j], single), f"image {i} box {j}"
        assert not np.array_equal(got[0], got[1])


def test_a_box_outside_the_image_is_refused_by_name(plugin):
    images = [np.zeros((20, 30, 3), np.uint8)]
    for bad in ([25, 0, 6, 5, 0], [0, 0, 10.5, 5, 0], [0, 0, 0, 5, 0]):
        with pytest.raises(RuntimeError, match=r"sample 0 box 1: .* is not a window of whole pixels inside the 30 x 20"):
            run_boxes(images, [np.asarray([[0, 0, 30, 20, 0], bad], np.float32)])
