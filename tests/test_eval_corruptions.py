"""ImageNet-C corruptions, the mCE arithmetic, written-once corrupted shards, robustness eval."""
from __future__ import annotations

import colorsys
import io
import json

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from kdkit.errors import KdkitError
from kdkit.evaluate import corruptions as C
from kdkit.evaluate.corrupted_shards import corrupt_views, write_corrupted
from kdkit.evaluate.robustness import ALEXNET, Reference, RobustnessConfig, load_reference, mce_summary
from kdkit.shards import tario
from kdkit.shards.verify import verify_set
from test_eval import SIZE, ckpt, one_torch_thread, run_cli  # noqa: F401 (shared fixtures)


def photo(h: int = 64, w: int = 64, seed: int = 0) -> np.ndarray:
    """A smooth image with edges: blurs and noise change it measurably, nothing saturates much."""
    rng = np.random.default_rng(seed)
    small = rng.integers(40, 215, (h // 8, w // 8, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR)).copy()
    img[h // 4:h // 2, w // 4:3 * w // 4] = (200, 60, 60)  # a sharp-edged block: high frequencies
    return img


def high_freq(x: np.ndarray) -> float:
    return float(ndimage.laplace(x.astype(np.float64).mean(-1))[2:-2, 2:-2].var())


def run(x, name, s, seed=0):
    return C.corrupt(x, name, s, np.random.default_rng(seed))


@pytest.mark.parametrize("name", C.NAMES)
@pytest.mark.parametrize("shape", [(64, 64), (48, 64)])
def test_every_corruption_keeps_shape_and_dtype_and_changes_the_image(name, shape):
    x = photo(*shape)
    out = run(x, name, 3)
    assert out.shape == x.shape and out.dtype == np.uint8 and out.flags.c_contiguous
    assert np.abs(out.astype(int) - x).mean() > 1


def test_noise_grows_with_severity():
    x = np.full((64, 64, 3), 128, np.uint8)
    for name in ("gaussian_noise", "shot_noise", "impulse_noise"):
        spread = [np.abs(run(x, name, s).astype(float) - 128).mean() for s in C.SEVERITIES]
        assert spread == sorted(spread) and spread[0] > 0, (name, spread)
    std = [(run(x, "gaussian_noise", s).astype(float) - 128).std() / 255 for s in (1, 2, 3)]
    assert std == pytest.approx([0.08, 0.12, 0.18], rel=0.05)  # the reference's sigmas (before clipping bites)
    changed = [(run(x, "impulse_noise", s) != 128).mean() for s in C.SEVERITIES]
    assert changed == pytest.approx([0.03, 0.06, 0.09, 0.17, 0.27], rel=0.15)  # the reference's amounts


@pytest.mark.parametrize("name", ["defocus_blur", "motion_blur", "zoom_blur", "glass_blur"])
def test_blurs_remove_more_high_frequencies_with_severity(name):
    x = photo(64, 64)
    energy = [high_freq(x)] + [np.mean([high_freq(run(x, name, s, seed)) for seed in range(3)]) for s in C.SEVERITIES]
    assert all(a > b for a, b in zip(energy[:2], energy[1:3])), energy  # any blur beats the clean image
    assert energy[1] > energy[5], energy  # and severity 5 blurs more than severity 1
    if name != "glass_blur":  # glass blur's shuffles re-add edges at some severities, as the reference's do
        # non-increasing up to 2 %: zoom blur's severities 4 and 5 average different zoom ladders
        # (1..1.24 in 0.02 steps vs 1..1.30 in 0.03) and blur about equally much
        assert all(b <= a * 1.02 for a, b in zip(energy[1:], energy[2:])), energy


def test_digital_and_weather_severities_are_monotone_where_the_definition_is():
    x = photo()
    stds = [run(x, "contrast", s).std() for s in C.SEVERITIES]
    assert stds == sorted(stds, reverse=True)
    means = [run(x, "brightness", s).mean() for s in C.SEVERITIES]
    assert means == sorted(means)
    errs = [np.abs(run(x, "jpeg_compression", s).astype(float) - x).mean() for s in C.SEVERITIES]
    assert errs == sorted(errs)
    big = photo(224, 224)  # at 224 px, as the constants are meant (at 64 px block alignment jitters)
    blocks = [np.abs(run(big, "pixelate", s).astype(float) - big).mean() for s in C.SEVERITIES]
    assert blocks == sorted(blocks)


def test_brightness_equals_the_hsv_round_trip_of_the_reference():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    x[0, 0] = 0  # black: S = 0, becomes grey
    out = run(x, "brightness", 2)
    for (i, j), rgb in np.ndenumerate(x[..., 0]):
        h, s, v = colorsys.rgb_to_hsv(*(x[i, j] / 255.0))
        ref = np.array(colorsys.hsv_to_rgb(h, s, min(v + 0.2, 1.0)))
        assert np.abs(out[i, j].astype(int) - np.clip(ref, 0, 1) * 255).max() <= 1


def test_corruptions_are_reproducible_per_sample_key():
    x = photo()
    a = corrupt_views((x, "key1", "gaussian_noise", [1, 2], 0, None, None, False))
    b = corrupt_views((x, "key1", "gaussian_noise", [1, 2], 0, None, None, False))
    other = corrupt_views((x, "key2", "gaussian_noise", [1, 2], 0, None, None, False))
    assert all(np.array_equal(p, q) for p, q in zip(a, b))
    assert not np.array_equal(a[0], other[0])


def test_frost_uses_the_reference_photos_when_given(tmp_path):
    for i, ext in enumerate(["png", "png", "png", "jpg", "jpg", "jpg"], start=1):
        Image.new("RGB", (100, 90), (10 * i, 20, 30)).save(tmp_path / f"frost{i}.{ext}", quality=100)
    x = photo()
    out = C.corrupt(x, "frost", 1, np.random.default_rng(0), frost_dir=tmp_path)
    pick = int(np.random.default_rng(0).integers(5)) + 1  # the same draw the corruption makes first
    layer = np.array([10 * pick, 20, 30], np.float64)
    assert np.abs(out.astype(float) - np.clip(x + 0.4 * layer, 0, 255)).max() <= 1.01  # (1, 0.4): severity 1


def test_selection_parsing():
    assert C.parse_corruptions("all") == C.NAMES
    assert C.parse_corruptions("fog,noise") == ["gaussian_noise", "shot_noise", "impulse_noise", "fog"]
    assert C.parse_severities("1-3,5") == [1, 2, 3, 5]
    with pytest.raises(ValueError, match="unknown corruption 'smog'"):
        C.parse_corruptions("smog")
    with pytest.raises(ValueError, match="values in 1..5"):
        C.parse_severities("0-6")


# ---------------------------------------------------------------------------------------------
# mCE arithmetic

def test_mce_against_a_hand_computation():
    # model f and reference r, two corruptions at severities 1..5, clean errors 0.20 (f) and 0.40 (r)
    f = {"fog": {1: 0.30, 2: 0.35, 3: 0.40, 4: 0.45, 5: 0.50},
         "contrast": {1: 0.25, 2: 0.25, 3: 0.30, 4: 0.40, 5: 0.60}}
    r = {"fog": {1: 0.50, 2: 0.60, 3: 0.70, 4: 0.80, 5: 0.90},
         "contrast": {1: 0.45, 2: 0.50, 3: 0.60, 4: 0.70, 5: 0.75}}
    out = mce_summary(f, 0.20, Reference("r", 0.40, r), ["fog", "contrast"], [1, 2, 3, 4, 5])
    # CE_fog = (0.30+0.35+0.40+0.45+0.50) / (0.50+0.60+0.70+0.80+0.90) = 2.00 / 3.50 = 0.571428...
    # CE_contrast = (0.25+0.25+0.30+0.40+0.60) / (0.45+0.50+0.60+0.70+0.75) = 1.80 / 3.00 = 0.6
    # mCE = (0.571428 + 0.6) / 2 = 0.585714...
    assert out["per_corruption"]["fog"]["ce"] == pytest.approx(2.0 / 3.5)
    assert out["per_corruption"]["contrast"]["ce"] == pytest.approx(0.6)
    assert out["mce"] == pytest.approx((2.0 / 3.5 + 0.6) / 2) == pytest.approx(0.5857142857)
    # relative: fog (2.00 - 5 x 0.20) / (3.50 - 5 x 0.40) = 1.00 / 1.50 = 0.6667;
    #           contrast (1.80 - 1.00) / (3.00 - 2.00) = 0.80; relative mCE = 0.7333...
    assert out["per_corruption"]["fog"]["relative_ce"] == pytest.approx(1.0 / 1.5)
    assert out["per_corruption"]["contrast"]["relative_ce"] == pytest.approx(0.8)
    assert out["relative_mce"] == pytest.approx((1.0 / 1.5 + 0.8) / 2)
    # unnormalised: mean over corruptions of the mean over severities = (0.40 + 0.36) / 2
    assert out["mean_error"] == pytest.approx(0.38)
    # a subset of severities sums over that subset only: CE_fog(1, 5) = 0.80 / 1.40
    sub = mce_summary(f, 0.20, Reference("r", 0.40, r), ["fog"], [1, 5])
    assert sub["mce"] == pytest.approx(0.8 / 1.4)


def test_mce_against_published_alexnet_errors():
    same = {c: {s: ALEXNET.errors[c][0] for s in C.SEVERITIES} for c in C.NAMES}
    out = mce_summary(same, 0.435, ALEXNET, C.NAMES, list(C.SEVERITIES))
    assert out["mce"] == pytest.approx(1.0) and out["relative_mce"] == pytest.approx(1.0)
    half = {c: {s: v / 2 for s, v in e.items()} for c, e in same.items()}
    assert mce_summary(half, 0.2, ALEXNET, C.NAMES, list(C.SEVERITIES))["mce"] == pytest.approx(0.5)
    with pytest.raises(KdkitError, match="only the mean over severities 1-5"):
        mce_summary(same, 0.4, ALEXNET, C.NAMES, [1, 2])


def test_reference_from_an_earlier_report_json(tmp_path):
    errors = {"fog": {"1": 0.5, "2": 0.7}}  # JSON turns severity keys into strings
    (tmp_path / "m.json").write_text(json.dumps({"robustness": {"errors": errors, "clean_error": 0.3}}))
    ref = load_reference(str(tmp_path / "m.json"))
    assert ref.errors == {"fog": {1: 0.5, 2: 0.7}} and ref.clean_error == 0.3
    (tmp_path / "h.json").write_text(json.dumps({"fog": [0.1, 0.2, 0.3, 0.4, 0.5]}))
    assert load_reference(str(tmp_path / "h.json")).errors_for("fog", [2, 4]) == [0.2, 0.4]
    with pytest.raises(KdkitError, match=r"no fog errors at severities \[3\]"):
        ref.errors_for("fog", [3])
    with pytest.raises(KdkitError, match="has no errors for snow"):
        ref.errors_for("snow", [1])


# ---------------------------------------------------------------------------------------------
# written once as shards, and the robustness evaluation itself

PAIRS = dict(corruptions=["gaussian_noise", "pixelate"], severities=[2, 5])


@pytest.fixture(scope="module")
def corrupted(tiny_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("corrupted")
    folders = write_corrupted(tiny_shards, out, SIZE, batch_size=5, progress=False, **PAIRS)
    return out, folders


def test_written_corrupted_sets_pass_verify_and_match_on_the_fly(corrupted, tiny_shards):
    out, folders = corrupted
    assert sorted(f.name for f in folders) == ["gaussian_noise-2", "gaussian_noise-5", "pixelate-2", "pixelate-5"]
    src = {k: m for t in sorted((tiny_shards / "val").glob("*.tar")) for k, m in tario.iter_tar_samples(t)}
    for folder in folders:
        rep = verify_set(folder, decode=True, progress=False)
        assert rep.ok, rep.problems
        assert rep.samples == 12
        man = json.loads((folder / "manifest.json").read_text())
        assert man["options"]["image_size"] == SIZE and man["source"]["corruption"] in PAIRS["corruptions"]
        assert [c["id"] for c in man["classes"]] == ["cat", "dog", "eel"]
        for tar in sorted(folder.glob("*.tar")):
            for key, m in tario.iter_tar_samples(tar):
                assert m["cls"] == src[key]["cls"]  # same keys, same labels
                assert Image.open(io.BytesIO(m["jpg"])).size == (SIZE, SIZE)
    # the stored JPEG decodes to what the on-the-fly path computes for that key (same seed per key)
    from kdkit.evaluate.corrupted_shards import as_uint8, raw_view_loader

    loader = raw_view_loader(tiny_shards / "val", SIZE, 0.875, 12, 2)
    view = as_uint8(next(iter(loader)).images)[0]
    tar, key = loader.keys()[0]
    fly = corrupt_views((view, key, "gaussian_noise", [5], 0, 85, None, False))[0]
    stored = dict(tario.iter_tar_samples(out / "gaussian_noise-5" / tar.name))[key]["jpg"]
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(stored)).convert("RGB")), fly)
    # resumable: a second run keeps the finished tars
    before = {p: p.stat().st_mtime_ns for f in folders for p in f.glob("*.tar")}
    write_corrupted(tiny_shards, out, SIZE, batch_size=5, progress=False, **PAIRS)
    assert {p: p.stat().st_mtime_ns for p in before} == before


def test_corrupted_sets_resume_an_interrupted_write_and_refuse_other_options(corrupted, tiny_shards, tmp_path,
                                                                             monkeypatch):
    from kdkit.shards import resume

    ref, _ = corrupted
    out = tmp_path / "c"
    real, calls = resume.ShardJob.write, []

    def interrupted(self, *a, **k):  # Ctrl-C after the third corrupted shard
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(resume.ShardJob, "write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_corrupted(tiny_shards, out, SIZE, batch_size=5, progress=False, **PAIRS)
    monkeypatch.undo()
    assert not list(out.glob("*/*.tmp")) and not list(out.glob("*/*.kdkit-tmp"))
    assert not list(out.glob("*/manifest.json"))
    write_corrupted(tiny_shards, out, SIZE, batch_size=5, progress=False, **PAIRS)
    for folder in sorted(ref.glob("*-*")):  # the same bytes as an uninterrupted write
        assert {p.name: p.read_bytes() for p in folder.glob("*.tar")} == \
            {p.name: p.read_bytes() for p in (out / folder.name).glob("*.tar")}
    # another seed into the same folders: refused, nothing rewritten (it used to keep the old tars silently)
    before = {p: p.read_bytes() for p in out.glob("*/*.tar")}
    with pytest.raises(KdkitError, match=r"gaussian_noise-2 holds a different corrupted set"):
        write_corrupted(tiny_shards, out, SIZE, batch_size=5, progress=False, seed=1, **PAIRS)
    assert {p: p.read_bytes() for p in before} == before


def test_robustness_on_the_fly_equals_written_shards_and_self_reference_is_one(ckpt, tiny_shards, corrupted):
    from kdkit.evaluate.eval import EvalConfig, evaluate, format_report

    out, _ = corrupted
    fly = evaluate(EvalConfig([ckpt], tiny_shards, batch_size=6,
                              robustness=RobustnessConfig(reference=str(ckpt), progress=False, **PAIRS)))["robustness"]
    shards = evaluate(EvalConfig([ckpt], tiny_shards, batch_size=6,
                                 robustness=RobustnessConfig(corrupted=out, progress=False, **PAIRS)))
    r = shards["robustness"]
    assert r["mode"] == "written shards" and fly["mode"] == "on the fly"
    assert r["errors"] == fly["errors"] and r["clean_error"] == fly["clean_error"]
    assert fly["num_samples"] == 12 and set(fly["errors"]) == set(PAIRS["corruptions"])
    # the model judged against itself: every CE is exactly 1
    assert all(row["ce"] == pytest.approx(1.0) for row in fly["per_corruption"].values() if row["ce"] is not None)
    assert "gaussian_noise" in format_report(shards) and "mean corruption error" in format_report(shards)


def test_cli_robustness_options(ckpt, tiny_shards, tmp_path, capsys):
    out = tmp_path / "c"
    assert run_cli(["eval", "--data", str(tiny_shards), "--write-corrupted", str(out), "--image-size", str(SIZE),
                    "--corruptions", "contrast", "--severities", "1", "--quiet"]) == 0
    assert (out / "contrast-1" / "manifest.json").exists()
    # --corrupted without --corruptions: every set found there
    assert run_cli(["eval", str(ckpt), "--data", str(tiny_shards), "--corrupted", str(out), "--severities", "1",
                    "--quiet", "--out", str(tmp_path / "o")]) == 0
    text = capsys.readouterr().out
    assert "written shards" in text and "contrast" in text and "fog" not in text
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["robustness"]["corruptions"] == ["contrast"]
    assert run_cli(["eval", str(ckpt), "--data", str(tiny_shards), "--corruptions", "noise", "--severities", "1-2",
                    "--reference", "alexnet", "--quiet", "--out", str(tmp_path / "o")]) == 2
    assert "only the mean over severities 1-5" in capsys.readouterr().out
    assert run_cli(["eval", str(ckpt), "--data", str(tiny_shards), "--corrupted", str(out), "--corruptions",
                    "fog", "--severities", "1", "--quiet", "--out", str(tmp_path / "o")]) == 2
    assert "fog-1: no corrupted shard set here" in capsys.readouterr().out
