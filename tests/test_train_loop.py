"""`kdkit train` end to end on tiny shard sets through the DALI CPU loader: learning, KD modes, the
run folder, resume equality, NaN stop, fine-tuning, bad input, and the LR finder."""
from __future__ import annotations

import io
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kdkit.errors import KdkitError
from kdkit.models.checkpoint import read_checkpoint, save_checkpoint
from kdkit.shards import contract, tario
from kdkit.train import loop
from kdkit.train.config import make_config
from kdkit.train.loop import TrainingDiverged, fit

RESNET = "test_resnet"  # timm's 0.4M-parameter ResNet (basic blocks, BN, zero-init last BN): learning, resume
MODEL = "test_efficientnet"  # timm's 0.1M-parameter EfficientNet, ~10x faster on CPU: everything else
FAST = dict(model=MODEL, image_size=32, batch_size=8, loader_threads=1, shuffle_buffer=32, progress=False,
            opt="adamw", lr=3e-3, weight_decay=0.01, warmup_epochs=0, log_interval=1)


def cfg_for(data, out, **kw):
    return make_config({"data": str(data), "output": str(out), **FAST, **kw})


def colour_jpeg(rng, label: int, h: int = 48, w: int = 56) -> bytes:
    """Class = the dominant colour channel, plus noise: learnable from any crop in a few steps."""
    img = rng.integers(0, 90, (h, w, 3)).astype(np.uint8)
    img[..., label % 3] += 140
    out = io.BytesIO()
    Image.fromarray(img).save(out, format="JPEG", quality=90)
    return out.getvalue()


def write_colour_shards(root: Path, num_classes: int = 3, per_class=(8, 4), seed: int = 0) -> Path:
    from kdkit.shards.sources.folder import list_folder
    from kdkit.shards.writer import ShardConfig, write_dataset

    rng = np.random.default_rng(seed)
    for split, n in zip(("train", "val"), per_class):
        for c in range(num_classes):
            d = root / "raw" / split / f"c{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                (d / f"{i}.jpg").write_bytes(colour_jpeg(rng, c))
    write_dataset(list_folder(root / "raw"), root / "shards", ShardConfig(samples_per_shard=10, workers=1,
                                                                         progress=False))
    return root / "shards"


def add_teacher_outputs(src: Path, dst: Path, width: int | None = None, views: int = 0, topk: int = 0) -> Path:
    """A copy of a dataset root whose train set holds the packed teacher member as `kdkit add-teacher-logits`
    would write it: float16 logits (C,) or, with views=K, (K, C) logits + (K, 5) pixel view boxes; with
    topk=k the k largest log-probabilities and their class indices instead of all."""
    from kdkit.teach import members as mem

    shutil.copytree(src, dst)
    folder = dst / "train"
    man = json.loads((folder / contract.MANIFEST).read_text())
    rng = np.random.default_rng(0)
    width = width or man["num_classes"]
    for rec in man["shards"]:
        tar = folder / rec["tar"]
        samples = []
        for key, members in tario.iter_tar_samples(tar):
            label = contract.decode_label(members[contract.LABEL_EXT])
            logits = rng.normal(0, 1, (max(views, 1), width)).astype(np.float16)
            logits[:, label % width] += 3  # a confident, mostly right teacher
            logits = logits[0] if not views else logits
            boxes = None
            if views:  # the colour images are 56 x 48: a box inside, the later views mirrored
                boxes = np.tile(np.array([[6, 5, 45, 38, 0]]), (views, 1))
                boxes[1:, 4] = 1
            samples.append({"__key__": key, **mem.without_teacher(members),
                            **mem.encode(logits.astype(np.float32), boxes, topk or None)})
        rec.update(tario.write_shard(tar, samples))
    layout = contract.teacher_layout(width, topk or None, views or None)
    man["teacher"] = {"model": "hand-made", "num_classes": width, "views": views or None, "dtype": "float16",
                      "topk": topk or None, **({"topk_values": "log_softmax"} if topk else {}),
                      "members": mem.member_names(), "layout": mem.layout_json(layout)}
    (folder / contract.MANIFEST).write_text(json.dumps(man))
    return dst


@pytest.fixture(scope="module")
def colour(tmp_path_factory):
    return write_colour_shards(tmp_path_factory.mktemp("colour"))


