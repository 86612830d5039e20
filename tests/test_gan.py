"""Tests for canonwrap.gan: DynamicMask (DMD), RetardationDetector, DCGAN, train_gan, Fréchet distance."""
from __future__ import annotations

import copy
import math
import os
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

from canonwrap.gan import (DCGANDiscriminator, DCGANGenerator, DynamicMask, RetardationDetector,
                           class_coverage, frechet_distance, improvement_statistic, train_gan)

torch.set_num_threads(1)


def tiny_disc(seed: int = 0) -> DCGANDiscriminator:
    torch.manual_seed(seed)
    return DCGANDiscriminator(width=4).eval()


def feature_net() -> nn.Module:
    """The output IS the hooked feature map, so masks can be read off the output."""
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(conv=nn.Conv2d(1, 6, 3, padding=1), out=nn.Identity()))


def fire(dmd: DynamicMask) -> None:
    """Feed a stalled (constant) sequence until the detector fires."""
    for _ in range(dmd.detector.window):
        info = dmd.step(1.0)
    assert info.fired and dmd.active


def no_hooks(module: nn.Module) -> bool:
    return all(len(m._forward_hooks) == 0 for m in module.modules())


X = torch.rand(5, 1, 28, 28, generator=torch.Generator().manual_seed(1))


# ----------------------------------------------------------------------------- wrapper
def test_unmasked_output_bitwise_equal():
    disc = tiny_disc()
    ref = copy.deepcopy(disc)
    dmd = DynamicMask(disc, layers=["block1", "block2"], ratio=0.5, period=3,
                      detector=RetardationDetector(window=4))
    assert torch.equal(dmd(X), ref(X))
    fire(dmd)
    assert not torch.equal(dmd(X), ref(X))  # masked now
    for _ in range(3):
        dmd.step(0.0)
    assert not dmd.active
    assert torch.equal(dmd(X), ref(X))  # unmasked again: bitwise equal


def test_train_mode_unmasked_equal_and_grads_flow():
    disc = tiny_disc().train()
    ref = copy.deepcopy(disc)
    # block1.0 is a conv followed by an in-place LeakyReLU: masking must stay autograd-safe
    dmd = DynamicMask(disc, layers=["block1.0", "block2"], ratio=0.3, period=2, kind="channel")
    assert torch.equal(dmd(X), ref(X))
    dmd.start_period()
    dmd(X).sum().backward()
    grad = disc.block1[0].weight.grad  # (w, 1, 4, 4)
    dropped = dmd.masks["block1.0"].view(-1) == 0  # (w,) channels masked at the conv output
    assert grad[~dropped].abs().sum() > 0 and grad[dropped].abs().sum() == 0


def test_mask_fixed_within_period_and_changes_between_periods():
    dmd = DynamicMask(tiny_disc(), layers=["block1", "block2"], ratio=0.5, period=4,
                      detector=RetardationDetector(window=4), seed=3)
    dmd(X)  # layer shapes become known
    fire(dmd)
    first = {k: v.clone() for k, v in dmd.masks.items()}
    assert set(first) == {"block1", "block2"}
    out0 = dmd(X)
    masked_flags = []
    for _ in range(4):
        info = dmd.step(0.5)
        masked_flags.append(info.masked)
        if dmd.active:
            assert all(torch.equal(first[k], dmd.masks[k]) for k in first)
            assert torch.equal(dmd(X), out0)  # same mask -> same output
    assert masked_flags == [True] * 4 and not dmd.active and dmd.masks == {}
    fire(dmd)
    second = dmd.masks
    assert any(not torch.equal(first[k], second[k]) for k in first)
    assert dmd.periods == 2


@pytest.mark.parametrize("kind", ["spatial", "channel"])
def test_mask_kinds_zero_exact_fraction(kind):
    net = feature_net()
    dmd = DynamicMask(net, layers=["conv"], ratio=0.5, period=5, kind=kind, rescale=False)
    x = torch.rand(3, 1, 8, 8) + 0.5
    ref = net(x)  # (3, 6, 8, 8)
    dmd.start_period()
    out = dmd(x)
    zero = out == 0  # (3, 6, 8, 8)
    if kind == "spatial":
        pos = zero.all(dim=1).all(dim=0)  # (8, 8) positions zeroed in every channel and sample
        assert pos.sum() == 32 and torch.equal(zero, pos.expand_as(zero))
    else:
        ch = zero.flatten(2).all(dim=2).all(dim=0)  # (6,) channels zeroed everywhere
        assert ch.sum() == 3 and torch.equal(zero, ch.view(1, 6, 1, 1).expand_as(zero))
    assert torch.equal(out[~zero], ref[~zero])  # kept units untouched (rescale=False)


