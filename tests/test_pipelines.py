"""DALI pipelines on the CPU backend: labels, geometry, epochs, sharding, replay, bad input."""
from __future__ import annotations

import io
import re
import os
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import jpeg_bytes, teacher_member, write_manifest
from kdkit.errors import OptionError
from kdkit.shards import contract, tario
from kdkit.pipelines import common
from kdkit.pipelines.config import LoaderConfig, loader_config
from kdkit.pipelines.loader import DaliLoader, build_pipeline
from kdkit.shards.reader import ShardError, explain_failure, reading_order, resolve_shards, scan_shards

H, W = 48, 64  # image size of the hand-written shards below
RAW = dict(mean=(0.0, 0.0, 0.0), std=(1 / 255,) * 3)  # normalize to plain 0..255 pixel values


def cfg(role: str = "train", **kw) -> LoaderConfig:
    base = dict(batch_size=4, num_threads=2, image_size=32, shuffle_buffer=16)
    return loader_config(role, **{**base, **kw})


def write_set(folder: Path, samples: list[dict], per_shard: int = 8, teacher: dict | None = None,
              num_classes: int = 4) -> list[Path]:
    """Tars written by hand; with `teacher` (the teacher block's topk / views) a manifest beside them
    whose layout says how the packed .teacher members are split."""
    folder.mkdir(parents=True, exist_ok=True)
    tars = []
    for i in range(0, len(samples), per_shard):
        tar = folder / contract.tar_name("s", i // per_shard)
        tario.write_shard(tar, samples[i:i + per_shard])
        tars.append(tar)
    if teacher is not None:
        write_manifest(folder, "s", num_classes, teacher)
    return tars


def make_samples(n: int = 23, seed: int = 3) -> list[dict]:
    """Samples whose label is their index, so a label identifies the sample after shuffling."""
    rng = np.random.default_rng(seed)
    return [{"__key__": f"s{i:03d}", "jpg": jpeg_bytes(rng, H, W), "cls": contract.encode_label(i)} for i in range(n)]


def pil_rgb(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(np.float32)


def ids(loader) -> list[list[int]]:
    return [b.labels.tolist() for b in loader]


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    samples = make_samples()
    return write_set(tmp_path_factory.mktemp("indexed"), samples), samples


# ---------------------------------------------------------------------------------------------
# labels, shapes, layouts

def test_eval_labels_match_the_tars_key_by_key(tiny_shards):
    shards = resolve_shards(tiny_shards, "train")
    loader = DaliLoader(shards, cfg("eval", batch_size=5))
    got = [label for b in loader for label in b.labels.tolist()]
    truth = {k: contract.decode_label(m["cls"]) for t in shards.tars for k, m in tario.iter_tar_samples(t)}
    assert got == [truth[k] for _, k in loader.keys()]
    assert loader.keys() == reading_order(shards, loader.scan)
    assert len(got) == shards.manifest.num_samples == 24


@pytest.mark.parametrize("layout,dtype,shape", [
    ("CHW", "float32", (4, 3, 32, 32)), ("HWC", "float16", (4, 32, 32, 3)),
    ("channels_last", "float32", (4, 3, 32, 32))])
def test_train_output_shape_dtype_layout(tiny_shards, layout, dtype, shape):
    loader = DaliLoader(tiny_shards, cfg(layout=layout, dtype=dtype))
    images, labels, logits = next(iter(loader))
    assert tuple(images.shape) == shape and images.dtype == getattr(torch, dtype)
    assert labels.dtype == torch.int64 and labels.shape == (4,) and logits is None
    assert torch.isfinite(images.float()).all() and images.float().abs().max() < 5  # normalized
    if layout == "channels_last":
        assert images.is_contiguous(memory_format=torch.channels_last)


def test_train_shuffles_but_covers_the_set(tiny_shards):
    loader = DaliLoader(tiny_shards, cfg(batch_size=6, last_batch="partial"))
    man = loader.shards.manifest
    for _ in range(2):
        labels = Counter(x for b in loader for x in b.labels.tolist())
        assert labels == Counter({0: 8, 1: 8, 2: 8}) and man.num_samples == 24


@pytest.mark.parametrize("aug", [dict(color_jitter=0.4), dict(auto_augment="randaugment"),
                                 dict(auto_augment="autoaugment"), dict(auto_augment="trivialaugment")])
@pytest.mark.slow
def test_train_augmentations_run_on_cpu(tiny_shards, aug):
    images, labels, _ = next(iter(DaliLoader(tiny_shards, cfg(**aug))))
    assert images.shape == (4, 3, 32, 32) and torch.isfinite(images).all()


def test_fast_idct_decodes_nearly_the_same_pixels(indexed):
    tars, _ = indexed
    c = dict(image_size=H, crop_ratio=1.0, layout="HWC", **RAW)
    exact = torch.cat([b.images for b in DaliLoader(tars, cfg("eval", **c))])
    fast = torch.cat([b.images for b in DaliLoader(tars, cfg("eval", fast_idct=True, **c))])
    diff = (exact - fast).abs()
    assert 0 < diff.mean() < 2 and diff.max() <= 12  # libjpeg-turbo's IFAST vs ISLOW: close, not bit-equal


# ---------------------------------------------------------------------------------------------
# eval geometry: compared with the image decoded by Pillow and cut in numpy

def test_eval_center_crop_is_the_middle_of_the_image(indexed):
    tars, samples = indexed
    loader = DaliLoader(tars, cfg("eval", image_size=H, crop_ratio=1.0, layout="HWC", **RAW))
    images = torch.cat([b.images for b in loader]).numpy()
    for img, s in zip(images, samples):
        ref = pil_rgb(s["jpg"])[:, (W - H) // 2:(W + H) // 2]  # shorter side already H: no resize
        assert np.abs(img - ref).max() <= 2


def test_eval_resize_then_crop_matches_pillow(indexed):
    tars, samples = indexed
    loader = DaliLoader(tars, cfg("eval", image_size=24, crop_ratio=0.75, layout="HWC", **RAW))
    img = next(iter(loader)).images[0].numpy()
    ref = Image.open(io.BytesIO(samples[0]["jpg"])).convert("RGB").resize((43, 32), Image.Resampling.BILINEAR)
    ref = np.asarray(ref, np.float32)[4:28, 10:34]  # shorter side 32 = 24 / 0.75, then the middle 24 x 24
    assert np.abs(img - ref).mean() < 4  # different resamplers, same geometry


def test_ten_crop_views(indexed):
    tars, samples = indexed
    c = cfg("eval", image_size=32, crop_ratio=32 / H, layout="HWC", views="tencrop", **RAW)
    views = next(iter(DaliLoader(tars, c))).images[0].numpy()
    assert views.shape == (10, 32, 32, 3)
    full = pil_rgb(samples[0]["jpg"])
    corners = [(0, 0), (0, W - 32), (H - 32, 0), (H - 32, W - 32), ((H - 32) // 2, (W - 32) // 2)]
    for i, (y, x) in enumerate(corners):
        crop = full[y:y + 32, x:x + 32]
        assert np.abs(views[i] - crop).max() <= 2
        assert np.abs(views[5 + i] - crop[:, ::-1]).max() <= 2
    flip = next(iter(DaliLoader(tars, cfg("eval", views="flip")))).images
    assert flip.shape == (4, 2, 3, 32, 32) and torch.allclose(flip[:, 1], flip[:, 0].flip(-1))


# ---------------------------------------------------------------------------------------------
# epochs, last batch, sharding

@pytest.mark.parametrize("policy,sizes", [("partial", [10, 10, 3]), ("drop", [10, 10]), ("fill", [10, 10, 10])])
def test_epoch_length_and_last_batch(indexed, policy, sizes):
    tars, _ = indexed  # 23 samples
    loader = DaliLoader(tars, cfg(batch_size=10, last_batch=policy))
    for _ in range(2):
        batches = ids(loader)
        assert len(loader) == len(sizes) and [len(b) for b in batches] == sizes
        seen = Counter(x for b in batches for x in b)
        if policy == "drop":
            assert len(seen) == 20 and max(seen.values()) == 1
        else:
            assert set(seen) == set(range(23)) and sum(seen.values()) == sum(sizes)


def test_shuffle_reorders_every_epoch_and_is_seeded(indexed):
    tars, _ = indexed

    def orders(seed):
        loader = DaliLoader(tars, cfg(batch_size=23, last_batch="partial", seed=seed))
        return [next(iter(loader)).labels.tolist() for _ in range(3)]

    a = orders(1)
    assert all(sorted(o) == list(range(23)) for o in a)
    assert a[0] != list(range(23)) and a[0] != a[1] != a[2]
    assert orders(1) == a and orders(2) != a  # the seed decides the order


def test_two_ranks_see_every_sample_once_per_epoch(indexed):
    tars, _ = indexed
    ranks = [DaliLoader(tars, cfg(shard_id=r, num_shards=2, last_batch="partial")) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1])  # equal step counts, as DDP needs
    assert [r.num_samples for r in ranks] == [11, 12]
    for _ in range(3):
        seen = [x for r in ranks for b in ids(r) for x in b]
        assert sorted(seen) == list(range(23))


def test_rank_and_world_come_from_torch_distributed(indexed, monkeypatch):
    tars, _ = indexed
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    loader = DaliLoader(tars, cfg(shuffle=False, last_batch="partial"))
    assert (loader.shard_id, loader.num_shards) == (1, 2)
    assert [x for b in ids(loader) for x in b] == list(range(11, 23))


def test_reading_order_is_what_dali_reads(indexed):
    from nvidia.dali import pipeline_def

    tars, _ = indexed
    shards = resolve_shards(tars)
    scan = scan_shards(shards, ["jpg", "cls"])

    @pipeline_def(batch_size=5, num_threads=1, device_id=None)
    def raw():
        return common.read_shards(shards, ["jpg"], cfg().reading, 1, 2, shuffle=False)[0]

    pipe = raw()
    pipe.build()
    got = []
    while len(got) < 12:
        got += [contract.split_member_name(t.source_info().rsplit(":", 1)[1])[0] for t in pipe.run()[0]]
    assert got[:12] == [k for _, k in reading_order(shards, scan, 1, 2)]


# ---------------------------------------------------------------------------------------------
# teacher views and replay

def test_teacher_views_are_reproducible(indexed):
    tars, _ = indexed

    def run(seed):
        loader = DaliLoader(tars, cfg("teacher_views", batch_size=8, seed=seed, num_views=3))
        return [b for b in loader]

    a, b, other = run(5), run(5), run(6)
    assert [x.views.shape[1:] for x in a][0] == (3, 3, 32, 32) and a[0].center.shape == (8, 3, 32, 32)
    for x, y in zip(a, b):
        assert torch.equal(x.boxes, y.boxes) and torch.equal(x.views, y.views) and torch.equal(x.labels, y.labels)
    assert not torch.equal(a[0].boxes, other[0].boxes)
    boxes = torch.cat([x.boxes for x in a]).reshape(-1, 5)  # integer pixels of the 64 x 48 images
    assert boxes.shape == (23 * 3, 5) and boxes.dtype == torch.int32 and (boxes[:, :2] >= 0).all()
    assert (boxes[:, 2:4] >= 1).all() and (boxes[:, 0] + boxes[:, 2] <= W).all() and (boxes[:, 1] + boxes[:, 3] <= H).all()
    assert set(boxes[:, 4].tolist()) == {0, 1}


def torchvision_box(height: int, width: int, u: np.ndarray, area=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop.get_params with the given numbers in place of its random ones
    (float32 as the graph computes; halves round up)."""
    tries = len(u[:-3]) // 2
    for t in range(tries):
        share = np.float32(area[0] + u[2 * t] * (area[1] - area[0]))
        r = np.float32(np.exp(np.log(ratio[0]) + u[2 * t + 1] * (np.log(ratio[1]) - np.log(ratio[0]))))
        w = np.floor(np.sqrt(np.float32(height * width) * share * r) + 0.5)
        h = np.floor(np.sqrt(np.float32(height * width) * share / r) + 0.5)
        if 1 <= w <= width and 1 <= h <= height:
            x, y = np.floor(u[-3] * (width - w + 1)), np.floor(u[-2] * (height - h + 1))
            return min(x, width - w), min(y, height - h), w, h
    if width / height < ratio[0]:
        w, h = width, np.floor(width / ratio[0] + 0.5)
    elif width / height > ratio[1]:
        w, h = np.floor(height * ratio[1] + 0.5), height
    else:
        w, h = width, height
    return np.floor((width - w) / 2), np.floor((height - h) / 2), w, h


def test_random_view_boxes_follow_torchvisions_rule():
    """The teacher views' boxes are computed in the graph from per-sample random numbers (so they do not
    depend on batch slots): the same boxes as torchvision's RandomResizedCrop given those numbers, its
    centre-crop fallback included (extreme aspect ratios with large areas)."""
    from nvidia.dali import fn, pipeline_def, types

    from kdkit.pipelines.options import RandomCrop
    from kdkit.pipelines.teacher_views import DRAWS, random_box

    rng = np.random.default_rng(0)
    shapes = [np.array([rng.integers(20, 600), rng.integers(20, 600), 3], np.int64) for _ in range(62)]
    shapes += [np.array([100, 1000, 3]), np.array([1000, 100, 3])]
    draws = [rng.random(DRAWS, dtype=np.float32) for _ in shapes]
    for u in draws[-2:]:
        u[0:-3:2] = 0.99  # large areas never fit these shapes: the fallback
    crop = RandomCrop()

    @pipeline_def(batch_size=len(shapes), num_threads=1, device_id=None)
    def boxes():
        shape = fn.external_source(source=lambda: shapes, dtype=types.INT64)
        u = fn.external_source(source=lambda: draws, dtype=types.FLOAT)
        height, width = fn.cast(shape[0], dtype=types.FLOAT), fn.cast(shape[1], dtype=types.FLOAT)
        return fn.stack(*random_box(height, width, u, crop))

    pipe = boxes()
    pipe.build()
    got = pipe.run()[0]
    for i, (shape, u) in enumerate(zip(shapes, draws)):
        x, y, w, h, flip = np.asarray(got[i])
        assert (x, y, w, h) == torchvision_box(int(shape[0]), int(shape[1]), u), i
        assert flip == float(u[-1] < 0.5)
    fallbacks = [np.asarray(got[i])[2:4].tolist() for i in (-2, -1)]
    assert fallbacks == [[133.0, 100.0], [100.0, 133.0]]  # the whole side, cut to the nearest allowed aspect


def with_views(samples, views_of, num_classes: int = 4) -> list[dict]:
    """Samples plus stored pixel boxes (K, 5) and logits (K, num_classes) whose row k is [id, k, 0, ...],
    packed into the .teacher member."""
    out = []
    for s in samples:
        i = int(s["cls"])
        views = np.asarray(views_of(i), np.int64)
        logits = np.zeros((len(views), num_classes), np.float16)
        logits[:, 0], logits[:, 1] = i, np.arange(len(views))
        out.append({**s, **teacher_member(logits, None, views, num_classes)})
    return out


def write_views(folder: Path, samples, views_of, k: int) -> list[Path]:
    return write_set(folder, with_views(samples, views_of), teacher={"views": k})


def test_replay_cuts_exactly_the_stored_box(indexed, tmp_path):
    _, samples = indexed
    # pixel boxes (x, y) of size 24 x 24, one mirrored: no resize at image_size=24, so the output
    # must be the decoded pixels themselves
    pixel = [(0, 0, 0), (40, 24, 1), (17, 9, 0)]
    tars = write_views(tmp_path, samples, lambda i: [(x, y, 24, 24, f) for x, y, f in pixel], 3)
    c = cfg("replay", image_size=24, layout="HWC", batch_size=8, last_batch="partial", **RAW)
    loader = DaliLoader(tars, c)
    chosen = Counter()
    for images, labels, logits in loader:
        for img, i, row, k in zip(images.numpy(), labels.tolist(), logits, loader.last_view_index.tolist()):
            x, y, f = pixel[k]
            ref = pil_rgb(samples[i]["jpg"])[y:y + 24, x:x + 24]
            assert np.abs(img - (ref[:, ::-1] if f else ref)).max() <= 2
            assert row.dtype == torch.float16 and row[:2].tolist() == [i, k]
            chosen[k] += 1
    assert sum(chosen.values()) == 23 and len(chosen) == 3  # every sample once, all views drawn


def test_replay_reproduces_the_teacher_views(indexed, tmp_path):
    tars, samples = indexed
    teacher = [b for b in DaliLoader(tars, cfg("teacher_views", batch_size=8, num_views=3, **RAW))]
    views = {i: v for b in teacher for i, v in zip(b.labels.tolist(), b.views)}
    boxes = {i: v.numpy() for b in teacher for i, v in zip(b.labels.tolist(), b.boxes)}
    replay = DaliLoader(write_views(tmp_path, samples, boxes.__getitem__, 3),
                        cfg("replay", batch_size=8, last_batch="partial", **RAW))
    n = 0
    for images, labels, _ in replay:
        for img, i, k in zip(images, labels.tolist(), replay.last_view_index.tolist()):
            assert (img - views[i][k]).abs().max() <= 1, f"sample {i} view {k}"
            n += 1
    assert n == 23


BOXES = [(0, 0, 64, 48, 0), (13, 10, 32, 24, 1), (6, 0, 45, 43, 0), (21, 8, 38, 38, 1)]  # pixels of the 64 x 48 images


def replay_views(loader) -> dict:
    """{(sample, view index): image} of one epoch of a replay loader (labels identify the samples)."""
    out = {}
    for b in loader:
        for img, i, k in zip(b.images, b.labels.tolist(), loader.last_view_index.tolist()):
            assert (i, k) not in out, f"sample {i} view {k} twice in one epoch"
            out[(i, k)] = img
    return out


@pytest.mark.parametrize("native_resize", [True, False])  # one operator call for N boxes | fn.slice + resize each
def test_views_per_load_cuts_the_one_view_replay_of_each_stored_box(indexed, tmp_path, native_resize):
    _, samples = indexed
    tars = write_views(tmp_path / "all", samples, lambda i: BOXES, 4)
    loader = DaliLoader(tars, cfg("replay", batch_size=4, last_batch="partial", views_per_load=3,
                                  native_resize=native_resize, **RAW))
    batch = next(iter(loader))
    assert batch.images.shape == (12, 3, 32, 32) and batch.teacher_logits.shape == (12, 4)
    assert batch.labels.tolist() == [i for i in batch.labels.tolist()[::3] for _ in range(3)]  # sample by sample
    # each image's logits row is its view's: row k of sample i holds [i, k]
    assert batch.teacher_logits[:, 0].tolist() == batch.labels.tolist()
    assert batch.teacher_logits[:, 1].tolist() == loader.last_view_index.tolist()
    got = replay_views(DaliLoader(tars, loader.cfg))
    assert len(got) == 23 * 3
    for k, box in enumerate(BOXES):  # the one-view route on a set storing only view k
        single = DaliLoader(write_views(tmp_path / f"v{k}", samples, lambda i: [box], 1),
                            cfg("replay", batch_size=4, last_batch="partial", native_resize=native_resize, **RAW))
        for images, labels, _ in single:
            for img, i in zip(images, labels.tolist()):
                if (i, k) in got:
                    assert torch.equal(img, got[(i, k)]), f"sample {i} view {k}"


@pytest.mark.parametrize("native_resize", [True, False])
def test_views_per_load_jitters_each_view_on_its_own(indexed, tmp_path, native_resize):
    # two stored views with the same box and flip: without jitter the two views of a load are equal,
    # with colour jitter each draws its own factors (on both routes)
    _, samples = indexed
    tars = write_views(tmp_path, samples, lambda i: [BOXES[1], BOXES[1]], 2)

    def pairs(**kw):
        c = cfg("replay", batch_size=4, views_per_load=2, image_size=16, native_resize=native_resize, **kw)
        return next(iter(DaliLoader(tars, c))).images.unflatten(0, (4, 2))

    plain, jittered = pairs(), pairs(color_jitter=0.4, hue=0.1)
    assert torch.equal(plain[:, 0], plain[:, 1])
    assert all((v[0] - v[1]).abs().mean() > 0.05 for v in jittered)


def test_views_per_load_draws_distinct_views_and_resumes_the_same_draw(indexed, tmp_path):
    _, samples = indexed
    tars = write_views(tmp_path, samples, lambda i: BOXES, 4)
    c = cfg("replay", batch_size=4, views_per_load=4, image_size=8, seed=3)
    loader = DaliLoader(tars, c, checkpointing=True)
    first = []
    for epoch in range(2):
        per_sample = {}
        for b in loader:
            for i, k in zip(b.labels.tolist(), loader.last_view_index.tolist()):
                per_sample.setdefault(i, []).append(k)
            first.append(loader.last_view_index.tolist())
            if epoch == 0 and len(first) == 2:
                state = loader.state()
        assert all(sorted(v) == [0, 1, 2, 3] for v in per_sample.values())  # N = K: every view once
    resumed = DaliLoader(tars, c, restore=state)
    again = [resumed.last_view_index.tolist() for _ in range(2) for _ in resumed]
    assert again == first[2:]  # the same views, batch by batch, for the rest of the run
    two = [b for b in DaliLoader(tars, cfg("replay", batch_size=4, views_per_load=2, image_size=8))]
    rows = torch.stack([b.teacher_logits[:, 1] for b in two]).view(-1, 2)
    assert (rows[:, 0] != rows[:, 1]).all()  # N < K: distinct views within a load


def test_views_per_load_beyond_the_stored_views_is_refused(indexed, tmp_path):
    _, samples = indexed
    tars = write_views(tmp_path, samples, lambda i: BOXES[:2], 2)
    with pytest.raises(OptionError, match=r"views_per_load=3: expected 1\.\.2: .* stores 2 views per sample"):
        DaliLoader(tars, cfg("replay", views_per_load=3))
    with pytest.raises(OptionError, match="views_per_load=0: expected an integer >= 1"):
        cfg("replay", views_per_load=0)


def test_views_per_load_yields_each_views_topk_row(indexed, tmp_path):
    _, samples = indexed
    stored = [{**s, **topk_members(int(s["cls"]), rows=3, boxes=BOXES[:3])} for s in samples]
    loader = DaliLoader(write_set(tmp_path, stored, teacher={"topk": 2, "views": 3}),
                        cfg("replay", batch_size=4, views_per_load=2, image_size=16))
    for images, labels, (values, idx) in loader:
        assert images.shape[0] == values.shape[0] == idx.shape[0] == len(labels) == 8
        assert values[:, 0].tolist() == labels.tolist() and idx[:, 1].eq(3).all()
        assert values[:, 1].tolist() == loader.last_view_index.tolist()


# ---------------------------------------------------------------------------------------------
# teacher logits members

def test_logits_are_read_when_every_sample_has_them(indexed, tmp_path):
    _, samples = indexed
    tars = write_set(tmp_path, [{**s, **teacher_member(np.full(5, int(s["cls"])), num_classes=5)} for s in samples],
                     teacher={}, num_classes=5)
    images, labels, logits = next(iter(DaliLoader(tars, cfg(shuffle=False))))
    assert logits.shape == (4, 5) and logits.dtype == torch.float16
    assert logits[:, 0].tolist() == labels.tolist()


def topk_members(i: int, rows: int | None = None, boxes=None) -> dict:
    """Top-2 storage as `add-teacher-logits --topk 2` writes it: values (k,) float16 + class indices, or
    (K, k) per stored view (with their boxes); values [i, k] and indices [i % 4, 3] identify sample and row."""
    shape = (2,) if rows is None else (rows, 2)
    values = np.zeros(shape, np.float16)
    idx = np.zeros(shape, np.int32)
    values[..., 0], idx[..., 0], idx[..., 1] = i, i % 4, 3
    if rows is not None:
        values[:, 1] = np.arange(rows)
    return teacher_member(values, idx, None if boxes is None else np.asarray(boxes), 4)


def test_topk_teacher_outputs_are_read_as_values_and_indices(indexed, tmp_path):
    _, samples = indexed
    tars = write_set(tmp_path, [{**s, **topk_members(int(s["cls"]))} for s in samples], teacher={"topk": 2})
    seen = 0
    for _, labels, teacher in DaliLoader(tars, cfg(shuffle=False, last_batch="partial")):
        values, idx = teacher  # read because every sample holds them, like full logits
        assert values.dtype == torch.float16 and idx.dtype == torch.int32 and values.shape == idx.shape == (len(labels), 2)
        assert values[:, 0].tolist() == labels.tolist() and idx[:, 0].tolist() == [i % 4 for i in labels.tolist()]
        seen += len(labels)
    assert seen == 23


def test_replay_picks_the_chosen_views_topk_row(indexed, tmp_path):
    _, samples = indexed
    stored = [{**s, **topk_members(int(s["cls"]), rows=3, boxes=BOXES[:3])} for s in samples]
    loader = DaliLoader(write_set(tmp_path, stored, teacher={"topk": 2, "views": 3}),
                        cfg("replay", batch_size=8, last_batch="partial", image_size=16))
    for _, labels, (values, idx) in loader:
        assert values.shape == (len(labels), 2) and idx[:, 1].eq(3).all()
        assert values[:, 0].tolist() == labels.tolist()
        assert values[:, 1].tolist() == loader.last_view_index.tolist()  # the same row as the pixels


@pytest.mark.timeout(60)
def test_missing_teacher_member_is_an_error_or_skipped_and_counted(indexed, tmp_path):
    _, samples = indexed
    mixed = [{**s, **teacher_member(np.zeros(5), num_classes=5)} if i % 2 else s for i, s in enumerate(samples)]
    tars = write_set(tmp_path, mixed, teacher={}, num_classes=5)
    assert next(iter(DaliLoader(tars, cfg()))).teacher_logits is None  # not every sample: not yielded
    with pytest.raises(ShardError, match=r"s-000000\.tar: sample s000 has no \.teacher member"):
        DaliLoader(tars, cfg(teacher_logits=True))
    loader = DaliLoader(tars, cfg(teacher_logits=True, missing="skip", last_batch="partial", shuffle=False))
    assert loader.skipped == 12 and loader.num_samples == 11
    assert [x for b in ids(loader) for x in b] == list(range(1, 23, 2))
    # straight into DALI (no pre-check): its "underful sample" error is translated to the key
    shards = resolve_shards(tars)
    with pytest.raises(RuntimeError) as err:
        build_pipeline(cfg("eval"), shards, teacher_kind=contract.teacher_layout(5, None, None)).build()
    assert "s-000000.tar: sample s000" in str(explain_failure(err.value, shards, None, "jpg", 0, 1))


# ---------------------------------------------------------------------------------------------
# bad input: a clear error naming shard and sample, never a hang

@pytest.mark.timeout(60)
def test_a_packed_member_shorter_than_its_layout_is_a_clear_error(indexed, tmp_path):
    _, samples = indexed
    stored = [{**s, **teacher_member(np.zeros(4))} for s in samples]
    stored[5][contract.TEACHER_EXT] = stored[5][contract.TEACHER_EXT][:4]
    tars = write_set(tmp_path, stored, teacher={})
    with pytest.raises(ShardError, match=r"a packed \.teacher member in .* is not as long as its manifest's layout"):
        for _ in DaliLoader(tars, cfg(teacher_logits=True)):
            pass


@pytest.mark.timeout(60)
def test_corrupt_image_names_shard_and_key(indexed, tmp_path):
    _, samples = indexed
    bad = [dict(s, jpg=b"\xff\xd8\xff\xe0" + b"not a jpeg" * 40) if s["__key__"] == "s010" else s for s in samples]
    tars = write_set(tmp_path, bad)
    with pytest.raises(ShardError, match=r"s-000001\.tar: sample s010: image does not decode"):
        loader = DaliLoader(tars, cfg(batch_size=8))  # no checksum vouches for these: their headers are checked
        for _ in range(2):
            for _ in loader:
                pass


def dali_error(reason: str) -> RuntimeError:
    return RuntimeError("Critical error in pipeline:\nError in MIXED operator `nvidia.dali.fn.decoders.image`,\n"
                        "which was used in the pipeline definition with the following traceback:\n  ...\n"
                        f"encountered:\n\nError in thread 0: decode failed\n{reason}\nC++ context: [...]")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("reason", ["CUDA runtime API error cudaErrorMemoryAllocation (2):\nout of memory",
                                    "std::bad_alloc", "nvjpeg error NVJPEG_STATUS_ALLOCATOR_FAILURE",
                                    "CUDA driver API error CUDA_ERROR_ILLEGAL_ADDRESS (700): an illegal memory access"])
def test_gpu_and_memory_failures_are_raised_as_they_are(indexed, tmp_path, monkeypatch, reason):
    """A decoder that runs out of GPU memory says "decode" too: its error must reach the user unchanged, not
    start a Pillow scan of the rank's whole share of the set and end in "an image does not decode"."""
    from kdkit.shards import reader

    loader = DaliLoader(write_set(tmp_path, indexed[1]), cfg())
    monkeypatch.setattr(reader, "find_undecodable", lambda *a, **k: pytest.fail("scanned the shards"))
    original = dali_error(reason)

    def fail():
        raise original
    with pytest.raises(RuntimeError) as err:
        loader._guarded(fail)
    assert err.value is original
    # a bad image is still looked for and named
    monkeypatch.setattr(reader, "find_undecodable", lambda *a, **k: (Path("s-000001.tar"), "s010", "truncated"))
    with pytest.raises(ShardError, match="s-000001.tar: sample s010: image does not decode"):
        loader._guarded(lambda: (_ for _ in ()).throw(dali_error("nvImageCodec: bitstream corrupted")))


@pytest.mark.timeout(60)
def test_missing_index_is_named(indexed, tmp_path):
    tars = write_set(tmp_path, indexed[1])
    tars[1].with_suffix(".idx").unlink()
    with pytest.raises(ShardError, match=r"s-000001\.idx: DALI index missing.*--fix-index"):
        DaliLoader(tars, cfg())


@pytest.mark.timeout(60)
def test_tar_truncated_mid_member_names_shard_and_key(indexed, tmp_path):
    tars = write_set(tmp_path, indexed[1])
    offset, size = tario.read_dali_index(tars[2].with_suffix(".idx"))[3]["jpg"]  # sample s019's image
    with open(tars[2], "r+b") as f:
        f.truncate(offset + size // 2)
    with pytest.raises(ShardError, match=r"s-000002\.tar: sample s019: member \.jpg ends at byte"):
        DaliLoader(tars, cfg())
    # the same shard straight into DALI (no pre-check): its error is translated too
    shards = resolve_shards(tars)
    pipe = build_pipeline(cfg("eval"), shards)
    with pytest.raises(RuntimeError) as err:
        pipe.build()
        for _ in range(6):
            pipe.run()
    named = explain_failure(err.value, shards, None, "jpg", 0, 1)
    assert "s-000002.tar: sample s019" in str(named)


@pytest.mark.timeout(60)
def test_label_not_zero_padded_is_named(indexed, tmp_path):
    _, samples = indexed
    tars = write_set(tmp_path, [dict(s, cls=b"7") if s["__key__"] == "s004" else s for s in samples])
    with pytest.raises(ShardError, match=r"s-000000\.tar: sample s004: \.cls is 1 bytes"):
        DaliLoader(tars, cfg())


def test_split_folder_and_dataset_root_resolve_alike(tiny_shards):
    a, b = resolve_shards(tiny_shards, "val"), resolve_shards(tiny_shards / "val")
    assert a.tars == b.tars and len(a.tars) == 2 and a.manifest.split == "val"
    with pytest.raises(ShardError, match="no shard set for split 'test'"):
        resolve_shards(tiny_shards, "test")


# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("role,extra", [("train", dict(color_jitter=0.4, auto_augment="randaugment")),
                                        ("eval", dict(views="tencrop")), ("teacher_views", {}),
                                        ("replay", dict(hw_decoder_load=0.75)), ("replay", dict(views_per_load=2))])
@pytest.mark.slow
def test_gpu_graphs_are_well_formed_without_a_gpu(tiny_shards, role, extra):
    # defining the graph (not building it) checks every CPU/GPU placement: "mixed" decoders,
    # GPU operators, CPU-side arguments, outputs moved with .gpu()
    with warnings.catch_warnings(record=True):  # DALI's auto_aug: deprecated aliases, forced to show
        pipe = build_pipeline(cfg(role, device="gpu", device_id=0, **extra), resolve_shards(tiny_shards),
                              teacher_kind=contract.teacher_layout(3, None, 4) if role == "replay" else False)
    assert pipe.device_id == 0


from conftest import cuda_only as gpu  # noqa: E402


@gpu
@pytest.mark.parametrize("role", ["train", "eval", "teacher_views"])
def test_gpu_outputs_are_on_the_device(tiny_shards, role):
    batch = next(iter(DaliLoader(tiny_shards, cfg(role, device="gpu",
                                                   device_id=int(os.environ.get("LOCAL_RANK", 0))))))
    assert all(t.is_cuda for t in batch if t is not None)


@gpu
def test_gpu_replay_matches_cpu_replay_geometry(indexed, tmp_path):
    _, samples = indexed
    tars = write_views(tmp_path, samples, lambda i: [(16, 12, 32, 24, 1)], 1)
    c = dict(shuffle=False, last_batch="partial", batch_size=8, **RAW)
    on_cpu = next(iter(DaliLoader(tars, cfg("replay", **c)))).images
    on_gpu = next(iter(DaliLoader(tars, cfg("replay", device="gpu", **c)))).images.cpu()
    # the same chroma upsampling on both (jpeg_fancy_upsampling): what is left is the IDCT's rounding
    assert (on_cpu - on_gpu).abs().mean() < 1


@gpu
def test_gpu_views_per_load_matches_one_view_replay(indexed, tmp_path):
    _, samples = indexed
    c = dict(shuffle=False, last_batch="partial", batch_size=8, device="gpu", **RAW)
    both = DaliLoader(write_set(tmp_path / "2", with_views(samples, lambda i: BOXES[1:3])),
                      cfg("replay", views_per_load=2, **c))
    got = {(i, k): img.cpu() for b in both for img, i, k in zip(b.images, b.labels.tolist(),
                                                                 both.last_view_index.tolist())}
    assert len(got) == 46
    for k, box in enumerate(BOXES[1:3]):
        one = DaliLoader(write_set(tmp_path / f"1{k}", with_views(samples, lambda i: [box])), cfg("replay", **c))
        for images, labels, _ in one:
            for img, i in zip(images.cpu(), labels.tolist()):  # whole decode + slice vs ROI decode on the GPU
                assert (img - got[(i, k)]).abs().mean() < 1, f"sample {i} view {k}"


# ---------------------------------------------------------------------------------------------
# the loader's configuration: typed parts, checked where they are made

@pytest.mark.parametrize("role,options,named", [
    ("train", dict(image_size=0), "image_size=0"), ("train", dict(batch_size=-3), "batch_size=-3"),
    ("train", dict(random_area=(0.5, 0.2)), "random_area"), ("train", dict(random_area=0.5), "random_area=0.5"),
    ("train", dict(color_jitter=-1.0), "color_jitter"), ("train", dict(auto_augment="fancy"), "auto_augment"),
    ("eval", dict(crop_ratio=0), "crop_ratio=0"), ("eval", dict(views="nine"), "views='nine'"),
    ("teacher_views", dict(num_views=0), "num_views=0"), ("train", dict(last_batch="most"), "last_batch"),
    ("train", dict(device="tpu"), "device='tpu'"), ("train", dict(num_threads=0), "num_threads=0"),
    ("train", dict(mean=(0.5, 0.5)), "mean"), ("train", dict(std=(1.0, 0.0, 1.0)), "std"),
    ("eval", dict(random_area=(0.1, 1.0)), "random_area: not a loader option of role 'eval'"),
    ("train", dict(colour_jitter=0.4), "colour_jitter: not a loader option"), ("tiny", {}, "role='tiny'")])
def test_nonsense_loader_options_fail_where_they_are_made(role, options, named):
    from kdkit.errors import OptionError

    with pytest.raises(OptionError, match=re.escape(named)):
        loader_config(role, **options)


def test_a_loader_config_says_what_it_is_and_routes_each_option(indexed):
    c = loader_config("eval", views="flip", crop_ratio=0.8, image_size=40, batch_size=3, device="cpu", num_threads=1)
    assert (c.role.views, c.role.crop_ratio, c.output.image_size, c.reading.batch_size, c.backend.num_threads) == \
        ("flip", 0.8, 40, 3, 1)
    assert "Eval(crop_ratio=0.8, views='flip')" in repr(c)  # a pipeline is data you can print
    # the roles say how their batches look
    tars, _ = indexed
    assert next(iter(DaliLoader(tars, c))).images.shape == (3, 2, 3, 40, 40)