@pytest.fixture(scope="module")
def colour_kd(colour, tmp_path_factory):
    return add_teacher_outputs(colour, tmp_path_factory.mktemp("kd") / "shards")


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------
# learning and the run folder

@pytest.mark.slow
def test_teacher_training_learns_and_writes_the_run_folder(colour, tmp_path):
    history = fit(cfg_for(colour, tmp_path, epochs=4, name="t", ema=True, ema_decay=0.5, sched="cosine", model=RESNET))
    run = tmp_path / "t"
    assert {"config.yaml", "metrics.jsonl", "last.pth", "best.pth", "curves.png"} <= {p.name for p in run.iterdir()}
    losses = [r["train_loss"] for r in history]
    assert losses[-1] < 0.6 * losses[0], losses
    assert history[-1]["val_top1"] >= 75 and history == rows(run)
    for key in ("train_loss", "val_top1", "val_top3", "ema_top1", "lr", "images_per_s", "loader_wait_share"):
        assert key in history[-1], key
    assert "val_top5" not in history[-1]  # 3 classes: top-3, as `kdkit eval` says it
    assert 0 <= history[-1]["loader_wait_share"] < 1 and history[-1]["samples"] == 24
    ckpt = read_checkpoint(run / "last.pth")
    assert ckpt["model"] == RESNET and ckpt["num_classes"] == 3 and [c["id"] for c in ckpt["classes"]] == ["c0", "c1", "c2"]
    assert ckpt["epoch"] == 4 and ckpt["train_state"]["updates"] == 12 and ckpt["ema_state_dict"]
    best = read_checkpoint(run / "best.pth")
    assert best["train_state"] is None and best["metrics"]["val_top1"] == max(r["val_top1"] for r in history)
    assert Image.open(run / "curves.png").size[0] > 500
    assert f"model: {RESNET}" in (run / "config.yaml").read_text()
    with pytest.raises(KdkitError, match="already holds a run.*--resume"):
        fit(cfg_for(colour, tmp_path, epochs=1, name="t"))


@pytest.mark.parametrize("kd,extra", [
    ("stored", dict(mixup=0.4, cutmix=1.0, label_smoothing=0.1)),
    ("replay", dict(sam_rho=0.05, grad_accum=1)),
])
@pytest.mark.slow
def test_student_from_stored_teacher_outputs(colour, tmp_path, kd, extra):
    data = add_teacher_outputs(colour, tmp_path / "d", views=3 if kd == "replay" else 0)
    history = fit(cfg_for(data, tmp_path, epochs=2, name="s", kd=kd, kd_temperature=2.0, **extra))
    assert len(history) == 2 and all(np.isfinite(r["train_loss"]) for r in history)


@pytest.mark.slow
def test_augmix_jsd_trains_a_teacher_through_the_cli(colour, tmp_path, capsys):
    from kdkit.cli import main

    # the smallest AugMix (one chain of one op) keeps the DALI graph quick to build; JSD on top
    assert main(["train", "teacher", str(colour), "--output", str(tmp_path), "--name", "jsd", "--model", MODEL,
                 "--image-size", "32", "--batch-size", "8", "--loader-threads", "1", "--epochs", "1",
                 "--no-progress", "--val-split", "none", "--augmix", "--augmix-jsd", "--augmix-width", "1",
                 "--augmix-depth", "1", "--rotate", "10", "--hue", "0.05"]) == 0
    out = capsys.readouterr().out
    assert "done" in out and "24 train samples of 3 classes, no val set (no evaluation);" in out
    row = json.loads((tmp_path / "jsd" / "metrics.jsonl").read_text().splitlines()[-1])
    assert np.isfinite(row["train_loss"]) and row["samples"] > 0  # samples, not 3 views each