def test_rescale_keeps_units_scaled():
    net = feature_net()
    dmd = DynamicMask(net, layers=["conv"], ratio=0.25, period=5, kind="channel")
    x = torch.rand(2, 1, 8, 8)
    ref = net(x)  # unmasked call through the hooks: the layer's output shape becomes known
    dmd.start_period()
    keep = dmd.masks  # so the mask is sampled right when the period starts
    assert set(keep) == {"conv"}
    out = dmd(x)
    kept = keep["conv"].view(-1) > 0  # (6,)
    assert kept.sum() == 6 - 2  # round(0.25 * 6) = 2 dropped
    torch.testing.assert_close(out[:, kept], ref[:, kept] * 6 / 4)


def test_token_and_flat_layouts():
    tok = nn.Sequential(OrderedDict(lin=nn.Linear(4, 8)))
    dmd = DynamicMask(tok, layers=["lin"], ratio=0.5, period=2, kind="spatial")
    dmd.start_period()
    out = dmd(torch.rand(2, 10, 4))  # (B, N, D) -> tokens masked
    assert (out == 0).all(dim=2).all(dim=0).sum() == 5
    flat = DynamicMask(nn.Sequential(OrderedDict(lin=nn.Linear(4, 8))), ["lin"], 0.5, 2, "spatial")
    flat.start_period()
    with pytest.raises(ValueError, match="kind='channel'"):
        flat(torch.rand(2, 4))


def test_remove_restores_original_module():
    disc = tiny_disc()
    ref = copy.deepcopy(disc)
    dmd = DynamicMask(disc, layers=["block1", "block2.0"], ratio=0.5, period=10,
                      detector=RetardationDetector(window=4))
    assert not no_hooks(disc)
    fire(dmd)
    assert not torch.equal(dmd(X), ref(X))
    original = dmd.remove()
    assert original is disc and no_hooks(disc)
    assert torch.equal(original(X), ref(X))
    assert set(original.state_dict()) == set(ref.state_dict())
    with pytest.raises(RuntimeError, match="removed"):
        dmd(X)


def test_state_dict_round_trip_mid_period():
    det_kw = dict(window=6, threshold=1.0)
    dmd = DynamicMask(tiny_disc(), layers=["block1", "block2"], ratio=0.4, period=5,
                      kind="channel", detector=RetardationDetector(**det_kw), seed=7)
    dmd(X)
    fire(dmd)
    dmd.step(0.1)
    dmd.step(0.2)
    sd = dmd.state_dict()
    clone = DynamicMask(tiny_disc(seed=99), layers=["block1", "block2"], ratio=0.4, period=5,
                        kind="channel", detector=RetardationDetector(**det_kw), seed=0)
    clone.load_state_dict(sd)
    assert (clone.active, clone.remaining, clone.steps, clone.periods) == (True, 3, 8, 1)
    assert all(torch.equal(dmd.masks[k], clone.masks[k]) for k in dmd.masks)
    assert torch.equal(clone(X), dmd(X))
    # the rest of the run is identical too: detector window + mask sampler RNG were restored
    for v in [0.3, 0.3, 0.3, 1.0, 2.0, 1.5]:
        a, b = dmd.step(v), clone.step(v)
        assert (a.masked, a.fired, a.remaining) == (b.masked, b.fired, b.remaining)
    assert list(dmd.detector.values) == list(clone.detector.values) and len(dmd.detector.values) > 0
    dmd.start_period()
    clone.start_period()
    assert all(torch.equal(dmd.masks[k], clone.masks[k]) for k in dmd.masks)


def test_state_dict_rejects_other_layers():
    a = DynamicMask(tiny_disc(), layers=["block1"], ratio=0.5, period=2)
    b = DynamicMask(tiny_disc(), layers=["block2"], ratio=0.5, period=2)
    with pytest.raises(ValueError, match="layers"):
        b.load_state_dict(a.state_dict())


@pytest.mark.parametrize("ratio", [0, 0.0, 1, 1.0, 1.5, -0.1])
def test_bad_ratio(ratio):
    with pytest.raises(ValueError, match="ratio"):
        DynamicMask(tiny_disc(), layers=["block1"], ratio=ratio, period=5)


def test_bad_arguments():
    with pytest.raises(ValueError) as err:
        DynamicMask(tiny_disc(), layers=["blok1"], ratio=0.5, period=5)
    msg = str(err.value)
    assert "block1" in msg and "block2" in msg and "head" in msg and "Did you mean 'block1'" in msg
    with pytest.raises(ValueError, match="period"):
        DynamicMask(tiny_disc(), layers=["block1"], ratio=0.5, period=0)
    with pytest.raises(ValueError, match="spatial"):
        DynamicMask(tiny_disc(), layers=["block1"], ratio=0.5, period=5, kind="pixel")
    with pytest.raises(TypeError, match="nn.Module"):
        DynamicMask(lambda x: x, layers=["block1"])
    with pytest.raises(ValueError, match="window"):
        RetardationDetector(window=5)
    with pytest.raises(TypeError, match="float or a tensor"):
        RetardationDetector().update("0.3")


