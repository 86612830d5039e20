"""Calibration metrics (ECE, NLL, Brier), reliability-diagram data and temperature scaling.

A classifier is *calibrated* when, among the inputs it predicts with confidence ``c``, a fraction
``c`` is correct. All functions here take plain tensors or numpy arrays:

- ``probs``  (N, K): class probabilities, rows sum to 1.
- ``logits`` (N, K): unnormalized scores.
- ``labels`` (N,):   integer class indices in ``[0, K)``.

Temperature scaling (Guo et al., "On Calibration of Modern Neural Networks", ICML 2017) divides
the logits by one scalar ``T > 0`` fitted on a held-out validation split to minimize NLL; it does not
change the argmax, so accuracy is untouched.

Example::

    >>> T = fit_temperature(val_logits, val_labels)          # T > 1 for over-confident models
    >>> scaler = TemperatureScaler(T)
    >>> ece(scaler(test_logits).softmax(-1), test_labels)     # lower than before, usually
"""
from __future__ import annotations

import math
from typing import Dict, List, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

ArrayLike = Union[torch.Tensor, np.ndarray, Sequence]

__all__ = [
    "reliability_bins",
    "ece",
    "nll",
    "brier",
    "fit_temperature",
    "TemperatureScaler",
]


# ----------------------------------------------------------------------------- input checks
def _to_tensor(x: ArrayLike, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach()
    if isinstance(x, (np.ndarray, list, tuple)):
        return torch.as_tensor(np.asarray(x))
    raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(x).__name__}")