@pytest.mark.parametrize("kd", ["stored", "replay"])
@pytest.mark.slow
def test_student_from_topk_teacher_outputs(colour, tmp_path, kd, monkeypatch):
    """Top-k storage: the loader yields (values, indices) and the loss sees the dense logits with
    -inf outside the stored classes (kd.dense_logits_from_topk)."""
    import kdkit.train.kd as kd_mod

    data = add_teacher_outputs(colour, tmp_path / "d", views=3 if kd == "replay" else 0, topk=2)
    seen = []
    real = kd_mod.dense_teacher_logits

    def spy(stored, num_classes, dev, topk_target):
        dense = real(stored, num_classes, dev, topk_target)
        seen.append((isinstance(stored, tuple), dense))
        return dense
    monkeypatch.setattr(kd_mod, "dense_teacher_logits", spy)
    history = fit(cfg_for(data, tmp_path, epochs=1, name="s", kd=kd, kd_temperature=2.0))
    assert np.isfinite(history[-1]["train_loss"]) and seen
    for was_topk, dense in seen:
        assert was_topk and dense.shape[1] == 3
        assert (torch.isinf(dense).sum(1) == 1).all()  # 3 classes, 2 stored: one -inf per row


def test_marginal_topk_target_spreads_the_rest_and_needs_log_probabilities(colour, tmp_path, monkeypatch):
    import kdkit.train.kd as kd_mod

    data = add_teacher_outputs(colour, tmp_path / "d", topk=1)
    seen = []
    real = kd_mod.TeacherTargets.probs

    def spy(self, temperature, standardize=False):
        probs = real(self, temperature, standardize)
        seen.append(probs)
        return probs
    monkeypatch.setattr(kd_mod.TeacherTargets, "probs", spy)
    fit(cfg_for(data, tmp_path, epochs=1, name="m", kd="stored", topk_target="marginal", kd_temperature=1.0))
    for probs in seen:  # 3 classes, 1 kept: the two others share what it leaves, equally, and nothing is 0
        assert torch.allclose(probs.sum(1), torch.ones(len(probs))) and (probs > 0).all()
        low = probs.sort(1).values
        assert torch.allclose(low[:, 0], low[:, 1])
    manifest = data / "train" / contract.MANIFEST
    man = json.loads(manifest.read_text())
    del man["teacher"]["topk_values"]  # top-k raw logits, as older sets hold them
    manifest.write_text(json.dumps(man))
    with pytest.raises(KdkitError, match="--topk-target marginal: .* stores top-k raw logits"):
        fit(cfg_for(data, tmp_path, epochs=1, name="m2", kd="stored", topk_target="marginal"))


@pytest.mark.parametrize("kd_loss, kd, topk", [("dkd", "replay", 0), ("kl-ls", "stored", 2), ("dkd-ls", "replay", 2)])
def test_kd_losses_train_from_stored_and_replayed_logits_and_topk(colour, tmp_path, kd_loss, kd, topk, monkeypatch):
    """Each KD term trains from the targets a run gets (full or top-k, single view or replayed), with the
    term's own numbers: the loss seen each step is the criterion's with that term."""
    from kdkit.train import losses

    data = add_teacher_outputs(colour, tmp_path / "d", views=3 if kd == "replay" else 0, topk=topk)
    calls = []
    real = losses.KD_LOSSES[kd_loss].__call__

    def spy(self, logits, target, teacher, temperature, epoch):
        value = real(self, logits, target, teacher, temperature, epoch)
        calls.append((type(self).name, epoch, value.item()))
        return value
    monkeypatch.setattr(losses.KD_LOSSES[kd_loss], "__call__", spy)
    history = fit(cfg_for(data, tmp_path, epochs=2, name="s", kd=kd, kd_loss=kd_loss, kd_temperature=2.0,
                          topk_target="marginal" if topk else "renormalize", dkd_warmup=2))
    assert np.isfinite(history[-1]["train_loss"]) and calls
    assert {c[0] for c in calls} == {kd_loss} and {c[1] for c in calls} == {0, 1}  # the trainer told it the epoch
    assert all(np.isfinite(c[2]) and c[2] >= 0 for c in calls)


def test_standardized_losses_refuse_renormalized_topk_and_old_sets_name_the_conversion(colour, tmp_path):
    data = add_teacher_outputs(colour, tmp_path / "d", topk=2)
    with pytest.raises(KdkitError, match="--kd-loss kl-ls: standardizing needs every class's logit.*--topk-target "
                                         "marginal"):
        fit(cfg_for(data, tmp_path, epochs=1, name="ls", kd="stored", kd_loss="kl-ls"))
    man = json.loads((data / "train" / contract.MANIFEST).read_text())
    del man["teacher"]["layout"]  # a teacher block as kdkit wrote it before the packed member
    (data / "train" / contract.MANIFEST).write_text(json.dumps(man))
    with pytest.raises(KdkitError, match=r"before 2026-12 .* `kdkit add-teacher-logits .*train --repack --in-place`"):
        fit(cfg_for(data, tmp_path, epochs=1, name="old", kd="stored"))


