"""Tests for canonwrap.finetune.fit_head: cached features, SAM family, robust losses, errors."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import canonwrap as cw
from canonwrap.finetune import LOSSES, _Objective, extract_features, fit_head, head_sharpness
from canonwrap.robust import pgd_at_loss, trades_loss

torch.set_num_threads(1)

N, K = 96, 10


def _model(num_classes: int = K, seed: int = 0) -> cw.CanonicalizedModel:
    torch.manual_seed(seed)
    return cw.wrap("canonwrap:digitnet", group="c4", num_classes=num_classes)


def _data(n: int = N, seed: int = 0):
    """Noisy copies of K random prototype images (so the frozen random features are clustered)."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.rand(K, 1, 32, 32, generator=g)  # (K, 1, 32, 32)
    y = torch.arange(n) % K  # (N,)
    x = (protos[y] + 0.03 * torch.randn(n, 1, 32, 32, generator=g)).clamp(0, 1)  # (N, 1, 32, 32)
    return x, y


def _state(module: torch.nn.Module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def _same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _full_ce(model, x, y) -> float:
    with torch.no_grad():
        return float(F.cross_entropy(model.eval()(x), y))


# ---------------------------------------------------------------------------------- cached mode
def test_cached_equals_naive_for_sgd():
    x, y = _data()
    m1 = _model()
    m2 = copy.deepcopy(m1)
    kw = dict(epochs=2, batch_size=32, optimizer="sgd", lr=0.5, progress=False, val_data=(x[:40], y[:40]))
    h1 = fit_head(m1, (x, y), cache_features=True, **kw)
    h2 = fit_head(m2, (x, y), cache_features=False, **kw)
    assert h1.config["cached"] and h1.config["space"] == "features"
    assert not h2.config["cached"] and h2.config["space"] == "pixels"
    assert not torch.equal(m1.head.weight, _model().head.weight)  # it trained
    torch.testing.assert_close(m1.head.weight, m2.head.weight, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(m1.head.bias, m2.head.bias, rtol=1e-4, atol=1e-5)
    for e1, e2 in zip(h1.epochs, h2.epochs):
        assert math.isclose(e1["loss"], e2["loss"], rel_tol=1e-4)
        assert e1["val_upright"] == pytest.approx(e2["val_upright"], abs=1e-6)


def test_backbone_and_frozen_canonicalizer_untouched():
    x, y = _data()
    model = _model()
    bb, canon = _state(model.backbone), _state(model.canonicalizer)
    flags = [p.requires_grad for p in model.parameters()]
    head0 = _state(model.head)
    fit_head(model, (x, y), epochs=1, batch_size=32, optimizer="sam", rho=0.05, cache_features=False, progress=False)
    assert _same(bb, _state(model.backbone))  # weights AND BatchNorm buffers
    assert _same(canon, _state(model.canonicalizer))  # frozen canonicalizer: BN stats too
    assert not _same(head0, _state(model.head))
    assert flags == [p.requires_grad for p in model.parameters()]  # requires_grad restored


def test_sam_cached_reduces_loss_and_logs_sharpness():
    x, y = _data()
    model = _model()
    before = _full_ce(model, x, y)
    hist = fit_head(model, (x, y), epochs=6, batch_size=32, optimizer="sam", rho=0.05, lr=2.0, progress=False)
    after = _full_ce(model, x, y)  # the random backbone's features are tiny: hence the large lr
    assert after < before - 0.1, (before, after)
    assert hist.epochs[-1]["loss"] < hist.epochs[0]["loss"]
    assert hist.config["cached"] and hist.config["optimizer"] == "sam"
    assert all("sharpness" in e and math.isfinite(e["sharpness"]) for e in hist.epochs)
    assert hist.epochs[0]["feature_seconds"] > 0 and hist.epochs[1]["feature_seconds"] == 0  # cached once


def test_samar_logs_lambda_and_augment_recomputes_features():
    x, y = _data(64)
    hist = fit_head(_model(), (x, y), epochs=2, batch_size=32, optimizer="samar", augment="group", progress=False)
    assert hist.config["cached"] and hist.config["augment"] == "group"
    assert hist.epochs[1]["feature_seconds"] > 0  # recomputed under fresh group elements
    assert 0.0 <= hist.last["lam"] <= 1.0


def test_precomputed_features_give_the_same_head():
    x, y = _data(64)
    m1 = _model()
    m2 = copy.deepcopy(m1)
    feats, labels, _ = extract_features(m1, (x, y))
    h1 = fit_head(m1, (x, y), epochs=2, batch_size=16, optimizer="sgd", lr=1.0, features=(feats, labels), progress=False)
    fit_head(m2, (x, y), epochs=2, batch_size=16, optimizer="sgd", lr=1.0, progress=False)
    assert h1.config["features_given"] and h1.epochs[0]["feature_seconds"] == 0
    torch.testing.assert_close(m1.head.weight, m2.head.weight)
    with pytest.raises(ValueError, match="cached mode without augmentation"):
        fit_head(m1, (x, y), augment="group", features=(feats, labels), progress=False)
    with pytest.raises(ValueError, match="pair of tensors"):
        fit_head(m1, (x, y), features=(feats, labels[:3]), progress=False)


def test_extract_features_matches_model_pipeline():
    x, y = _data(20)
    model = _model().train()
    feats, labels, elems = extract_features(model, (x, y), batch_size=8)
    assert model.training  # mode restored
    model.eval()
    with torch.no_grad():
        ref = model.backbone.features(model.normalize(model.canonicalize(x).images))
    torch.testing.assert_close(feats, ref)
    assert torch.equal(labels, y) and torch.equal(elems, torch.zeros_like(y))
    torch.testing.assert_close(model.head(feats), model(x))


def test_head_sharpness_convex_head_and_restores_weights():
    x, y = _data(40)
    model = _model()
    feats, labels, _ = extract_features(model, (x, y))
    w0 = _state(model.head)
    s = head_sharpness(model.head, feats, labels, rho=0.05)
    assert _same(w0, _state(model.head))
    # CE of a linear head is convex in its parameters: f(w + eps) >= f(w) + <g, eps> = f(w) + rho * |g|
    assert s["sharpness"] >= 0.05 * s["grad_norm"] - 1e-6


# ---------------------------------------------------------------------------------- robust losses
ROBUST = [
    ("pgd_at", "input", {}),
    ("trades", "input", {}),
    ("d2r", "input", {}),
    ("d2r", "input", {"guide": "head", "mode": "two_stage", "optimizer": "sam", "rho": 0.05}),
    ("pgd_at", "feature", {"optimizer": "asam"}),
    ("trades", "feature", {}),
    ("d2r", "feature", {}),
]


@pytest.mark.parametrize("loss,threat,extra", ROBUST, ids=[f"{l}-{t}-{i}" for i, (l, t, _) in enumerate(ROBUST)])
def test_robust_losses_one_epoch_only_head_changes(loss, threat, extra):
    x, y = _data(48)
    model = _model()
    bb, canon, head0 = _state(model.backbone), _state(model.canonicalizer), _state(model.head)
    eps = 0.1 if threat == "input" else 0.05
    hist = fit_head(model, (x, y), epochs=1, batch_size=24, loss=loss, threat=threat, eps=eps, steps=2,
                    progress=False, **extra)
    rec = hist.last
    assert math.isfinite(rec["loss"]) and math.isfinite(rec["train_acc"])
    assert _same(bb, _state(model.backbone)) and _same(canon, _state(model.canonicalizer))
    assert not _same(head0, _state(model.head))
    assert hist.config["threat"] == threat and hist.config["loss"] == loss
    assert hist.config["cached"] == (threat == "feature")
    assert all(math.isfinite(v) for k, v in rec.items() if k.endswith("_loss"))
    if loss == "d2r":
        assert {"ce_loss", "mse_loss", "kl_sym_loss", "kl_adv_loss"} <= set(rec)
        assert hist.config["guide"] == extra.get("guide", "pretrained")


def test_feature_threat_is_labelled_and_needs_eps():
    x, y = _data(32)
    hist = fit_head(_model(), (x, y), epochs=1, loss="trades", threat="feature", eps=0.05, steps=2, progress=False)
    assert hist.config["threat"] == "feature"
    assert "FEATURE space" in hist.config["threat_model"] and "not a pixel-space" in hist.config["threat_model"]
    hist_in = fit_head(_model(), (x, y), epochs=1, loss="pgd_at", eps=0.1, steps=1, progress=False)
    assert hist_in.config["threat"] == "input" and "pixels" in hist_in.config["threat_model"]
    assert fit_head(_model(), (x, y), epochs=1, progress=False).config["threat"] is None  # CE: no threat model
    with pytest.raises(ValueError, match="feature units|FEATURE units"):
        fit_head(_model(), (x, y), loss="pgd_at", threat="feature", progress=False)


def test_d2r_guide_falls_back_to_a_head_when_classes_differ():
    x, y = _data(24)
    y = y % 5
    hist = fit_head(_model(num_classes=5), (x, y), epochs=1, loss="d2r", eps=0.05, steps=1, progress=False)
    assert hist.config["guide"] == "head"  # the pretrained classifier has 10 classes
    hist = fit_head(_model(), (x, _data(24)[1]), epochs=1, loss="d2r", threat="feature", eps=0.05, steps=1,
                    progress=False)
    assert hist.config["guide"] == "pretrained"  # DigitNet.classifier found on the features


def test_objective_matches_canonwrap_robust():
    """fit_head's generate-then-loss split (SAM reuses x') equals the library's PGD-AT and TRADES."""
    x, y = _data(12)
    model = _model().eval()
    opts = {"norm": "linf", "random_start": True, "beta": 6.0}
    obj = _Objective("pgd_at", model, None, 0.1, 0.03, 3, (0.0, 1.0), opts)
    torch.manual_seed(3)
    ref, _ = pgd_at_loss(model, x, y, eps=0.1, alpha=0.03, steps=3)
    torch.manual_seed(3)
    mine = obj.loss(x, y, obj.generate(x, y)).loss
    torch.testing.assert_close(mine, ref)
    obj = _Objective("trades", model, None, 0.1, 0.03, 3, (0.0, 1.0), opts)
    torch.manual_seed(4)
    ref = trades_loss(model, x, y, eps=0.1, alpha=0.03, steps=3, beta=6.0).loss
    torch.manual_seed(4)
    mine = obj.loss(x, y, obj.generate(x, y)).loss
    torch.testing.assert_close(mine, ref)


def test_train_canonicalizer_changes_it_but_not_the_backbone():
    x, y = _data(32)
    model = _model()
    bb, canon = _state(model.backbone), _state(model.canonicalizer)
    hist = fit_head(model, (x, y), epochs=1, batch_size=16, train_canonicalizer=True, optimizer="sam", progress=False)
    assert not hist.config["cached"] and hist.config["augment"] == "group"
    assert "prior_loss" in hist.last
    assert _same(bb, _state(model.backbone))
    assert not _same(canon, _state(model.canonicalizer))


# ---------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"loss": "trade"}, ValueError, r"unknown loss 'trade'.*Did you mean 'trades'"),
        ({"optimizer": "sma"}, ValueError, r"unknown optimizer 'sma'.*expected one of"),
        ({"loss": "pgd_at", "threat": "pixel"}, ValueError, r"unknown threat 'pixel'.*'feature', 'input'"),
        ({"guide": "teacher", "loss": "d2r"}, ValueError, r"unknown guide"),
        ({"loss": "pgd_at", "cache_features": True}, ValueError, r"cache_features=True is impossible"),
        ({"cache_features": "yes"}, ValueError, r"cache_features must be"),
        ({"eps": 0.1}, ValueError, r"robust losses"),
        ({"loss": "pgd_at", "eps": -0.1}, ValueError, r"eps must be >= 0"),
        ({"loss": "trades", "gap_weight": 3.0}, TypeError, r"accepts \['beta', 'norm'\]"),
        ({"optimizer": "sgd", "rho": 0.05}, TypeError, r"SAM family"),
        ({"optimizer": "sam", "rho": -1.0}, ValueError, r"rho"),
        ({"epochs": 0}, ValueError, r"epochs must be"),
        ({"augment": "rotate"}, ValueError, r"unknown augment"),
        ({"loss": "d2r", "mode": "three_stage"}, ValueError, r"D2R mode"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, exc, match):
    x, y = _data(16)
    with pytest.raises(exc, match=match):
        fit_head(_model(), (x, y), epochs=kwargs.pop("epochs", 1), progress=False, **kwargs)


def test_model_without_head_and_unlabelled_data_are_rejected():
    x, y = _data(16)
    with pytest.raises(ValueError, match="num_classes=N"):
        fit_head(cw.wrap("canonwrap:digitnet", group="c4"), (x, y), progress=False)
    with pytest.raises(ValueError, match="labelled"):
        fit_head(_model(), x, progress=False)
    with pytest.raises(TypeError, match="wrapped model"):
        fit_head(torch.nn.Linear(2, 2), (x, y), progress=False)


def test_loss_names_are_the_documented_ones():
    assert LOSSES == ("ce", "pgd_at", "trades", "d2r")
