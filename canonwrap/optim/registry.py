"""Optimizer factory in timm's style: ``create_optimizer(name, params, **kw)`` / ``list_optimizers()``.

Names: ``sgd``, ``adam``, ``adamw`` (plain PyTorch optimizers) and ``sam``, ``asam``, ``samar``
(wrappers around a base named by ``base="sgd" | "adam" | "adamw"``, default ``"sgd"``).

Defaults (override any of them by keyword):

=========  ==========================================================
sgd        lr=0.01, momentum=0.9, weight_decay=0
adam       lr=1e-3, weight_decay=0
adamw      lr=1e-3, weight_decay=0.01
sam        base="sgd", rho=0.05
asam       base="sgd", rho=0.5, eta=0.01
samar      base="sgd", rho=0.05, lam_init=1, lam_min=0, lam_max=1, smoothing=0.9, interval=10, kappa=0.1
=========  ==========================================================

``params`` may be an ``nn.Module``: its trainable parameters are used and, for the SAM family, the
module is passed as ``model=`` so BatchNorm statistics are updated once per step.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, List, Union

import torch
from torch import nn
from torch.optim import Optimizer

from .._registry import Registry
from .sam import ASAM, SAM
from .samar import SAMAR

Params = Union[nn.Module, Iterable[Any]]

_BASES: Dict[str, tuple] = {
    "sgd": (torch.optim.SGD, dict(lr=0.01, momentum=0.9, weight_decay=0.0)),
    "adam": (torch.optim.Adam, dict(lr=1e-3, weight_decay=0.0)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-3, weight_decay=0.01)),
}
_SAM_ONLY = {"rho", "adaptive", "eta", "model", "base", "lam_init", "lam_min", "lam_max",
             "smoothing", "interval", "kappa"}

OPTIMIZERS: Registry[Callable[..., Optimizer]] = Registry("optimizer")


def _trainable(params: Params) -> List[Any]:
    if isinstance(params, nn.Module):
        return [p for p in params.parameters() if p.requires_grad]
    params = list(params)
    if not params:
        raise ValueError("create_optimizer got an empty parameter list")
    return params


def _make_base(name: str) -> Callable[..., Optimizer]:
    cls, defaults = _BASES[name]

    def factory(params: Params, **kw: Any) -> Optimizer:
        wrong = sorted(set(kw) & _SAM_ONLY)
        if wrong:
            raise TypeError(f"{wrong} are options of the SAM family (sam, asam, samar), not of {name!r}")
        return cls(_trainable(params), **{**defaults, **kw})

    factory.__name__ = f"create_{name}"
    return factory


for _name in _BASES:
    OPTIMIZERS.register(_name)(_make_base(_name))

_BASE_NAMES: Registry[str] = Registry("base optimizer")
for _name in _BASES:
    _BASE_NAMES.register(_name)(_name)


def _make_sam(cls: type) -> Callable[..., Optimizer]:
    def factory(params: Params, base: str = "sgd", **kw: Any) -> Optimizer:
        base_cls, base_defaults = _BASES[_BASE_NAMES.get(base)]
        if isinstance(params, nn.Module):
            kw.setdefault("model", params)
        return cls(_trainable(params), base_cls, **{**base_defaults, **kw})

    factory.__name__ = f"create_{cls.__name__.lower()}"
    return factory


OPTIMIZERS.register("sam")(_make_sam(SAM))
OPTIMIZERS.register("asam")(_make_sam(ASAM))
OPTIMIZERS.register("samar")(_make_sam(SAMAR))


def create_optimizer(name: str, params: Params, **kwargs: Any) -> Optimizer:
    """Build an optimizer by name.

    Args:
        name: one of :func:`list_optimizers` (case-insensitive).
        params: an ``nn.Module`` (its trainable parameters) or parameters / parameter groups.
        **kwargs: optimizer options (``lr``, ``momentum``, ``weight_decay``, ...); for the SAM family also
            ``base``, ``rho`` and the wrapper's options (see the module docstring).

    Raises:
        KeyError: unknown ``name`` or ``base`` (message lists the valid names and the nearest match).
        ValueError / TypeError: bad hyperparameters (negative rho, λ bounds out of order, SAM options
            given to a plain optimizer, ...).

    Example::

        opt = create_optimizer("sam", model.head, base="adamw", rho=0.05, lr=1e-3)
    """
    if not isinstance(name, str):
        raise TypeError(f"optimizer name must be a str, got {type(name).__name__} {name!r}")
    return OPTIMIZERS.get(name)(params, **kwargs)


def list_optimizers() -> List[str]:
    """Registered optimizer names, sorted."""
    return OPTIMIZERS.names()