def test_views_per_load_trains_on_b_x_n_views_and_mixes_within_them(colour, tmp_path, monkeypatch):
    import kdkit.train.kd as kd_mod

    data = add_teacher_outputs(colour, tmp_path / "d", views=3)
    mixed = []
    real = kd_mod.KD_MODES["replay"].targets

    def spy(self, batch, images, mix):
        teacher = real(self, batch, images, mix)
        t_probs = kd_mod.TeacherTargets(teacher.logits).probs(2.0)  # unmixed
        mixed.append((images.shape[0], batch.labels, t_probs, teacher.probs(2.0), mix))
        return teacher
    monkeypatch.setattr(kd_mod.KD_MODES["replay"], "targets", spy)
    history = fit(cfg_for(data, tmp_path, epochs=1, name="s", kd="replay", views_per_load=2, mixup=0.4,
                          kd_temperature=2.0))
    assert history[0]["samples"] == 3 * 8 * 2 and history[0]["updates"] == 3  # 3 steps of 8 samples x 2 views
    for n, labels, t_probs, t_mixed, p in mixed:
        assert n == labels.shape[0] == t_probs.shape[0] == 16  # images, class and teacher targets: B x N rows
        # image i is mixed with image 15 - i, a view of another sample; its teacher target with the same lambda
        assert p.kind == "mixup" and torch.allclose(t_mixed, p.lam * t_probs + (1 - p.lam) * t_probs.flip(0))
    with pytest.raises(KdkitError, match=r"views_per_load=4: expected 1\.\.3: .* stores 3 views per sample"):
        fit(cfg_for(data, tmp_path, epochs=1, name="s4", kd="replay", views_per_load=4))
    with pytest.raises(KdkitError, match="views_per_load=2: several stored views per load need kd=replay"):
        cfg_for(data, tmp_path, kd="stored", views_per_load=2)


@pytest.mark.slow
def test_online_teacher_and_grad_accumulation(colour, tmp_path):
    fit(cfg_for(colour, tmp_path, epochs=1, name="teacher"))
    history = fit(cfg_for(colour, tmp_path, epochs=1, name="student", kd="online",
                          teacher_checkpoint=str(tmp_path / "teacher" / "best.pth"), grad_accum=2,
                          clip_grad=1.0, am_softmax=True, model=RESNET))
    assert history[0]["updates"] == 2  # 3 micro-batches: one full group of 2 and a short last one
    assert read_checkpoint(tmp_path / "student" / "last.pth")["head"]["type"] == "am_softmax"


# ---------------------------------------------------------------------------------------------
# resume: killed anywhere, started again, the same result

class Killed(BaseException):
    """Stands in for SIGKILL: nothing after it runs (no except / finally saves anything)."""


def kill_at_step(monkeypatch, n: int):
    calls = {"n": 0}
    real = loop.train_step

    def step(*a, **k):
        calls["n"] += 1
        if calls["n"] == n:
            raise Killed()
        return real(*a, **k)

    monkeypatch.setattr(loop, "train_step", step)


def resume_cfg(data, out, name, **kw):
    # every source of randomness on: augmentation, shuffling, mixup/cutmix, EMA, KD, warmup + cosine
    return cfg_for(data, out, name=name, epochs=3, kd="stored", mixup=0.4, cutmix=1.0, label_smoothing=0.1,
                   ema=True, ema_decay=0.9, warmup_epochs=1, opt="sgd", lr=0.05, model=RESNET, **kw)


def count_index_reads(monkeypatch) -> dict[str, int]:
    """{index path: times the shard reader parsed it}, filled while the patch holds."""
    from kdkit.shards import reader

    reads, parse = {}, reader.parse_dali_index

    def counted(idx):
        reads[str(idx)] = reads.get(str(idx), 0) + 1
        return parse(idx)

    monkeypatch.setattr(reader, "parse_dali_index", counted)
    return reads


