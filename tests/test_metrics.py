"""Calibration, uncertainty and corruption building blocks (hand-computed cases)."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from canonwrap.corruptions import apply_corruption, list_corruptions
from canonwrap.metrics import (
    TemperatureScaler,
    accuracy_at_coverage,
    aurc,
    auroc,
    brier,
    canon_margin,
    ece,
    enable_dropout,
    ensemble_disagreement,
    fit_temperature,
    mc_dropout_predict,
    nll,
    predictive_entropy,
    reliability_bins,
    risk_coverage,
    threshold_for_coverage,
)

torch.set_num_threads(1)


# ----------------------------------------------------------------------------- calibration
def _hand_case():
    # conf 0.95 (right), 0.85 (wrong) -> bin (0.8, 1]: conf 0.9, acc 0.5, gap 0.4, weight 1/2
    # conf 0.65 (right) -> bin (0.6, 0.8]: gap 0.35, weight 1/4
    # conf 0.55 (wrong) -> bin (0.4, 0.6]: gap 0.55, weight 1/4      => ECE = 0.2 + 0.0875 + 0.1375
    probs = torch.tensor([[0.95, 0.05], [0.85, 0.15], [0.35, 0.65], [0.55, 0.45]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 1, 1])
    return probs, labels


def test_ece_hand_computed():
    probs, labels = _hand_case()
    assert ece(probs, labels, n_bins=5) == pytest.approx(0.425, abs=1e-12)
    assert ece(probs.numpy(), labels.numpy(), n_bins=5) == pytest.approx(0.425, abs=1e-12)


def test_reliability_bins_hand_computed():
    probs, labels = _hand_case()
    b = reliability_bins(probs, labels, n_bins=5)
    assert b["edges"] == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert b["count"] == [0, 0, 1, 1, 2]
    assert b["accuracy"][:2] == [None, None]
    assert b["accuracy"][2:] == pytest.approx([0.0, 1.0, 0.5])
    assert b["confidence"][2:] == pytest.approx([0.55, 0.65, 0.9])


def test_reliability_bins_edges_are_right_inclusive():
    probs = torch.tensor([[0.5, 0.5], [1.0, 0.0]], dtype=torch.float64)
    b = reliability_bins(probs, torch.tensor([0, 0]), n_bins=2)
    assert b["count"] == [1, 1]  # 0.5 -> (0, 0.5], 1.0 -> (0.5, 1]


def test_ece_perfectly_calibrated_is_zero():
    probs = torch.tensor([[0.75, 0.25]] * 4, dtype=torch.float64)
    assert ece(probs, torch.tensor([0, 0, 0, 1])) == pytest.approx(0.0, abs=1e-12)


def test_ece_matches_torchmetrics():
    tm = pytest.importorskip("torchmetrics")
    g = torch.Generator().manual_seed(0)
    probs = (torch.randn(500, 5, generator=g) * 2).softmax(-1)
    labels = torch.randint(0, 5, (500,), generator=g)
    ref = tm.functional.classification.multiclass_calibration_error(probs, labels, num_classes=5, n_bins=10)
    assert ece(probs, labels, n_bins=10) == pytest.approx(float(ref), abs=1e-5)


def test_nll_hand_computed_and_logits_equal_probs():
    probs = torch.tensor([[0.5, 0.5], [0.25, 0.75]], dtype=torch.float64)
    labels = torch.tensor([0, 1])
    expected = (math.log(2) + math.log(4 / 3)) / 2
    assert nll(probs, labels) == pytest.approx(expected)  # auto -> probs
    logits = torch.log(probs) + 3.0  # same softmax
    assert nll(logits, labels) == pytest.approx(expected)  # auto -> logits
    assert nll(logits, labels, kind="logits") == pytest.approx(expected)
    with pytest.raises(ValueError, match="not probabilities"):
        nll(logits, labels, kind="probs")
    with pytest.raises(ValueError, match="kind"):
        nll(logits, labels, kind="softmax")


def test_brier_hand_computed():
    assert brier(torch.tensor([[0.8, 0.2]]), torch.tensor([0])) == pytest.approx(0.08)
    assert brier(torch.full((3, 4), 0.25), torch.tensor([0, 1, 2])) == pytest.approx(0.75)  # 1 - 1/K
    assert brier(torch.tensor([[0.0, 1.0]]), torch.tensor([0])) == pytest.approx(2.0)


@pytest.mark.parametrize(
    "probs, labels, exc, match",
    [
        (torch.tensor([0.5, 0.5]), torch.tensor([0]), ValueError, "shape"),
        (torch.tensor([[0.5, 0.5]]), torch.tensor([0, 1]), ValueError, "labels must have shape"),
        (torch.tensor([[0.5, 0.5]]), torch.tensor([2]), ValueError, "labels must lie in"),
        (torch.tensor([[0.5, 0.5]]), torch.tensor([0.0]), TypeError, "integer"),
        (torch.tensor([[0.9, 0.9]]), torch.tensor([0]), ValueError, "softmax"),
        (torch.tensor([[1, 0]]), torch.tensor([0]), TypeError, "floating"),
        ("probs", torch.tensor([0]), TypeError, "torch.Tensor or numpy"),
    ],
)
def test_calibration_bad_arguments(probs, labels, exc, match):
    for fn in (ece, brier):
        with pytest.raises(exc, match=match):
            fn(probs, labels)


def test_bad_n_bins():
    probs, labels = _hand_case()
    with pytest.raises(ValueError, match="n_bins"):
        ece(probs, labels, n_bins=0)


def _overconfident(scale: float, n: int = 4000, k: int = 10, seed: int = 0):
    """Labels drawn from softmax(z): z is calibrated, scale * z is over-confident by `scale`."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, k, generator=g) * 2  # (N, K)
    y = torch.multinomial(z.softmax(-1), 1, generator=g)[:, 0]  # (N,)
    return z * scale, y


