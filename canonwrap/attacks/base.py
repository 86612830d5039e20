"""Shared machinery for attacks: the ``Attack`` base class, argument checks, eval-mode handling,
logits extraction and the projected signed/normalised gradient step used by PGD, TRADES and CAG.

Conventions (the whole package): a model takes float pixels in ``[0, 1]`` of shape (B, C, H, W)
and returns logits (B, K); normalisation lives inside the model. Any callable works; if its output
has a ``.logits`` attribute that is used. For the feature-space threat model pass a head
(features -> logits) and ``clamp=None`` (features are not bounded to ``[0, 1]``).
"""
from __future__ import annotations

import abc

import contextlib
import math
from typing import Any, Callable, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._registry import Registry

ATTACKS: Registry[Callable[..., "Attack"]] = Registry("attack")

NORMS = ("linf", "l2")
Clamp = Optional[Tuple[float, float]]


# ----------------------------------------------------------------------------------------------
# argument checks
# ----------------------------------------------------------------------------------------------
def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number; got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite; got {value}")
    return value


def check_eps(eps: Any) -> float:
    """``eps >= 0`` (radius of the perturbation ball)."""
    eps = _number("eps", eps)
    if eps < 0:
        raise ValueError(f"eps must be >= 0 (radius of the perturbation ball); got {eps}")
    return eps


def check_alpha(alpha: Any) -> float:
    """``alpha > 0`` (step size)."""
    alpha = _number("alpha", alpha)
    if alpha <= 0:
        raise ValueError(f"alpha (step size) must be > 0; got {alpha}")
    return alpha


def check_steps(steps: Any) -> int:
    """``steps >= 1`` (integer number of iterations)."""
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise TypeError(f"steps must be an int >= 1; got {type(steps).__name__} {steps!r}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1; got {steps}")
    return steps


def check_norm(norm: Any) -> str:
    """Normalised norm name; unknown names list the valid ones."""
    key = str(norm).lower()
    if key not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; expected one of {list(NORMS)}")
    return key


def check_clamp(clamp: Any) -> Clamp:
    """``None`` or a ``(low, high)`` pair with ``low < high``."""
    if clamp is None:
        return None
    try:
        lo, hi = (float(v) for v in clamp)
    except (TypeError, ValueError):
        raise TypeError(f"clamp must be None or a (low, high) pair of numbers; got {clamp!r}") from None
    if not lo < hi:
        raise ValueError(f"clamp must satisfy low < high; got {clamp!r}")
    return (lo, hi)


def check_model(model: Any) -> None:
    if not callable(model):
        raise TypeError(f"model must be a callable x -> logits (e.g. an nn.Module); got {type(model).__name__}")