def same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
def test_resume_equals_uninterrupted(colour_kd, tmp_path, monkeypatch):
    fit(resume_cfg(colour_kd, tmp_path, "whole"))
    whole = read_checkpoint(tmp_path / "whole" / "last.pth")
    # killed at the start of epoch 2 (an epoch boundary), and in the middle of epoch 3
    for name, kill, every in (("boundary", 4, 0), ("mid", 8, 1)):
        with monkeypatch.context() as m:
            kill_at_step(m, kill)
            with pytest.raises(Killed):
                fit(resume_cfg(colour_kd, tmp_path, name, checkpoint_every=every))
        ckpt = read_checkpoint(tmp_path / name / "last.pth")
        assert (ckpt["epoch"], ckpt["train_state"]["step_in_epoch"]) == ((1, 0) if name == "boundary" else (2, 1))
        with monkeypatch.context() as m:
            reads = count_index_reads(m)
            fit(resume_cfg(colour_kd, tmp_path, name, checkpoint_every=every, resume="last"))
        train = sorted(str(p) for p in (colour_kd / "train").glob("*.idx"))
        # the KD check, the resume's same-set check and the loader: each train index read once (a request in a bucket)
        assert train and [reads.get(i) for i in train] == [1] * len(train)
        again = read_checkpoint(tmp_path / name / "last.pth")
        same_state(whole["state_dict"], again["state_dict"])
        same_state(whole["ema_state_dict"], again["ema_state_dict"])
        got, want = rows(tmp_path / name), rows(tmp_path / "whole")
        assert [r["epoch"] for r in got] == [1, 2, 3]
        for key in ("train_loss", "val_loss", "val_top1", "ema_top1", "lr"):
            assert [r[key] for r in got] == [r[key] for r in want], key


@pytest.mark.slow
def test_resume_restores_the_loader_state_and_falls_back_where_it_cannot(colour_kd, tmp_path, monkeypatch):
    """The data position is DALI's checkpoint of the one train loader: threads may change, it still
    resumes exactly; other loader options cannot continue that stream: said, and the run finishes
    from a freshly shuffled loader."""
    fit(resume_cfg(colour_kd, tmp_path, "whole"))
    whole = read_checkpoint(tmp_path / "whole" / "last.pth")
    for name, change in (("threads", dict(loader_threads=2)), ("buffer", dict(shuffle_buffer=16))):
        with monkeypatch.context() as m:
            kill_at_step(m, 8)  # epoch 3, step 2
            with pytest.raises(Killed):
                fit(resume_cfg(colour_kd, tmp_path, name, checkpoint_every=1))
        saved = read_checkpoint(tmp_path / name / "last.pth")["train_state"]
        assert len(saved["loader"]) == 1 and 0 < len(saved["loader"][0]) < 10_000  # one DALI state per rank
        if name == "threads":
            fit(resume_cfg(colour_kd, tmp_path, name, checkpoint_every=1, resume="last", **change))
            same_state(whole["state_dict"], read_checkpoint(tmp_path / name / "last.pth")["state_dict"])
        else:
            with pytest.warns(UserWarning, match="data position cannot be restored exactly .*loader's options"):
                fit(resume_cfg(colour_kd, tmp_path, name, checkpoint_every=1, resume="last", **change))
            got = rows(tmp_path / name)
            assert [r["epoch"] for r in got] == [1, 2, 3] and got[-1]["samples"] == 24


# ---------------------------------------------------------------------------------------------
# failures: NaN, bad input

def poison_one_sample(folder: Path, value: float) -> str:
    """Overwrite one sample's stored logits with `value` (NaN, inf), as a diverged teacher would have stored
    them, keeping the manifest's checksums right; returns its key."""
    man = json.loads((folder / contract.MANIFEST).read_text())
    rec = man["shards"][0]
    samples = [{"__key__": k, **m} for k, m in tario.iter_tar_samples(folder / rec["tar"])]
    member = bytearray(samples[0][contract.TEACHER_EXT])  # the packed member: float16 values first (FORMAT.md)
    member[:2] = np.float16(value).tobytes()
    samples[0][contract.TEACHER_EXT] = bytes(member)
    rec.update(tario.write_shard(folder / rec["tar"], samples))
    (folder / contract.MANIFEST).write_text(json.dumps(man))
    return samples[0]["__key__"]


