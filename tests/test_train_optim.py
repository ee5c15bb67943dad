"""The Keras seed's training options: linear / exponential LR decay per epoch, TF-style RMSprop and
dropout before the classifier; from flags and from recipe files."""
from __future__ import annotations

import argparse

import pytest
import torch
from timm.optim import RMSpropTF

from kdkit.errors import KdkitError, OptionError
from kdkit.models.checkpoint import read_checkpoint
from kdkit.train.config import make_config
from kdkit.train.loop import fit
from kdkit.train.model import build_model
from kdkit.train.optim import build_optimizer, build_scheduler
from test_train_loop import cfg_for, rows, write_colour_shards


def expected_lr(sched: str, lr: float, min_lr: float, decay_epochs: int, i: int) -> float:
    """The Keras seed's --initial_lr / --final_lr decays: epoch i (0-based) of the decay epochs."""
    if sched == "linear":
        return lr - (lr - min_lr) * i / (decay_epochs - 1)
    return lr * (min_lr / lr) ** (i / (decay_epochs - 1))


def lrs_per_epoch(cfg, updates_per_epoch: int = 3) -> list[float]:
    """The LR each epoch trains at, driving the scheduler as the training loop does."""
    model = torch.nn.Linear(2, 2)
    opt = build_optimizer(cfg, model)
    sched = build_scheduler(cfg, opt, updates_per_epoch)
    out, updates = [], 0
    for epoch in range(cfg.epochs):
        seen = set()
        for _ in range(updates_per_epoch):
            seen.add(opt.param_groups[0]["lr"])
            updates += 1
            sched.step_update(num_updates=updates)
        assert len(seen) == 1, f"the LR changed within epoch {epoch + 1}: {seen}"  # one LR per epoch
        out.append(seen.pop())
        sched.step(epoch + 1)
    return out


@pytest.mark.parametrize("sched", ["linear", "exp"])
@pytest.mark.parametrize("warmup", [0, 2])
def test_per_epoch_decay_runs_from_lr_to_min_lr(sched, warmup):
    cfg = make_config(dict(sched=sched, lr=0.1, min_lr=0.002, epochs=6 + warmup, warmup_epochs=warmup,
                           warmup_lr=1e-4, opt="sgd"))
    got = lrs_per_epoch(cfg)
    assert got[:warmup] == pytest.approx([1e-4 + (0.1 - 1e-4) * e / warmup for e in range(warmup)])
    want = [expected_lr(sched, 0.1, 0.002, 6, i) for i in range(6)]
    assert got[warmup:] == pytest.approx(want, rel=1e-9)
    assert got[warmup] == pytest.approx(0.1) and got[-1] == pytest.approx(0.002)  # --lr first, --min-lr last
    if sched == "exp":  # a constant ratio from one epoch to the next
        ratios = [b / a for a, b in zip(got[warmup:], got[warmup + 1:])]
        assert ratios == pytest.approx([ratios[0]] * len(ratios))


def test_per_epoch_decay_refuses_what_it_cannot_reach():
    with pytest.raises(OptionError, match=r"min_lr=0.0: sched=exp decays .* expected 0 < min_lr <= lr"):
        make_config(dict(sched="exp", lr=0.1, min_lr=0.0, epochs=5))
    with pytest.raises(OptionError, match=r"min_lr=0.5: sched=linear .* expected min_lr <= lr"):
        make_config(dict(sched="linear", lr=0.1, min_lr=0.5, epochs=5))
    with pytest.raises(OptionError, match=r"sched=linear: .* expected epochs >= warmup_epochs \+ 2"):
        make_config(dict(sched="linear", epochs=3, warmup_epochs=2))
    with pytest.raises(OptionError, match=r"sched='expo': expected one of .*linear, exp"):
        make_config(dict(sched="expo"))


def test_rmsprop_is_timms_tf_rmsprop_and_a_step_changes_the_weights():
    model = torch.nn.Linear(4, 3)
    opt = build_optimizer(make_config(dict(opt="rmsprop", lr=0.01, momentum=0.9)), model)
    assert type(opt) is RMSpropTF
    group = opt.param_groups[0]
    assert (group["alpha"], group["eps"], group["momentum"]) == (0.9, 1e-3, 0.9)
    before = model.weight.detach().clone()
    torch.nn.functional.cross_entropy(model(torch.randn(8, 4)), torch.arange(8) % 3).backward()
    opt.step()
    assert not torch.equal(before, model.weight) and "square_avg" in opt.state[model.weight]
    eps = build_optimizer(make_config(dict(opt="rmsprop", opt_eps=1e-7)), model).param_groups[0]["eps"]
    assert eps == 1e-7  # Keras' RMSprop epsilon, when asked for
    lookahead = build_optimizer(make_config(dict(opt="lookahead_rmsprop")), model)
    assert type(lookahead._base_optimizer) is RMSpropTF and lookahead.param_groups[0]["eps"] == 1e-3


