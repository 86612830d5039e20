"""Tests for canonwrap.robust: KL convention, PGD-AT, TRADES, CAG and D2R (one pass and two stages)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from canonwrap.attacks import eval_mode
from canonwrap.robust import D2RLoss, TradesLoss, cag, d2r_loss, kl_div, pgd_at_loss, trades_loss

torch.set_num_threads(1)

H = W = 8
K = 4


class TwoHeads(nn.Module):
    """Frozen backbone (conv + BN, requires_grad False) with a guide head and a target head."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.backbone = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten())
        self.backbone.requires_grad_(False)
        self.backbone.eval()
        self.guide_head = nn.Sequential(nn.Dropout(0.1), nn.Linear(4 * H * W, K))
        self.target_head = nn.Sequential(nn.Dropout(0.1), nn.Linear(4 * H * W, K))

    def guide(self, x):
        return self.guide_head(self.backbone(x))

    def target(self, x):
        return self.target_head(self.backbone(x))


class Wrap(nn.Module):
    """Whole-model view (pixels -> logits) of one head, sharing the modules."""

    def __init__(self, net: TwoHeads, which: str) -> None:
        super().__init__()
        self.backbone, self.head = net.backbone, getattr(net, f"{which}_head")

    def forward(self, x):
        return self.head(self.backbone(x))


def batch(b: int = 12, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 1, H, W, generator=g), torch.randint(0, K, (b,), generator=g)


