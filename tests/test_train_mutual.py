"""`kdkit train mutual` (deep mutual learning, the OpenVINO seed's MobileNetV3 recipe): each student's
loss against a hand computation, exact resume of the pair, the CLI end to end with `kdkit eval` on
the peer, and the options it refuses."""
from __future__ import annotations

import json

import pytest
import torch

from kdkit.cli import main
from kdkit.errors import KdkitError
from kdkit.models.checkpoint import read_checkpoint
from kdkit.train.kd import TeacherTargets
from kdkit.train.losses import DistillationLoss
from kdkit.train.loop import fit
from kdkit.train.mutual import mutual_losses
from test_train_loop import (Killed, add_teacher_outputs, cfg_for, kill_at_step, rows, same_state,
                             write_colour_shards)


@pytest.fixture(scope="module")
def colour(tmp_path_factory):
    return write_colour_shards(tmp_path_factory.mktemp("colour-mutual"))


def hand_loss(own, peer, labels, alpha, T, am=None, teacher=None):
    """(1 - alpha) * CE(own, y) + alpha * T^2 * KL(softmax(peer / T) || softmax(own / T)), written out;
    am=(s, m): the AM-softmax margin s * m off the target logit in the CE term; teacher logits: the
    KL's target is the mean of the teacher's and the peer's softmax at T."""
    n, c = own.shape
    hard_logits = own.clone()
    if am:
        hard_logits[torch.arange(n), labels] -= am[0] * am[1]
    ce = sum(-torch.log(torch.exp(hard_logits[i, labels[i]]) / torch.exp(hard_logits[i]).sum()) for i in range(n)) / n
    p = torch.exp(peer / T) / torch.exp(peer / T).sum(1, keepdim=True)
    if teacher is not None:
        p = (p + torch.exp(teacher / T) / torch.exp(teacher / T).sum(1, keepdim=True)) / 2
    q = torch.exp(own / T) / torch.exp(own / T).sum(1, keepdim=True)
    kl = (p * (torch.log(p) - torch.log(q))).sum() / n
    return (1 - alpha) * ce + alpha * T * T * kl


def test_each_student_takes_dkd_against_its_peer_as_against_a_teacher():
    from kdkit.train.losses import DKD, DKDStandardized, one_hot_smoothed

    from test_train_losses import hand_dkd, zscore

    torch.manual_seed(1)
    a, b = torch.randn(3, 4), torch.randn(3, 4) * 2
    labels = [0, 3, 1]
    target = one_hot_smoothed(torch.tensor(labels), 4)
    for term, z in ((DKD(1.0, 2.0), lambda r: r), (DKDStandardized(1.0, 2.0), zscore)):
        losses = mutual_losses([a, b], target, [DistillationLoss(2.0, 1.0, term=term)] * 2)
        for got, own, peer in zip(losses.tolist(), (a, b), (b, a)):
            hand = [hand_dkd(z(o), z(p), y, 2.0, 1.0, 2.0)[0] for o, p, y in zip(own.tolist(), peer.tolist(), labels)]
            assert got == pytest.approx(sum(hand) / 3, rel=1e-5)


def test_each_students_loss_is_the_hand_computed_one():
    torch.manual_seed(0)
    a = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    b = (torch.randn(4, 3, dtype=torch.float64) * 5).requires_grad_(True)  # as AM-softmax's scaled cosines
    labels = torch.tensor([0, 2, 1, 2])
    target = torch.nn.functional.one_hot(labels, 3).float()
    alpha, T, s, m = 0.4, 3.0, 5.0, 0.35
    losses = mutual_losses([a, b], target, [DistillationLoss(T, alpha), DistillationLoss(T, alpha, s, m)])
    with torch.no_grad():
        want_a = hand_loss(a.double(), b.double(), labels, alpha, T)
        want_b = hand_loss(b.double(), a.double(), labels, alpha, T, am=(s, m))
    assert losses.tolist() == pytest.approx([want_a.item(), want_b.item()], rel=1e-5)
    # the peer enters detached: student 1's loss moves student 1 alone, and the other way round
    for i, (own, peer) in enumerate(((a, b), (b, a))):
        g_own, g_peer = torch.autograd.grad(losses[i], [own, peer], retain_graph=True)
        assert g_own.abs().sum() > 0 and not g_peer.any()
    # a stored teacher on top: the mean of its and the peer's distributions is the KL's target
    t = torch.randn(4, 3, dtype=torch.float64) * 2
    losses = mutual_losses([a, b], target, [DistillationLoss(T, alpha), DistillationLoss(T, alpha, s, m)],
                           teacher=TeacherTargets(t))
    with torch.no_grad():
        want_a = hand_loss(a, b, labels, alpha, T, teacher=t)
        want_b = hand_loss(b, a, labels, alpha, T, am=(s, m), teacher=t)
    assert losses.tolist() == pytest.approx([want_a.item(), want_b.item()], rel=1e-5)