def test_nan_from_non_finite_teacher_targets_names_them_not_the_learning_rate(colour_kd, tmp_path):
    """Stored teacher outputs holding NaN (written by a diverged teacher before the pass refused them): the
    student stops naming the teacher targets as the cause and how to check them; `kdkit verify` finds them."""
    from kdkit.shards.verify import verify_set

    data = tmp_path / "kd"
    shutil.copytree(colour_kd, data)
    key = poison_one_sample(data / "train", float("nan"))
    with pytest.raises(TrainingDiverged) as e:
        fit(cfg_for(data, tmp_path, epochs=1, name="s", kd="stored"))
    said = str(e.value)
    assert "the teacher targets of step" in said and "are not finite" in said and "Lower --lr" not in said, said
    assert f"kdkit verify --decode {data}" in said
    rep = verify_set(data / "train", decode=True, progress=False)
    assert any(f"sample {key} .teacher holds NaN teacher outputs" in p for p in rep.problems), rep.problems


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(colour, tmp_path, monkeypatch):
    from kdkit.train import build as build_mod

    real, calls = build_mod.build_model, {"n": 0}

    def poisoned(cfg, n):
        model = real(cfg, n)

        def hook(module, args, out):
            if module.training:
                calls["n"] += 1
                if calls["n"] >= 5:  # epoch 2, step 2
                    return out * float("nan")
            return out
        model.register_forward_hook(hook)
        return model

    monkeypatch.setattr(build_mod, "build_model", poisoned)
    with pytest.raises(TrainingDiverged, match=r"loss is nan at epoch 2, step 2/3.*last good checkpoint is kept"):
        fit(cfg_for(colour, tmp_path, epochs=3, name="nan"))
    ckpt = read_checkpoint(tmp_path / "nan" / "last.pth")
    assert ckpt["epoch"] == 1 and all(torch.isfinite(v).all() for v in ckpt["state_dict"].values()
                                      if v.is_floating_point())
    assert [r["epoch"] for r in rows(tmp_path / "nan")] == [1]


def test_kd_without_teacher_logits_is_a_clear_error(tiny_shards, tmp_path):
    with pytest.raises(KdkitError, match=r"--kd stored: shard set .*train has no teacher logits; add them with "
                                         r"`kdkit add-teacher-logits"):
        fit(cfg_for(tiny_shards, tmp_path, kd="stored", epochs=1))
    assert not (tmp_path / f"student-{MODEL}").exists()  # failed before anything was written


def test_class_count_mismatches_are_errors_before_training(colour, tmp_path):
    wide = add_teacher_outputs(colour, tmp_path / "wide", width=5)
    with pytest.raises(KdkitError, match="teacher logits over 5 classes, the shards and model have 3"):
        fit(cfg_for(wide, tmp_path, kd="stored", epochs=1))
    with pytest.raises(KdkitError, match="--num-classes 4 disagrees with .*3 classes"):
        fit(cfg_for(colour, tmp_path, num_classes=4, epochs=1))
    teacher = tmp_path / "t5.pth"
    from timm import create_model
    save_checkpoint(teacher, {"model": MODEL, "model_kwargs": {}, "num_classes": 5,
                              "state_dict": create_model(MODEL, num_classes=5).state_dict()})
    with pytest.raises(KdkitError, match=r"t5\.pth: the model predicts 5 classes, the data has 3"):
        fit(cfg_for(colour, tmp_path, kd="online", teacher_checkpoint=str(teacher), epochs=1))
    mixed = tmp_path / "mixed"
    shutil.copytree(colour, mixed)
    man = json.loads((mixed / "val" / contract.MANIFEST).read_text())
    man["classes"].append({"index": 3, "id": "c3", "name": ""})
    (mixed / "val" / contract.MANIFEST).write_text(json.dumps(man))
    with pytest.raises(KdkitError, match="class counts disagree: .*train has 3 classes, .*val 4"):
        fit(cfg_for(mixed, tmp_path, epochs=1))


# ---------------------------------------------------------------------------------------------
# fine-tuning with a new head

