"""Trainer losses, mixing, SAM and the AM-softmax head against hand computations (no data, no DALI)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from timm.loss import JsdCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from kdkit.train.kd import TeacherTargets
from kdkit.train.losses import (AugMixJsdLoss, DistillationLoss, dense_logits_from_topk, kd_kl, kd_loss,
                                one_hot_smoothed, soft_target_ce, teacher_probs)
from kdkit.train.mix import MixParams, draw_mix, mix_batch, mix_images
from kdkit.models.heads import AMSoftmaxHead
from kdkit.train.config import TrainConfig
from kdkit.train.optim import SAM, build_optimizer, build_scheduler


def softmax(x):
    e = [math.exp(v) for v in x]
    return [v / sum(e) for v in e]


def test_kd_loss_matches_a_hand_computation():
    s, t, T, alpha = [1.0, 2.0, 0.5], [2.0, 0.0, 1.0], 2.0, 0.7
    # by hand: teacher and student distributions at T, KL(p_t || p_s), and the CE on label 1
    p_t, p_s = softmax([v / T for v in t]), softmax([v / T for v in s])
    kl = sum(a * math.log(a / b) for a, b in zip(p_t, p_s))
    ce = -math.log(softmax(s)[1])
    expected = (1 - alpha) * ce + alpha * T * T * kl
    got = kd_loss(torch.tensor([s]), torch.tensor([t]), torch.tensor([1]), temperature=T, alpha=alpha)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # explicit numbers for the record: p_t = (0.5065, 0.1863, 0.3072) at T=2
    assert p_t[0] == pytest.approx(0.506480, abs=1e-6) and expected == pytest.approx(0.686104, abs=1e-6)


def test_kd_loss_averages_over_the_batch_and_takes_fp16_teacher_logits():
    s = torch.tensor([[1.0, 2.0, 0.5], [0.0, 0.0, 3.0]])
    t = torch.tensor([[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]], dtype=torch.float16)
    both = kd_loss(s, t, torch.tensor([1, 2]), 3.0, 1.0)
    one = [kd_loss(s[i:i + 1], t[i:i + 1], torch.tensor([[1], [2]][i]), 3.0, 1.0) for i in range(2)]
    assert both.item() == pytest.approx((one[0] + one[1]).item() / 2, rel=1e-6)
    assert kd_kl(s, teacher_probs(s, 3.0), 3.0).item() == pytest.approx(0.0, abs=1e-6)  # KL(p || p) = 0


def test_label_smoothing_value():
    target = one_hot_smoothed(torch.tensor([1]), 3, 0.1)
    assert target.tolist()[0] == pytest.approx([0.1 / 3, 0.9 + 0.1 / 3, 0.1 / 3])
    logits = torch.tensor([[0.2, 1.5, -0.3], [2.0, 0.1, 0.0]])
    labels = torch.tensor([1, 0])
    ours = soft_target_ce(logits, one_hot_smoothed(labels, 3, 0.1))
    assert ours.item() == pytest.approx(LabelSmoothingCrossEntropy(0.1)(logits, labels).item(), rel=1e-6)
    logp = torch.log_softmax(logits[0], 0).tolist()  # by hand for sample 0
    hand0 = -(0.9 + 0.1 / 3) * logp[1] - (0.1 / 3) * (logp[0] + logp[2])
    assert soft_target_ce(logits[:1], one_hot_smoothed(labels[:1], 3, 0.1)).item() == pytest.approx(hand0, rel=1e-6)


def test_topk_dense_target():
    values = torch.tensor([[3.0, 1.0], [0.5, 2.0]], dtype=torch.float16)
    indices = torch.tensor([[2, 0], [1, 3]], dtype=torch.int32)
    dense = dense_logits_from_topk(values, indices, 4)
    assert dense[0].tolist() == [1.0, float("-inf"), 3.0, float("-inf")]
    probs = teacher_probs(dense, 2.0)
    # the teacher's distribution renormalized over its top-k classes, zero elsewhere
    assert probs[0].tolist() == pytest.approx([softmax([0.5, 1.5])[0], 0.0, softmax([0.5, 1.5])[1], 0.0])
    assert probs[1, 3].item() == pytest.approx(softmax([0.25, 1.0])[1])
    loss = kd_kl(torch.zeros(2, 4), probs, 2.0)  # zeros in the target contribute nothing (0 log 0 = 0)
    assert torch.isfinite(loss) and loss.item() == pytest.approx(
        4 * np.mean([sum(p * math.log(p * 4) for p in row if p > 0) for row in probs.tolist()]), rel=1e-5)
    views = dense_logits_from_topk(torch.ones(2, 3, 2), torch.tensor([[[0, 1]] * 3] * 2), 5)  # (B, K, k)
    assert views.shape == (2, 3, 5)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_topk_targets_renormalized_or_marginal_each_sum_to_one(temperature):
    logits = torch.randn(3, 2, 10) * 3  # (B, K views, C)
    log_probs = logits.log_softmax(-1)
    values, indices = log_probs.topk(4, dim=-1)  # top-k as add-teacher-logits stores it (fp16 below)
    values = values.half()
    kept = values.float().exp()
    for target in ("renormalize", "marginal"):
        probs = teacher_probs(dense_logits_from_topk(values, indices, 10, target), temperature)
        assert probs.shape == (3, 2, 10) and torch.allclose(probs.sum(-1), torch.ones(3, 2), atol=1e-6)
        outside = torch.ones_like(probs, dtype=torch.bool).scatter_(-1, indices, False)
        at_kept = probs.gather(-1, indices)
        if target == "renormalize":  # the k classes only, in the teacher's proportions
            assert (probs[outside] == 0).all()
            if temperature == 1.0:
                assert torch.allclose(at_kept, kept / kept.sum(-1, keepdim=True), atol=1e-6)
        else:  # every other class the same share of what the k classes leave
            rest = probs.masked_fill(~outside, float("nan"))
            assert (rest.nan_to_num(1.0) > 0).all()
            assert torch.allclose(rest.nanmean(-1, keepdim=True).expand_as(probs)[outside], probs[outside])
            if temperature == 1.0:  # FKD's marginal smoothing exactly: the teacher's own probabilities
                assert torch.allclose(at_kept, kept, atol=1e-6)
                share = (1 - kept.sum(-1, keepdim=True)) / 6
                assert torch.allclose(probs[outside].view(3, 2, 6), share.expand(3, 2, 6), atol=1e-6)
    with pytest.raises(ValueError, match="target='spread'"):
        dense_logits_from_topk(values, indices, 10, "spread")


def test_mixup_kd_target_mixes_teacher_probabilities_with_the_same_lambda():
    torch.manual_seed(0)
    np.random.seed(3)
    images = torch.randn(4, 3, 8, 8)
    target = one_hot_smoothed(torch.tensor([0, 1, 2, 1]), 3, 0.1)
    logits = torch.randn(4, 3)
    t_probs = teacher_probs(logits, 4.0)
    mixed, y, p = mix_batch(images, target, mixup_alpha=0.4, cutmix_alpha=0.0)
    t = TeacherTargets(logits, p).probs(4.0)  # the teacher's targets get the images' draw
    lam = p.lam
    assert p.kind == "mixup" and 0 < lam < 1
    assert torch.allclose(mixed, lam * images + (1 - lam) * images.flip(0))
    assert torch.allclose(t, lam * t_probs + (1 - lam) * t_probs.flip(0))  # lam * t_a + (1 - lam) * t_b
    assert torch.allclose(y, lam * target + (1 - lam) * target.flip(0))
    assert torch.allclose(t.sum(1), torch.ones(4)) and torch.allclose(y.sum(1), torch.ones(4))
    # the same draw as timm's Mixup: its soft targets for this lambda are ours
    from timm.data.mixup import mixup_target
    assert torch.allclose(y, mixup_target(torch.tensor([0, 1, 2, 1]), 3, lam, 0.1))


def test_cutmix_uses_the_area_corrected_lambda():
    np.random.seed(2)  # draws a 7 x 6 box
    images = torch.arange(2 * 1 * 10 * 10, dtype=torch.float32).reshape(2, 1, 10, 10)
    target = one_hot_smoothed(torch.tensor([0, 1]), 2)
    t_probs = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
    mixed, y, p = mix_batch(images, target, mixup_alpha=0.0, cutmix_alpha=1.0)
    t = TeacherTargets(t_probs.log(), p).probs(1.0)
    yl, yh, xl, xh = p.box
    area = (yh - yl) * (xh - xl)
    assert p.kind == "cutmix" and 0 < area < 100
    assert p.lam == pytest.approx(1 - area / 100)  # the pasted area, not the Beta draw
    pasted = (mixed != images).float().mean().item()
    assert pasted == pytest.approx(area / 100)  # every pasted pixel differs (the partner's values)
    assert torch.allclose(t, p.lam * t_probs + (1 - p.lam) * t_probs.flip(0))
    assert torch.allclose(y, p.lam * target + (1 - p.lam) * target.flip(0))


def test_mix_switch_and_prob():
    np.random.seed(0)
    kinds = [draw_mix((8, 3, 16, 16), 0.2, 1.0, prob=1.0, switch_prob=0.5).kind for _ in range(200)]
    assert 60 < kinds.count("cutmix") < 140 and kinds.count("none") == 0
    assert all(draw_mix((8, 3, 16, 16), 0.2, 1.0, prob=0.0).kind == "none" for _ in range(20))
    assert mix_images(torch.ones(2, 3), MixParams()) is not None


def test_distillation_loss_without_teacher_is_the_hard_loss():
    logits, target = torch.randn(5, 4), one_hot_smoothed(torch.tensor([0, 1, 2, 3, 0]), 4, 0.1)
    assert DistillationLoss(4.0, 0.9)(logits, target).item() == pytest.approx(
        SoftTargetCrossEntropy()(logits, target).item(), rel=1e-6)


def test_am_softmax_head_and_margin():
    head = AMSoftmaxHead(6, 3, scale=10.0)
    x = torch.randn(4, 6)
    cos = head(x) / 10.0
    assert cos.abs().max() <= 1 + 1e-6
    assert torch.allclose(head(2.5 * x), head(x), atol=1e-5)  # features are normalized
    loss = DistillationLoss(am_scale=10.0, am_margin=0.35)
    labels = torch.tensor([0, 1, 2, 0])
    target = one_hot_smoothed(labels, 3)
    logits = head(x)
    manual = torch.nn.functional.cross_entropy(logits - 10.0 * 0.35 * torch.nn.functional.one_hot(labels, 3), labels)
    assert loss(logits, target).item() == pytest.approx(manual.item(), rel=1e-6)


def test_sam_steps_with_the_gradient_at_the_perturbed_point():
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = torch.optim.SGD([w], lr=0.1)
    sam = SAM(opt, rho=0.5)

    def loss_fn():
        return (w ** 4).sum()

    loss_fn().backward()
    g = w.grad.clone()
    sam.perturb()
    e = 0.5 * g / g.norm()
    assert torch.allclose(w.detach(), torch.tensor([1.0, -2.0]) + e)
    opt.zero_grad()
    loss_fn().backward()
    g_perturbed = w.grad.clone()
    sam.restore()
    opt.step()
    assert torch.allclose(w.detach(), torch.tensor([1.0, -2.0]) - 0.1 * g_perturbed)


@pytest.mark.parametrize("name", ["sgd", "momentum", "adamw", "radam", "lamb", "lars", "lookahead_sgd", "lookahead_adamw"])
def test_optimizers_step_and_skip_decay_on_biases_and_norms(name):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.LazyLinear(2))
    model(torch.randn(2, 3, 6, 6))
    opt = build_optimizer(TrainConfig(opt=name, lr=0.01, weight_decay=0.05), model)
    groups = getattr(opt, "base_optimizer", opt).param_groups
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert {id(p) for n, p in model.named_parameters() if p.ndim <= 1} == no_decay  # biases, BN weights
    if name == "sgd":
        assert groups[0]["nesterov"] is True
    model(torch.randn(2, 3, 6, 6)).sum().backward()
    opt.step()
    decayed = build_optimizer(TrainConfig(opt=name, weight_decay=0.05, bias_decay=True), model)
    assert all(g["weight_decay"] == 0.05 for g in getattr(decayed, "base_optimizer", decayed).param_groups)


def test_warmup_then_cosine_per_update():
    w = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([w], lr=0.1)
    sched = build_scheduler(TrainConfig(lr=0.1, sched="cosine", epochs=10, warmup_epochs=2, warmup_lr=0.0,
                                        min_lr=0.0), opt, updates_per_epoch=5)
    lrs = []
    for u in range(1, 51):
        sched.step_update(num_updates=u)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[4] == pytest.approx(0.05) and lrs[9] == pytest.approx(0.1)  # linear warmup over 10 updates
    assert lrs[29] == pytest.approx(0.05) and lrs[-1] < 0.001  # then the whole cosine over 40, down to 0
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_augmix_jsd_loss_is_timms_on_the_loaders_split_major_views(smoothing):
    torch.manual_seed(0)
    B, C = 4, 5
    logits, labels = torch.randn(3 * B, C), torch.tensor([0, 3, 1, 4])
    got = AugMixJsdLoss(smoothing)(logits, one_hot_smoothed(labels, C, smoothing))
    want = JsdCrossEntropy(num_splits=3, alpha=12, smoothing=smoothing)(logits, labels.repeat(3))
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    # by hand: the CE on the clean third, plus 12 x the mean KL of each view to the views' mixture
    probs = logits.softmax(-1).split(B)
    mixture = torch.stack(probs).mean(0)
    js = sum((p * (p.log() - mixture.log())).sum(-1).mean() for p in probs) / 3
    ce = -(one_hot_smoothed(labels, C, smoothing) * logits[:B].log_softmax(-1)).sum(-1).mean()
    assert got.item() == pytest.approx((ce + 12 * js).item(), rel=1e-4)
    # three views the model sees alike: nothing to make consistent, the loss is the clean CE
    same = logits[:B].repeat(3, 1)
    alike = AugMixJsdLoss(smoothing)(same, one_hot_smoothed(labels, C, smoothing))
    assert alike.item() == pytest.approx(ce.item(), rel=1e-5)


# ---------------------------------------------------------------------------------------------
# the KD terms (--kd-loss): DKD and logit standardization against the papers' formulas, by hand

def kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def hand_dkd(s, t, gt, T, alpha, beta):
    """Zhao et al. 2022, eq. 1-7, one sample: b = (p_gt, 1 - p_gt), p^ = the non-target classes renormalized."""
    p_t, p_s = softmax([v / T for v in t]), softmax([v / T for v in s])
    tckd = kl([p_t[gt], 1 - p_t[gt]], [p_s[gt], 1 - p_s[gt]])
    rest_t = [p / (1 - p_t[gt]) for i, p in enumerate(p_t) if i != gt]
    rest_s = [p / (1 - p_s[gt]) for i, p in enumerate(p_s) if i != gt]
    return T * T * (alpha * tckd + beta * kl(rest_t, rest_s)), tckd, kl(rest_t, rest_s), p_t[gt]


def zscore(x):
    """Sun et al. 2024: (x - mean) / std, the authors' unbiased std (n - 1) with 1e-7 added to it."""
    m = sum(x) / len(x)
    sd = math.sqrt(sum((v - m) ** 2 for v in x) / (len(x) - 1))
    return [(v - m) / (1e-7 + sd) for v in x]


