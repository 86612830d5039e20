"""Fréchet distance between two feature sets, and class coverage of generated samples.

Fréchet distance (Heusel et al., NeurIPS 2017, "GANs trained by a two time-scale update rule")
between Gaussians fitted to features ``a`` (N, D) and ``b`` (M, D)::

    FD = |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))

"FID" is this distance in the feature space of an Inception-v3 network. canonwrap computes it in
whatever feature space you pass (e.g. a frozen digit classifier's penultimate layer): numbers are
comparable only within one feature extractor and are NOT Inception FID.

The trace of the matrix square root uses ``Tr((S_a S_b)^(1/2)) = sum sqrt(eig(A S_b A))`` with
``A = S_a^(1/2)`` (symmetric PSD), computed in float64 with ``eigh``: no scipy, no complex parts.

Example::

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(size=(2000, 8))
    >>> round(frechet_distance(x, x), 6)
    0.0
    >>> frechet_distance(x, x + 1.0) > 7.9   # mean shift of 1 in 8 dims -> ~8
    True
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Union

import numpy as np
import torch

Array = Union[np.ndarray, torch.Tensor]


def _as_features(x: Array, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    elif isinstance(x, np.ndarray):
        x = x.astype(np.float64, copy=False)
    else:
        raise TypeError(f"{name} must be a numpy array or torch tensor, got {type(x).__name__}")
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"{name} must have shape (N, D) with N >= 2, got {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf")
    return x


def _sqrt_psd(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(a: Array, b: Array) -> float:
    """Fréchet distance between Gaussians fitted to feature sets ``a`` (N, D) and ``b`` (M, D).

    Args:
        a, b: features, numpy arrays or torch tensors, same D; computed in float64.

    Returns:
        the distance (float, clipped at 0 against round-off).
    """
    a, b = _as_features(a, "a"), _as_features(b, "b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dims differ: a has D={a.shape[1]}, b has D={b.shape[1]}")
    mu_a, mu_b = a.mean(0), b.mean(0)  # (D,)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)  # (D, D)
    s_a, s_b = np.atleast_2d(s_a), np.atleast_2d(s_b)
    root_a = _sqrt_psd(s_a)
    m = root_a @ s_b @ root_a  # (D, D) symmetric PSD, same eigenvalues as S_a S_b
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0.0, None)).sum()
    diff = mu_a - mu_b
    fd = float(diff @ diff + np.trace(s_a) + np.trace(s_b) - 2.0 * tr_sqrt)
    return fd if fd > 0.0 else 0.0  # round-off can make identical sets slightly negative


@dataclass
class ClassCoverage:
    """How generated samples spread over the classes a frozen classifier predicts.

    counts: samples per predicted class (K,).
    coverage: fraction of classes holding at least ``min_share`` of the uniform share N/K.
    entropy: normalized entropy of the predicted-class histogram in [0, 1] (1 = uniform).
    """

    counts: List[int]
    coverage: float
    entropy: float


def class_coverage(predictions: Array, num_classes: int, min_share: float = 0.1) -> ClassCoverage:
    """Class coverage of generated samples.

    Args:
        predictions: predicted class ids (N,) or logits/probabilities (N, K).
        num_classes: K.
        min_share: a class counts as covered if it gets at least ``min_share * N / K`` samples.

    Returns:
        :class:`ClassCoverage`.
    """
    if isinstance(predictions, torch.Tensor):
        predictions = predictions.detach().cpu().numpy()
    if not isinstance(predictions, np.ndarray):
        raise TypeError(f"predictions must be a numpy array or torch tensor, got {type(predictions).__name__}")
    if predictions.ndim == 2:
        if predictions.shape[1] != num_classes:
            raise ValueError(f"logits have {predictions.shape[1]} columns, expected num_classes={num_classes}")
        predictions = predictions.argmax(1)
    if predictions.ndim != 1 or predictions.size == 0:
        raise ValueError(f"predictions must be (N,) class ids or (N, K) logits, got shape {predictions.shape}")
    ids = predictions.astype(np.int64)
    if ids.min() < 0 or ids.max() >= num_classes:
        raise ValueError(f"class ids must be in [0, {num_classes}), got range [{ids.min()}, {ids.max()}]")
    counts = np.bincount(ids, minlength=num_classes)  # (K,)
    n = counts.sum()
    p = counts[counts > 0] / n
    entropy = max(0.0, float(-(p * np.log(p)).sum() / np.log(num_classes))) if num_classes > 1 else 1.0
    covered = float((counts >= min_share * n / num_classes).mean())
    return ClassCoverage(counts=counts.tolist(), coverage=covered, entropy=entropy)