def test_temperature_scaling_recovers_t_and_lowers_nll():
    val_logits, val_y = _overconfident(5.0, seed=0)
    test_logits, test_y = _overconfident(5.0, seed=1)
    t = fit_temperature(val_logits, val_y)
    assert 4.0 < t < 6.0
    scaler = TemperatureScaler(t)
    before = nll(test_logits, test_y, kind="logits")
    after = nll(scaler(test_logits), test_y, kind="logits")
    assert after < before - 0.5
    assert ece(scaler(test_logits).softmax(-1), test_y) < ece(test_logits.softmax(-1), test_y) / 3
    assert torch.equal(scaler(test_logits).argmax(-1), test_logits.argmax(-1))  # accuracy unchanged


def test_temperature_of_calibrated_model_is_near_one():
    logits, y = _overconfident(1.0)
    assert 0.8 < fit_temperature(logits, y) < 1.2


def test_fit_temperature_bad_arguments():
    logits, y = _overconfident(1.0, n=10)
    with pytest.raises(ValueError, match="t_min"):
        fit_temperature(logits, y, t_min=2.0, t_max=1.0)
    with pytest.raises(ValueError, match="contains NaN"):
        fit_temperature(torch.full((2, 3), float("nan")), torch.tensor([0, 1]))


def test_temperature_scaler_module_and_state_dict(tmp_path):
    scaler = TemperatureScaler.fit(*_overconfident(3.0, n=1000))
    assert "temperature" in scaler.state_dict() and not list(scaler.parameters())
    x = torch.randn(4, 10)
    assert torch.allclose(scaler(x), x / float(scaler.temperature))
    assert scaler(x.half()).dtype == torch.float16
    st = pytest.importorskip("safetensors.torch")
    st.save_file(scaler.state_dict(), str(tmp_path / "t.safetensors"))
    loaded = TemperatureScaler()
    loaded.load_state_dict(st.load_file(str(tmp_path / "t.safetensors")))
    assert float(loaded.temperature) == pytest.approx(float(scaler.temperature))
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="temperature"):
            TemperatureScaler(bad)


# ----------------------------------------------------------------------------- uncertainty scores
def test_predictive_entropy_hand_computed():
    h = predictive_entropy(torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [1 / 3, 1 / 3, 1 / 3]]))
    assert torch.allclose(h, torch.tensor([0.0, math.log(2), math.log(3)]))
    with pytest.raises(ValueError, match=r"\(N, K\)"):
        predictive_entropy(torch.ones(3))


def test_canon_margin_hand_computed():
    m = canon_margin(torch.tensor([[4.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]]))
    e4 = math.exp(4)
    assert m[0].item() == pytest.approx((e4 - 1) / (e4 + 3), rel=1e-6)  # high margin = confident
    assert m[1].item() == pytest.approx(0.0, abs=1e-7)  # tie between two orientations
    with pytest.raises(ValueError, match=r"\|G\| >= 2"):
        canon_margin(torch.ones(2, 1))