def snapshot(module: nn.Module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_only_heads_get_grads(net: TwoHeads, heads=("guide_head", "target_head")):
    for p in net.backbone.parameters():
        assert p.grad is None
    for name in heads:
        grads = [p.grad for p in getattr(net, name).parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), name
        assert sum(float(g.abs().sum()) for g in grads) > 0, name


# --------------------------------------------------------------------------------------------
# KL convention
# --------------------------------------------------------------------------------------------
def test_kl_div_convention_and_reductions():
    torch.manual_seed(0)
    p, q = torch.randn(5, K), torch.randn(5, K)
    ref = F.kl_div(F.log_softmax(q, 1), F.log_softmax(p, 1), reduction="batchmean", log_target=True)  # KL(p||q)
    assert torch.allclose(kl_div(p, q), ref, atol=1e-6)
    assert torch.allclose(kl_div(p, q, "mean"), ref / K, atol=1e-6)
    assert torch.allclose(kl_div(p, q, "sum"), ref * 5, atol=1e-5)
    assert kl_div(p, q, "none").shape == (5,) and bool((kl_div(p, q, "none") >= 0).all())
    assert float(kl_div(p, p)) == pytest.approx(0.0, abs=1e-7)
    assert not torch.allclose(kl_div(p, q), kl_div(q, p))  # not symmetric: the order matters
    assert torch.isfinite(kl_div(torch.tensor([[100.0, -100.0]]), torch.tensor([[-100.0, 100.0]])))
    with pytest.raises(ValueError, match="unknown reduction"):
        kl_div(p, q, "avg")


# --------------------------------------------------------------------------------------------
# PGD-AT and TRADES
# --------------------------------------------------------------------------------------------
def test_pgd_at_loss():
    net = TwoHeads()
    model = Wrap(net, "target").train()
    net.backbone.eval()
    x, y = batch()
    loss, x_adv = pgd_at_loss(model, x, y, eps=0.1, alpha=0.03, steps=5)
    assert float((x_adv - x).abs().max()) <= 0.1 + 1e-6 and 0 <= float(x_adv.min()) and float(x_adv.max()) <= 1
    with torch.no_grad(), eval_mode(model):
        assert float(F.cross_entropy(model(x_adv), y)) > float(F.cross_entropy(model(x), y))
    assert model.training and not net.backbone.training  # modes restored, per submodule
    loss.backward()
    assert_only_heads_get_grads(net, heads=("target_head",))
    with pytest.raises(ValueError, match="eps must be >= 0"):
        pgd_at_loss(model, x, y, eps=-1)
    with pytest.raises(ValueError, match="unknown norm"):
        pgd_at_loss(model, x, y, norm="l0")


def test_trades_loss_terms_grads_and_frozen_backbone():
    net = TwoHeads()
    model = Wrap(net, "target").train()
    net.backbone.eval()
    x, y = batch()
    before = snapshot(net.backbone)
    out = trades_loss(model, x, y, eps=0.1, alpha=0.03, steps=5, beta=6.0)
    assert isinstance(out, TradesLoss)
    assert torch.isfinite(out.loss) and out.robust >= 0 and out.natural > 0
    assert float((out.x_adv - x).abs().max()) <= 0.1 + 1e-6
    assert 0 <= float(out.x_adv.min()) and float(out.x_adv.max()) <= 1
    assert model.training and model.head.training and not net.backbone.training
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    out.loss.backward()
    assert_only_heads_get_grads(net, heads=("target_head",))
    opt.step()
    after = snapshot(net.backbone)
    assert all(torch.equal(before[k], after[k]) for k in before), "frozen backbone changed"


def test_trades_beta_zero_is_ce_and_robust_term_is_kl():
    net = TwoHeads()
    model = Wrap(net, "target").eval()
    x, y = batch()
    torch.manual_seed(3)
    out = trades_loss(model, x, y, eps=0.1, alpha=0.03, steps=3, beta=0.0)
    with torch.no_grad():
        assert out.loss.item() == pytest.approx(F.cross_entropy(model(x), y).item(), rel=1e-6)
        assert out.robust == pytest.approx(kl_div(model(x), model(out.x_adv)).item(), rel=1e-5)
        # the inner maximisation found a larger KL than the tiny random start
        x0 = x + 0.001 * torch.randn_like(x)
        assert out.robust > kl_div(model(x), model(x0)).item()
    with pytest.raises(ValueError, match="beta must be a number >= 0"):
        trades_loss(model, x, y, beta=-1.0)


# --------------------------------------------------------------------------------------------
# CAG and D2R
# --------------------------------------------------------------------------------------------
def test_cag_stays_in_ball_increases_kl_and_restores_modes():
    net = TwoHeads()
    guide, target = Wrap(net, "guide").train(), Wrap(net, "target").train()
    net.backbone.eval()
    x, _ = batch()
    x_adv = cag(guide, target, x, eps=0.1, alpha=0.02, steps=8)
    assert float((x_adv - x).abs().max()) <= 0.1 + 1e-6
    assert 0 <= float(x_adv.min()) and float(x_adv.max()) <= 1
    with torch.no_grad(), eval_mode(guide, target):
        assert float(kl_div(guide(x), target(x_adv))) > float(kl_div(guide(x), target(x))) + 1e-3
    assert guide.training and target.training and guide.head.training and not net.backbone.training
    assert all(p.grad is None for p in net.parameters())


def test_cag_feature_space_threat_model():
    torch.manual_seed(0)
    g, f = nn.Linear(16, K), nn.Linear(16, K)
    feats = 3.0 * torch.randn(6, 16)
    with pytest.raises(ValueError, match="clamp=None"):
        cag(g, f, feats)
    f_adv = cag(g, f, feats, eps=0.5, alpha=0.1, steps=5, clamp=None)
    assert float((f_adv - feats).abs().max()) <= 0.5 + 1e-6
    assert float(f_adv.abs().max()) > 1.0  # not clamped to [0, 1]


def released_d2r(out_adv, out_natural, out, y):
    """The released D2R loss formula (lusti-Yu/D2R, D2R/D2R.py), written out for a parity check."""

    def kl_loss(a, b):  # elementwise b * (log b - a) with a = log q, b = p: KL(p || q)
        return -a * b + torch.log(b + 1e-5) * b

    kl1 = kl_loss(F.log_softmax(out, 1), F.softmax(out_natural, 1)).mean()
    kl2 = kl_loss(F.log_softmax(out_natural, 1), F.softmax(out, 1)).mean()
    kl5 = kl_loss(F.log_softmax(out, 1), F.softmax(out_adv, 1)).mean()
    return F.cross_entropy(out, y) + F.mse_loss(out_adv, out) + 20 * (kl1 - kl2).abs() + 30 * kl5


def test_d2r_matches_released_formula_and_terms_are_finite():
    net = TwoHeads()
    guide, target = Wrap(net, "guide").eval(), Wrap(net, "target").eval()
    x, y = batch()
    torch.manual_seed(0)
    x_adv = cag(guide, target, x, eps=0.1, alpha=0.03, steps=5)
    out = d2r_loss(guide, target, x, y, x_adv)
    assert isinstance(out, D2RLoss)
    ref = released_d2r(target(x_adv), target(x), guide(x), y)
    assert out.loss.item() == pytest.approx(ref.item(), abs=2e-3)
    # same gradients as the released formula for both heads (nothing detached, as released)
    heads = list(net.guide_head.parameters()) + list(net.target_head.parameters())
    ours = torch.autograd.grad(out.loss, heads)
    theirs = torch.autograd.grad(ref, heads)
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b, atol=2e-3 * float(b.abs().max()) + 1e-6)
    terms = out.terms()
    assert set(terms) == {"ce", "mse", "kl_sym", "kl_adv", "loss"}
    assert all(isinstance(v, float) and v == v and abs(v) < 1e6 for v in terms.values())
    recomposed = out.ce + out.mse + 20 * out.kl_sym + 30 * out.kl_adv
    assert out.loss.item() == pytest.approx(recomposed, rel=1e-5)
    batchmean = d2r_loss(guide, target, x, y, x_adv, kl_reduction="batchmean")
    assert batchmean.kl_adv == pytest.approx(K * out.kl_adv, rel=1e-5)


