"""Accuracy under every group element and arbitrary angles, for the wrapped and the frozen model.

C4-avg / C8-avg = mean accuracy over the test set rotated by k * 90 / k * 45 degrees (Mondal et
al., 2023). Rotations by multiples of 90 degrees are exact pixel permutations, 45-degree ones and
the angle sweep are bilinear (zeros outside).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
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
    """Accuracy under rotations (``wrapped``, ``frozen``) and, when requested, the worst-case and
    uncertainty sections of :mod:`canonwrap.worstcase` as report-schema dicts (see
    :mod:`canonwrap.report`): ``adversarial``, ``corruptions``, ``calibration``, ``uncertainty``
    (the ``risk_coverage`` section); ``meta`` (temperature, ...); ``files`` written by ``report_dir``."""

    group: str
    elements: List[str]
    wrapped: Metrics
    frozen: Optional[Metrics] = None
    n: int = 0
    adversarial: Optional[Dict[str, Any]] = None
    corruptions: Optional[Dict[str, Any]] = None
    calibration: Optional[Dict[str, Any]] = None
    uncertainty: Optional[Dict[str, Any]] = None
    meta: Dict[str, Any] = field(default_factory=dict)
    files: Dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def to_report_dict(self, title: Optional[str] = None) -> Dict[str, Any]:
        """The dict :func:`canonwrap.report.render_report` draws (schema at the top of report.py)."""
        from .worstcase import report_dict

        return report_dict(self, title)

    def table(self) -> str:
        """Printable comparison (percent)."""
        rows: List[Tuple[str, Metrics]] = [("wrapped", self.wrapped)]
        if self.frozen is not None:
            rows.insert(0, ("frozen", self.frozen))
        extra = self.group not in ("c4", "c8")  # d4 / d8: their own average as well
        cols = ["upright", "C4-avg", "C8-avg"] + ([f"{self.group.upper()}-avg"] if extra else [])
        cols += ["angle-avg", "angle-min", "identity"]
        lines = [f"{'model':<9}" + "".join(f"{c:>11}" for c in cols)]
        for name, m in rows:
            vals = [m.upright, m.group_avg.get("c4"), m.group_avg.get("c8")]
            vals += ([m.group_avg.get(self.group)] if extra else []) + [m.angle_avg, m.angle_min, m.identity_rate]
            lines.append(f"{name:<9}" + "".join(f"{'-':>11}" if v is None else f"{100 * v:>10.2f}%" for v in vals))
        if self.adversarial or self.corruptions or self.calibration or self.uncertainty:
            from .worstcase import summary_lines

            lines += [""] + summary_lines(self)
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
    attacks: Any = None,
    corruptions: Any = None,
    uncertainty: Any = None,
    calibration_data: Any = None,
    report_dir: "str | Path | None" = None,
    rotations: Optional[Iterable[float]] = None,
) -> EvalReport:
    """Upright, per-element, group-averaged (C4, C8, model group) and angle-sweep accuracy, and on
    request the worst case and uncertainty (:mod:`canonwrap.worstcase`).

    Args:
        model: a wrapped model.
        data: labelled Dataset / DataLoader / (images, labels) tuple; pixels in [0, 1], upright.
        angles: angles (degrees) of the continuous sweep; ``None`` skips it.
        baseline: also evaluate the frozen backbone without canonicalization.
        attacks: adversarial accuracy vs eps through the whole wrapped model: ``True`` (FGSM, PGD,
            group attack), names (``["pgd", "group"]``), a dict of
            :class:`~canonwrap.worstcase.AdversarialConfig` fields (``{"eps": [0, 0.05], "steps": 20}``)
            or a config.
        corruptions: accuracy by severity: ``True`` (all), names, a dict / :class:`~canonwrap.worstcase.CorruptionConfig`.
        uncertainty: calibration (ECE / NLL / Brier, reliability bins) and error detection (AUROC,
            accuracy at 90% coverage, risk-coverage) of each score: ``True``, score names, a dict /
            :class:`~canonwrap.worstcase.UncertaintyConfig`. Inputs are randomly rotated by default.
        calibration_data: labelled validation split: the temperature is fitted on it and STORED in
            ``model.temperature`` (saved with the model, exported with ``uncertainty=True``);
            implies ``uncertainty=True`` when that is not given.
        report_dir: write ``report.json``, the PNG plots and a self-contained ``report.html`` there.
        rotations: alias of ``angles``.
    Returns:
        :class:`EvalReport` (``.table()`` prints it, ``.to_dict()`` serializes it,
        ``.to_report_dict()`` is what the HTML report draws).

    Raises:
        KeyError: unknown attack / corruption / score name (with the valid names).
        ValueError, TypeError: bad options (e.g. coverage outside (0, 1]).

    Example:
        >>> rep = evaluate(model, test, attacks=True, corruptions=True, calibration_data=val, report_dir="runs/eval")
    """
    from .worstcase import as_adversarial_config, as_corruption_config, as_uncertainty_config, resolve_scores

    if rotations is not None:
        angles = rotations

    adv_cfg, cor_cfg = as_adversarial_config(attacks), as_corruption_config(corruptions)  # fail fast on bad names
    unc_cfg = as_uncertainty_config(True if uncertainty is None and calibration_data is not None else uncertainty)
    if unc_cfg is not None:
        resolve_scores(model, unc_cfg)
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
    sections: Dict[str, Any] = {}
    if adv_cfg is not None or cor_cfg is not None or unc_cfg is not None:
        from .worstcase import evaluate_sections

        sections = evaluate_sections(model, x, y, adv_cfg, cor_cfg, unc_cfg, calibration_data, batch_size)
    report = EvalReport(model.group.name, elements, wrapped, frozen, n=int(y.shape[0]), **sections)
    if report_dir is not None:
        from .report import render_report

        html = render_report(report.to_report_dict(), report_dir)
        report.files = {"html": str(html), "json": str(html.parent / "report.json")}
    return report