def test_drop_rate_reaches_the_model():
    x = torch.randn(4, 3, 32, 32)
    for name in ("test_efficientnet", "mlp_800"):
        kw = dict(model=name, model_kwargs={"img_size": 32} if name == "mlp_800" else {})
        plain, dropped = (build_model(make_config(dict(kw, **extra)), 3) for extra in ({}, {"drop_rate": 0.5}))
        assert any(isinstance(m, torch.nn.Dropout) and m.p == 0.5 for m in dropped.modules()) or \
            getattr(dropped, "drop_rate", None) == 0.5
        torch.manual_seed(0)
        dropped.train()
        assert not torch.equal(dropped(x), dropped(x)), name  # a fresh dropout mask each pass
        if name == "test_efficientnet":
            plain.train()
            assert torch.equal(plain(x), plain(x))  # without it, training mode is deterministic
        dropped.eval()
        assert torch.equal(dropped(x), dropped(x))
    with pytest.raises(KdkitError, match=r"drop_rate=0.2 and model_kwargs drop_rate=0.3 disagree"):
        build_model(make_config(dict(model="test_efficientnet", drop_rate=0.2, model_kwargs={"drop_rate": 0.3})), 3)
    with pytest.raises(OptionError, match=r"drop_rate=1.5: expected a number 0 <= drop_rate <= 1"):
        make_config(dict(drop_rate=1.5))


def test_a_model_without_drop_rate_is_refused_in_one_line():
    from timm.models import register_model

    class NoDrop(torch.nn.Module):
        def __init__(self, num_classes=3):
            super().__init__()
            self.fc = torch.nn.Linear(3, num_classes)

    name = "kdkit_test_nodrop"

    def kdkit_test_nodrop(pretrained=False, **kwargs):
        return NoDrop(**kwargs)
    import timm
    if not timm.is_model(name):
        register_model(kdkit_test_nodrop)
    with pytest.raises(KdkitError, match=r"drop_rate=0.1: model kdkit_test_nodrop takes no drop_rate"):
        build_model(make_config(dict(model=name, drop_rate=0.1)), 3)


def test_a_recipe_sets_the_keras_seed_options_and_a_run_follows_them(tmp_path):
    data = write_colour_shards(tmp_path / "colour", per_class=(4, 2))
    recipe = tmp_path / "keras.yaml"
    recipe.write_text("opt: rmsprop\nlr: 0.004\nsched: exp\nmin_lr: 0.0001\nepochs: 3\ndrop_rate: 0.3\n")
    cfg = make_config({"data": str(data), "output": str(tmp_path), "name": "keras",
                       **{k: v for k, v in dict(cfg_for(data, tmp_path).to_dict()).items()
                          if k in ("model", "image_size", "batch_size", "loader_threads", "shuffle_buffer",
                                   "progress")}}, recipe=str(recipe))
    assert (cfg.opt, cfg.sched, cfg.drop_rate) == ("rmsprop", "exp", 0.3)
    history = fit(cfg)
    assert [r["lr"] for r in history] == pytest.approx([expected_lr("exp", 0.004, 1e-4, 3, i) for i in range(3)])
    assert rows(tmp_path / "keras") == history
    ckpt = read_checkpoint(tmp_path / "keras" / "last.pth")
    assert ckpt["model_kwargs"]["drop_rate"] == 0.3  # the checkpoint names the model it holds
    assert "square_avg" in next(iter(ckpt["train_state"]["optimizer"]["state"].values()))


def test_cli_flags(tmp_path):
    from kdkit.train.cli import add_parser, config_from_args

    p = argparse.ArgumentParser(prog="kdkit")
    add_parser(p.add_subparsers(dest="command"))
    a = p.parse_args(["train", "teacher", "d", "--opt", "rmsprop", "--opt-eps", "1e-7", "--sched", "linear",
                      "--min-lr", "0.001", "--drop-rate", "0.2", "--epochs", "4"])
    cfg = config_from_args(a, "teacher")
    assert (cfg.opt, cfg.opt_eps, cfg.sched, cfg.min_lr, cfg.drop_rate) == ("rmsprop", 1e-7, "linear", 0.001, 0.2)


def test_bundled_recipes_of_the_keras_and_openvino_seeds():
    keras = make_config({"data": "x"}, recipe="keras-rmsprop-exp")
    assert (keras.opt, keras.sched, keras.drop_rate) == ("rmsprop", "exp", 0.2) and 0 < keras.min_lr < keras.lr
    assert type(build_optimizer(keras, torch.nn.Linear(2, 2))) is RMSpropTF
    dml = make_config({"data": "x"}, recipe="mutual-mobilenetv3")
    assert dml.mutual and dml.peer_am_softmax and dml.run_name == "mutual-mobilenetv3_large_100"