def test_d2r_gradients_reach_only_trainable_parameters():
    net = TwoHeads().train()
    net.backbone.eval()
    guide, target = Wrap(net, "guide"), Wrap(net, "target")
    x, y = batch()
    before = snapshot(net.backbone)
    x_adv = cag(guide, target, x, eps=0.1, alpha=0.03, steps=3)
    out = d2r_loss(guide, target, x, y, x_adv)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    out.loss.backward()
    assert_only_heads_get_grads(net)  # as released: both heads learn, the frozen backbone does not
    opt.step()
    assert all(torch.equal(before[k], v) for k, v in net.backbone.state_dict().items())


def test_d2r_detach_guide_trains_guide_only_through_ce():
    net = TwoHeads().eval()
    guide, target = Wrap(net, "guide"), Wrap(net, "target")
    x, y = batch()
    x_adv = cag(guide, target, x, eps=0.1, alpha=0.03, steps=3)
    d2r_loss(guide, target, x, y, x_adv, detach_guide=True).loss.backward()
    g_detached = [p.grad.clone() for p in net.guide_head.parameters()]
    net.zero_grad()
    F.cross_entropy(guide(x), y).backward()
    g_ce = [p.grad for p in net.guide_head.parameters()]
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g_detached, g_ce))


def test_d2r_two_stage_split_sums_to_one_pass_and_steps():
    net = TwoHeads().eval()
    guide, target = Wrap(net, "guide"), Wrap(net, "target")
    x, y = batch()
    x_adv = cag(guide, target, x, eps=0.1, alpha=0.03, steps=3)
    one = d2r_loss(guide, target, x, y, x_adv)
    adv = d2r_loss(guide, target, x, y, x_adv, mode="two_stage", stage="adv")
    clean = d2r_loss(guide, target, x, y, x_adv, mode="two_stage", stage="clean")
    assert (adv.loss + clean.loss).item() == pytest.approx(one.loss.item(), rel=1e-5)
    assert adv.ce is None and adv.kl_sym is None and adv.mse is not None and adv.kl_adv is not None
    assert clean.mse is None and clean.kl_adv is None and clean.ce is not None and clean.kl_sym is not None
    assert set(adv.terms()) == {"mse", "kl_adv", "loss"}
    # the documented schedule: adv step, then clean step recomputed with the updated parameters
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.05)
    adv.loss.backward()
    opt.step()
    opt.zero_grad()
    clean2 = d2r_loss(guide, target, x, y, x_adv, mode="two_stage", stage="clean")
    assert clean2.loss.item() != pytest.approx(clean.loss.item(), rel=1e-7)  # parameters moved
    clean2.loss.backward()
    assert all(p.grad is None for p in net.backbone.parameters())


@pytest.mark.parametrize(
    "kwargs, msg",
    [
        (dict(mode="three_stage"), "unknown D2R mode"),
        (dict(mode="two_stage"), r"needs stage in \['adv', 'clean'\]"),
        (dict(mode="two_stage", stage="robust"), r"needs stage in \['adv', 'clean'\]"),
        (dict(stage="adv"), "stage must be None with mode='one_pass'"),
        (dict(alpha=-1.0), "alpha must be a number >= 0"),
        (dict(kl_reduction="sum"), "unknown kl_reduction"),
    ],
)
def test_d2r_bad_arguments(kwargs, msg):
    net = TwoHeads()
    x, y = batch(4)
    with pytest.raises(ValueError, match=msg):
        d2r_loss(net.guide, net.target, x, y, x, **kwargs)


def test_d2r_x_adv_shape_and_cag_arguments():
    net = TwoHeads()
    x, y = batch(4)
    with pytest.raises(ValueError, match="x_adv must have the shape of x"):
        d2r_loss(net.guide, net.target, x, y, x[:2])
    with pytest.raises(ValueError, match="steps must be >= 1"):
        cag(net.guide, net.target, x, steps=0)
    with pytest.raises(ValueError, match="eps must be >= 0"):
        cag(net.guide, net.target, x, eps=-0.1)
