"""Accuracy under every group element and arbitrary angles, for the wrapped and the frozen model.

C4-avg / C8-avg = mean accuracy over the test set rotated by k * 90 / k * 45 degrees (Mondal et
al., 2023). Rotations by multiples of 90 degrees are exact pixel permutations, 45-degree ones and
the angle sweep are bilinear (zeros outside).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch import Tensor

from .data import as_loader, split_batch
from .groups import get_group, rotate, transform
from .model import CanonicalizedModel


@dataclass
class Metrics:
    """Accuracies in [0, 1]. ``per_element[k]``: test set transformed by element k of the model's
    group; ``group_avg``: {"c4": .., "c8": .., <model group>: ..}; ``angle_acc[i]`` at ``angles[i]``;
    ``orientation_acc[k]`` (wrapped only): fraction of inputs transformed by k for which the
    canonicalizer chose k (k = 0: the identity rate on upright inputs)."""

    upright: float
    per_element: List[float]
    group_avg: Dict[str, float]
    angles: List[float] = field(default_factory=list)
    angle_acc: List[float] = field(default_factory=list)
    orientation_acc: List[float] = field(default_factory=list)

    @property
    def identity_rate(self) -> Optional[float]:
        return self.orientation_acc[0] if self.orientation_acc else None

    @property
    def angle_avg(self) -> Optional[float]:
        return sum(self.angle_acc) / len(self.angle_acc) if self.angle_acc else None

    @property
    def angle_min(self) -> Optional[float]:
        return min(self.angle_acc) if self.angle_acc else None


@dataclass
class EvalReport:
    group: str
    elements: List[str]
    wrapped: Metrics
    frozen: Optional[Metrics] = None
    n: int = 0

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        """Printable comparison (percent)."""
        rows: List[Tuple[str, Metrics]] = [("wrapped", self.wrapped)]
        if self.frozen is not None:
            rows.insert(0, ("frozen", self.frozen))
        cols = ["upright", "C4-avg", "C8-avg", f"{self.group.upper()}-avg", "angle-avg", "angle-min", "identity"]
        lines = [f"{'model':<9}" + "".join(f"{c:>11}" for c in cols)]
        for name, m in rows:
            vals = [m.upright, m.group_avg.get("c4"), m.group_avg.get("c8"), m.group_avg.get(self.group),
                    m.angle_avg, m.angle_min, m.identity_rate]
            lines.append(f"{name:<9}" + "".join(f"{'-':>11}" if v is None else f"{100 * v:>10.2f}%" for v in vals))
        return "\n".join(lines)


def _collect(data: Any, batch_size: int) -> Tuple[Tensor, Tensor]:
    xs, ys = [], []
    for batch in as_loader(data, batch_size, shuffle=False):
        x, y = split_batch(batch)
        if y is None:
            raise ValueError("evaluate needs labelled data: (image, label) pairs")
        xs.append(x)
        ys.append(y)
    return torch.cat(xs), torch.cat(ys)


@torch.no_grad()
def _predict(fn: Callable[[Tensor], Tuple[Tensor, Optional[Tensor]]], x: Tensor, batch_size: int, dev: torch.device) -> Tuple[Tensor, Optional[Tensor]]:
    preds, elems = [], []
    for i in range(0, x.shape[0], batch_size):
        p, e = fn(x[i : i + batch_size].to(dev))
        preds.append(p.cpu())
        if e is not None:
            elems.append(e.cpu())
    return torch.cat(preds), (torch.cat(elems) if elems else None)


def _metrics(
    fn: Callable[[Tensor], Tuple[Tensor, Optional[Tensor]]],
    x: Tensor,
    y: Tensor,
    group_name: str,
    angles: List[float],
    batch_size: int,
    dev: torch.device,
    bar: Any,
) -> Metrics:
    group = get_group(group_name)
    d8 = get_group("d8")
    cache: Dict[Tuple[float, bool], Tuple[float, Optional[float]]] = {}

    def run(angle: float, flip: bool, element: Optional[int]) -> Tuple[float, Optional[float]]:
        key = (angle % 360.0, flip)
        if key not in cache:
            if angle % 45 == 0:
                xt = transform(x, d8, d8.element(int(angle // 45), flip))  # exact for 90-degree multiples
            else:
                xt = rotate(x, angle, flip=flip).clamp(0, 1)
            pred, chosen = _predict(fn, xt, batch_size, dev)
            acc = float((pred == y).float().mean())
            orient = float((chosen == element).float().mean()) if chosen is not None and element is not None else None
            cache[key] = (acc, orient)
            bar.update(1)
        return cache[key]

    per_element, orientation = [], []
    for e in range(group.order):
        acc, orient = run(group.angle(e), group.flip(e), e)
        per_element.append(acc)
        if orient is not None:
            orientation.append(orient)
    group_avg = {
        "c4": sum(run(90.0 * k, False, None)[0] for k in range(4)) / 4,
        "c8": sum(run(45.0 * k, False, None)[0] for k in range(8)) / 8,
        group.name: sum(per_element) / len(per_element),
    }
    angle_acc = [run(float(a), False, None)[0] for a in angles]
    return Metrics(per_element[0], per_element, group_avg, [float(a) for a in angles], angle_acc, orientation)


def evaluate(
    model: CanonicalizedModel,
    data: Any,
    angles: Optional[Iterable[float]] = tuple(range(0, 360, 10)),
    baseline: bool = True,
    batch_size: int = 256,
    device: "str | torch.device | None" = None,
    progress: bool = False,
) -> EvalReport:
    """Upright, per-element, group-averaged (C4, C8, model group) and angle-sweep accuracy.

    Args:
        model: a wrapped model.
        data: labelled Dataset / DataLoader / (images, labels) tuple; pixels in [0, 1], upright.
        angles: angles (degrees) of the continuous sweep; ``None`` skips it.
        baseline: also evaluate the frozen backbone without canonicalization.
    Returns:
        :class:`EvalReport` (``.table()`` prints it, ``.to_dict()`` serializes it).
    """
    if device is not None:
        model.to(device)
    dev = next(model.parameters()).device
    was_training = model.training
    model.eval()
    x, y = _collect(data, batch_size)
    angle_list = [float(a) for a in angles] if angles is not None else []
    from tqdm.auto import tqdm

    bar = tqdm(total=(2 if baseline else 1) * (model.group.order + 8 + len(angle_list)), desc="evaluate", disable=not progress, leave=False)

    def wrapped_fn(xb: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        out = model.canonicalize(xb)
        return model.head_logits(model.normalize(out.images)).argmax(1), out.index

    def frozen_fn(xb: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        return model.frozen_logits(xb).argmax(1), None

    try:
        wrapped = _metrics(wrapped_fn, x, y, model.group.name, angle_list, batch_size, dev, bar)
        frozen = _metrics(frozen_fn, x, y, model.group.name, angle_list, batch_size, dev, bar) if baseline else None
    finally:
        bar.close()
        model.train(was_training)
    elements = [model.group.describe(e) for e in range(model.group.order)]
    return EvalReport(model.group.name, elements, wrapped, frozen, n=int(y.shape[0]))