def term_value(name, s, t, labels, T, epoch=0, **kw):
    from kdkit.train.losses import kd_loss_type

    term = kd_loss_type(name)(**kw) if kw else kd_loss_type(name)()
    target = one_hot_smoothed(torch.tensor(labels), len(s[0]))
    return term(torch.tensor(s), target, TeacherTargets(torch.tensor(t)), T, epoch)


def test_dkd_matches_the_papers_formula_and_splits_kd_as_its_equation_4():
    s, t, gt, T = [1.0, 2.0, 0.5, -1.0], [2.0, 0.0, 1.0, 0.3], 1, 2.0
    expected, tckd, nckd, p_gt = hand_dkd(s, t, gt, T, alpha=1.5, beta=4.0)
    got = term_value("dkd", [s], [t], [gt], T, alpha=1.5, beta=4.0)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    assert expected == pytest.approx(1.26742, abs=1e-5)  # the number, for the record
    # eq. 4: KD = TCKD + (1 - p_gt) * NCKD, so alpha = 1, beta = 1 - p_gt gives Hinton's KD term back
    kd = term_value("kl", [s], [t], [gt], T)
    assert term_value("dkd", [s], [t], [gt], T, alpha=1.0, beta=1 - p_gt).item() == pytest.approx(kd.item(), rel=1e-5)
    assert T * T * (tckd + (1 - p_gt) * nckd) == pytest.approx(kd.item(), rel=1e-5)
    # a batch: the mean of its samples (label smoothing leaves the target class where it was)
    s2, t2 = [[1.0, 2.0, 0.5, -1.0], [0.0, 0.2, 3.0, 1.0]], [[2.0, 0.0, 1.0, 0.3], [0.5, 0.1, 2.5, 2.0]]
    both = term_value("dkd", s2, t2, [1, 2], 4.0)
    hand = [hand_dkd(a, b, g, 4.0, 1.0, 8.0)[0] for a, b, g in zip(s2, t2, [1, 2])]
    assert both.item() == pytest.approx(sum(hand) / 2, rel=1e-5)