@pytest.mark.slow
def test_finetune_loads_the_backbone_and_reinitialises_the_head(colour, tiny_shards, tmp_path):
    five = write_colour_shards(tmp_path / "five", num_classes=5, per_class=(2, 1))
    fit(cfg_for(five, tmp_path, epochs=1, name="src"))
    src = read_checkpoint(tmp_path / "src" / "last.pth")["state_dict"]
    # one frozen epoch on a 3-class set: only the new 3-class head trains
    fit(cfg_for(tiny_shards, tmp_path, epochs=1, name="ft", finetune=str(tmp_path / "src" / "last.pth"),
                freeze_epochs=1))
    ft = read_checkpoint(tmp_path / "ft" / "last.pth")["state_dict"]
    head = "classifier.weight"
    assert ft[head].shape == (3, src[head].shape[1]) and src[head].shape[0] == 5
    backbone = [k for k in src if not k.startswith("classifier.")]
    for k in backbone:  # parameters and BatchNorm statistics: untouched by the frozen epoch
        assert torch.equal(src[k], ft[k]), k
    # thawed after the frozen epochs: the backbone trains too
    fit(cfg_for(tiny_shards, tmp_path, epochs=2, name="ft2", finetune=str(tmp_path / "src" / "last.pth"),
                freeze_epochs=1))
    ft2 = read_checkpoint(tmp_path / "ft2" / "last.pth")["state_dict"]
    assert not torch.equal(src["conv_stem.weight"], ft2["conv_stem.weight"])


def test_checkpoint_of_another_architecture_is_refused(colour, tmp_path):
    fit(cfg_for(colour, tmp_path, epochs=1, name="src"))
    with pytest.raises(KdkitError, match=r"a checkpoint of 'test_efficientnet', but 'test_resnet' was asked for"):
        fit(cfg_for(colour, tmp_path, epochs=1, name="x", model=RESNET,
                    finetune=str(tmp_path / "src" / "last.pth")))
    bare = tmp_path / "bare.pth"  # a plain state dict: load_weights names the mismatch
    torch.save(read_checkpoint(tmp_path / "src" / "last.pth")["state_dict"], bare)
    with pytest.raises(KdkitError, match=r"bare\.pth \(test_resnet, model weights\): does not fit the model.*"
                                         r"another architecture"):
        fit(cfg_for(colour, tmp_path, epochs=1, name="y", model=RESNET, finetune=str(bare)))
    with pytest.raises(KdkitError, match=r"a checkpoint of 'test_efficientnet'"):
        fit(cfg_for(colour, tmp_path, epochs=2, name="src", model=RESNET, resume="last"))


# ---------------------------------------------------------------------------------------------

def test_lr_find_plots_and_suggests(colour, tmp_path):
    from kdkit.train.lr_find import lr_find

    r = lr_find(cfg_for(colour, tmp_path, name="lrf"), start_lr=1e-5, end_lr=10.0, num_steps=20)
    assert (tmp_path / "lrf" / "lr_find.png").exists() and (tmp_path / "lrf" / "lr_find.json").exists()
    assert 1e-5 <= r.suggested_lr <= 10 and len(r.lrs) == len(r.losses) >= 5
    assert r.lrs == sorted(r.lrs)


# ---------------------------------------------------------------------------------------------
# resuming with other epochs or other data

def trainable(state: dict) -> dict:
    return {k: v for k, v in state.items() if v.dtype.is_floating_point and "running" not in k}


@pytest.mark.slow
def test_resume_with_more_epochs_follows_the_longer_schedule(colour, tmp_path, capsys):
    """A finished 1-epoch run continued to 3: the added epochs train (their LR is that of a run started
    with 3 epochs at the same position, not the ended schedule's 0), and the weights move."""
    base = dict(model=RESNET, opt="sgd", lr=0.05, sched="cosine")
    fit(cfg_for(colour, tmp_path, name="three", epochs=3, **base))
    fit(cfg_for(colour, tmp_path, name="ext", epochs=1, **base))
    one = read_checkpoint(tmp_path / "ext" / "last.pth")["state_dict"]
    capsys.readouterr()
    fit(cfg_for(colour, tmp_path, name="ext", epochs=3, resume="last", **base))
    assert "LR schedule is now that of a 3-epoch run (this run started with 1)" in capsys.readouterr().out
    got, want = rows(tmp_path / "ext"), rows(tmp_path / "three")
    assert [r["epoch"] for r in got] == [1, 2, 3]
    assert got[1]["lr"] == pytest.approx(want[1]["lr"]) and got[1]["lr"] > 0.01  # was 0: the 1-epoch cosine ended
    three = read_checkpoint(tmp_path / "ext" / "last.pth")["state_dict"]
    moved = [k for k, v in trainable(one).items() if not torch.equal(v, three[k])]
    assert len(moved) == len(trainable(one))


