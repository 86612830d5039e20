"""Uncertainty outputs in the exported graph, so a deployment can route uncertain inputs to a person.

``export_onnx(model, path, uncertainty=True, reject_threshold=t)`` exports
:class:`UncertaintyExportModule` instead of the plain graph. Outputs (B = dynamic batch):

======================  ========  ==================================================================
name                    shape     value
======================  ========  ==================================================================
logits                  (B, K)    raw logits (as the plain export)
element                 (B,)      chosen group element (as the plain export)
scores                  (B, G)    canonicalizer scores (as the plain export)
probs                   (B, K)    ``softmax(logits / T)``, T = ``model.temperature`` (metadata ``temperature``)
entropy                 (B,)      ``-sum_k p_k log p_k`` of ``probs``; HIGH = uncertain
canon_margin            (B,)      top-1 minus top-2 of ``softmax(scores)``; LOW = orientation unsure
ensemble_disagreement   (B,)      only for an ensemble head: mutual information of the members'
                                  ``softmax`` (no temperature); HIGH = uncertain
======================  ========  ==================================================================

The same definitions as :mod:`canonwrap.metrics` (``predictive_entropy``, ``canon_margin``,
``ensemble_disagreement(kind="mutual_info")``), written with export-friendly ops (Softmax, Log,
TopK, ReduceSum). Metadata ``reject_score`` / ``reject_threshold`` / ``reject_rule`` describe the
deployed reject rule; compute the threshold on validation data with :func:`reject_threshold`.

Example::

    >>> t = reject_threshold(model, (val_x, val_y), coverage=0.9)          # entropy at 90% coverage
    >>> export_onnx(model, "model.onnx", uncertainty=True, reject_threshold=t)
    >>> # onnxruntime: outputs include "probs", "entropy", "canon_margin"; metadata "reject_threshold"
"""
from __future__ import annotations

import json
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

BASE_OUTPUTS = ("logits", "element", "scores")
UNCERTAINTY_OUTPUTS = ("probs", "entropy", "canon_margin")
ENSEMBLE_OUTPUT = "ensemble_disagreement"
# score name -> True when HIGH means uncertain (reject above the threshold)
REJECT_SCORES: Dict[str, bool] = {"entropy": True, "canon_margin": False, ENSEMBLE_OUTPUT: True}


def _entropy(p: Tensor) -> Tensor:
    """(..., K) probabilities -> (...,) entropy; 0 * log 0 = 0 (export-friendly ``special.entr``)."""
    return -(p * torch.log(p.clamp_min(1e-30))).sum(dim=-1)


def _margin(scores: Tensor) -> Tensor:
    top2 = scores.float().softmax(dim=-1).topk(2, dim=-1).values  # (B, 2)
    return top2[:, 0] - top2[:, 1]  # (B,)


class UncertaintyExportModule(nn.Module):
    """The wrapped model with uncertainty outputs (see the module docstring); ``output_names``
    lists them in order. ``forward(pixel_values (B, C, H, W)) -> tuple of tensors``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        from canonwrap.ensemble import is_ensemble

        self.model = model
        self.ensemble = is_ensemble(model.head)
        if model.group.order < 2:
            raise ValueError("canon_margin needs a group with at least 2 elements")

    @property
    def output_names(self) -> Tuple[str, ...]:
        return BASE_OUTPUTS + UNCERTAINTY_OUTPUTS + ((ENSEMBLE_OUTPUT,) if self.ensemble else ())

    def forward(self, pixel_values: Tensor) -> Tuple[Tensor, ...]:
        from canonwrap.ensemble import head_forward

        m = self.model
        out = m.canonicalize(pixel_values)
        logits, _, members = head_forward(m, m.normalize(out.images))  # (B, K), _, (M, B, K) or None
        probs = (logits.float() / m.temperature.float()).softmax(dim=-1)  # (B, K)
        outs = (logits, out.index, out.scores, probs, _entropy(probs), _margin(out.scores))
        if self.ensemble:
            pm = members.float().softmax(dim=-1)  # (M, B, K)
            mi = (_entropy(pm.mean(dim=0)) - _entropy(pm).mean(dim=0)).clamp_min(0.0)  # (B,)
            outs = outs + (mi,)
        return outs


@torch.no_grad()
def uncertainty_outputs(model: nn.Module, x: Tensor, batch_size: int = 256) -> Dict[str, Tensor]:
    """The exported graph's outputs computed in PyTorch: ``{name: tensor}`` on CPU (eval mode)."""
    module = UncertaintyExportModule(model)
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    parts: Dict[str, list] = {n: [] for n in module.output_names}
    try:
        for i in range(0, x.shape[0], batch_size):
            for name, t in zip(module.output_names, module(x[i : i + batch_size].to(dev))):
                parts[name].append(t.cpu())
    finally:
        model.train(was_training)
    return {n: torch.cat(v) for n, v in parts.items()}