def test_dkd_warmup_ramps_in_per_epoch_as_mdistiller():
    s, t = [[1.0, 2.0, 0.5]], [[2.0, 0.0, 1.0]]
    full = term_value("dkd", s, t, [0], 4.0, warmup=0).item()
    ramp = [term_value("dkd", s, t, [0], 4.0, epoch=e, warmup=4).item() / full for e in range(6)]
    assert ramp == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0], rel=1e-6)  # min(epoch / 4, 1), epochs from 1
    loss = DistillationLoss(4.0, 0.5, term=__import__("kdkit.train.losses", fromlist=["DKD"]).DKD(warmup=4))
    target = one_hot_smoothed(torch.tensor([0]), 3)
    first = loss(torch.tensor(s), target, TeacherTargets(torch.tensor(t)))
    loss.set_epoch(3)  # the trainer sets it at the start of every epoch
    later = loss(torch.tensor(s), target, TeacherTargets(torch.tensor(t)))
    hard = soft_target_ce(torch.tensor(s), target).item()
    assert first.item() == pytest.approx(0.5 * hard + 0.5 * full / 4, rel=1e-5)
    assert later.item() == pytest.approx(0.5 * hard + 0.5 * full, rel=1e-5)


def test_logit_standardization_is_the_z_score_then_kl_or_dkd_at_the_base_temperature():
    s, t, T = [1.0, 2.0, 0.5, -1.0], [6.0, 0.0, 3.0, 1.0], 2.0
    zs, zt = zscore(s), zscore(t)
    assert zt == pytest.approx([1.3229, -0.9449, 0.1890, -0.5669], abs=1e-4)  # mean 2.5, std sqrt(21 / 3)
    expected = T * T * kl(softmax([v / T for v in zt]), softmax([v / T for v in zs]))
    assert term_value("kl-ls", [s], [t], [0], T).item() == pytest.approx(expected, rel=1e-5)
    # invariant to the teacher's scale and shift: only the logits' relations are distilled
    scaled = [[3 * v + 7 for v in t]]
    assert term_value("kl-ls", [s], scaled, [0], T).item() == pytest.approx(expected, rel=1e-5)
    assert term_value("kl", [s], scaled, [0], T).item() != pytest.approx(term_value("kl", [s], [t], [0], T).item())
    # the authors' KD weight: --kl-weight multiplies the term
    assert term_value("kl-ls", [s], [t], [0], T, weight=10.0).item() == pytest.approx(10 * expected, rel=1e-5)
    # DKD on the z-scores
    assert term_value("dkd-ls", [s], [t], [2], T, alpha=1.0, beta=2.0).item() == pytest.approx(
        hand_dkd(zs, zt, 2, T, 1.0, 2.0)[0], rel=1e-5)


