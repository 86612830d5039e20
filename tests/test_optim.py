"""Tests for canonwrap.optim: SAM, ASAM, SAMAR and the optimizer registry (tiny CPU models)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from canonwrap.optim import (
    ASAM,
    SAM,
    SAMAR,
    create_optimizer,
    disable_running_stats,
    list_optimizers,
)

torch.set_num_threads(1)


def _mlp(seed: int = 0, bn: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Linear(2, 16)] + ([nn.BatchNorm1d(16)] if bn else []) + [nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
                                                                          nn.Linear(16, 1)]
    return nn.Sequential(*layers)


def _data(seed: int = 1, n: int = 64):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 2, generator=g) * 4 - 2  # (N, 2)
    y = torch.sin(2 * x[:, :1]) * torch.cos(2 * x[:, 1:])  # (N, 1), non-convex regression target
    return x, y


def _closure(model, opt, x, y):
    def closure():
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        return loss

    return closure


def _params_equal(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


BASES = [
    (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-4)),
    (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.01)),
]


# ---------------------------------------------------------------- rho = 0 is the base optimizer
@pytest.mark.parametrize("base_cls,kw", BASES, ids=["sgd_momentum", "adamw"])
@pytest.mark.parametrize("wrapper", ["sam", "asam", "samar", "manual"])
def test_rho_zero_equals_base_bit_for_bit(base_cls, kw, wrapper):
    x, y = _data()
    ref, model = _mlp(), _mlp()
    base = base_cls(ref.parameters(), **kw)
    if wrapper == "samar":
        opt = SAMAR(model.parameters(), base_cls, rho=0.0, lam_init=0.5, **kw)
    elif wrapper == "asam":
        opt = ASAM(model.parameters(), base_cls, rho=0.0, **kw)
    else:
        opt = SAM(model.parameters(), base_cls, rho=0.0, **kw)
    for _ in range(5):
        _closure(ref, base, x, y)()
        base.step()
        if wrapper == "manual":
            _closure(model, opt, x, y)()
            opt.first_step(zero_grad=True)
            _closure(model, opt, x, y)()
            opt.second_step(zero_grad=True)
        else:
            opt.step(_closure(model, opt, x, y))
    assert not _params_equal(ref, _mlp())  # the weights did move
    assert _params_equal(ref, model)


def test_constructed_base_instance_equals_class_form():
    x, y = _data()
    m1, m2 = _mlp(), _mlp()
    o1 = SAM(m1.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    o2 = SAM(None, torch.optim.SGD(m2.parameters(), lr=0.1, momentum=0.9), rho=0.05)
    for _ in range(3):
        o1.step(_closure(m1, o1, x, y))
        o2.step(_closure(m2, o2, x, y))
    assert _params_equal(m1, m2)
    assert o2.param_groups is o2.base_optimizer.param_groups and o2.param_groups[0]["rho"] == 0.05


# ---------------------------------------------------------------- they optimize
@pytest.mark.parametrize("name,kw", [("sam", dict(rho=0.05)), ("asam", dict(rho=0.5)),
                                     ("samar", dict(rho=0.05, lam_init=0.5, interval=5)),
                                     ("sam", dict(rho=0.05, base="adamw", lr=1e-2))])
def test_reduces_loss_on_nonconvex_toy(name, kw):
    x, y = _data()
    model = _mlp()
    opt = create_optimizer(name, model, **{"lr": 0.1, **kw})
    closure = _closure(model, opt, x, y)
    first = float(opt.step(closure))
    for _ in range(150):
        loss = float(opt.step(closure))
    assert loss < 0.5 * first, (first, loss)


# ---------------------------------------------------------------- the ascent step
def test_sam_ascent_step_has_norm_rho():
    x, y = _data()
    model = _mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.07, lr=0.0)  # lr = 0: w stays put after the step
    w = [p.detach().clone() for p in model.parameters()]
    _closure(model, opt, x, y)()
    grad_norm = opt.first_step()
    eps = torch.cat([(p.detach() - w0).flatten() for p, w0 in zip(model.parameters(), w)])
    g = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert torch.allclose(eps.norm(), torch.tensor(0.07), rtol=1e-4)
    assert torch.allclose(grad_norm, g.norm(), rtol=1e-5)
    assert torch.nn.functional.cosine_similarity(eps, g, dim=0) > 0.9999  # along the gradient
    opt.second_step()
    assert all(torch.equal(p, w0) for p, w0 in zip(model.parameters(), w))  # exact restore


def test_asam_ascent_step_has_adaptive_norm_rho():
    x, y = _data()
    model = _mlp()
    opt = ASAM(model.parameters(), torch.optim.SGD, rho=0.5, eta=0.01, lr=0.1)
    w = [p.detach().clone() for p in model.parameters()]
    _closure(model, opt, x, y)()
    opt.first_step()
    t_inv_eps = torch.cat([((p.detach() - w0) / (w0.abs() + 0.01)).flatten()
                           for p, w0 in zip(model.parameters(), w)])
    plain = torch.cat([(p.detach() - w0).flatten() for p, w0 in zip(model.parameters(), w)])
    assert torch.allclose(t_inv_eps.norm(), torch.tensor(0.5), rtol=1e-4)
    assert not torch.allclose(plain.norm(), torch.tensor(0.5), rtol=1e-2)  # differs from plain SAM


# ---------------------------------------------------------------- SAMAR's λ
def _scaled_quadratic_run(factor: float, steps: int = 40, **kw):
    """f(w) = a_t·‖w‖², a_t = factor^t, lr = 0: S = a_t·(2ρ‖w‖ + ρ²) grows (factor > 1) or shrinks."""
    w = nn.Parameter(torch.ones(3))
    opt = SAMAR([w], torch.optim.SGD, rho=0.1, lr=0.0, smoothing=0.5, interval=2, kappa=1.0, **kw)
    a = [1.0]
    lams, sharp = [], []

    def closure():
        opt.zero_grad()
        loss = a[0] * (w ** 2).sum()
        loss.backward()
        return loss

    for _ in range(steps):
        stats = opt.step_with_stats(closure)
        sharp.append(float(stats.sharpness))
        lams.append(opt.lam)
        a[0] *= factor
    return lams, sharp


def test_samar_lam_rises_when_sharpening_and_stays_in_bounds():
    lams, sharp = _scaled_quadratic_run(1.1, lam_init=0.3, lam_min=0.1, lam_max=0.8)
    assert sharp[-1] > sharp[0] > 0
    assert lams[5] > 0.3  # moved up
    assert max(lams) == pytest.approx(0.8) and all(0.1 <= v <= 0.8 for v in lams)


def test_samar_lam_falls_when_flattening_and_stays_in_bounds():
    lams, sharp = _scaled_quadratic_run(0.9, lam_init=0.7, lam_min=0.2, lam_max=0.9)
    assert sharp[-1] < sharp[0]
    assert lams[5] < 0.7  # moved down
    assert min(lams) == pytest.approx(0.2) and all(0.2 <= v <= 0.9 for v in lams)


def test_samar_update_rule_matches_docstring():
    opt = SAMAR([nn.Parameter(torch.ones(1))], torch.optim.SGD, lr=0.1, lam_init=0.5,
                smoothing=0.0, interval=1, kappa=0.2)
    assert opt.update_lam(1.0) == 0.5  # first check only stores the reference
    assert opt.update_lam(3.0) == pytest.approx(0.5 + 0.2 * (3 - 1) / (3 + 1))
    assert opt.update_lam(3.0) == pytest.approx(0.6)  # r = 1: unchanged
    assert opt.update_lam(-1.0) == pytest.approx(0.6 - 0.2 * (3 - 1e-12) / (3 + 1e-12))  # clamped S


def test_samar_gradient_is_the_lambda_mix():
    x, y = _data()
    model = _mlp()
    opt = SAMAR(model.parameters(), torch.optim.SGD, rho=0.1, lam_init=0.25, lr=1.0, kappa=0.0)
    w = [p.detach().clone() for p in model.parameters()]
    closure = _closure(model, opt, x, y)
    closure()
    g0 = [p.grad.clone() for p in model.parameters()]
    opt.first_step(zero_grad=True)
    closure()
    g1 = [p.grad.clone() for p in model.parameters()]
    opt.second_step()
    for p, w0, a, b in zip(model.parameters(), w, g0, g1):  # plain SGD lr=1: w ← w − g
        assert torch.allclose(p.detach(), w0 - (0.75 * a + 0.25 * b), atol=1e-6)


# ---------------------------------------------------------------- state dict round trip
@pytest.mark.parametrize("cls,kw", [(SAM, dict(rho=0.05)), (SAMAR, dict(rho=0.05, lam_init=0.5, interval=2))])
@pytest.mark.parametrize("base_cls,base_kw", BASES, ids=["sgd_momentum", "adamw"])
def test_state_dict_round_trip_continues_identically(cls, kw, base_cls, base_kw):
    x, y = _data()
    m1 = _mlp()
    o1 = cls(m1.parameters(), base_cls, **kw, **base_kw)
    for _ in range(4):
        o1.step(_closure(m1, o1, x, y))
    m2 = copy.deepcopy(m1)
    o2 = cls(m2.parameters(), base_cls, rho=0.3, **base_kw)  # other hyperparameters: the loaded ones win
    o2.load_state_dict(copy.deepcopy(o1.state_dict()))
    assert o2.param_groups is o2.base_optimizer.param_groups
    assert o2.param_groups[0]["rho"] == 0.05
    assert len(o2.base_optimizer.state) == len(list(m2.parameters()))  # momentum / moments relinked
    for _ in range(4):
        o1.step(_closure(m1, o1, x, y))
        o2.step(_closure(m2, o2, x, y))
    assert _params_equal(m1, m2)
    if cls is SAMAR:
        assert o1.lam == o2.lam != 0.5 and o1.sharpness_ema == o2.sharpness_ema and o2.interval == 2


def test_load_plain_base_optimizer_checkpoint():
    x, y = _data()
    m1 = _mlp()
    base = torch.optim.SGD(m1.parameters(), lr=0.1, momentum=0.9)
    for _ in range(2):
        _closure(m1, base, x, y)()
        base.step()
    m2 = copy.deepcopy(m1)
    opt = SAM(m2.parameters(), torch.optim.SGD, rho=0.05, lr=0.5, momentum=0.9)
    opt.load_state_dict(base.state_dict())
    assert opt.param_groups[0]["rho"] == 0.05 and opt.param_groups[0]["lr"] == 0.1
    assert torch.equal(opt.base_optimizer.state[next(m2.parameters())]["momentum_buffer"],
                       base.state[next(m1.parameters())]["momentum_buffer"])
    opt.step(_closure(m2, opt, x, y))


# ---------------------------------------------------------------- BatchNorm
def test_batchnorm_stats_change_once_per_step():
    x, y = _data()
    model, ref = _mlp(bn=True), _mlp(bn=True)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1, model=model)
    opt.step(_closure(model, opt, x, y))
    with torch.no_grad():
        ref(x)  # one forward at w, in training mode
    bn, bn_ref = model[1], ref[1]
    assert int(bn.num_batches_tracked) == 1
    assert torch.equal(bn.running_mean, bn_ref.running_mean)
    assert torch.equal(bn.running_var, bn_ref.running_var)
    assert bn.track_running_stats  # restored

    # without model= the second pass updates the statistics again (the pitfall being fixed)
    naive = _mlp(bn=True)
    opt2 = SAM(naive.parameters(), torch.optim.SGD, rho=0.5, lr=0.1)
    opt2.step(_closure(naive, opt2, x, y))
    assert int(naive[1].num_batches_tracked) == 2


def test_disable_running_stats_uses_batch_stats_and_restores_flags():
    x, _ = _data()
    model = _mlp(bn=True)
    before = model[1].running_mean.clone()
    with disable_running_stats(model):
        out = model(x)
        assert not model[1].track_running_stats
    assert model[1].track_running_stats and torch.equal(model[1].running_mean, before)
    ref = _mlp(bn=True)
    assert torch.equal(out, ref(x))  # same training-mode output (batch statistics)
    with pytest.raises(TypeError, match="nn.Module"):
        with disable_running_stats("model"):
            pass


# ---------------------------------------------------------------- schedulers, clipping, accumulation
def test_lr_scheduler_on_wrapper_changes_base_lr():
    x, y = _data()
    model = _mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.step(_closure(model, opt, x, y))
    sched.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
    assert opt.param_groups is opt.base_optimizer.param_groups


def test_gradient_clipping_inside_closure_bounds_the_update():
    x, y = _data()
    y = y * 100  # large gradients
    model = _mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=1.0)
    w = torch.cat([p.detach().flatten().clone() for p in model.parameters()])

    def closure():
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.1)
        return loss

    opt.step(closure)
    step = torch.cat([p.detach().flatten() for p in model.parameters()]) - w
    assert 0.05 < float(step.norm()) <= 0.1 + 1e-6


def test_gradient_accumulation_inside_closure_equals_full_batch():
    x, y = _data()
    m1, m2 = _mlp(), _mlp()
    o1 = SAM(m1.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    o2 = SAM(m2.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)

    def accumulating():
        o2.zero_grad()
        total = 0.0
        for xb, yb in zip(x.chunk(4), y.chunk(4)):
            loss = ((m2(xb) - yb) ** 2).mean() / 4
            loss.backward()
            total = total + loss.detach()
        return total

    for _ in range(3):
        o1.step(_closure(m1, o1, x, y))
        o2.step(accumulating)
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


def test_misuse_raises_clear_errors():
    x, y = _data()
    model = _mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    with pytest.raises(RuntimeError, match="closure"):
        opt.step()
    with pytest.raises(RuntimeError, match="without a preceding first_step"):
        opt.second_step()
    _closure(model, opt, x, y)()
    opt.first_step()
    with pytest.raises(RuntimeError, match="gradient accumulation"):
        opt.first_step()  # per-micro-batch first_step: the broken accumulation pattern
    with pytest.raises(RuntimeError, match="between first_step and second_step"):
        opt.step(_closure(model, opt, x, y))
    opt.second_step()
    with pytest.raises(ValueError, match="return the loss"):
        opt.step(lambda: None)


def test_failing_second_pass_restores_weights():
    x, y = _data()
    model = _mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1)
    w = [p.detach().clone() for p in model.parameters()]
    calls = [0]

    def closure():
        calls[0] += 1
        if calls[0] == 2:
            raise FloatingPointError("boom")
        return _closure(model, opt, x, y)()

    with pytest.raises(FloatingPointError):
        opt.step(closure)
    assert all(torch.equal(p, w0) for p, w0 in zip(model.parameters(), w))
    opt.step(closure)  # usable again


def test_fp16_grad_scaler_raises_clear_error():
    x, y = _data()
    model = _mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0)
    scaler.scale(((model(x) - y) ** 2).mean()).backward()
    with pytest.raises(RuntimeError, match="GradScaler"):
        scaler.step(opt)


def test_bf16_autocast_step_runs():
    x, y = _data()
    model = _mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    w = [p.detach().clone() for p in model.parameters()]

    def closure():
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)  # (N, 1) bf16
            assert out.dtype == torch.bfloat16
        loss = ((out.float() - y) ** 2).mean()
        loss.backward()
        return loss

    stats = opt.step_with_stats(closure)
    assert torch.isfinite(stats.loss) and torch.isfinite(stats.sharpness)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert not all(torch.equal(p, w0) for p, w0 in zip(model.parameters(), w))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bf16_autocast_and_rho_zero():
    x, y = (t.cuda() for t in _data())
    ref, model = _mlp().cuda(), _mlp().cuda()
    base = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.0, lr=0.1, momentum=0.9)
    for _ in range(3):
        _closure(ref, base, x, y)()
        base.step()
        opt.step(_closure(model, opt, x, y))
    assert _params_equal(ref, model)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)

    def closure():
        opt.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = ((model(x).float() - y) ** 2).mean()
        loss.backward()
        return loss

    stats = opt.step_with_stats(closure)
    assert torch.isfinite(stats.sharpness) and stats.grad_norm.device.type == "cuda"


def test_step_with_stats_reports_sharpness():
    x, y = _data()
    model = _mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.0)
    closure = _closure(model, opt, x, y)
    stats = opt.step_with_stats(closure)
    assert opt.last_stats is stats and stats.lam == 1.0
    assert float(stats.sharpness) == pytest.approx(float(stats.loss_perturbed - stats.loss))
    assert float(stats.sharpness) > 0  # a first-order ascent step of radius 0.5 raises the loss
    assert float(stats.loss) == pytest.approx(float(closure().detach()))  # lr = 0: loss at w unchanged


# ---------------------------------------------------------------- bad hyperparameters
@pytest.mark.parametrize("cls,kw,err,match", [
    (SAM, dict(rho=-0.1), ValueError, "rho"),
    (SAM, dict(rho=float("nan")), ValueError, "rho"),
    (ASAM, dict(eta=-1.0), ValueError, "eta"),
    (SAM, dict(adaptive="yes"), TypeError, "adaptive"),
    (SAMAR, dict(lam_min=0.8, lam_max=0.2, lam_init=0.5), ValueError, "out of order"),
    (SAMAR, dict(lam_init=0.9, lam_max=0.5), ValueError, "lam_init"),
    (SAMAR, dict(lam_min=-0.1), ValueError, "lam_min"),
    (SAMAR, dict(smoothing=1.0), ValueError, "smoothing"),
    (SAMAR, dict(interval=0), ValueError, "interval"),
    (SAMAR, dict(kappa=-1.0), ValueError, "kappa"),
])
def test_bad_hyperparameters_raise(cls, kw, err, match):
    with pytest.raises(err, match=match):
        cls(_mlp().parameters(), torch.optim.SGD, lr=0.1, **kw)


def test_bad_per_group_rho_raises():
    model = _mlp()
    groups = [{"params": model[0].parameters(), "rho": -0.5}, {"params": model[2].parameters()}]
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['rho'\]"):
        SAM(groups, torch.optim.SGD, lr=0.1)


def test_bad_base_optimizer_raises():
    params = list(_mlp().parameters())
    with pytest.raises(TypeError, match="create_optimizer"):
        SAM(params, "sgd", lr=0.1)
    with pytest.raises(TypeError, match="SAM-family"):
        SAM(params, SAM, lr=0.1)
    with pytest.raises(TypeError, match="already constructed"):
        SAM(params, torch.optim.SGD(params, lr=0.1), lr=0.2)
    with pytest.raises(ValueError, match="parameters of the constructed"):
        SAM(list(_mlp().parameters()), torch.optim.SGD(params, lr=0.1))


# ---------------------------------------------------------------- registry
def test_list_optimizers():
    assert list_optimizers() == ["adam", "adamw", "asam", "sam", "samar", "sgd"]


@pytest.mark.parametrize("name", list_optimizers())
def test_every_registered_optimizer_steps(name):
    x, y = _data()
    model = _mlp()
    opt = create_optimizer(name, model, lr=0.05)
    w = [p.detach().clone() for p in model.parameters()]
    opt.step(_closure(model, opt, x, y))
    assert not all(torch.equal(p, w0) for p, w0 in zip(model.parameters(), w))


def test_registry_wires_base_rho_and_model():
    model = _mlp(bn=True)
    opt = create_optimizer("SAM", model, base="adamw", rho=0.1, lr=3e-3)
    assert isinstance(opt, SAM) and isinstance(opt.base_optimizer, torch.optim.AdamW)
    assert opt.param_groups[0]["rho"] == 0.1 and opt.param_groups[0]["lr"] == 3e-3
    assert opt.model is model
    assert isinstance(create_optimizer("asam", model), ASAM)
    assert create_optimizer("asam", model).param_groups[0]["rho"] == 0.5
    assert create_optimizer("samar", model.parameters(), lam_init=0.3).lam == 0.3


def test_registry_errors():
    params = list(_mlp().parameters())
    with pytest.raises(KeyError) as e:
        create_optimizer("adamww", params)
    assert "adamw" in str(e.value) and "sgd" in str(e.value) and "Did you mean 'adamw'" in str(e.value)
    with pytest.raises(KeyError, match="base optimizer"):
        create_optimizer("sam", params, base="lion")
    with pytest.raises(ValueError, match="rho"):
        create_optimizer("sam", params, rho=-1.0)
    with pytest.raises(ValueError, match="out of order"):
        create_optimizer("samar", params, lam_min=0.9, lam_max=0.1, lam_init=0.5)
    with pytest.raises(TypeError, match="SAM family"):
        create_optimizer("sgd", params, rho=0.05)
    with pytest.raises(ValueError, match="empty"):
        create_optimizer("sgd", [])