def reject_threshold(
    model: nn.Module,
    data: Any,
    coverage: float = 0.9,
    score: str = "entropy",
    rotate: bool = True,
    seed: int = 2,
    batch_size: int = 256,
) -> float:
    """Threshold of ``score`` that accepts a fraction ``coverage`` of validation ``data``.

    Uses the exported definitions (and ``model.temperature``: calibrate first). For ``entropy`` and
    ``ensemble_disagreement`` the rule is "reject when score > threshold", for ``canon_margin``
    "reject when margin < threshold" (:func:`canonwrap.metrics.threshold_for_coverage` on the
    uncertainty direction).

    Args:
        data: labelled or unlabelled validation data (Dataset / DataLoader / tensor / tuple).
        coverage: in (0, 1].
        score: ``entropy``, ``canon_margin`` or ``ensemble_disagreement`` (ensemble heads).
        rotate: rotate every input by a random angle first (the deployment setting).
    """
    from canonwrap.data import as_loader, split_batch
    from canonwrap.metrics import threshold_for_coverage
    from canonwrap.worstcase import random_rotation

    high_is_uncertain = _check_score(score, model)
    x = torch.cat([split_batch(b)[0] for b in as_loader(data, batch_size, shuffle=False)])
    if rotate:
        x, _ = random_rotation(x, seed)
    values = uncertainty_outputs(model, x, batch_size)[score].double()  # (N,)
    if high_is_uncertain:
        return threshold_for_coverage(values, coverage)
    return -threshold_for_coverage(-values, coverage)


def _check_score(score: str, model: Optional[nn.Module] = None) -> bool:
    if score not in REJECT_SCORES:
        from canonwrap._registry import unknown_name_message

        raise ValueError(unknown_name_message("reject score", score, list(REJECT_SCORES)))
    if score == ENSEMBLE_OUTPUT and model is not None:
        from canonwrap.ensemble import is_ensemble

        if not is_ensemble(model.head):
            raise ValueError("reject score 'ensemble_disagreement' needs an ensemble head (canonwrap.ensemble.fit_ensemble)")
    return REJECT_SCORES[score]


def uncertainty_metadata(
    model: nn.Module, output_names: Tuple[str, ...], reject_threshold: Optional[float] = None, reject_score: str = "entropy"
) -> Dict[str, str]:
    """``metadata_props`` entries of an uncertainty export (strings, JSON for structures)."""
    import math

    high = _check_score(reject_score, model)
    meta = {
        "outputs": json.dumps(list(output_names)),
        "uncertainty_outputs": json.dumps([n for n in output_names if n not in BASE_OUTPUTS]),
        "temperature": repr(float(model.temperature)),
        "reject_score": reject_score,
    }
    if reject_threshold is not None:
        t = float(reject_threshold)
        if not math.isfinite(t):
            raise ValueError(f"reject_threshold must be a finite number; got {reject_threshold!r}")
        meta["reject_threshold"] = repr(t)
        meta["reject_rule"] = f"route to a person when {reject_score} {'>' if high else '<'} {t!r}"
    return meta
