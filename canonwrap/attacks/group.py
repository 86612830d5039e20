"""Group attack: the worst group element and the worst continuous rotation for each input."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..groups import Group, GroupWarp, get_group, rotate
from .base import ATTACKS, Attack, check_inputs, eval_mode

CRITERIA = ("margin", "ce")


@dataclass
class GroupAttackResult:
    """Per-sample outcome of :meth:`GroupAttack.evaluate`. Scores: lower is worse for the model.

    Attributes:
        x_adv: (B, C, H, W) the worst transformed input over all candidates (elements and angles).
        worst_element: (B,) long, the group element with the lowest score.
        element_scores: (B, G) score of every element (true-class margin or -CE).
        worst_angle: (B,) float degrees, or None when no ``angles`` were given.
        angle_scores: (B, A) score of every angle, or None.
        correct_clean: (B,) bool, prediction on the untransformed input is right.
        correct_group: (B,) bool, right under every group element.
        correct_angles: (B,) bool, right under every angle, or None.
        correct: (B,) bool, right under every candidate (the attack fails on this sample).
        clean_accuracy, group_accuracy, angle_accuracy (or None), accuracy: the means of the above.
    """

    x_adv: Tensor
    worst_element: Tensor
    element_scores: Tensor
    worst_angle: Optional[Tensor]
    angle_scores: Optional[Tensor]
    correct_clean: Tensor
    correct_group: Tensor
    correct_angles: Optional[Tensor]
    correct: Tensor
    clean_accuracy: float
    group_accuracy: float
    angle_accuracy: Optional[float]
    accuracy: float


def true_class_margin(logits: Tensor, y: Tensor) -> Tensor:
    """``z_y - max_{k != y} z_k`` per sample; logits (B, K), y (B,) -> (B,). Negative = wrong."""
    true = logits.gather(1, y[:, None]).squeeze(1)  # (B,)
    others = logits.scatter(1, y[:, None], float("-inf"))  # (B, K)
    return true - others.max(dim=1).values


@ATTACKS.register("group")
class GroupAttack(Attack):
    r"""Group attack: evaluate every element of a planar group (and optionally a grid of rotation
    angles) and keep, per input, the transformation the model handles worst. The natural adversary
    of a canonicalized (supposedly invariant) model: an exactly invariant model has the same
    accuracy under this attack as on clean data.

    Distance Measure : none (the threat model is the group orbit / the rotation circle)

    Score of a candidate (lower is worse): the true-class margin ``z_y - max_{k!=y} z_k``
    (``criterion="margin"``) or ``-CE(f(g.x), y)`` (``criterion="ce"``). Accuracy under the attack
    counts a sample as correct only if it is classified right under every candidate.

    Arguments:
        model (callable): x (B, C, H, W) -> logits (B, K) (or an output with ``.logits``).
        group (str or Group): ``c2``, ``c4``, ``c8``, ``d4``, ``d8``. (Default: ``"c8"``)
        angles (sequence of float or None): rotation angles in degrees (counter-clockwise), e.g.
            ``range(0, 360, 5)``; bilinear with zero padding (:func:`canonwrap.groups.rotate`).
        criterion (str): ``"margin"`` or ``"ce"``. (Default: ``"margin"``)

    Shape:
        - x: (B, C, H, W) (square images for groups with 90-degree rotations), y: (B,) long.
        - output of ``__call__``: (B, C, H, W); :meth:`evaluate` returns a :class:`GroupAttackResult`.

    Examples::
        >>> attack = GroupAttack(model, group="c8", angles=range(0, 360, 5))
        >>> x_adv = attack(images, labels)
        >>> res = attack.evaluate(images, labels)
        >>> res.worst_element, res.worst_angle, res.accuracy
    """

    def __init__(
        self,
        model: Callable[[Tensor], Any],
        group: "str | Group" = "c8",
        angles: Optional[Sequence[float]] = None,
        criterion: str = "margin",
    ) -> None:
        super().__init__(model, eps=None, clamp=None)
        self.group = get_group(group)
        self.angles = self._check_angles(angles)
        if str(criterion).lower() not in CRITERIA:
            raise ValueError(f"unknown criterion {criterion!r}; expected one of {list(CRITERIA)}")
        self.criterion = str(criterion).lower()

    @staticmethod
    def _check_angles(angles: Optional[Sequence[float]]) -> Optional[List[float]]:
        if angles is None:
            return None
        try:
            out = [float(a) for a in angles]
        except (TypeError, ValueError):
            raise TypeError(f"angles must be None or a sequence of degrees; got {angles!r}") from None
        if not out or not all(math.isfinite(a) for a in out):
            raise ValueError(f"angles must be a non-empty sequence of finite degrees; got {angles!r}")
        return out

    def _scan(self, candidates: Iterable[Tensor], y: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """Streams N transformed batches (each (B, C, H, W)) through the model, keeping only the worst.

        Returns scores (B, N) (lower is worse), correctness (B, N) bool and the worst input (B, C, H, W).
        """
        scores, correct = [], []
        worst_x, worst_score = None, None
        for xi in candidates:
            logits = self.logits(xi)  # (B, K)
            if self.criterion == "margin":
                score = true_class_margin(logits, y)  # (B,)
            else:
                score = -F.cross_entropy(logits, y, reduction="none")  # (B,)
            if worst_x is None:
                worst_x, worst_score = xi, score
            else:
                better = score < worst_score  # (B,) strictly worse for the model: first one wins ties
                worst_x = torch.where(better.view(-1, *([1] * (xi.dim() - 1))), xi, worst_x)
                worst_score = torch.minimum(score, worst_score)
            scores.append(score)
            correct.append(logits.argmax(dim=1) == y)
        return torch.stack(scores, dim=1), torch.stack(correct, dim=1), worst_x

    def perturb(self, x: Tensor, y: Tensor) -> Tensor:
        return self._evaluate(x, y).x_adv

    def evaluate(self, x: Tensor, y: Tensor) -> GroupAttackResult:
        """Run the attack and return the per-sample worst element/angle and the accuracies."""
        check_inputs(x, y, None, min_dim=4)
        with eval_mode(self.model):
            return self._evaluate(x.detach(), y.detach())

    @torch.no_grad()
    def _evaluate(self, x: Tensor, y: Tensor) -> GroupAttackResult:
        if x.dim() != 4:
            raise ValueError(f"group attack needs images (B, C, H, W); got {tuple(x.shape)}")
        rows = torch.arange(x.shape[0], device=x.device)
        warp = GroupWarp(self.group, x.shape[-2], x.shape[-1]).to(x.device)  # tables built once
        elements = (warp(x, rows.new_full(rows.shape, e)) for e in self.group.elements())  # lazily, G x (B, C, H, W)
        element_scores, correct_elements, x_adv = self._scan(elements, y)  # (B, G), (B, G), (B, C, H, W)
        worst_element = element_scores.argmin(dim=1)  # (B,)
        correct_group = correct_elements.all(dim=1)  # (B,)
        correct = correct_group.clone()

        worst_angle = angle_scores = correct_angles = None
        if self.angles is not None:
            rotated = (rotate(x, a) for a in self.angles)  # lazily, A x (B, C, H, W)
            angle_scores, correct_rotated, x_rot = self._scan(rotated, y)  # (B, A), (B, A), (B, C, H, W)
            worst_index = angle_scores.argmin(dim=1)  # (B,)
            worst_angle = torch.tensor(self.angles, device=x.device)[worst_index]  # (B,)
            correct_angles = correct_rotated.all(dim=1)  # (B,)
            correct &= correct_angles
            angle_wins = angle_scores[rows, worst_index] < element_scores[rows, worst_element]  # (B,)
            x_adv = torch.where(angle_wins.view(-1, 1, 1, 1), x_rot, x_adv)

        correct_clean = correct_elements[:, 0]  # element 0 is the identity

        def mean(t: Optional[Tensor]) -> Optional[float]:
            return None if t is None else (float(t.float().mean()) if t.numel() else float("nan"))

        return GroupAttackResult(
            x_adv=x_adv,
            worst_element=worst_element,
            element_scores=element_scores,
            worst_angle=worst_angle,
            angle_scores=angle_scores,
            correct_clean=correct_clean,
            correct_group=correct_group,
            correct_angles=correct_angles,
            correct=correct,
            clean_accuracy=mean(correct_clean),
            group_accuracy=mean(correct_group),
            angle_accuracy=mean(correct_angles),
            accuracy=mean(correct),
        )