def check_inputs(x: Any, y: Any, clamp: Clamp, min_dim: int = 2) -> None:
    """x: floating (B, ...) tensor inside ``clamp``; y: long (B,) labels (or None: not checked)."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor; got {type(x).__name__} {getattr(x, 'dtype', '')}")
    if x.dim() < min_dim:
        raise ValueError(f"x must have shape (B, ...) with at least {min_dim} dims; got {tuple(x.shape)}")
    if y is not None and (
        not isinstance(y, Tensor) or y.dtype != torch.long or y.dim() != 1 or y.shape[0] != x.shape[0]
    ):
        got = f"{type(y).__name__} {tuple(y.shape)} {y.dtype}" if isinstance(y, Tensor) else type(y).__name__
        raise ValueError(f"y must be a long tensor of shape ({x.shape[0]},) (labels); got {got}")
    if clamp is not None and x.numel() > 0:
        lo, hi = float(x.min()), float(x.max())
        if lo < clamp[0] - 1e-5 or hi > clamp[1] + 1e-5:
            raise ValueError(
                f"x must lie in [{clamp[0]:g}, {clamp[1]:g}] (pixels; normalisation belongs inside the "
                f"model); got values in [{lo:.4g}, {hi:.4g}]. Pass clamp=None for features."
            )


# ----------------------------------------------------------------------------------------------
# model helpers
# ----------------------------------------------------------------------------------------------
def get_logits(output: Any) -> Tensor:
    """Logits (B, K) from a model output: a tensor or an object with a ``.logits`` attribute."""
    logits = getattr(output, "logits", output)
    if not isinstance(logits, Tensor) or logits.dim() != 2:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise TypeError(f"model must return logits of shape (B, K) (or an object with .logits); got {shape}")
    return logits


def _modules_of(model: Any) -> List[nn.Module]:
    """The nn.Modules behind a callable: the module itself, or the owner of a bound method."""
    if isinstance(model, nn.Module):
        return [model]
    owner = getattr(model, "__self__", None)  # e.g. ``net.forward_head``
    return [owner] if isinstance(owner, nn.Module) else []


@contextlib.contextmanager
def eval_mode(*models: Any) -> Iterator[None]:
    """Put every module behind ``models`` in eval mode; restore each submodule's own flag on exit.

    Restores even when the body raises. Plain functions (not modules, not bound methods of
    modules) are left alone: wrap them in an ``nn.Module`` to get mode handling.
    """
    saved = [(m, m.training) for model in models for root in _modules_of(model) for m in root.modules()]
    try:
        for model in models:
            for root in _modules_of(model):
                root.eval()
        yield
    finally:
        for m, flag in saved:
            m.training = flag


# ----------------------------------------------------------------------------------------------
# projected steps (shared by PGD, TRADES and CAG)
# ----------------------------------------------------------------------------------------------
def _flat_norm(t: Tensor) -> Tensor:
    """Per-sample L2 norm, (B, ...) -> (B, 1, ..., 1) for broadcasting."""
    return t.flatten(1).norm(p=2, dim=1).view(-1, *([1] * (t.dim() - 1)))


def project(delta: Tensor, eps: float, norm: str) -> Tensor:
    """Project perturbations (B, ...) onto the ``norm`` ball of radius ``eps``."""
    if norm == "linf":
        return delta.clamp(-eps, eps)
    scale = (eps / _flat_norm(delta).clamp_min(1e-12)).clamp(max=1.0)  # (B, 1, ...)
    return delta * scale


def clamp_to(x: Tensor, clamp: Clamp) -> Tensor:
    return x if clamp is None else x.clamp(clamp[0], clamp[1])


def random_start(x: Tensor, eps: float, norm: str, clamp: Clamp) -> Tensor:
    """Uniform point of the Linf ball, or a random direction with uniform radius in the L2 ball."""
    if norm == "linf":
        delta = torch.empty_like(x).uniform_(-eps, eps)
    else:
        direction = torch.randn_like(x)
        radius = torch.rand(x.shape[0], *([1] * (x.dim() - 1)), device=x.device, dtype=x.dtype)
        delta = direction / _flat_norm(direction).clamp_min(1e-12) * radius * eps
    return clamp_to(x + delta, clamp)


def ascent_step(x_adv: Tensor, x: Tensor, grad: Tensor, alpha: float, eps: float, norm: str, clamp: Clamp) -> Tensor:
    """One step uphill then projection: Linf uses ``alpha * sign(grad)``, L2 ``alpha * grad / ||grad||``.

    The result stays in the ``eps``-ball around ``x`` and inside ``clamp`` (clamping a point of the
    ball whose centre is inside the box moves it towards the centre, so it stays in the ball).
    """
    if norm == "linf":
        x_adv = x_adv + alpha * grad.sign()
    else:
        x_adv = x_adv + alpha * grad / _flat_norm(grad).clamp_min(1e-12)
    return clamp_to(x + project(x_adv - x, eps, norm), clamp).detach()


def input_grad(loss_fn: Callable[[Tensor], Tensor], x_adv: Tensor) -> Tensor:
    """Gradient of a scalar ``loss_fn(x_adv)`` w.r.t. the input only (parameters' .grad untouched)."""
    x_adv = x_adv.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = loss_fn(x_adv)
        (grad,) = torch.autograd.grad(loss, [x_adv])
    return grad.detach()


# ----------------------------------------------------------------------------------------------
# base class
# ----------------------------------------------------------------------------------------------
class Attack(abc.ABC):
    r"""Base class of attacks: ``attack(x, y) -> x_adv``.

    Subclasses implement :meth:`perturb`; ``__call__`` validates the inputs and runs ``perturb``
    with the model in eval mode (each submodule's own train/eval flag restored afterwards, even on
    exceptions). Gradients are taken w.r.t. the input only, so model parameters never accumulate
    ``.grad``.

    Arguments:
        model (callable): x -> logits (B, K), or an output with ``.logits``.
        eps (float or None): radius of the threat model; ``None`` for unbounded attacks (group).
        clamp (tuple or None): valid input range, ``(0, 1)`` for pixels; ``None`` for features.
    """

    def __init__(self, model: Callable[[Tensor], Any], eps: Optional[float] = None, clamp: Clamp = (0.0, 1.0)) -> None:
        check_model(model)
        self.model = model
        self.eps = None if eps is None else check_eps(eps)
        self.clamp = check_clamp(clamp)

    def logits(self, x: Tensor) -> Tensor:
        return get_logits(self.model(x))

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        """x (B, C, H, W) in ``clamp``, y (B,) long -> x_adv with the same shape, detached."""
        check_inputs(x, y, self.clamp)
        with eval_mode(self.model):
            return self.perturb(x.detach(), y.detach()).detach()

    @abc.abstractmethod
    def perturb(self, x: Tensor, y: Tensor) -> Tensor:
        """The attack itself: x (B, ...) detached, y (B,) -> x_adv (B, ...)."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if k != "model")
        return f"{type(self).__name__}({args})"


def cross_entropy_sum(logits: Tensor, y: Tensor) -> Tensor:
    """Summed CE, so per-sample input gradients do not shrink with the batch size."""
    return F.cross_entropy(logits, y, reduction="sum")