def test_dkd_on_top_k_targets_reads_the_missing_classes_as_probability_zero():
    from kdkit.train.losses import kd_loss_type

    s, T = torch.tensor([[1.0, 2.0, 0.5], [0.3, 1.0, -0.5]], requires_grad=True), 2.0
    # top-2 renormalized: sample 0 left its target class (1) out, sample 1 stored only its target class and one other
    dense = dense_logits_from_topk(torch.tensor([[3.0, 1.0], [2.0, 0.5]]), torch.tensor([[0, 2], [1, 0]]), 3)
    loss = kd_loss_type("dkd")()(s, one_hot_smoothed(torch.tensor([1, 1]), 3), TeacherTargets(dense), T, 0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    p_s = [softmax([v / T for v in row]) for row in s.tolist()]
    # sample 0: b_t = (0, 1), so TCKD = -log(1 - p_s[1]); NCKD compares the two stored non-target classes
    tckd0 = -math.log(1 - p_s[0][1])
    nckd0 = kl(softmax([1.5, 0.5]), [p_s[0][0] / (1 - p_s[0][1]), p_s[0][2] / (1 - p_s[0][1])])
    # sample 1: class 2 has probability 0 in the teacher, so NCKD puts all of the non-target mass on class 0
    p_t1 = softmax([2.0 / T, 0.5 / T])  # the stored classes (1, 0)
    tckd1 = kl([p_t1[0], p_t1[1]], [p_s[1][1], 1 - p_s[1][1]])
    nckd1 = -math.log(p_s[1][0] / (1 - p_s[1][1]))
    assert loss.item() == pytest.approx(T * T * ((tckd0 + 8 * nckd0) + (tckd1 + 8 * nckd1)) / 2, rel=1e-5)
    # a teacher sure of the target class alone (top-1 = the label): no non-target distribution, NCKD adds 0
    only = dense_logits_from_topk(torch.tensor([[3.0]]), torch.tensor([[1]]), 3)
    one = kd_loss_type("dkd")()(s[:1], one_hot_smoothed(torch.tensor([1]), 3), TeacherTargets(only), T, 0)
    assert one.item() == pytest.approx(T * T * -math.log(p_s[0][1]), rel=1e-5)


def test_standardized_mixed_and_peer_targets_are_each_distribution_standardized_on_its_own():
    from kdkit.train.mutual import PeerTargets

    torch.manual_seed(0)
    logits, peer = torch.randn(4, 5) * 3, torch.randn(4, 5)
    z = [torch.tensor([zscore(row) for row in x.tolist()]) for x in (logits, peer)]
    p = MixParams("mixup", 0.3)
    mixed = TeacherTargets(logits, p)
    want = [(zz / 2.0).softmax(-1) for zz in z]
    assert torch.allclose(mixed.probs(2.0, standardize=True), 0.3 * want[0] + 0.7 * want[0].flip(0), atol=1e-6)
    assert torch.allclose(mixed.log_probs(2.0).exp(), mixed.probs(2.0), atol=1e-6)
    assert torch.allclose(mixed.probs(2.0), 0.3 * teacher_probs(logits, 2.0) + 0.7 * teacher_probs(logits, 2.0).flip(0),
                          atol=1e-6)
    both = PeerTargets(peer, TeacherTargets(logits))
    assert torch.allclose(both.probs(2.0, standardize=True), (want[0] + want[1]) / 2, atol=1e-6)
    assert torch.allclose(PeerTargets(peer).probs(2.0, True), want[1], atol=1e-6)


def test_kd_loss_is_chosen_by_one_option_and_refuses_dkd_with_mixing():
    from kdkit.errors import OptionError
    from kdkit.train.build import criterion
    from kdkit.train.losses import DKDStandardized

    loss = criterion(TrainConfig(kd="stored", kd_loss="dkd-ls", dkd_alpha=2.0, dkd_beta=0.5, dkd_warmup=3))
    assert isinstance(loss.term, DKDStandardized) and (loss.term.alpha, loss.term.beta, loss.term.warmup) == (2.0, 0.5, 3)
    assert criterion(TrainConfig(kd="stored", kd_loss="kl-ls", kl_weight=10.0)).term.weight == 10.0
    assert type(criterion(TrainConfig(kd="stored")).term).__name__ == "KL"  # Hinton's, the default
    with pytest.raises(OptionError, match=r"kd_loss=dkd: DKD separates the target class .* --mixup 0 --cutmix 0"):
        TrainConfig(kd="stored", kd_loss="dkd", mixup=0.2)
    with pytest.raises(OptionError, match="kd_loss='hint'"):
        TrainConfig(kd="stored", kd_loss="hint")
    TrainConfig(kd="stored", kd_loss="kl-ls", cutmix=1.0)  # the KL terms mix as the images do
