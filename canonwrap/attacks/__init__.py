"""Adversarial attacks on models that take pixels in [0, 1] and return logits (torchattacks style).

One readable class per attack over a small base (:class:`Attack`); ``attack(x, y) -> x_adv``.
The model is put in eval mode during the attack and each submodule's own mode is restored
afterwards (even on exceptions); gradients are taken w.r.t. the input only.

Registered names: ``fgsm``, ``pgd`` (Linf by default, ``norm="l2"`` available), ``pgd_l2`` and
``group`` (worst group element / worst rotation angle).

Example::

    >>> from canonwrap.attacks import create_attack
    >>> attack = create_attack("pgd", model, eps=0.1, alpha=0.01, steps=20)
    >>> x_adv = attack(images, labels)
"""
from __future__ import annotations

import inspect
from typing import Any, List

from .base import ATTACKS, NORMS, Attack, eval_mode, get_logits
from .fgsm import FGSM
from .group import GroupAttack, GroupAttackResult, true_class_margin
from .pgd import PGD, PGDL2


def list_attacks() -> List[str]:
    """Registered attack names."""
    return ATTACKS.names()


def create_attack(name: str, model: Any, **kwargs: Any) -> Attack:
    """Build a registered attack by name: ``create_attack("pgd", model, eps=8/255, steps=20)``.

    Unknown names raise ``KeyError`` with the valid names and the nearest match; unknown keyword
    arguments raise ``TypeError`` listing the ones the attack accepts.
    """
    cls = ATTACKS.get(name)
    try:
        inspect.signature(cls).bind(model, **kwargs)
    except TypeError:
        accepted = [p for p in inspect.signature(cls).parameters if p != "model"]
        unknown = sorted(set(kwargs) - set(accepted))
        raise TypeError(f"attack {name!r} got unexpected argument(s) {unknown}; it accepts {accepted}") from None
    return cls(model, **kwargs)


__all__ = [
    "ATTACKS",
    "NORMS",
    "Attack",
    "FGSM",
    "PGD",
    "PGDL2",
    "GroupAttack",
    "GroupAttackResult",
    "create_attack",
    "list_attacks",
    "eval_mode",
    "get_logits",
    "true_class_margin",
]
