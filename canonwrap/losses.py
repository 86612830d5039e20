"""Training signals for canonicalizers.

* canonicalization prior (Mondal et al., 2023): upright data -> identity element; with augmentation
  the target is the element that was applied (the one that undoes it is its inverse);
* model-driven prior: the frozen model's own confidence on every orbit element, softmax(metric / tau),
  as a soft target -- works on data that is not upright and needs no labels;
* orbit-contrastive loss: see :func:`canonwrap.canonicalizers.orbit_contrastive_loss`.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def prior_loss(scores: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy of the canonicalizer's scores (B, G) towards elements (B,) long or a soft
    distribution (B, G)."""
    if target.dim() == 1:
        return F.cross_entropy(scores, target)
    return -(target * scores.log_softmax(dim=1)).sum(dim=1).mean()


@torch.no_grad()
def model_prior_target(
    logits_fn: Callable[[Tensor], Tensor],
    orbit: Tensor,
    labels: Optional[Tensor] = None,
    temperature: float = 0.1,
) -> Tensor:
    """Soft canonicalization target from the frozen model.

    orbit (B, G, C, H, W) with entry g = g^-1 . x (the candidate canonical images);
    ``logits_fn`` maps (N, C, H, W) pixels to logits. The metric per element is the log-probability
    of the true label when labels are given, else the negative predictive entropy (confidence).
    Returns softmax(metric / temperature) over G, shape (B, G).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")
    b, g = orbit.shape[:2]
    logp = logits_fn(orbit.flatten(0, 1)).float().log_softmax(dim=-1).view(b, g, -1)  # (B, G, K)
    if labels is not None:
        metric = logp.gather(2, labels.view(b, 1, 1).expand(b, g, 1)).squeeze(2)  # (B, G)
    else:
        metric = (logp.exp() * logp).sum(dim=-1)  # negative entropy (B, G)
    return (metric / temperature).softmax(dim=1)