def mutual_cfg(data, out, name, **kw):
    # mixing, smoothing, warmup + cosine, an AM-softmax peer of another architecture: all must resume exactly
    return cfg_for(data, out, name=name, epochs=3, mutual=True, peer_model="test_resnet", peer_am_softmax=True,
                   kd_alpha=0.5, kd_temperature=2.0, mixup=0.4, cutmix=1.0, label_smoothing=0.1, warmup_epochs=1,
                   opt="sgd", lr=0.05, **kw)


@pytest.mark.slow
def test_mutual_learning_writes_both_students_and_resumes_exactly(colour, tmp_path, monkeypatch):
    history = fit(mutual_cfg(colour, tmp_path, "whole"))
    run = tmp_path / "whole"
    assert {"best.pth", "last.pth", "peer_best.pth", "peer_last.pth", "curves.png"} <= {p.name for p in run.iterdir()}
    for key in ("train_loss", "peer_train_loss", "val_top1", "peer_val_top1", "peer_val_top3"):
        assert key in history[-1], key
    whole = read_checkpoint(run / "last.pth")
    peer = read_checkpoint(run / "peer_last.pth")
    assert whole["model"] == "test_efficientnet" and "head" not in whole
    assert peer["model"] == "test_resnet" and peer["head"]["type"] == "am_softmax" and peer["train_state"] is None
    same_state(peer["state_dict"], whole["train_state"]["peer"]["state_dict"])
    assert peer["metrics"]["val_top1"] == history[-1]["peer_val_top1"]
    best = max(r["peer_val_top1"] for r in history)
    assert read_checkpoint(run / "peer_best.pth")["metrics"]["val_top1"] == best
    # killed in the middle of epoch 2, after a mid-epoch checkpoint (the epoch's loss sums, the loader's
    # position) and after an evaluation (both students back in training mode)
    with monkeypatch.context() as m:
        kill_at_step(m, 6)
        with pytest.raises(Killed):
            fit(mutual_cfg(colour, tmp_path, "cut", checkpoint_every=1))
    assert read_checkpoint(tmp_path / "cut" / "last.pth")["train_state"]["step_in_epoch"] == 2
    fit(mutual_cfg(colour, tmp_path, "cut", checkpoint_every=1, resume="last"))
    again = read_checkpoint(tmp_path / "cut" / "last.pth")
    same_state(whole["state_dict"], again["state_dict"])
    same_state(whole["train_state"]["peer"]["state_dict"], again["train_state"]["peer"]["state_dict"])
    same_state(peer["state_dict"], read_checkpoint(tmp_path / "cut" / "peer_last.pth")["state_dict"])
    got, want = rows(tmp_path / "cut"), rows(run)
    assert [r["epoch"] for r in got] == [1, 2, 3]
    for key in ("train_loss", "peer_train_loss", "val_loss", "val_top1", "peer_val_loss", "peer_val_top1", "lr"):
        assert [r[key] for r in got] == [r[key] for r in want], key


@pytest.mark.slow
def test_cli_trains_two_students_and_eval_takes_the_peer(colour, tmp_path, capsys):
    common = ["--model", "test_efficientnet", "--image-size", "32", "--batch-size", "8", "--loader-threads", "1",
              "--shuffle-buffer", "32", "--no-progress", "--output", str(tmp_path), "--opt", "adamw", "--lr", "3e-3"]
    assert main(["train", "mutual", str(colour), "--name", "dml", "--epochs", "2", "--peer-am-softmax",
                 "--kd-alpha", "0.5"] + common) == 0
    out = capsys.readouterr().out
    assert "mutual learning with test_efficientnet with the AM-softmax head" in out and "peer_best.pth" in out
    run = tmp_path / "dml"
    assert "mutual: true" in (run / "config.yaml").read_text()
    peer_top1 = rows(run)[-1]["peer_val_top1"]
    assert main(["eval", str(run / "peer_last.pth"), "--data", str(colour), "--json", str(tmp_path / "p.json"),
                 "--batch-size", "6"]) == 0
    report = json.loads((tmp_path / "p.json").read_text())
    assert 100 * report["metrics"]["top1"] == pytest.approx(peer_top1)  # the peer as the run evaluated it
    # the two students as an ensemble
    assert main(["eval", str(run / "last.pth"), str(run / "peer_last.pth"), "--data", str(colour)]) == 0
    # continuing the run: the same subcommand, its saved config
    assert main(["train", "mutual", str(colour), "--name", "dml", "--output", str(tmp_path), "--epochs", "3",
                 "--resume", "--no-progress"]) == 0
    assert [r["epoch"] for r in rows(run)] == [1, 2, 3]