def test_ensemble_disagreement():
    g = torch.Generator().manual_seed(0)
    p = torch.randn(5, 7, 4, generator=g).softmax(-1)  # (M, N, K)
    mi = ensemble_disagreement(p)
    p_bar = p.mean(0)
    mean_kl = (p * (p.log() - p_bar.log())).sum(-1).mean(0)  # mean_m KL(p_m || p_bar)
    assert torch.allclose(mi, mean_kl, atol=1e-6)
    same = p[:1].expand(3, -1, -1)
    assert torch.allclose(ensemble_disagreement(same), torch.zeros(7), atol=1e-6)
    split = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    assert ensemble_disagreement(split).item() == pytest.approx(math.log(2))
    votes = torch.tensor([[[0.9, 0.1]], [[0.8, 0.2]], [[0.3, 0.7]]])
    assert ensemble_disagreement(votes, kind="vote").item() == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="kind"):
        ensemble_disagreement(p, kind="kl")
    with pytest.raises(ValueError, match=r"\(M, N, K\)"):
        ensemble_disagreement(p[0])


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(8)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(8, 3)
        self.seen = []  # test-only probe of modes during forward

    def forward(self, x):
        self.seen.append((self.bn.training, self.drop.training))
        return self.fc(self.drop(self.bn(x)))


def test_mc_dropout_samples_and_restores_modes():
    torch.manual_seed(0)
    net = _Net().eval()
    x = torch.randn(4, 8)
    bn_stats = net.bn.running_mean.clone()
    samples = mc_dropout_predict(net, x, n_samples=6, seed=1)
    assert samples.shape == (6, 4, 3)
    assert torch.allclose(samples.sum(-1), torch.ones(6, 4))
    assert not torch.allclose(samples[0], samples[1])  # dropout really on
    assert all(s == (False, True) for s in net.seen)  # only dropout in train mode
    assert not net.training and not net.drop.training and not net.bn.training  # restored
    assert torch.equal(net.bn.running_mean, bn_stats)
    assert torch.equal(samples, mc_dropout_predict(net, x, n_samples=6, seed=1))  # seeded


def test_mc_dropout_restores_modes_after_exception():
    net = _Net().eval()

    def boom(x):
        net(x)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        mc_dropout_predict(boom, torch.randn(2, 8), n_samples=3, module=net)
    assert not net.drop.training and not net.bn.training
    net.train()  # previous flags are restored, not forced to eval
    with enable_dropout(net) as layers:
        assert layers == [net.drop]
    assert net.drop.training and net.bn.training


def test_mc_dropout_bad_arguments():
    with pytest.raises(ValueError, match="no dropout"):
        mc_dropout_predict(nn.Linear(3, 2), torch.randn(2, 3), n_samples=2)
    with pytest.raises(ValueError, match="n_samples"):
        mc_dropout_predict(_Net(), torch.randn(2, 8), n_samples=0)
    with pytest.raises(TypeError, match="module="):
        mc_dropout_predict(lambda x: x, torch.randn(2, 8), n_samples=2)


# ----------------------------------------------------------------------------- judging scores
def test_auroc_hand_cases():
    err = [False, False, True, True]
    assert auroc([0.1, 0.2, 0.8, 0.9], err) == 1.0
    assert auroc([0.9, 0.8, 0.2, 0.1], err) == 0.0
    assert auroc([0.5, 0.5, 0.5, 0.5], err) == 0.5
    # pairs (error, correct): (.5,.1)=1 (.5,.5)=1/2 (.9,.1)=1 (.9,.5)=1 -> 3.5 / 4
    assert auroc(np.array([0.1, 0.5, 0.5, 0.9]), np.array([0, 1, 0, 1])) == pytest.approx(0.875)
    assert math.isnan(auroc([0.1, 0.2], [False, False]))


def test_auroc_matches_sklearn_with_ties():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    s = rng.integers(0, 5, 300).astype(float)  # many ties
    e = rng.random(300) < 0.3
    assert auroc(torch.from_numpy(s), torch.from_numpy(e)) == pytest.approx(metrics.roc_auc_score(e, s))


def test_risk_coverage_pieces():
    rng = np.random.default_rng(0)
    u = rng.random(200)
    correct = u < 0.7  # perfect ranking: all errors are the most uncertain
    cov, risk = risk_coverage(u, correct)
    assert np.all(np.diff(cov) > 0) and cov[-1] == 1.0
    assert np.all(np.diff(risk) >= -1e-12) and risk[0] == 0.0  # monotone for a perfect score
    assert risk[-1] == pytest.approx(1 - correct.mean())
    cov, risk = risk_coverage([0.1, 0.1, 0.2], [True, False, True])  # ties accepted together
    assert cov.tolist() == pytest.approx([2 / 3, 1.0]) and risk.tolist() == pytest.approx([0.5, 1 / 3])
    assert aurc(u, correct) < aurc(-u, correct)