@pytest.mark.slow
def test_resume_on_another_train_set_is_refused(colour, tmp_path):
    other = write_colour_shards(tmp_path / "other", per_class=(12, 4), seed=1)
    fit(cfg_for(colour, tmp_path, name="r", epochs=1))
    config = (tmp_path / "r" / "config.yaml").read_text()
    with pytest.raises(KdkitError, match=r"this run trained on .*colour.*\(24 samples\); .*other.* holds other "
                                         r"samples \(36\)\. Resume it on the set it started with.*--finetune"):
        fit(cfg_for(other, tmp_path, name="r", epochs=2, resume="last"))
    assert (tmp_path / "r" / "config.yaml").read_text() == config  # the run folder still says what it trained on
    moved = tmp_path / "moved"
    shutil.copytree(colour, moved)  # the same set elsewhere: resumes
    fit(cfg_for(moved, tmp_path, name="r", epochs=2, resume="last"))
    assert [r["epoch"] for r in rows(tmp_path / "r")] == [1, 2]


def test_evaluation_reads_the_device_once_not_per_batch(host_reads):
    """evaluate() sums loss and hits on the device: on a GPU, a read per batch would stall the queue three
    times a batch. The same numbers as a hand computation, one batch or six."""
    from contextlib import nullcontext
    from types import SimpleNamespace

    from kdkit.pipelines.config import Batch
    from kdkit.runtime import Runtime

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 7))
    images, labels = torch.randn(24, 3, 2, 2), torch.randint(0, 7, (24,))
    p = SimpleNamespace(rt=Runtime(), data=SimpleNamespace(num_classes=7), autocast=nullcontext)
    with torch.no_grad():
        logits = model(images)
    top5 = logits.topk(5, 1).indices == labels[:, None]
    expected = {"loss": float(torch.nn.functional.cross_entropy(logits, labels)),
                "top1": 100 * float(top5[:, 0].double().mean()), "top5": 100 * float(top5.any(1).double().mean()),
                "count": 24}
    reads = []
    for size in (24, 4):
        batches = [Batch(x, y, None) for x, y in zip(images.split(size), labels.split(size))]
        counter = host_reads()
        got = loop.evaluate(model, batches, p)
        reads.append(counter.count)
        assert got == pytest.approx(expected, rel=1e-6)
    assert reads[0] == reads[1]


def test_the_loader_wait_is_timed_without_a_device_sync_per_step(colour, tmp_path, monkeypatch):
    """On CUDA the loop used to synchronize the whole device before every next() to time the loader wait,
    so the host could never queue a step ahead. Now two CUDA events per step time it, read (one host wait)
    every log_interval steps and once at the end of the epoch. Faked here: the loader's wait on a 'GPU'
    whose events are host timestamps; 6 steps, log_interval 3."""
    waits = []

    class Event:
        def __init__(self, enable_timing=False):
            self.at = None

        def record(self):
            self.at = time.perf_counter()

        def synchronize(self):
            waits.append("event")

        def elapsed_time(self, end):
            return 1000 * (end.at - self.at)

    class OnCuda(loop.LoaderWait):
        def __init__(self, device):
            super().__init__(device)
            self.cuda = True

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: waits.append("device"))
    monkeypatch.setattr(loop, "LoaderWait", OnCuda)
    history = fit(cfg_for(colour, tmp_path, epochs=1, name="w", batch_size=4, log_interval=3))
    assert history[0]["samples"] == 24  # 6 steps
    assert waits == ["event", "event", "device"]  # steps 3 and 6, then the epoch's end: not one per step
    assert 0 < history[0]["loader_wait_share"] < 1  # the events' gaps were summed
