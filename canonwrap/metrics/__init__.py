"""Calibration and uncertainty metrics: pure functions on tensors / numpy arrays.

See :mod:`canonwrap.metrics.calibration` (ECE, NLL, Brier, temperature scaling) and
:mod:`canonwrap.metrics.uncertainty` (entropy, canonicalizer margin, ensemble disagreement,
MC dropout, AUROC, risk-coverage).
"""
from canonwrap.metrics.calibration import (
    TemperatureScaler,
    brier,
    ece,
    fit_temperature,
    nll,
    reliability_bins,
)
from canonwrap.metrics.uncertainty import (
    accuracy_at_coverage,
    aurc,
    auroc,
    canon_margin,
    enable_dropout,
    ensemble_disagreement,
    mc_dropout_predict,
    predictive_entropy,
    risk_coverage,
    threshold_for_coverage,
)

__all__ = [
    "TemperatureScaler",
    "brier",
    "ece",
    "fit_temperature",
    "nll",
    "reliability_bins",
    "accuracy_at_coverage",
    "aurc",
    "auroc",
    "canon_margin",
    "enable_dropout",
    "ensemble_disagreement",
    "mc_dropout_predict",
    "predictive_entropy",
    "risk_coverage",
    "threshold_for_coverage",
]