# ----------------------------------------------------------------------------- detector
def test_detector_fires_on_stalled_not_on_improving():
    rng = np.random.default_rng(0)
    stalled = RetardationDetector(window=20, threshold=1.0)
    fired_stalled = [stalled.update(0.7 + 0.02 * rng.standard_normal()).fired for _ in range(200)]
    improving = RetardationDetector(window=20, threshold=1.0)
    outs = [improving.update(1.0 - 0.01 * t + 0.02 * rng.standard_normal()) for t in range(200)]
    assert sum(fired_stalled) >= 5  # ~84% of full windows on a flat sequence
    assert not any(o.fired for o in outs)
    full = [o.statistic for o in outs if not math.isnan(o.statistic)]
    assert len(full) == 181 and min(full) > 3.0


def test_detector_statistic_values():
    assert improvement_statistic([1.0] * 8) == 0.0
    assert improvement_statistic([4.0, 4.0, 3.0, 3.0, 1.0, 1.0, 0.0, 0.0]) > 3.0  # falling
    assert improvement_statistic([0.0, 0.0, 1.0, 1.0, 3.0, 3.0, 4.0, 4.0]) < -3.0  # rising
    det = RetardationDetector(window=4)
    outs = [det.update(torch.tensor([1.0, 3.0])) for _ in range(4)]  # tensor -> mean 2.0
    assert [o.filled for o in outs] == [1, 2, 3, 4] and outs[-1].fired and len(det.values) == 0


def test_detector_only_sees_unmasked_steps():
    dmd = DynamicMask(tiny_disc(), layers=["block1"], ratio=0.5, period=3,
                      detector=RetardationDetector(window=4, threshold=1.0))
    infos = [dmd.step(1.0) for _ in range(14)]
    # 4 unmasked steps (window fills, fires), 3 masked, then again
    assert [i.masked for i in infos] == [False] * 4 + [True] * 3 + [False] * 4 + [True] * 3
    assert [i.fired for i in infos].count(True) == 2
    assert all(math.isnan(i.statistic) for i in infos if i.masked)


# ----------------------------------------------------------------------------- training loop
def test_train_gan_runs_with_dmd_and_saves_grids(tmp_path):
    torch.manual_seed(0)
    g, d = DCGANGenerator(z_dim=8, width=4), DCGANDiscriminator(width=4)
    dmd = DynamicMask(d, layers=["block1", "block2"], ratio=0.5, period=3,
                      detector=RetardationDetector(window=4, threshold=1e9))  # always fires
    data = torch.rand(64, 1, 28, 28)
    hist = train_gan(g, dmd, data, steps=12, batch_size=8, out_dir=str(tmp_path),
                     sample_every=5, progress=False)
    assert len(hist["d_loss"]) == 12 and all(math.isfinite(v) for v in hist["g_loss"])
    assert hist["masked"] == ([False] * 4 + [True] * 3) + [False] * 4 + [True]
    assert hist["periods"] == 2
    assert [os.path.basename(p) for p in hist["samples"]] == [
        "samples_000005.png", "samples_000010.png", "samples_000012.png"]
    from PIL import Image
    assert Image.open(hist["samples"][-1]).size == (8 * 30 + 2, 8 * 30 + 2)


def test_train_gan_plain_and_bad_data():
    torch.manual_seed(0)
    g, d = DCGANGenerator(z_dim=8, width=4), DCGANDiscriminator(width=4)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.rand(32, 1, 28, 28), torch.zeros(32)), batch_size=8)
    hist = train_gan(g, d, loader, steps=5, progress=False)
    assert hist["masked"] == [False] * 5 and hist["samples"] == []
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        train_gan(g, d, torch.rand(8, 1, 28, 28) * 2 - 1, steps=1, progress=False)


# ----------------------------------------------------------------------------- metrics
def test_frechet_distance_matches_scipy_formula():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 6))
    b = rng.normal(size=(400, 6)) @ rng.normal(size=(6, 6)) * 0.5 + 0.3
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    scipy_linalg = pytest.importorskip("scipy.linalg")
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    ref = ((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * scipy_linalg.sqrtm(s_a @ s_b).real)
    assert frechet_distance(a, b) == pytest.approx(ref, rel=1e-6)
    assert frechet_distance(torch.from_numpy(a).float(), torch.from_numpy(b)) == pytest.approx(ref, rel=1e-4)
    with pytest.raises(ValueError, match="feature dims"):
        frechet_distance(a, b[:, :5])


def test_class_coverage():
    preds = np.array([0] * 50 + [1] * 45 + [2] * 5)
    cov = class_coverage(preds, num_classes=4, min_share=0.5)  # needs >= 12.5 samples
    assert cov.counts == [50, 45, 5, 0] and cov.coverage == 0.5
    uniform = class_coverage(torch.eye(4).repeat(10, 1), num_classes=4)  # logits (40, 4)
    assert uniform.coverage == 1.0 and uniform.entropy == pytest.approx(1.0)
    with pytest.raises(ValueError, match="class ids"):
        class_coverage(np.array([0, 7]), num_classes=4)