def test_aurc_matches_accuracy_at_coverage_definition():
    u = np.array([0.3, 0.1, 0.1, 0.5, 0.5, 0.5, 0.9])
    c = np.array([1, 1, 0, 1, 0, 0, 1], dtype=bool)
    expected = np.mean([1 - accuracy_at_coverage(u, c, k / len(u)) for k in range(1, len(u) + 1)])
    assert aurc(u, c) == pytest.approx(expected)


def test_accuracy_at_coverage_hand_cases():
    u = np.arange(10) / 10.0
    correct = np.array([1, 1, 1, 1, 1, 1, 1, 1, 0, 0], dtype=bool)
    assert accuracy_at_coverage(u, correct, 0.8) == 1.0
    assert accuracy_at_coverage(u, correct, 0.9) == pytest.approx(8 / 9)
    assert accuracy_at_coverage(u, correct, 1.0) == pytest.approx(0.8)
    # cut inside a tie group: 2 below + half of the tied pair {correct, wrong} -> 2.5 / 3
    assert accuracy_at_coverage([0.0, 0.0, 1.0, 1.0], [True, True, True, False], 0.75) == pytest.approx(2.5 / 3)
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="coverage"):
            accuracy_at_coverage(u, correct, bad)
    with pytest.raises(ValueError, match="same shape"):
        accuracy_at_coverage(u, correct[:5])
    with pytest.raises(ValueError, match="boolean"):
        accuracy_at_coverage(u, np.full(10, 2))


def test_threshold_for_coverage():
    assert threshold_for_coverage([0.4, 0.1, 0.3, 0.2], 0.5) == 0.2
    assert threshold_for_coverage(torch.tensor([0.4, 0.1, 0.3, 0.2]), 1.0) == pytest.approx(0.4)
    u = np.random.default_rng(0).integers(0, 4, 101).astype(float)  # ties
    for cov in (0.1, 0.5, 0.9):
        t = threshold_for_coverage(u, cov)
        assert np.mean(u <= t) >= cov and np.mean(u < t) < cov
    with pytest.raises(ValueError, match="coverage"):
        threshold_for_coverage(u, 0)


# ----------------------------------------------------------------------------- corruptions
def _images(seed=0, shape=(4, 3, 16, 16)):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def test_registry_lists_all_corruptions():
    assert list_corruptions() == ["brightness", "contrast", "gaussian_blur", "gaussian_noise", "quantization"]


@pytest.mark.parametrize("name", list_corruptions())
def test_corruption_shape_range_and_severity(name):
    x = _images()
    dist = []
    for severity in range(1, 6):
        y = apply_corruption(name, x, severity, seed=0)
        assert y.shape == x.shape and y.dtype == x.dtype
        assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
        dist.append(float((y - x).abs().mean()))
    assert dist[0] > 0 and all(b > a for a, b in zip(dist, dist[1:])), dist


@pytest.mark.parametrize("name", list_corruptions())
def test_corruption_deterministic_and_leaves_global_rng(name):
    x = _images()
    state = torch.get_rng_state()
    assert torch.equal(apply_corruption(name, x, 3, seed=7), apply_corruption(name, x, 3, seed=7))
    assert torch.equal(torch.get_rng_state(), state)


def test_noise_depends_on_seed_and_blur_keeps_constants():
    x = _images()
    assert not torch.equal(apply_corruption("gaussian_noise", x, 2, seed=0), apply_corruption("gaussian_noise", x, 2, seed=1))
    flat = torch.full((2, 1, 9, 9), 0.3)
    assert torch.allclose(apply_corruption("gaussian_blur", flat, 5), flat, atol=1e-6)
    assert torch.allclose(apply_corruption("Contrast", x, 5).mean((1, 2, 3)), x.mean((1, 2, 3)), atol=1e-5)


@pytest.mark.parametrize(
    "args, exc, match",
    [
        (("gaussian_nose", None, 1), KeyError, "gaussian_noise"),
        (("brightness", None, 0), ValueError, "severity"),
        (("brightness", None, 6), ValueError, "severity"),
        (("brightness", None, True), ValueError, "severity"),
        (("brightness", None, 2.0), ValueError, "severity"),
        (("brightness", torch.rand(3, 8, 8), 1), ValueError, r"\(B, C, H, W\)"),
        (("brightness", torch.zeros(1, 1, 4, 4, dtype=torch.uint8), 1), TypeError, "floating"),
        (("brightness", torch.full((1, 1, 4, 4), 255.0), 1), ValueError, r"\[0, 1\]"),
    ],
)
def test_corruption_bad_arguments(args, exc, match):
    name, x, severity = args
    with pytest.raises(exc, match=match):
        apply_corruption(name, _images() if x is None else x, severity)
