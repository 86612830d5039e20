"""Head ensembles and MC-dropout heads on the frozen features (cheap uncertainty).

The backbone is frozen, so a deep ensemble of whole models is out of reach; an ensemble of M small
heads on the same frozen features of the canonicalized input is not (Lakshminarayanan et al., 2017
for deep ensembles; here only the heads differ: initialization seed and data order). The features
are computed once and cached, so training M heads costs seconds and inference one backbone pass
plus M linear layers.

- :class:`EnsembleHead`: ``forward(features) -> mean logits`` (B, K); ``members(features)`` (M, B, K).
- :func:`fit_ensemble`: train M heads on cached features of the canonicalized training inputs.
- :func:`add_mc_dropout`: ``nn.Sequential(nn.Dropout(p), head)`` for MC dropout in the head
  (Gal & Ghahramani, 2016); sample it with :func:`canonwrap.metrics.mc_dropout_predict`.
- :func:`head_forward`: logits, features and ensemble members of a wrapped model in one pass.

Example::

    >>> model.head = fit_ensemble(model, train, m=5)      # replaces the classifier by 5 heads
    >>> logits = model(x)                                  # (B, K) mean of the members
    >>> feats = model.backbone.features(model.normalize(model.canonicalize(x).images))
    >>> model.head.members(feats).shape                    # (5, B, K)
"""
from __future__ import annotations

import math
from typing import Any, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["EnsembleHead", "fit_ensemble", "add_mc_dropout", "head_members", "head_forward", "frozen_features", "has_dropout", "is_ensemble"]


class EnsembleHead(nn.Module):
    r"""M heads on the same features; the prediction is the mean of their logits.

    Arguments:
        heads (sequence of nn.Module): M >= 1 modules mapping features (B, D) -> logits (B, K).

    Shape:
        - features: (B, D).
        - ``forward``: (B, K) mean logits; ``members``: (M, B, K).

    Examples::
        >>> head = EnsembleHead.linear(128, 10, m=5, seed=0)
        >>> head(torch.randn(4, 128)).shape, head.members(torch.randn(4, 128)).shape
        (torch.Size([4, 10]), torch.Size([5, 4, 10]))
    """

    def __init__(self, heads: Sequence[nn.Module]) -> None:
        super().__init__()
        heads = list(heads)
        if not heads or not all(isinstance(h, nn.Module) for h in heads):
            raise TypeError(f"heads must be a non-empty sequence of nn.Module; got {[type(h).__name__ for h in heads]}")
        self.heads = nn.ModuleList(heads)

    @property
    def m(self) -> int:
        return len(self.heads)

    @classmethod
    def linear(cls, in_features: int, num_classes: int, m: int = 5, dropout: float = 0.0, seed: int = 0) -> "EnsembleHead":
        """M linear heads (each behind ``nn.Dropout(dropout)`` if ``dropout > 0``), member i
        initialized from seed ``seed + i``; the global RNG is left untouched."""
        _check_int("m", m, 1)
        _check_int("in_features", in_features, 1)
        _check_int("num_classes", num_classes, 1)
        _check_p(dropout, allow_zero=True)
        heads: List[nn.Module] = []
        for i in range(m):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed + i)
                linear = nn.Linear(in_features, num_classes)
            heads.append(nn.Sequential(nn.Dropout(dropout), linear) if dropout > 0 else linear)
        return cls(heads)

    def members(self, features: Tensor) -> Tensor:
        """features (B, D) -> member logits (M, B, K)."""
        return torch.stack([h(features) for h in self.heads])

    def forward(self, features: Tensor) -> Tensor:
        """features (B, D) -> mean logits (B, K)."""
        return self.members(features).mean(dim=0)


# ------------------------------------------------------------------------------------ helpers
def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}; got {value!r}")
    return value


def _check_p(p: Any, allow_zero: bool = False) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p):
        raise TypeError(f"dropout probability must be a number; got {p!r}")
    ok = (0.0 <= p < 1.0) if allow_zero else (0.0 < p < 1.0)
    if not ok:
        raise ValueError(f"dropout probability must be in {'[0, 1)' if allow_zero else '(0, 1)'}; got {p}")
    return float(p)


def has_dropout(module: Optional[nn.Module]) -> bool:
    """True when ``module`` contains an ``nn.Dropout*`` layer (MC dropout is possible)."""
    return module is not None and any(isinstance(m, nn.modules.dropout._DropoutNd) for m in module.modules())


def add_mc_dropout(head: nn.Module, p: float = 0.2) -> nn.Sequential:
    """``nn.Sequential(nn.Dropout(p), head)``: dropout on the features in front of ``head``.

    The result takes the head's train/eval mode. In eval mode the dropout is the identity
    (``model(x)`` is unchanged); MC dropout switches it
    on (:func:`canonwrap.metrics.mc_dropout_predict` with ``module=model.head``). A head trained
    without dropout works (inverted dropout keeps the expected features), one trained with it
    (``fit_ensemble(..., dropout=p)``) gives better-behaved samples.

    Example::
        >>> model.head = add_mc_dropout(model.head, p=0.2)
    """
    if not isinstance(head, nn.Module):
        raise TypeError(f"head must be an nn.Module (features -> logits); got {type(head).__name__}")
    return nn.Sequential(nn.Dropout(_check_p(p)), head).train(head.training)  # keeps the head's mode


