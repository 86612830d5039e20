"""FGSM: one signed-gradient step (Goodfellow et al., 2015)."""
from __future__ import annotations

from typing import Any, Callable

from torch import Tensor

from .base import ATTACKS, Attack, Clamp, clamp_to, cross_entropy_sum, input_grad


@ATTACKS.register("fgsm")
class FGSM(Attack):
    r"""FGSM in the paper 'Explaining and Harnessing Adversarial Examples'
    [https://arxiv.org/abs/1412.6572]

    Distance Measure : Linf

    ``x_adv = clamp(x + eps * sign(grad_x CE(f(x), y)))``; targeted: ``x - eps * sign(grad_x CE(f(x), t))``.

    Arguments:
        model (callable): x (B, C, H, W) in [0, 1] -> logits (B, K) (or an output with ``.logits``).
        eps (float): maximum perturbation, >= 0. (Default: 8/255)
        targeted (bool): if True, ``y`` are target labels and the attack moves towards them.
        clamp (tuple or None): valid input range; ``None`` for the feature-space threat model.

    Shape:
        - x: (B, C, H, W) (or (B, D) features with ``clamp=None``), y: (B,) long.
        - output: like x, ``|x_adv - x|_inf <= eps``.

    Examples::
        >>> attack = FGSM(model, eps=8/255)
        >>> x_adv = attack(images, labels)
    """

    def __init__(
        self, model: Callable[[Tensor], Any], eps: float = 8 / 255, targeted: bool = False, clamp: Clamp = (0.0, 1.0)
    ) -> None:
        super().__init__(model, eps, clamp)
        self.targeted = bool(targeted)

    def perturb(self, x: Tensor, y: Tensor) -> Tensor:
        sign = -1.0 if self.targeted else 1.0
        grad = input_grad(lambda z: sign * cross_entropy_sum(self.logits(z), y), x)  # (B, C, H, W)
        return clamp_to(x + self.eps * grad.sign(), self.clamp)