@pytest.mark.parametrize("flags,message", [
    (["--ema"], "kdkit train mutual: --ema: EMA weights of the two students are not supported"),
    (["--sam-rho", "0.05"], "kdkit train mutual: --sam-rho: SAM's second pass is not supported"),
])
def test_what_mutual_learning_refuses_is_one_line_with_exit_status_2(colour, tmp_path, capsys, flags, message):
    assert main(["train", "mutual", str(colour), "--output", str(tmp_path), "--epochs", "1"] + flags) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("kdkit: error:")]
    assert len(errors) == 1 and message in errors[0]
    assert not (tmp_path / "mutual-resnet50").exists()


def test_mutual_learning_with_stored_teacher_logits_on_top(colour, tmp_path, capsys):
    data = add_teacher_outputs(colour, tmp_path / "kd", views=3)
    common = ["--model", "test_efficientnet", "--image-size", "32", "--batch-size", "8", "--loader-threads", "1",
              "--shuffle-buffer", "32", "--no-progress", "--output", str(tmp_path), "--epochs", "1"]
    assert main(["train", "mutual", str(data), "--name", "dml-kd", "--kd", "replay", "--val-data", str(colour)]
                + common) == 0
    assert "mutual learning with test_efficientnet and KD from replayed stored views" in capsys.readouterr().out
    assert all(k in rows(tmp_path / "dml-kd")[0] for k in ("train_loss", "peer_train_loss", "peer_val_top1"))
    assert main(["train", "mutual", str(colour), "--name", "x", "--kd", "stored"] + common) == 2
    assert "has no teacher logits" in capsys.readouterr().err  # the same checks as `kdkit train student`


def test_kd_and_peer_options_stay_with_their_subcommands(colour, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("mutual: true\n")
    assert main(["train", "teacher", str(colour), "-c", str(recipe), "--output", str(tmp_path)]) == 2
    assert "use `kdkit train mutual`" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # no --peer-* flag outside `kdkit train mutual`
        main(["train", "teacher", str(colour), "--peer-model", "test_resnet"])
    assert e.value.code == 2
    with pytest.raises(KdkitError, match="peer_model='test_resnet', .* describe the second student"):
        cfg_for(colour, tmp_path, epochs=1, peer_model="test_resnet")  # refused with the options, before any run


from conftest import cuda_only as gpu  # noqa: E402


@gpu
def test_gpu_mutual_learning_with_fp16_loss_scaling(colour, tmp_path):
    """One GradScaler over the two students' optimizers (scaler.step for each, one update)."""
    history = fit(cfg_for(colour, tmp_path, epochs=2, name="gpu", device="cuda", amp="fp16", mutual=True,
                          peer_am_softmax=True, kd_alpha=0.5, channels_last=True, clip_grad=1.0))
    for key in ("train_loss", "peer_train_loss", "val_top1", "peer_val_top1"):
        assert all(torch.isfinite(torch.tensor(r[key])) for r in history), key


def test_resuming_a_single_student_run_as_mutual_names_the_command(colour, tmp_path, capsys):
    common = ["--model", "test_efficientnet", "--image-size", "32", "--batch-size", "8", "--loader-threads", "1",
              "--shuffle-buffer", "32", "--no-progress", "--output", str(tmp_path)]
    assert main(["train", "teacher", str(colour), "--name", "one", "--epochs", "1"] + common) == 0
    capsys.readouterr()
    assert main(["train", "mutual", str(colour), "--name", "one", "--epochs", "2", "--resume"] + common) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "was not trained with `kdkit train mutual`" in err and "--mutual" not in err