def head_members(head: Optional[nn.Module], features: Tensor) -> Optional[Tensor]:
    """Member logits (M, B, K) when ``head`` is an :class:`EnsembleHead` (possibly behind
    :func:`add_mc_dropout`), else ``None``."""
    if isinstance(head, EnsembleHead):
        return head.members(features)
    if isinstance(head, nn.Sequential) and len(head) > 0 and isinstance(head[-1], EnsembleHead):
        return head[-1].members(head[:-1](features))
    return None


def is_ensemble(head: Optional[nn.Module]) -> bool:
    """True when ``head`` is an :class:`EnsembleHead` of M >= 2 members (possibly behind
    :func:`add_mc_dropout`): only then is there a disagreement to measure."""
    if isinstance(head, nn.Sequential) and len(head) > 0:
        head = head[-1]
    return isinstance(head, EnsembleHead) and head.m >= 2


def head_forward(model: Any, x_norm: Tensor) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """One pass of the model's classifier on normalized canonical images.

    Returns ``(logits (B, K), features (B, D) or None, members (M, B, K) or None)``: features when
    the model has a new head (``None`` for the backbone's own classifier), members when that head
    is an ensemble. ``logits`` equal ``model.head_logits(x_norm)``.
    """
    if model.head is None:
        return model.backbone.logits(x_norm), None, None
    feats = model.backbone.features(x_norm)  # (B, D)
    members = head_members(model.head, feats)  # (M, B, K) or None
    logits = members.mean(dim=0) if members is not None else model.head(feats)  # (B, K)
    return logits, feats, members


def frozen_features(model: Any, data: Any, batch_size: int = 256) -> Tuple[Tensor, Tensor]:
    """Frozen backbone features of the canonicalized inputs: ``(features (N, D), labels (N,))`` on CPU.

    A thin view of :func:`canonwrap.finetune.extract_features` (no augmentation)."""
    from .finetune import extract_features

    feats, labels, _ = extract_features(model, data, batch_size)
    return feats.float().cpu(), labels.long().cpu()


def fit_ensemble(
    model: Any,
    data: Any,
    m: int = 5,
    epochs: int = 30,
    lr: float = 3e-3,
    batch_size: int = 128,
    weight_decay: float = 1e-4,
    dropout: float = 0.0,
    seed: int = 0,
    features: Optional[Tuple[Tensor, Tensor]] = None,
) -> EnsembleHead:
    """Train M linear heads on cached frozen features of the canonicalized inputs.

    Member i is initialized and shuffles its mini-batches with seed ``seed + i`` (AdamW, cosine
    schedule, cross-entropy); the canonicalizer and backbone are not touched. The model is NOT
    modified: attach the result with ``model.head = fit_ensemble(model, train)``.

    Args:
        model: a wrapped model (:func:`canonwrap.wrap`).
        data: labelled Dataset / DataLoader / (images, labels) tuple, pixels in [0, 1].
        m: number of heads (>= 1; ``m=1, dropout=p`` gives a single MC-dropout head).
        epochs, lr, batch_size, weight_decay: optimization of each head.
        dropout: ``p`` of an ``nn.Dropout`` in front of each head (0 = none); with ``p > 0`` the
            heads support MC dropout.
        seed: base seed.
        features: precomputed ``frozen_features(model, data)`` to share between calls.

    Returns:
        :class:`EnsembleHead` in eval mode, on the model's device.

    Example::
        >>> model.head = fit_ensemble(model, (train_x, train_y), m=5)
    """
    _check_int("m", m, 1)
    _check_int("epochs", epochs, 1)
    _check_int("batch_size", batch_size, 1)
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"lr must be > 0; got {lr!r}")
    dev = next(model.parameters()).device
    feats, labels = features if features is not None else frozen_features(model, data)
    if feats.dim() != 2:
        raise ValueError(f"features must be (N, D); got shape {tuple(feats.shape)}")
    num_classes = int(model.num_classes)
    if int(labels.max()) >= num_classes or int(labels.min()) < 0:
        raise ValueError(f"labels must lie in [0, {num_classes}); got range [{int(labels.min())}, {int(labels.max())}]")
    feats, labels = feats.to(dev), labels.to(dev)
    ens = EnsembleHead.linear(feats.shape[1], num_classes, m=m, dropout=dropout, seed=seed).to(dev)
    n = feats.shape[0]
    steps = epochs * math.ceil(n / batch_size)
    for i, head in enumerate(ens.heads):
        gen = torch.Generator().manual_seed(seed + i)
        opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
        head.train()
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            torch.manual_seed(seed + i)  # dropout masks
            for _ in range(epochs):
                order = torch.randperm(n, generator=gen).to(dev)
                for j in range(0, n, batch_size):
                    idx = order[j : j + batch_size]
                    loss = F.cross_entropy(head(feats[idx]), labels[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
    return ens.eval()
