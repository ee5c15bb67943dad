"""One file-to-pixels conversion (kdkit.shards.images.to_rgb) for the shard writers and `kdkit predict`:
EXIF orientation applied, high bit depths scaled, transparency on white, each checked against a reference
computed here in numpy, and the shards and predict agreeing on the pixels."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from kdkit.evaluate.predict import load_image
from kdkit.shards import contract
from kdkit.shards.images import ORIENTATION, ImageOptions, PIXELS_SPEC, to_rgb
from kdkit.shards.sources.folder import list_folder
from kdkit.shards.writer import write_dataset

from conftest import make_class_tree, read_with_webdataset
from conftest import shard_cfg as cfg


def corner_photo(orientation: int) -> tuple[Image.Image, bytes]:
    """A 120x80 JPEG with a red block in its stored top-left corner and an EXIF orientation tag."""
    a = np.zeros((80, 120, 3), np.uint8)
    a[:26, :40] = (255, 0, 0)
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[ORIENTATION] = orientation
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    return im, buf.getvalue()


def stored(out: Path, key: str) -> Image.Image:
    return Image.open(io.BytesIO(read_with_webdataset(out / "train")[key][0]))


@pytest.mark.parametrize("opts", [ImageOptions(), ImageOptions(quality=90), ImageOptions(max_size=60)],
                         ids=["pass-through", "quality", "max-size"])
def test_exif_rotated_photo_is_stored_upright_without_the_tag(tmp_path, opts):
    root = tmp_path / "raw"
    make_class_tree(root, per_class=2, size=(24, 24))
    raw = {}
    for o in (6, 8):
        _, raw[o] = corner_photo(o)
        (root / "train" / "cat" / f"phone{o}.jpg").write_bytes(raw[o])
    out = tmp_path / "s"
    write_dataset(list_folder(root), out, cfg(image=opts))
    for o in (6, 8):
        want = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(raw[o]))), np.float32)
        im = stored(out, f"cat__phone{o}")
        assert im.getexif().get(ORIENTATION, 1) == 1  # every reader sees the same pixels: no tag left to apply
        if opts.max_size:
            assert im.size == (60, 90)  # the shorter side of the upright 80x120 photo
            im = im.resize((80, 120))
        got = np.asarray(im.convert("RGB"), np.float32)
        assert got.shape == want.shape == (120, 80, 3)
        assert np.abs(got - want).mean() < 4  # the red corner moved with the rotation
    man = json.loads((out / "train" / contract.MANIFEST).read_text())
    assert man["converted"] == {"orientation": 2}


def test_upright_jpegs_keep_their_bytes(tmp_path):
    root = tmp_path / "raw"
    made = make_class_tree(root, per_class=2, size=(24, 24))
    _, upright = corner_photo(1)
    (root / "train" / "cat" / "tagged1.jpg").write_bytes(upright)
    out = tmp_path / "s"
    write_dataset(list_folder(root), out, cfg())
    got = read_with_webdataset(out / "train")
    assert got["cat__tagged1"][0] == upright
    assert got["cat__cat_0"][0] == made["train"]["cat/cat_0.jpg"][0]
    assert json.loads((out / "train" / contract.MANIFEST).read_text())["converted"] == {}


def test_predict_reads_the_photo_upright(tmp_path):
    _, raw = corner_photo(6)
    (tmp_path / "phone.jpg").write_bytes(raw)
    im = load_image(tmp_path / "phone.jpg")
    assert im.size == (80, 120) and im.mode == "RGB"
    assert np.asarray(im)[:40, -26:, 0].mean() > 200  # orientation 6 (turn 90 degrees clockwise): the stored
    assert np.asarray(im)[-40:, :26, 0].mean() < 50  # top-left block is now top-right, 26 wide, 40 tall


RAMP16 = np.linspace(0, 65535, 64 * 48).reshape(48, 64).astype(np.uint16)


def high_bit_cases(tmp_path: Path):
    """(file, reference 8-bit pixels computed independently)."""
    cases = []
    Image.fromarray(RAMP16).save(tmp_path / "ramp16.png")  # Pillow mode I;16
    cases.append(("ramp16.png", np.round(RAMP16 / 257.0)))
    dark = (RAMP16 // 16).astype(np.int32)  # a 12-bit sensor's values in a 32-bit TIFF: mode I, 0..4095
    Image.fromarray(dark).save(tmp_path / "dark32.tif")
    cases.append(("dark32.tif", np.round(dark * 255 / 65535.0)))
    unit = RAMP16.astype(np.float32) / 65535  # a float TIFF of 0..1 (mode F)
    Image.fromarray(unit).save(tmp_path / "unit.tif")
    cases.append(("unit.tif", np.round(unit.astype(np.float64) * 255)))
    return cases


def test_high_bit_depth_images_are_scaled_not_clipped(tmp_path):
    for name, ref in high_bit_cases(tmp_path):
        assert Image.open(tmp_path / name).mode in ("I;16", "I", "F"), name
        img, changed = to_rgb(Image.open(tmp_path / name))
        got = np.asarray(img).astype(np.float64)
        assert changed == ["high_bit_depth"] and img.mode == "RGB"
        assert np.abs(got[..., 0] - ref).max() <= 1, name  # half-up vs numpy's half-even rounding
        assert (got[..., 0] == got[..., 2]).all()


def test_16bit_png_is_stored_as_its_grey_ramp(tmp_path):
    root = tmp_path / "raw"
    make_class_tree(root, per_class=2, size=(24, 24))
    Image.fromarray(RAMP16).save(root / "train" / "cat" / "ramp16.png")
    out = tmp_path / "s"
    write_dataset(list_folder(root), out, cfg())
    got = np.asarray(stored(out, "cat__ramp16").convert("L"), np.float64)
    ref = RAMP16 / 257.0
    assert abs(got.mean() - ref.mean()) < 1 and np.abs(got - ref).mean() < 2  # was 254 of 255: white
    assert json.loads((out / "train" / contract.MANIFEST).read_text())["converted"] == {"high_bit_depth": 1}


def rgba_with_hidden_colours() -> np.ndarray:
    rng = np.random.default_rng(3)
    a = rng.integers(0, 256, (40, 50, 4), dtype=np.uint8)
    a[:10, :, 3] = 0  # transparent rows over vivid colours a viewer never shows
    a[10:20, :, 3] = 255
    return a


def on_white_reference(a: np.ndarray) -> np.ndarray:
    c, alpha = a[..., :3].astype(np.float64), a[..., 3:].astype(np.float64)
    return np.floor(c * alpha / 255 + 255 * (1 - alpha / 255) + 0.5)


def test_transparency_is_composited_on_white_exactly(tmp_path):
    a = rgba_with_hidden_colours()
    Image.fromarray(a, "RGBA").save(tmp_path / "icon.png")
    img, changed = to_rgb(Image.open(tmp_path / "icon.png"))
    assert changed == ["alpha"]
    np.testing.assert_array_equal(np.asarray(img), on_white_reference(a))
    assert (np.asarray(img)[:10] == 255).all()


def test_predict_and_the_shards_see_the_same_pixels(tmp_path):
    """What `kdkit predict` feeds the model is what training read: the same conversion, here up to the
    shard's one JPEG generation (quality 95)."""
    y, x = np.mgrid[0:40, 0:50]
    a = np.stack([x * 5, y * 6, 255 - x * 5, np.full_like(x, 160)], -1).astype(np.uint8)  # smooth: JPEG keeps it
    a[:10, :, :] = (0, 255, 0, 0)  # transparent green: white on screen, green through convert("RGB")
    root = tmp_path / "raw"
    make_class_tree(root, per_class=2, size=(24, 24))
    Image.fromarray(a, "RGBA").save(root / "train" / "cat" / "icon.png")
    out = tmp_path / "s"
    write_dataset(list_folder(root), out, cfg())
    shard = np.asarray(stored(out, "cat__icon").convert("RGB"), np.float64)
    predicted = np.asarray(load_image(root / "train" / "cat" / "icon.png"), np.float64)
    np.testing.assert_array_equal(predicted, on_white_reference(a))  # not the hidden colours (convert("RGB"))
    assert np.abs(shard - predicted).mean() < 2 and shard[:8].min() > 240


def test_the_export_spec_says_how_pixels_and_crop_are_made():
    from kdkit.evaluate.deploy import input_spec
    from kdkit.models.checkpoint import ModelInfo

    info = ModelInfo(source="x.pth", model="resnet18", model_kwargs={}, num_classes=2, classes=None, image_size=32,
                     crop_ratio=0.875, mean=(0.5,) * 3, std=(0.25,) * 3, head=None, weights="model")
    spec = input_spec(info, 0.875, False, None)
    assert spec["decode"] == PIXELS_SPEC and "composited on white" in spec["decode"]
    assert "floor((H - 32) / 2 + 0.5)" in spec["crop"] and "half up" in spec["crop"]
