"""Tests for canonwrap.attacks: FGSM, PGD (Linf/L2), the group attack, the factory and mode handling."""
from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from canonwrap.attacks import (
    FGSM,
    PGD,
    PGDL2,
    GroupAttack,
    create_attack,
    eval_mode,
    list_attacks,
    true_class_margin,
)
from canonwrap.groups import rotate, transform

torch.set_num_threads(1)

H = W = 8


def tiny_cnn(k: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.1),
        nn.Flatten(), nn.Linear(4 * H * W, k),
    )


def batch(b: int = 16, k: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 1, H, W, generator=g), torch.randint(0, k, (b,), generator=g)


def mean_ce(model, x, y) -> float:
    with torch.no_grad(), eval_mode(model):
        return float(F.cross_entropy(model(x), y))


def linf(d):
    return d.flatten(1).abs().max(dim=1).values


def l2(d):
    return d.flatten(1).norm(dim=1)


# --------------------------------------------------------------------------------------------
# registry / factory
# --------------------------------------------------------------------------------------------
def test_list_attacks():
    assert list_attacks() == ["fgsm", "group", "pgd", "pgd_l2"]


@pytest.mark.parametrize("name", list_attacks())
def test_every_registered_attack_runs_and_keeps_shape_and_range(name):
    model = tiny_cnn()
    x, y = batch()
    x_adv = create_attack(name, model)(x, y)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    assert not x_adv.requires_grad
    assert all(p.grad is None for p in model.parameters()), "attack accumulated parameter gradients"


def test_create_attack_kwargs_and_errors():
    model = tiny_cnn()
    assert create_attack("PGD_L2", model, eps=0.5).norm == "l2"
    assert create_attack("pgd", model, norm="L2").norm == "l2"
    with pytest.raises(KeyError, match="Did you mean 'pgd'"):
        create_attack("pdg", model)
    with pytest.raises(KeyError, match="fgsm"):
        create_attack("carlini", model)
    with pytest.raises(TypeError, match="unexpected argument.*'epsilon'"):
        create_attack("fgsm", model, epsilon=0.1)


@pytest.mark.parametrize(
    "kwargs, err, msg",
    [
        (dict(eps=-0.1), ValueError, "eps must be >= 0"),
        (dict(alpha=0.0), ValueError, "alpha .* must be > 0"),
        (dict(steps=0), ValueError, "steps must be >= 1"),
        (dict(steps=2.5), TypeError, "steps must be an int"),
        (dict(norm="l1"), ValueError, r"unknown norm 'l1'; expected one of \['linf', 'l2'\]"),
        (dict(eps="big"), TypeError, "eps must be a real number"),
        (dict(clamp=(1, 0)), ValueError, "low < high"),
    ],
)
def test_pgd_bad_arguments(kwargs, err, msg):
    with pytest.raises(err, match=msg):
        PGD(tiny_cnn(), **kwargs)


def test_bad_inputs():
    model = tiny_cnn()
    x, y = batch()
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        FGSM(model, eps=0.1)(x * 2 - 0.5, y)  # normalised input, not pixels
    with pytest.raises(ValueError, match="y must be a long tensor"):
        FGSM(model, eps=0.1)(x, y.float())
    with pytest.raises(TypeError, match="model must be a callable"):
        FGSM("resnet", eps=0.1)
    with pytest.raises(TypeError, match="logits of shape"):
        FGSM(lambda z: z.sum(), eps=0.1)(x, y)
    with pytest.raises(ValueError, match="eps must be >= 0"):
        FGSM(model, eps=-1.0)


# --------------------------------------------------------------------------------------------
# norm balls, range, strength
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make, ball",
    [
        (lambda m: FGSM(m, eps=0.1), linf),
        (lambda m: PGD(m, eps=0.1, alpha=0.03, steps=7), linf),
        (lambda m: PGD(m, eps=0.1, alpha=0.03, steps=7, random_start=False), linf),
        (lambda m: PGDL2(m, eps=0.5, alpha=0.2, steps=7), l2),
        (lambda m: PGD(m, eps=0.5, alpha=0.2, steps=7, norm="l2", random_start=False), l2),
    ],
)
def test_perturbation_within_eps_in_range_and_loss_increases(make, ball):
    model = tiny_cnn()
    x, y = batch()
    x[:, :, :2] = 0.0  # pixels at the box boundary: clamping must hold
    x[:, :, -2:] = 1.0
    attack = make(model)
    x_adv = attack(x, y)
    assert float(ball(x_adv - x).max()) <= attack.eps + 1e-5
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    assert float(ball(x_adv - x).max()) > 0.5 * attack.eps  # it actually moved
    assert mean_ce(model, x_adv, y) > mean_ce(model, x, y)