def _check_scores_labels(scores: ArrayLike, labels: ArrayLike, name: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Validate (N, K) float scores and (N,) integer labels; return float64 CPU tensors."""
    s = _to_tensor(scores, name)
    y = _to_tensor(labels, "labels")
    if s.ndim != 2:
        raise ValueError(f"{name} must have shape (N, K), got shape {tuple(s.shape)}")
    if not s.is_floating_point():
        raise TypeError(f"{name} must be floating point, got dtype {s.dtype}")
    if y.ndim != 1 or y.shape[0] != s.shape[0]:
        raise ValueError(f"labels must have shape (N,) = ({s.shape[0]},), got shape {tuple(y.shape)}")
    if y.is_floating_point() or y.dtype == torch.bool or y.is_complex():
        raise TypeError(f"labels must be integer class indices, got dtype {y.dtype}")
    if s.shape[0] == 0:
        raise ValueError(f"{name} is empty (N = 0)")
    if s.shape[1] < 2:
        raise ValueError(f"{name} needs at least 2 classes (K >= 2), got K = {s.shape[1]}")
    y = y.long().cpu()
    if int(y.min()) < 0 or int(y.max()) >= s.shape[1]:
        raise ValueError(f"labels must lie in [0, {s.shape[1]}), got range [{int(y.min())}, {int(y.max())}]")
    if not torch.isfinite(s).all():
        raise ValueError(f"{name} contains NaN or inf")
    return s.double().cpu(), y


def _looks_like_probs(s: torch.Tensor, atol: float = 1e-3) -> bool:
    return bool((s >= 0).all() and (s <= 1).all() and torch.allclose(s.sum(-1), torch.ones(len(s), dtype=s.dtype), atol=atol))


def _check_probs(probs: ArrayLike, labels: ArrayLike) -> Tuple[torch.Tensor, torch.Tensor]:
    p, y = _check_scores_labels(probs, labels, "probs")
    if not _looks_like_probs(p):
        raise ValueError(
            "probs must be probabilities in [0, 1] whose rows sum to 1 "
            f"(got min {float(p.min()):.4g}, max {float(p.max()):.4g}, "
            f"row sums in [{float(p.sum(-1).min()):.4g}, {float(p.sum(-1).max()):.4g}]); "
            "apply softmax to logits first"
        )
    return p, y


# ----------------------------------------------------------------------------- ECE and bins
def reliability_bins(probs: ArrayLike, labels: ArrayLike, n_bins: int = 15) -> Dict[str, List]:
    """Per-bin data of a reliability diagram with equal-width confidence bins.

    Confidence is the top-1 probability ``c_i = max_k p_ik``; bin ``b`` holds the samples with
    ``c_i`` in ``(edges[b], edges[b+1]]`` (the first bin also holds ``c = 0``).

    Args:
        probs: (N, K) class probabilities.
        labels: (N,) integer labels.
        n_bins: number of equal-width bins on [0, 1] (default 15, as in Guo et al.).

    Returns:
        dict of plain lists (JSON-ready): ``edges`` (n_bins + 1,), ``confidence`` (n_bins,) mean
        confidence per bin, ``accuracy`` (n_bins,) accuracy per bin, ``count`` (n_bins,) samples per
        bin. Empty bins have ``confidence`` and ``accuracy`` equal to ``None``.

    Example::

        >>> b = reliability_bins(torch.tensor([[0.9, 0.1], [0.3, 0.7]]), torch.tensor([0, 0]), n_bins=2)
        >>> b["count"], b["accuracy"]
        ([0, 2], [None, 0.5])
    """
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive int, got {n_bins!r}")
    p, y = _check_probs(probs, labels)
    conf, pred = p.max(dim=1)  # (N,), (N,)
    correct = (pred == y).double()  # (N,)
    edges = torch.linspace(0.0, 1.0, n_bins + 1, dtype=torch.float64)
    # bin index b such that edges[b] < c <= edges[b+1]; c = 0 goes to bin 0
    idx = torch.clamp(torch.bucketize(conf, edges, right=False) - 1, 0, n_bins - 1)  # (N,)
    count = torch.bincount(idx, minlength=n_bins)  # (n_bins,)
    conf_sum = torch.bincount(idx, weights=conf, minlength=n_bins)
    acc_sum = torch.bincount(idx, weights=correct, minlength=n_bins)
    confidence: List = []
    accuracy: List = []
    for b in range(n_bins):
        n = int(count[b])
        confidence.append(float(conf_sum[b]) / n if n else None)
        accuracy.append(float(acc_sum[b]) / n if n else None)
    return {
        "edges": [float(e) for e in edges],
        "confidence": confidence,
        "accuracy": accuracy,
        "count": [int(c) for c in count],
    }


def ece(probs: ArrayLike, labels: ArrayLike, n_bins: int = 15) -> float:
    """Expected Calibration Error with equal-width confidence bins (Naeini et al., 2015; Guo et al., 2017).

    ``ECE = sum_b (n_b / N) * |acc_b - conf_b|`` over the bins of :func:`reliability_bins`.
    0 is perfectly calibrated; the maximum is 1.

    Args:
        probs: (N, K) class probabilities.
        labels: (N,) integer labels.
        n_bins: number of equal-width bins on [0, 1].

    Returns:
        ECE as a Python float in [0, 1].

    Example::

        >>> ece(torch.tensor([[0.9, 0.1], [0.9, 0.1]]), torch.tensor([0, 1]))  # conf 0.9, acc 0.5
        0.4
    """
    bins = reliability_bins(probs, labels, n_bins)
    n_total = sum(bins["count"])
    total = 0.0
    for n, acc, conf in zip(bins["count"], bins["accuracy"], bins["confidence"]):
        if n:
            total += n / n_total * abs(acc - conf)
    return float(total)


# ----------------------------------------------------------------------------- NLL and Brier
def nll(scores: ArrayLike, labels: ArrayLike, kind: str = "auto", eps: float = 1e-12) -> float:
    """Mean negative log-likelihood of the true class, ``-1/N sum_i log p_i,y_i`` (natural log).

    Args:
        scores: (N, K) logits or probabilities.
        labels: (N,) integer labels.
        kind: ``"logits"`` (log-softmax is applied), ``"probs"`` (log of the given probabilities,
            clamped at ``eps``), or ``"auto"`` (default): probabilities if every entry is in [0, 1]
            and every row sums to 1 within 1e-3, otherwise logits. Pass ``kind`` explicitly when
            logits might happen to look like probabilities.
        eps: floor for probabilities before the log (``kind="probs"``), so a zero gives a large
            finite value instead of inf.

    Returns:
        NLL as a Python float (0 for a perfect, fully confident model).

    Example::

        >>> nll(torch.tensor([[0.5, 0.5], [0.25, 0.75]]), torch.tensor([0, 1]))  # (ln 2 + ln 4/3) / 2
        0.4904...
    """
    if kind not in ("auto", "logits", "probs"):
        raise ValueError(f"kind must be 'auto', 'logits' or 'probs', got {kind!r}")
    s, y = _check_scores_labels(scores, labels, "scores")
    if kind == "auto":
        kind = "probs" if _looks_like_probs(s) else "logits"
    if kind == "probs":
        if not _looks_like_probs(s):
            raise ValueError("kind='probs' but scores are not probabilities (entries in [0, 1], rows summing to 1)")
        logp = torch.log(s.clamp_min(eps))  # (N, K)
    else:
        logp = F.log_softmax(s, dim=1)  # (N, K)
    return float(-logp.gather(1, y[:, None]).mean())


def brier(probs: ArrayLike, labels: ArrayLike) -> float:
    """Multi-class Brier score (Brier, 1950): ``1/N sum_i sum_k (p_ik - 1[y_i = k])^2``.

    Summed over classes and averaged over samples, so it lies in [0, 2] (0 = perfect; a uniform
    prediction over K classes scores ``1 - 1/K``). Some libraries divide by K as well; we do not.

    Args:
        probs: (N, K) class probabilities.
        labels: (N,) integer labels.

    Returns:
        Brier score as a Python float.

    Example::

        >>> brier(torch.tensor([[0.8, 0.2]]), torch.tensor([0]))  # 0.2^2 + 0.2^2
        0.08
    """
    p, y = _check_probs(probs, labels)
    onehot = F.one_hot(y, p.shape[1]).double()  # (N, K)
    return float(((p - onehot) ** 2).sum(dim=1).mean())


# ----------------------------------------------------------------------------- temperature scaling
def _nll_at_temperature(z: torch.Tensor, y: torch.Tensor, log_t: float) -> float:
    return float(F.cross_entropy(z / math.exp(log_t), y))


def fit_temperature(
    logits: ArrayLike,
    labels: ArrayLike,
    t_min: float = 0.01,
    t_max: float = 100.0,
    tol: float = 1e-6,
    max_iter: int = 200,
) -> float:
    """Fit the temperature ``T`` minimizing the NLL of ``softmax(logits / T)`` (Guo et al., 2017).

    Pass logits of a held-out *validation* split (not the training data, not the test data).
    The NLL is convex in ``beta = 1/T`` (log-sum-exp of linear functions), hence unimodal in
    ``log T``; we run a golden-section search on ``log T`` in ``[log t_min, log t_max]`` in float64.
    Deterministic, no gradients, no learning rate. ``T > 1`` softens an over-confident model.

    Args:
        logits: (N, K) validation logits.
        labels: (N,) validation labels.
        t_min, t_max: search interval for ``T`` (``0 < t_min < t_max``). A result at a bound means
            the optimum lies outside (e.g. a perfectly separable validation set wants ``T -> 0``).
        tol: stop when the interval on ``log T`` is shorter than this.
        max_iter: maximum number of golden-section steps.

    Returns:
        The fitted temperature as a Python float.

    Example::

        >>> T = fit_temperature(val_logits, val_labels)
        >>> calibrated = TemperatureScaler(T)(test_logits)
    """
    if not (0 < t_min < t_max) or not (math.isfinite(t_min) and math.isfinite(t_max)):
        raise ValueError(f"need 0 < t_min < t_max (finite), got t_min={t_min!r}, t_max={t_max!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive int, got {max_iter!r}")
    z, y = _check_scores_labels(logits, labels, "logits")
    inv_phi = (math.sqrt(5.0) - 1.0) / 2.0  # 0.618...
    a, b = math.log(t_min), math.log(t_max)
    c, d = b - inv_phi * (b - a), a + inv_phi * (b - a)
    fc, fd = _nll_at_temperature(z, y, c), _nll_at_temperature(z, y, d)
    for _ in range(max_iter):
        if b - a < tol:
            break
        if fc <= fd:  # minimum in [a, d]
            b, d, fd = d, c, fc
            c = b - inv_phi * (b - a)
            fc = _nll_at_temperature(z, y, c)
        else:  # minimum in [c, b]
            a, c, fc = c, d, fd
            d = a + inv_phi * (b - a)
            fd = _nll_at_temperature(z, y, d)
    # compare the interior optimum with the two bounds (the minimum may sit at a bound)
    candidates = [(a + b) / 2.0, math.log(t_min), math.log(t_max)]
    best = min(candidates, key=lambda lt: _nll_at_temperature(z, y, lt))
    return float(math.exp(best))


class TemperatureScaler(nn.Module):
    """Divides logits by a fitted temperature: ``forward(logits) = logits / T``.

    ``T`` is a buffer of shape (1,), so it lives in ``state_dict()`` (and a safetensors file, and
    an exported graph) next to the model's weights, and is not touched by optimizers.

    Args:
        temperature: ``T > 0`` (1.0 = identity).

    Shape:
        logits (..., K) -> (..., K), same dtype as the input.

    Example::

        >>> scaler = TemperatureScaler.fit(val_logits, val_labels)
        >>> probs = scaler(test_logits).softmax(-1)
        >>> safetensors.torch.save_file(scaler.state_dict(), "temperature.safetensors")
    """

    temperature: torch.Tensor

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        t = float(temperature)
        if not (math.isfinite(t) and t > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        self.register_buffer("temperature", torch.tensor([t], dtype=torch.float32))

    @classmethod
    def fit(cls, logits: ArrayLike, labels: ArrayLike, **kwargs) -> "TemperatureScaler":
        """Build a scaler from :func:`fit_temperature` on validation ``logits`` / ``labels``."""
        return cls(fit_temperature(logits, labels, **kwargs))

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return logits / self.temperature.to(logits.dtype)  # (..., K)

    def extra_repr(self) -> str:
        return f"temperature={float(self.temperature):.4g}"
