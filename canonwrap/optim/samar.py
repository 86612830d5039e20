"""SAMAR: SAM whose sharpness weight λ adapts to the measured sharpness (Zou et al., 2024).

Only the paper's abstract is public ("sharpness ratio" rule); the rule below is ours and documented
exactly. Write SAM as ``f(w) + λ·S(w)`` with sharpness ``S(w) = f(w + ε) − f(w)``; its gradient is

    (1 − λ)·∇f(w) + λ·∇f(w + ε)          (λ = 1: SAM,  λ = 0: the base optimizer).
"""
from __future__ import annotations

import math
from typing import Any, Dict, Iterable, Optional

import torch
from torch import nn

from .sam import SAM, Closure, OptimizerLike, SAMStepStats, _check_nonneg

_TINY = 1e-12


class SAMAR(SAM):
    r"""SAM with an adaptive sharpness weight λ (sharpness-ratio rule).

    Update direction: ``(1 − λ)·∇f(w) + λ·∇f(w + ε)``, ε = ρ·g/‖g‖ (or ASAM's with ``adaptive=True``),
    fed to the base optimizer. Both passes always run (λ = 0 still needs f(w + ε) to measure S).

    The λ rule (``update_lam``), exactly:

    1. every step measure ``S_t = f(w + ε) − f(w)`` (the closure's two losses);
    2. smooth it: ``m_t = β·m_{t−1} + (1 − β)·S_t`` with ``β = smoothing``, ``m_1 = S_1``;
    3. every ``interval`` steps (t = interval, 2·interval, ...) compare with the value stored at the
       previous check, ``m_ref`` (the first check only stores ``m_ref = m_t``):
       ``a = max(m_t, 1e-12)``, ``b = max(m_ref, 1e-12)``, ratio ``r = a / b`` and
       ``λ ← clip(λ + κ·(r − 1)/(r + 1), lam_min, lam_max)``, then ``m_ref = m_t``.

    ``(r − 1)/(r + 1) = (a − b)/(a + b) = tanh(½·log r)`` lies in (−1, 1): λ rises when the smoothed
    sharpness grows (r > 1), falls when it shrinks (r < 1), moves by at most κ per check, treats
    r and 1/r symmetrically, and (being additive) can leave ``lam_min = 0`` again. Non-positive
    sharpness (f(w + ε) ≤ f(w)) is clamped to 1e-12 so the ratio stays defined.

    Args:
        params, base_optimizer, rho, adaptive, eta, model, **base_kwargs: as :class:`SAM`.
        lam_init: starting λ, within [lam_min, lam_max].
        lam_min, lam_max: bounds of λ, 0 <= lam_min <= lam_max.
        smoothing: β in [0, 1) of the sharpness EMA (0 = no smoothing).
        interval: steps between λ updates (>= 1).
        kappa: κ >= 0, the largest change of λ per update (0 freezes λ).

    Logging: ``lam`` (current λ), ``sharpness_ema`` (m_t, None before the first step) and the
    :class:`SAMStepStats` of ``step_with_stats`` / ``last_stats`` (loss, f(w + ε), sharpness, the λ
    used for that update).

    Example::

        opt = SAMAR(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9,
                    lam_init=1.0, lam_min=0.0, lam_max=1.0, smoothing=0.9, interval=10, kappa=0.1)
        stats = opt.step_with_stats(closure)   # closure: zero_grad, forward, backward, return loss
        print(stats.sharpness, opt.lam)
    """

    def __init__(
        self,
        params: Optional[Iterable[Any]],
        base_optimizer: OptimizerLike,
        rho: float = 0.05,
        lam_init: float = 1.0,
        lam_min: float = 0.0,
        lam_max: float = 1.0,
        smoothing: float = 0.9,
        interval: int = 10,
        kappa: float = 0.1,
        adaptive: bool = False,
        eta: float = 0.01,
        model: Optional[nn.Module] = None,
        **base_kwargs: Any,
    ) -> None:
        lam_init, lam_min, lam_max = (_check_nonneg(n, v) for n, v in
                                      (("lam_init", lam_init), ("lam_min", lam_min), ("lam_max", lam_max)))
        if lam_min > lam_max:
            raise ValueError(f"lam bounds out of order: need lam_min <= lam_max, got lam_min={lam_min}, lam_max={lam_max}")
        if not lam_min <= lam_init <= lam_max:
            raise ValueError(f"lam_init must lie in [lam_min, lam_max] = [{lam_min}, {lam_max}], got {lam_init}")
        smoothing = _check_nonneg("smoothing", smoothing)
        if smoothing >= 1:
            raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"interval must be an int >= 1, got {interval!r}")
        kappa = _check_nonneg("kappa", kappa)
        super().__init__(params, base_optimizer, rho=rho, adaptive=adaptive, eta=eta, model=model, **base_kwargs)
        self.lam = lam_init
        self.lam_min, self.lam_max = lam_min, lam_max
        self.smoothing, self.interval, self.kappa = smoothing, interval, kappa
        self.sharpness_ema: Optional[float] = None  # m_t
        self._ema_ref: Optional[float] = None  # m at the previous λ check
        self._num_measured = 0

    # ------------------------------------------------------------------ λ rule
    def update_lam(self, sharpness: float) -> float:
        """Feed one measured S = f(w + ε) − f(w); apply the rule of the class docstring; return λ."""
        s = float(sharpness)
        if not math.isfinite(s):
            return self.lam  # a non-finite loss carries no information about the trend
        beta = self.smoothing
        self.sharpness_ema = s if self.sharpness_ema is None else beta * self.sharpness_ema + (1 - beta) * s
        self._num_measured += 1
        if self._num_measured % self.interval == 0:
            if self._ema_ref is not None:
                a, b = max(self.sharpness_ema, _TINY), max(self._ema_ref, _TINY)
                self.lam = min(max(self.lam + self.kappa * (a - b) / (a + b), self.lam_min), self.lam_max)
            self._ema_ref = self.sharpness_ema
        return self.lam

    # ------------------------------------------------------------------ two passes with mixing
    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> torch.Tensor:
        """As SAM's, and keeps ∇f(w) when λ < 1 (needed for the mix in ``second_step``)."""
        if self.lam < 1 and not self._perturbed:
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        self.state[p]["grad_w"] = p.grad.detach().clone()  # ∇f(w), shape of p
        return super().first_step(zero_grad=zero_grad)

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Mix ``.grad ← (1 − λ)·∇f(w) + λ·.grad`` (current λ), restore w, then the base step."""
        if self._perturbed:
            lam = self.lam
            for group in self.param_groups:
                for p in group["params"]:
                    g_w = self.state[p].pop("grad_w", None)
                    if g_w is None:
                        continue
                    if p.grad is None:
                        p.grad = g_w.mul_(1 - lam)
                    else:
                        p.grad.mul_(lam).add_(g_w, alpha=1 - lam)
        super().second_step(zero_grad=zero_grad)

    def _two_pass(self, closure: Closure) -> SAMStepStats:
        lam = self.lam
        stats = super()._two_pass(closure)
        stats.lam = lam
        if stats.grad_norm is not None:  # rho > 0: a real sharpness measurement
            self.update_lam(stats.sharpness)
        return stats

    # ------------------------------------------------------------------ state
    _HYPER = ("lam_min", "lam_max", "smoothing", "interval", "kappa")

    def _extra_state(self) -> Dict[str, Any]:
        """λ, the sharpness EMA state and the λ-rule hyperparameters (saved under ``state_dict()["sam"]``)."""
        return dict(lam=self.lam, sharpness_ema=self.sharpness_ema, ema_ref=self._ema_ref,
                    num_measured=self._num_measured, **{k: getattr(self, k) for k in self._HYPER})

    def _load_extra_state(self, extra: Dict[str, Any]) -> None:
        if not extra:
            return
        for k in self._HYPER:  # like rho in param_groups, the checkpoint's values win
            setattr(self, k, extra[k])
        self.lam = float(extra["lam"])
        self.sharpness_ema = extra["sharpness_ema"]
        self._ema_ref = extra["ema_ref"]
        self._num_measured = int(extra["num_measured"])
