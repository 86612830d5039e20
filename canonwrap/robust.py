r"""Robust training losses as pure functions over callables: PGD-AT, TRADES, CAG and D2R.

Every function takes whatever callable you pass (``x -> logits``, or an output with ``.logits``):

* **Input-space threat model** (default, the honest one): pass the whole model (pixels in [0, 1]
  -> logits). Gradients flow through the frozen backbone to the pixels; ``clamp=(0, 1)``.
* **Feature-space threat model**: pass a head (features -> logits) and the frozen features as
  ``x`` with ``clamp=None`` (features are not bounded). Much cheaper, but a *different* threat
  model: an ε-ball around the features is not the image of an ε-ball of pixels. Label such
  results as feature-space.

Conventions: ``KL(p || q) = sum_k p_k (log p_k - log q_k)`` computed from logits with
``log_softmax``; :func:`kl_div` takes ``(p_logits, q_logits)`` in that order. Adversarial examples
are generated with the models in eval mode (each submodule's own mode restored afterwards, even on
exceptions) and with gradients w.r.t. the input only; the training losses are then evaluated in
whatever mode the caller left the models in (usually train).

Example::

    >>> loss, x_adv = pgd_at_loss(model, images, labels, eps=8/255, alpha=2/255, steps=10)
    >>> out = trades_loss(model, images, labels, beta=6.0); out.loss.backward()
    >>> x_adv = cag(guide, target, images)                       # D2R: generation, then
    >>> out = d2r_loss(guide, target, images, labels, x_adv)     # the loss; out.terms() for logging
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .attacks.base import (
    Clamp,
    ascent_step,
    check_alpha,
    check_clamp,
    check_eps,
    check_inputs,
    check_model,
    check_norm,
    check_steps,
    clamp_to,
    eval_mode,
    get_logits,
    input_grad,
)
from .attacks.pgd import PGD

Model = Callable[[Tensor], Any]
KL_REDUCTIONS = ("batchmean", "mean", "sum", "none")
D2R_MODES = ("one_pass", "two_stage")
D2R_STAGES = ("adv", "clean")


def kl_div(p_logits: Tensor, q_logits: Tensor, reduction: str = "batchmean") -> Tensor:
    r"""``KL(p || q) = sum_k p_k (log p_k - log q_k)`` with ``p = softmax(p_logits)``, ``q = softmax(q_logits)``.

    Arguments:
        p_logits, q_logits: (B, K) logits.
        reduction: ``"batchmean"`` (sum over classes, mean over the batch; the KL per sample
            averaged), ``"mean"`` (mean over batch *and* classes = batchmean / K, what
            ``torch.mean`` over the elementwise KL gives, as in the released D2R code), ``"sum"``,
            or ``"none"`` (per-sample KL, shape (B,)).

    Example::
        >>> kl_div(logits_clean, logits_adv)  # KL(p(x) || p(x')), the TRADES regulariser
    """
    if reduction not in KL_REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; expected one of {list(KL_REDUCTIONS)}")
    if p_logits.shape != q_logits.shape or p_logits.dim() != 2:
        shapes = f"{tuple(p_logits.shape)} and {tuple(q_logits.shape)}"
        raise ValueError(f"kl_div needs two (B, K) logits of the same shape; got {shapes}")
    log_p = F.log_softmax(p_logits, dim=1)  # (B, K)
    log_q = F.log_softmax(q_logits, dim=1)  # (B, K)
    kl = log_p.exp() * (log_p - log_q)  # (B, K)
    if reduction == "batchmean":
        return kl.sum(dim=1).mean()
    if reduction == "mean":
        return kl.mean()
    if reduction == "sum":
        return kl.sum()
    return kl.sum(dim=1)


def _logits(model: Model, x: Tensor) -> Tensor:
    return get_logits(model(x))


def _kl_ascent(
    ref_logits: Tensor, model: Model, x: Tensor, eps: float, alpha: float, steps: int, norm: str, clamp: Clamp
) -> Tensor:
    """``x' = x + 0.001 N(0, I)``, then ``steps`` projected ascent steps on ``KL(softmax(ref) || p_model(x'))``.

    The start is clamped to the valid range (the reference TRADES/D2R code does not; models that
    validate their pixels would reject values slightly outside [0, 1]).
    """
    ref_logits = ref_logits.detach()  # (B, K)
    x_adv = clamp_to(x + 0.001 * torch.randn_like(x), clamp)  # (B, ...)
    for _ in range(steps):
        grad = input_grad(lambda z: kl_div(ref_logits, _logits(model, z), "sum"), x_adv)
        x_adv = ascent_step(x_adv, x, grad, alpha, eps, norm, clamp)
    return x_adv


# ----------------------------------------------------------------------------------------------
# PGD-AT
# ----------------------------------------------------------------------------------------------
def pgd_at_loss(
    model: Model,
    x: Tensor,
    y: Tensor,
    eps: float = 8 / 255,
    alpha: float = 2 / 255,
    steps: int = 10,
    norm: str = "linf",
    random_start: bool = True,
    clamp: Clamp = (0.0, 1.0),
) -> Tuple[Tensor, Tensor]:
    r"""PGD adversarial training (Madry et al., 2018, https://arxiv.org/abs/1706.06083).

    ``loss = CE(f(x'), y)`` with ``x' = PGD(f, eps, alpha, steps, random start)(x, y)`` generated
    in eval mode; the loss itself is evaluated in the caller's mode.

    Arguments:
        model: x -> logits. x (B, C, H, W) in [0, 1] (or features with ``clamp=None``), y (B,) long.
        eps, alpha, steps, norm, random_start, clamp: as in :class:`canonwrap.attacks.PGD`
            (defaults: 8/255, 2/255, 10 steps, Linf, random start).

    Returns:
        ``(loss, x_adv)``: scalar loss with gradients to the model's trainable parameters, and the
        detached adversarial inputs (like x).

    Example::
        >>> loss, x_adv = pgd_at_loss(model, images, labels); loss.backward(); opt.step()
    """
    attack = PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=random_start, norm=norm, clamp=clamp)
    x_adv = attack(x, y)  # (B, ...) detached
    return F.cross_entropy(_logits(model, x_adv), y), x_adv


# ----------------------------------------------------------------------------------------------
# TRADES
# ----------------------------------------------------------------------------------------------
@dataclass
class TradesLoss:
    """Output of :func:`trades_loss`: ``loss = natural + beta * robust`` (floats are for logging)."""

    loss: Tensor
    natural: float  # CE(f(x), y)
    robust: float  # KL(p_f(x) || p_f(x')), batch mean
    x_adv: Tensor

    def terms(self) -> Dict[str, float]:
        return {"natural": self.natural, "robust": self.robust}


def trades_loss(
    model: Model,
    x: Tensor,
    y: Tensor,
    eps: float = 0.031,
    alpha: float = 0.007,
    steps: int = 10,
    beta: float = 6.0,
    norm: str = "linf",
    clamp: Clamp = (0.0, 1.0),
) -> TradesLoss:
    r"""TRADES (Zhang et al., 2019, https://arxiv.org/abs/1901.08573).

    ``loss = CE(f(x), y) + beta * KL(p_f(x) || p_f(x'))`` (KL batch mean), where ``x'`` maximises
    ``KL(p_f(x) || p_f(x'))`` in the eps-ball: ``x' = clamp(x + 0.001 N(0, I))``, then ``steps`` projected
    ascent steps (sign steps for Linf, normalised for L2), model in eval mode during generation
    (modes restored afterwards). Nothing is detached in the outer loss, as in the reference code.

    Arguments:
        model: x -> logits. x (B, C, H, W) in [0, 1] (or features with ``clamp=None``), y (B,) long.
        eps (float): ball radius, >= 0. (Default: 0.031)
        alpha (float): step size, > 0. (Default: 0.007)
        steps (int): inner steps, >= 1. (Default: 10)
        beta (float): weight of the robust KL, >= 0. (Default: 6.0)
        norm (str): ``"linf"`` or ``"l2"``. clamp: valid input range or None.

    Returns:
        :class:`TradesLoss` with the differentiable total ``loss``, the terms as floats and ``x_adv``.

    Example::
        >>> out = trades_loss(model, images, labels, eps=0.1, alpha=0.02, steps=10, beta=6.0)
        >>> out.loss.backward()
    """
    check_model(model)
    eps, alpha, steps = check_eps(eps), check_alpha(alpha), check_steps(steps)
    norm, clamp = check_norm(norm), check_clamp(clamp)
    beta = _check_weight("beta", beta)
    check_inputs(x, y, clamp)
    x = x.detach()
    with eval_mode(model):
        with torch.no_grad():
            ref = _logits(model, x)  # (B, K) p_f(x) in eval mode, the inner-max anchor
        x_adv = _kl_ascent(ref, model, x, eps, alpha, steps, norm, clamp)  # (B, ...)
    logits_nat = _logits(model, x)  # (B, K)
    logits_adv = _logits(model, x_adv)  # (B, K)
    natural = F.cross_entropy(logits_nat, y)
    robust = kl_div(logits_nat, logits_adv, "batchmean")
    loss = natural + beta * robust
    nat_f, rob_f = torch.stack([natural.detach(), robust.detach()]).tolist()
    return TradesLoss(loss=loss, natural=nat_f, robust=rob_f, x_adv=x_adv)


# ----------------------------------------------------------------------------------------------
# D2R + CAG
# ----------------------------------------------------------------------------------------------
def cag(
    guide: Model,
    target: Model,
    x: Tensor,
    eps: float = 0.031,
    alpha: float = 0.007,
    steps: int = 10,
    norm: str = "linf",
    clamp: Clamp = (0.0, 1.0),
) -> Tensor:
    r"""Collaborative adversarial generation (CAG) of D2R (Liu et al., 2025,
    https://arxiv.org/abs/2506.07056; released code https://github.com/lusti-Yu/D2R).

    ``x' = clamp(x + 0.001 N(0, I))``, then ``steps`` times
    ``x' <- clamp(x + Proj_eps(x' + alpha * sign grad_x' KL(p_g(x) || p_f(x')) - x))``
    with the guide ``g`` (clean) and target ``f`` (robust) both in eval mode (modes restored
    afterwards); ``p_g(x)`` is computed once and held fixed. ``norm="l2"`` uses normalised steps
    (the released L2 branch uses the target instead of the guide for the anchor; we keep the guide).

    Arguments:
        guide, target: x -> logits (e.g. two heads on the same frozen features, or whole models).
        x: (B, C, H, W) in [0, 1] (or features with ``clamp=None``).
        eps (float): >= 0. (Default: 0.031)  alpha (float): > 0. (Default: 0.007)
        steps (int): >= 1. (Default: 10)  norm: ``"linf"`` | ``"l2"``.  clamp: range or None.

    Returns:
        x_adv, detached, like x.

    Example::
        >>> x_adv = cag(guide, target, images, eps=0.031, alpha=0.007, steps=10)
    """
    check_model(guide)
    check_model(target)
    eps, alpha, steps = check_eps(eps), check_alpha(alpha), check_steps(steps)
    norm, clamp = check_norm(norm), check_clamp(clamp)
    check_inputs(x, None, clamp)
    x = x.detach()
    with eval_mode(guide, target):
        with torch.no_grad():
            ref = _logits(guide, x)  # (B, K) p_g(x)
        return _kl_ascent(ref, target, x, eps, alpha, steps, norm, clamp).detach()


@dataclass
class D2RLoss:
    """Output of :func:`d2r_loss`. Terms are floats for logging; ``None`` when not in this stage.

    ``loss = ce + mse + alpha * kl_sym + beta * kl_adv`` (one pass), or the stage's part of it.
    """

    loss: Tensor
    ce: Optional[float]  # CE(g(x), y)                                          stage "clean"
    mse: Optional[float]  # MSE(f(x'), g(x)) on logits                          stage "adv"
    kl_sym: Optional[float]  # |KL(p_f(x)||p_g(x)) - KL(p_g(x)||p_f(x))|         stage "clean"
    kl_adv: Optional[float]  # KL(p_f(x')||p_g(x))                               stage "adv"
    mode: str
    stage: Optional[str]

    def terms(self) -> Dict[str, float]:
        """The computed terms (unweighted) and the total, as floats."""
        out = {k: getattr(self, k) for k in ("ce", "mse", "kl_sym", "kl_adv") if getattr(self, k) is not None}
        out["loss"] = float(self.loss.detach())
        return out


def d2r_loss(
    guide: Model,
    target: Model,
    x: Tensor,
    y: Tensor,
    x_adv: Tensor,
    alpha: float = 20.0,
    beta: float = 30.0,
    mode: str = "one_pass",
    stage: Optional[str] = None,
    kl_reduction: str = "mean",
    detach_guide: bool = False,
) -> D2RLoss:
    r"""Dual regularization loss D2R (Liu et al., 2025, https://arxiv.org/abs/2506.07056), as released.

    With guide ``g`` (clean) and target ``f`` (robust), ``x'`` from :func:`cag`::

        L = CE(g(x), y)                                           # guide learns the clean task
          + MSE(f(x'), g(x))                                      # logits, mean over B*K
          + alpha * |KL(p_f(x) || p_g(x)) - KL(p_g(x) || p_f(x))| # clean distributions
          + beta  * KL(p_f(x') || p_g(x))                         # adversarial distribution

    What we checked in the released code (``D2R/D2R.py``, ``train_D2R_cifar100.py``):

    * CE and MSE take **logits**; the three KLs take probabilities (softmax / log-softmax of logits).
    * **Nothing is detached**: every term sends gradients to both ``f`` and ``g``, and one SGD
      optimizer holds the parameters of both models (the guide is trained jointly, from scratch).
      Default here: the same (``detach_guide=False``). ``detach_guide=True`` uses ``g(x).detach()``
      in the MSE and KL terms, so ``g`` learns only from its CE (a fixed-teacher variant). A
      frozen guide (e.g. the pretrained classifier, ``requires_grad=False``) gets no gradient
      either way.
    * The KLs are reduced with ``torch.mean`` over the (B, K) elementwise KL, i.e. the per-sample
      KL divided by K (``kl_reduction="mean"``, default, so alpha=20 and beta=30 keep the scale
      they were tuned at). ``"batchmean"`` gives the textbook batch-mean KL, which makes the two
      KL terms K times stronger. The released KL adds 1e-5 inside ``log p``; we use exact
      ``log_softmax`` (differences ~1e-5).
    * The loss is evaluated with both models in train mode (the caller's mode here).

    Two-stage schedule (``mode="two_stage"``): the paper optimises towards the adversarial
    distribution, then towards the clean one; the released code sums both in one backward pass
    (``mode="one_pass"``). Our split of the released terms (the paper gives no code for it)::

        stage="adv":   MSE(f(x'), g(x)) + beta * KL(p_f(x') || p_g(x))
        stage="clean": CE(g(x), y) + alpha * |KL(p_f(x) || p_g(x)) - KL(p_g(x) || p_f(x))|

    so that ``adv + clean == one_pass`` for the same parameters. Per batch: ``x' = cag(...)``;
    ``d2r_loss(..., stage="adv").loss.backward(); opt.step(); opt.zero_grad()``; then
    ``d2r_loss(..., stage="clean")`` (recomputed with the updated parameters, same ``x'``),
    backward, step.

    Arguments:
        guide, target: x -> logits. x, x_adv: (B, ...) same shape; y: (B,) long.
        alpha (float): weight of the symmetric-KL gap, >= 0. (Default: 20.0)
        beta (float): weight of the adversarial KL, >= 0. (Default: 30.0)
        mode (str): ``"one_pass"`` (released) or ``"two_stage"``.
        stage (str or None): ``None`` for one pass; ``"adv"`` or ``"clean"`` for two stages.
        kl_reduction (str): ``"mean"`` (released) or ``"batchmean"``.
        detach_guide (bool): see above. (Default: False, as released)

    Returns:
        :class:`D2RLoss` with the differentiable ``loss`` and each unweighted term as a float.

    Example::
        >>> x_adv = cag(guide, target, images)
        >>> out = d2r_loss(guide, target, images, labels, x_adv)
        >>> out.loss.backward(); log(out.terms())
    """
    check_model(guide)
    check_model(target)
    mode = str(mode).lower()
    if mode not in D2R_MODES:
        raise ValueError(f"unknown D2R mode {mode!r}; expected one of {list(D2R_MODES)}")
    if mode == "one_pass" and stage is not None:
        raise ValueError(f"stage must be None with mode='one_pass'; got stage={stage!r} (use mode='two_stage')")
    if mode == "two_stage" and stage not in D2R_STAGES:
        raise ValueError(f"mode='two_stage' needs stage in {list(D2R_STAGES)}; got {stage!r}")
    if kl_reduction not in ("mean", "batchmean"):
        raise ValueError(f"unknown kl_reduction {kl_reduction!r}; expected one of ['batchmean', 'mean']")
    alpha, beta = _check_weight("alpha", alpha), _check_weight("beta", beta)
    check_inputs(x, y, None)
    if not isinstance(x_adv, Tensor) or x_adv.shape != x.shape:
        got = tuple(x_adv.shape) if isinstance(x_adv, Tensor) else type(x_adv).__name__
        raise ValueError(f"x_adv must have the shape of x {tuple(x.shape)}; got {got}")

    g_x = _logits(guide, x)  # (B, K)
    g_ref = g_x.detach() if detach_guide else g_x  # (B, K) anchor of the regularisers
    ce = mse = kl_sym = kl_adv = None
    loss = g_x.new_zeros(())
    if stage in (None, "clean"):
        f_x = _logits(target, x)  # (B, K)
        ce = F.cross_entropy(g_x, y)
        kl_sym = (kl_div(f_x, g_ref, kl_reduction) - kl_div(g_ref, f_x, kl_reduction)).abs()
        loss = loss + ce + alpha * kl_sym
    if stage in (None, "adv"):
        f_adv = _logits(target, x_adv.detach())  # (B, K)
        mse = F.mse_loss(f_adv, g_ref)
        kl_adv = kl_div(f_adv, g_ref, kl_reduction)
        loss = loss + mse + beta * kl_adv
    names = ("ce", "mse", "kl_sym", "kl_adv")
    present = [(n, t) for n, t in zip(names, (ce, mse, kl_sym, kl_adv)) if t is not None]
    values = dict(zip([n for n, _ in present], torch.stack([t.detach() for _, t in present]).tolist()))
    return D2RLoss(
        loss=loss,
        ce=values.get("ce"),
        mse=values.get("mse"),
        kl_sym=values.get("kl_sym"),
        kl_adv=values.get("kl_adv"),
        mode=mode,
        stage=stage,
    )


def _check_weight(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value) >= 0:
        raise ValueError(f"{name} must be a number >= 0; got {value!r}")
    return float(value)
