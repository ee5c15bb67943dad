"""Trainer options end to end: optimizer / schedule / precision combinations resume exactly, the CLI
runs a training, a train shard-set folder finds its val sibling, optional extras fail clearly."""
from __future__ import annotations

import argparse

import pytest
import torch

from kdkit.errors import KdkitError
from kdkit.models.checkpoint import read_checkpoint
from kdkit.train.cli import add_lr_find_parser, add_parser
from kdkit.train.data import prepare_data
from kdkit.train.loop import fit
from test_train_loop import Killed, add_teacher_outputs, cfg_for, kill_at_step, rows, same_state, write_colour_shards


@pytest.fixture(scope="module")
def colour(tmp_path_factory):
    return write_colour_shards(tmp_path_factory.mktemp("colour-opts"))


@pytest.mark.parametrize("opts", [
    # Lookahead around RAdam, reduce-on-plateau, bf16 autocast, channels-last, clipping, 2 micro-batches per update
    dict(opt="lookahead_radam", lr=3e-3, sched="plateau", patience_epochs=0, decay_rate=0.5, amp="bf16",
         channels_last=True, clip_grad=1.0, grad_accum=2),
    # LAMB, warmup + multistep, label smoothing, cutmix only, EMA with warmup, agc clipping
    dict(opt="lamb", lr=5e-3, sched="multistep", decay_milestones=[1], warmup_epochs=1, label_smoothing=0.1,
         cutmix=1.0, ema=True, ema_warmup=True, clip_grad=0.05, clip_mode="agc"),
], ids=["lookahead-radam-plateau-bf16", "lamb-multistep-ema"])
@pytest.mark.slow
def test_option_combinations_resume_exactly(colour, tmp_path, monkeypatch, opts):
    opts = dict(opts, model="test_efficientnet", epochs=2)  # 0.1M parameters: the fastest timm test model
    whole = fit(cfg_for(colour, tmp_path, name="whole", **opts))
    with monkeypatch.context() as m:
        kill_at_step(m, 6)  # epoch 2, third micro-batch: after a mid-epoch checkpoint
        with pytest.raises(Killed):
            fit(cfg_for(colour, tmp_path, name="cut", checkpoint_every=1, **opts))
    assert read_checkpoint(tmp_path / "cut" / "last.pth")["train_state"]["step_in_epoch"] == 2
    fit(cfg_for(colour, tmp_path, name="cut", checkpoint_every=1, resume="last", **opts))
    a, b = (read_checkpoint(tmp_path / n / "last.pth") for n in ("whole", "cut"))
    same_state(a["state_dict"], b["state_dict"])
    assert a["train_state"]["scheduler"] == b["train_state"]["scheduler"]
    assert [r["lr"] for r in whole] == [r["lr"] for r in rows(tmp_path / "cut")]
    assert all(torch.isfinite(v.float()).all() for v in a["state_dict"].values())


def test_cli_trains_and_reports_bad_input(colour, tmp_path):
    p = argparse.ArgumentParser(prog="kdkit")
    sub = p.add_subparsers(dest="command", required=True)
    add_parser(sub)
    add_lr_find_parser(sub)
    common = ["--model", "test_resnet", "--image-size", "32", "--batch-size", "8", "--loader-threads", "1",
              "--shuffle-buffer", "32", "--no-progress", "--output", str(tmp_path), "--epochs", "1"]
    a = p.parse_args(["train", "teacher", str(colour), "-c", "bag-of-tricks", "--name", "cli", "--lr", "0.01"] + common)
    assert a.func(a) == 0
    saved = (tmp_path / "cli" / "config.yaml").read_text()
    assert "recipe: bag-of-tricks" in saved and "lr: 0.01" in saved and "mixup: 0.2" in saved
    s = p.parse_args(["train", "student", str(colour), "--name", "s"] + common)
    with pytest.raises(KdkitError, match="has no teacher logits"):
        s.func(s)
    f = p.parse_args(["lr-find", str(colour), "--name", "lrf", "--num-steps", "8", "--start-lr", "1e-4"] + common)
    assert f.func(f) == 0 and (tmp_path / "lrf" / "lr_find.png").exists()


def test_train_set_folder_finds_its_val_sibling(colour, tmp_path):
    info = prepare_data(cfg_for(colour / "train", tmp_path))
    assert info.val is not None and info.val.folder.name == "val" and info.num_classes == 3
    assert prepare_data(cfg_for(colour / "train", tmp_path, val_split=None)).val is None


def test_tensorboard_is_optional(colour, tmp_path):
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(KdkitError, match="--tensorboard needs the tensorboard package"):
            fit(cfg_for(colour, tmp_path, epochs=1, tensorboard=True))
    else:
        fit(cfg_for(colour, tmp_path, epochs=1, tensorboard=True, name="tb"))
        assert any((tmp_path / "tb" / "tb").iterdir())


from conftest import cuda_only as gpu  # noqa: E402


@gpu
@pytest.mark.parametrize("amp,compile_", [("fp16", False), ("bf16", True)])
def test_gpu_training_with_dali_gpu_loader(colour, tmp_path, amp, compile_):
    data = add_teacher_outputs(colour, tmp_path / "kd")
    history = fit(cfg_for(data, tmp_path, epochs=2, name="gpu", device="cuda", kd="stored", amp=amp,
                          channels_last=True, ema=True, mixup=0.2, compile=compile_))
    assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in history)
    assert history[-1]["val_top1"] >= 50
