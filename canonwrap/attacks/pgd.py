"""PGD in Linf and L2 (Madry et al., 2018)."""
from __future__ import annotations

from typing import Any, Callable

from torch import Tensor

from .base import (
    ATTACKS,
    Attack,
    Clamp,
    ascent_step,
    check_alpha,
    check_norm,
    check_steps,
    clamp_to,
    cross_entropy_sum,
    input_grad,
    random_start,
)


@ATTACKS.register("pgd")
class PGD(Attack):
    r"""PGD in the paper 'Towards Deep Learning Models Resistant to Adversarial Attacks'
    [https://arxiv.org/abs/1706.06083]

    Distance Measure : Linf (``norm="linf"``) or L2 (``norm="l2"``)

    Starting from ``x`` (or a uniform random point of the ball), repeat ``steps`` times::

        x' <- clamp(x + Proj_eps(x' + alpha * d - x))
        d = sign(grad)            (Linf)
        d = grad / ||grad||_2     (L2, per sample)

    with ``grad = grad_x' CE(f(x'), y)`` (untargeted, ascent) or ``-grad_x' CE(f(x'), t)``
    (targeted: ``y`` are target labels, the attack minimises their CE). The last iterate is
    returned.

    Arguments:
        model (callable): x (B, C, H, W) in [0, 1] -> logits (B, K) (or an output with ``.logits``).
        eps (float): radius of the ball, >= 0. (Default: 8/255)
        alpha (float): step size, > 0. (Default: 2/255)
        steps (int): number of steps, >= 1. (Default: 10)
        random_start (bool): start from a random point of the ball. (Default: True)
        norm (str): ``"linf"`` or ``"l2"``. (Default: ``"linf"``)
        targeted (bool): ``y`` are target labels. (Default: False)
        clamp (tuple or None): valid input range; ``None`` for the feature-space threat model.

    Shape:
        - x: (B, C, H, W) (or (B, D) features with ``clamp=None``), y: (B,) long.
        - output: like x, ``||x_adv - x|| <= eps`` in the chosen norm, inside ``clamp``.

    Examples::
        >>> attack = PGD(model, eps=8/255, alpha=2/255, steps=10)
        >>> x_adv = attack(images, labels)
    """

    def __init__(
        self,
        model: Callable[[Tensor], Any],
        eps: float = 8 / 255,
        alpha: float = 2 / 255,
        steps: int = 10,
        random_start: bool = True,
        norm: str = "linf",
        targeted: bool = False,
        clamp: Clamp = (0.0, 1.0),
    ) -> None:
        super().__init__(model, eps, clamp)
        self.alpha = check_alpha(alpha)
        self.steps = check_steps(steps)
        self.random_start = bool(random_start)
        self.norm = check_norm(norm)
        self.targeted = bool(targeted)

    def perturb(self, x: Tensor, y: Tensor) -> Tensor:
        sign = -1.0 if self.targeted else 1.0
        x_adv = random_start(x, self.eps, self.norm, self.clamp) if self.random_start else clamp_to(x, self.clamp)
        for _ in range(self.steps):
            grad = input_grad(lambda z: sign * cross_entropy_sum(self.logits(z), y), x_adv)  # (B, C, H, W)
            x_adv = ascent_step(x_adv, x, grad, self.alpha, self.eps, self.norm, self.clamp)
        return x_adv


@ATTACKS.register("pgd_l2")
class PGDL2(PGD):
    r"""PGD with the L2 norm: ``PGD(..., norm="l2")`` with L2-sized defaults.

    Distance Measure : L2

    Arguments:
        model (callable): x (B, C, H, W) in [0, 1] -> logits (B, K).
        eps (float): L2 radius per sample, >= 0. (Default: 1.0)
        alpha (float): L2 step length, > 0. (Default: 0.2)
        steps (int): number of steps, >= 1. (Default: 10)
        random_start, targeted, clamp: as in :class:`PGD`.

    Examples::
        >>> attack = PGDL2(model, eps=1.0, alpha=0.2, steps=10)
        >>> x_adv = attack(images, labels)  # ||x_adv - x||_2 <= 1 per sample
    """

    def __init__(
        self,
        model: Callable[[Tensor], Any],
        eps: float = 1.0,
        alpha: float = 0.2,
        steps: int = 10,
        random_start: bool = True,
        targeted: bool = False,
        clamp: Clamp = (0.0, 1.0),
    ) -> None:
        super().__init__(model, eps, alpha, steps, random_start, "l2", targeted, clamp)