def test_pgd_stronger_than_fgsm_and_zero_eps_is_identity():
    model = tiny_cnn()
    x, y = batch(32)
    ce_fgsm = mean_ce(model, FGSM(model, eps=0.05)(x, y), y)
    ce_pgd = mean_ce(model, PGD(model, eps=0.05, alpha=0.01, steps=20)(x, y), y)
    assert ce_pgd >= ce_fgsm - 1e-4
    assert torch.equal(PGD(model, eps=0.0, alpha=0.01, steps=3)(x, y), x)


def linear_2class(d: int = H * W, seed: int = 0):
    torch.manual_seed(seed)
    lin = nn.Linear(d, 2)
    return lin, nn.Sequential(nn.Flatten(), lin)


@pytest.mark.parametrize("random_start", [False, True])
def test_pgd_linf_reaches_analytic_worst_case_on_linear_model(random_start):
    lin, model = linear_2class()
    eps = 0.05
    x = 0.1 + 0.8 * torch.rand(6, 1, H, W)  # far from the box edges: no clamping
    y = torch.tensor([0, 1, 0, 1, 0, 1])
    w = lin.weight.detach()  # (2, D)
    direction = (w[y] - w[1 - y]).view(-1, 1, H, W)  # grad of the true-class margin
    expected = x - eps * direction.sign()
    x_adv = PGD(model, eps=eps, alpha=eps / 2, steps=6, random_start=random_start)(x, y)
    assert torch.allclose(x_adv, expected, atol=1e-6)
    assert torch.allclose(FGSM(model, eps=eps)(x, y), expected, atol=1e-6)
    # the worst case really is worse than random corners of the ball
    margin = lambda z: true_class_margin(model(z), y)  # noqa: E731
    corner = x + eps * torch.randn_like(x).sign()
    assert bool((margin(x_adv) <= margin(corner) + 1e-6).all())


def test_pgd_l2_reaches_analytic_worst_case_on_linear_model():
    lin, model = linear_2class()
    eps = 0.3
    x = 0.3 + 0.4 * torch.rand(4, 1, H, W)
    y = torch.tensor([0, 1, 1, 0])
    w = lin.weight.detach()
    direction = (w[y] - w[1 - y]).view(-1, 1, H, W)
    expected = x - eps * direction / direction.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    x_adv = PGDL2(model, eps=eps, alpha=0.1, steps=5, random_start=False)(x, y)
    assert torch.allclose(x_adv, expected, atol=1e-5)


def test_targeted_pgd_increases_target_probability():
    model = tiny_cnn(k=4)
    x, y = batch(24, k=4)
    target = (y + 1) % 4
    x_adv = PGD(model, eps=0.1, alpha=0.02, steps=10, targeted=True)(x, target)
    with torch.no_grad(), eval_mode(model):
        p0 = model(x).softmax(1).gather(1, target[:, None]).squeeze(1)
        p1 = model(x_adv).softmax(1).gather(1, target[:, None]).squeeze(1)
    assert float((p1 > p0).float().mean()) >= 0.9
    assert float(p1.mean()) > float(p0.mean()) + 0.01


def test_feature_space_threat_model_no_clamp():
    torch.manual_seed(0)
    head = nn.Linear(16, 3)
    feats = 5.0 * torch.randn(8, 16)  # features are not pixels
    y = torch.randint(0, 3, (8,))
    with pytest.raises(ValueError, match="clamp=None"):
        PGD(head, eps=0.5, alpha=0.1, steps=5)(feats, y)
    f_adv = PGD(head, eps=0.5, alpha=0.1, steps=5, clamp=None)(feats, y)
    assert float(linf(f_adv - feats).max()) <= 0.5 + 1e-6
    assert float(f_adv.abs().max()) > 1.0


def test_accepts_callables_and_logits_objects():
    model = tiny_cnn()
    x, y = batch(8)
    wrapped = lambda z: types.SimpleNamespace(logits=model(z))  # noqa: E731
    with eval_mode(model):
        a = FGSM(wrapped, eps=0.1)(x, y)
    b = FGSM(model, eps=0.1)(x, y)
    assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------
# modes and gradients
# --------------------------------------------------------------------------------------------
class Flaky(nn.Module):
    """Mixed train/eval submodules; raises on the n-th forward; records the mode it saw."""

    def __init__(self, fail_at: int) -> None:
        super().__init__()
        self.body = tiny_cnn()
        self.calls, self.fail_at, self.seen_training = 0, fail_at, []

    def forward(self, x):
        self.calls += 1
        self.seen_training.append([m.training for m in self.modules()])
        if self.calls == self.fail_at:
            raise RuntimeError("boom")
        return self.body(x)


@pytest.mark.parametrize(
    "make, fail_at",
    [
        (lambda m: PGD(m, eps=0.1, alpha=0.02, steps=5), 3),  # mid-way through the steps
        (lambda m: FGSM(m, eps=0.1), 1),
        (lambda m: GroupAttack(m, "c4"), 3),
    ],
)
def test_mode_restored_when_model_raises(make, fail_at):
    model = Flaky(fail_at)
    model.train()
    model.body[1].eval()  # a submodule with its own (eval) mode
    model.body[3].eval()
    before = [m.training for m in model.modules()]
    x, y = batch(4)
    with pytest.raises(RuntimeError, match="boom"):
        make(model)(x, y)
    assert [m.training for m in model.modules()] == before
    assert not any(any(flags) for flags in model.seen_training), "attack ran in train mode"


def test_attack_does_not_touch_batchnorm_stats_or_param_grads():
    model = tiny_cnn().train()
    x, y = batch()
    stats = model[1].running_mean.clone()
    PGD(model, eps=0.1, alpha=0.02, steps=5)(x, y)
    assert torch.equal(model[1].running_mean, stats)
    assert model.training and model[1].training
    assert all(p.grad is None for p in model.parameters())


def test_eval_mode_handles_bound_methods():
    model = tiny_cnn().train()
    with eval_mode(model.forward):
        assert not model.training and not model[3].training
    assert model.training and model[3].training


# --------------------------------------------------------------------------------------------
# group attack
# --------------------------------------------------------------------------------------------
class Lookup(nn.Module):
    """Returns the logits stored for the nearest stored image (a model we fully control)."""

    def __init__(self, images: torch.Tensor, logits: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("images", images.flatten(1))
        self.register_buffer("table", logits)

    def forward(self, x):
        idx = torch.cdist(x.flatten(1), self.images).argmin(dim=1)
        return self.table[idx]


def orbit_lookup(x, y, fail, group="c8", k=3):
    """Correct (with margin 1 + e) on every element e of every sample, except element fail[i] of sample i."""
    n = 8 if group == "c8" else 4
    images, logits = [], []
    for e in range(n):
        images.append(transform(x, group, e))
        lg = torch.zeros(len(x), k)
        lg[torch.arange(len(x)), y] = 1.0 + e
        wrong = fail == e
        lg[wrong] = 0.0
        lg[wrong, (y[wrong] + 1) % k] = 2.0  # margin -2 on the failing element
        logits.append(lg)
    return Lookup(torch.cat(images), torch.cat(logits))


def test_group_attack_finds_the_single_failing_rotation():
    x, y = batch(5)
    fail = torch.tensor([3, 0, 7, 5, 3])  # per-sample failing element (0 = identity)
    model = orbit_lookup(x, y, fail)
    attack = GroupAttack(model, "c8")
    res = attack.evaluate(x, y)
    assert torch.equal(res.worst_element, fail)
    assert torch.allclose(res.element_scores[torch.arange(5), fail], torch.full((5,), -2.0))
    assert res.clean_accuracy == pytest.approx(4 / 5)  # sample 1 fails on the identity
    assert res.group_accuracy == 0.0 and res.accuracy == 0.0
    assert res.worst_angle is None and res.angle_accuracy is None
    assert torch.equal(attack(x, y), torch.stack([transform(x[i:i + 1], "c8", int(fail[i]))[0] for i in range(5)]))


def test_group_attack_robust_model_and_ce_criterion():
    x, y = batch(4)
    model = orbit_lookup(x, y, torch.full((4,), -1))  # never fails; identity has the lowest margin
    res = GroupAttack(model, "c8", criterion="ce").evaluate(x, y)
    assert res.accuracy == res.group_accuracy == res.clean_accuracy == 1.0
    assert torch.equal(res.worst_element, torch.zeros(4, dtype=torch.long))


def test_group_attack_worst_continuous_angle():
    x, y = batch(3)
    angles = list(range(0, 360, 5))
    images = torch.cat([rotate(x, float(a)) for a in angles])
    logits = torch.zeros(len(images), 3)
    rows = torch.arange(len(images))
    yy = y.repeat(len(angles))
    logits[rows, yy] = 1.0
    bad = torch.tensor(angles).repeat_interleave(len(x)) == 35  # only 35 degrees fools the model
    logits[bad] = 0.0
    logits[bad, (yy[bad] + 1) % 3] = 1.0
    model = Lookup(images, logits)
    res = GroupAttack(model, "c8", angles=angles).evaluate(x, y)
    assert torch.equal(res.worst_angle, torch.full((3,), 35.0))
    assert res.angle_accuracy == 0.0 and res.accuracy == 0.0
    assert res.group_accuracy == 1.0 and res.clean_accuracy == 1.0
    assert torch.allclose(res.x_adv, rotate(x, 35.0))


def test_group_attack_bad_arguments():
    model = tiny_cnn()
    with pytest.raises(KeyError, match="c8"):
        GroupAttack(model, "c7")
    with pytest.raises(ValueError, match="non-empty"):
        GroupAttack(model, angles=[])
    with pytest.raises(ValueError, match="criterion"):
        GroupAttack(model, criterion="loss")
    with pytest.raises(ValueError, match="at least 4 dims"):
        GroupAttack(nn.Linear(4, 2)).evaluate(torch.rand(3, 4), torch.zeros(3, dtype=torch.long))
