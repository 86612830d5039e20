"""Uncertainty scores and how to judge them (error detection, selective prediction).

Scores (per input; see each function for the direction):

- :func:`predictive_entropy` of the class probabilities, HIGH = uncertain.
- :func:`canon_margin`: top-1 minus top-2 of the canonicalizer's softmaxed orbit scores,
  HIGH = confident about the orientation (use ``-margin`` or ``1 - margin`` as an uncertainty).
- :func:`ensemble_disagreement` of M members (head ensembles or MC-dropout samples), HIGH = uncertain.
- :func:`mc_dropout_predict` draws the MC-dropout samples (Gal & Ghahramani, ICML 2016).

Judging a score (Hartmann & Richter, 2023: uncertain inputs should be routed to a person):

- :func:`auroc` for detecting misclassified inputs (higher score = more likely an error).
- :func:`risk_coverage` / :func:`aurc`: error rate among the accepted inputs when only the most
  confident fraction is accepted (Geifman & El-Yaniv, NeurIPS 2017).
- :func:`accuracy_at_coverage`, :func:`threshold_for_coverage`: the operating point of a deployed
  reject rule ``accept if uncertainty <= threshold``.

Convention: every ``uncertainty`` argument is HIGH = uncertain; ``correct`` / ``is_error`` are
boolean (N,) arrays. Inputs may be torch tensors or numpy arrays; the evaluation functions
compute in float64 numpy and return Python floats or numpy arrays.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator, List, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

ArrayLike = Union[torch.Tensor, np.ndarray, Sequence]

__all__ = [
    "predictive_entropy",
    "canon_margin",
    "ensemble_disagreement",
    "enable_dropout",
    "mc_dropout_predict",
    "auroc",
    "risk_coverage",
    "aurc",
    "accuracy_at_coverage",
    "threshold_for_coverage",
]


# ----------------------------------------------------------------------------- scores (torch)
def _float_tensor(x: ArrayLike, name: str, ndim: int, shape_doc: str) -> torch.Tensor:
    if isinstance(x, (np.ndarray, list, tuple)):
        x = torch.as_tensor(np.asarray(x))
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(x).__name__}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must have shape {shape_doc}, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be floating point, got dtype {x.dtype}")
    return x


def predictive_entropy(probs: ArrayLike) -> torch.Tensor:
    """Entropy of the predictive distribution, ``H(p) = -sum_k p_k log p_k`` (nats).

    HIGH = uncertain. Ranges from 0 (one-hot) to ``log K`` (uniform). ``0 log 0 = 0``.

    Args:
        probs: (N, K) class probabilities (e.g. the mean over ensemble members).

    Returns:
        (N,) tensor, same dtype and device as ``probs``.

    Example::

        >>> predictive_entropy(torch.tensor([[1.0, 0.0], [0.5, 0.5]]))
        tensor([0.0000, 0.6931])
    """
    p = _float_tensor(probs, "probs", 2, "(N, K)")
    return torch.special.entr(p).sum(dim=-1)  # (N,)


def canon_margin(scores: ArrayLike) -> torch.Tensor:
    """Orientation confidence of a canonicalizer: top-1 minus top-2 of ``softmax(scores)``.

    ``scores`` are the canonicalizer's raw orbit scores, one per group element. HIGH margin =
    CONFIDENT (one element clearly wins); a margin near 0 means a near-tie between two
    orientations, where a tiny perturbation flips the chosen element and changes the canonical
    image (and often the prediction). Use ``-canon_margin(scores)`` as an uncertainty score.

    Args:
        scores: (B, |G|) raw orbit scores (logits), ``|G| >= 2``.

    Returns:
        (B,) tensor in [0, 1].

    Example::

        >>> canon_margin(torch.tensor([[4.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]]))
        tensor([0.9306, 0.0000])
    """
    s = _float_tensor(scores, "scores", 2, "(B, |G|)")
    if s.shape[1] < 2:
        raise ValueError(f"scores need at least 2 group elements (|G| >= 2), got shape {tuple(s.shape)}")
    top2 = s.softmax(dim=-1).topk(2, dim=-1).values  # (B, 2)
    return top2[:, 0] - top2[:, 1]  # (B,)


def ensemble_disagreement(probs_members: ArrayLike, kind: str = "mutual_info") -> torch.Tensor:
    """Disagreement between M predictive distributions of the same inputs. HIGH = uncertain.

    ``kind="mutual_info"`` (default, BALD; Houlsby et al., 2011; Depeweg et al., 2018):
    ``MI = H(mean_m p_m) - mean_m H(p_m)``, which equals the mean KL divergence of each member to
    the mean, ``mean_m KL(p_m || p_bar)``. It isolates the *epistemic* part of the predictive
    entropy: 0 when all members agree, even if each of them is unsure. In [0, log M].

    ``kind="vote"``: fraction of members whose argmax differs from the majority vote (ties broken
    towards the lowest class index), in [0, 1 - 1/M].

    Args:
        probs_members: (M, N, K) probabilities of M members (heads, seeds, MC-dropout samples).
        kind: ``"mutual_info"`` or ``"vote"``.

    Returns:
        (N,) tensor.

    Example::

        >>> p = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])   # two members, one input, full disagreement
        >>> ensemble_disagreement(p)                         # log 2
        tensor([0.6931])
    """
    p = _float_tensor(probs_members, "probs_members", 3, "(M, N, K)")
    if p.shape[0] < 1:
        raise ValueError("probs_members needs at least one member (M >= 1)")
    if kind == "mutual_info":
        p_bar = p.mean(dim=0)  # (N, K)
        return (predictive_entropy(p_bar) - torch.stack([predictive_entropy(pm) for pm in p]).mean(0)).clamp_min(0)
    if kind == "vote":
        votes = p.argmax(dim=-1)  # (M, N)
        counts = torch.nn.functional.one_hot(votes, p.shape[-1]).sum(0)  # (N, K)
        majority = counts.argmax(dim=-1)  # (N,)
        return (votes != majority[None]).to(p.dtype).mean(0)  # (N,)
    raise ValueError(f"kind must be 'mutual_info' or 'vote', got {kind!r}")


# ----------------------------------------------------------------------------- MC dropout
def _dropout_modules(module: nn.Module) -> List[nn.Module]:
    return [m for m in module.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]


@contextlib.contextmanager
def enable_dropout(module: nn.Module) -> Iterator[List[nn.Module]]:
    """Context manager: put ONLY the dropout layers of ``module`` in train mode.

    BatchNorm and everything else keep their current mode (running statistics are not updated).
    Each dropout layer's previous ``training`` flag is restored on exit, also after an exception.
    Yields the list of dropout layers that were switched (empty if the model has none).
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    layers = _dropout_modules(module)
    previous = [m.training for m in layers]
    try:
        for m in layers:
            m.train(True)
        yield layers
    finally:
        for m, flag in zip(layers, previous):
            m.train(flag)


def mc_dropout_predict(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    n_samples: int = 20,
    module: nn.Module = None,
    apply_softmax: bool = True,
    seed: int = None,
) -> torch.Tensor:
    """Monte-Carlo dropout (Gal & Ghahramani, ICML 2016): ``n_samples`` stochastic forward passes.

    Only the dropout layers are switched to train mode (see :func:`enable_dropout`); modes are
    restored afterwards, even if ``fn`` raises. Runs under ``torch.no_grad()``. Feed the result to
    :func:`ensemble_disagreement` (epistemic) and ``.mean(0)`` + :func:`predictive_entropy` (total).

    Args:
        fn: callable mapping x (B, ...) to logits (B, K); usually the model (or its head).
        x: input batch (B, ...).
        n_samples: number of stochastic passes S >= 1.
        module: the nn.Module whose dropout layers to enable; defaults to ``fn`` if it is a module.
            Passing e.g. only the head keeps dropout elsewhere off.
        apply_softmax: return probabilities (default) instead of raw outputs.
        seed: if given, the dropout masks are drawn from a forked RNG seeded with it (global RNG
            state is left unchanged), so repeated calls give the same samples.

    Returns:
        (S, B, K) tensor of probabilities (or raw outputs if ``apply_softmax=False``).

    Raises:
        ValueError: if the module contains no dropout layer (MC dropout would be deterministic).

    Example::

        >>> samples = mc_dropout_predict(model, images, n_samples=20, module=model.head)
        >>> probs, epistemic = samples.mean(0), ensemble_disagreement(samples)
    """
    if module is None:
        if not isinstance(fn, nn.Module):
            raise TypeError("fn is not an nn.Module; pass module= (the model whose dropout layers to enable)")
        module = fn
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples must be a positive int, got {n_samples!r}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not _dropout_modules(module):
        raise ValueError(f"{type(module).__name__} has no dropout layers (nn.Dropout*); MC dropout needs at least one")
    devices = [x.device] if x.device.type == "cuda" else []
    rng = torch.random.fork_rng(devices=devices) if seed is not None else contextlib.nullcontext()
    with rng, torch.no_grad(), enable_dropout(module):
        if seed is not None:
            torch.manual_seed(seed)
        outs = []
        for _ in range(n_samples):
            out = fn(x)  # (B, K)
            outs.append(out.softmax(dim=-1) if apply_softmax else out)
    return torch.stack(outs)  # (S, B, K)


# ----------------------------------------------------------------------------- evaluation (numpy)
def _vector(x: ArrayLike, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    elif isinstance(x, (list, tuple)):
        x = np.asarray(x)
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(x).__name__}")
    if x.ndim != 1:
        raise ValueError(f"{name} must have shape (N,), got shape {x.shape}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty (N = 0)")
    return x


def _pair(uncertainty: ArrayLike, flags: ArrayLike, u_name: str, f_name: str) -> Tuple[np.ndarray, np.ndarray]:
    u = _vector(uncertainty, u_name)
    f = _vector(flags, f_name)
    if u.shape != f.shape:
        raise ValueError(f"{u_name} and {f_name} must have the same shape (N,), got {u.shape} and {f.shape}")
    if u.dtype == bool or not np.issubdtype(u.dtype, np.number):
        raise TypeError(f"{u_name} must be numeric, got dtype {u.dtype}")
    u = u.astype(np.float64)
    if not np.isfinite(u).all():
        raise ValueError(f"{u_name} contains NaN or inf")
    if f.dtype != bool:
        if not np.isin(f, (0, 1)).all():
            raise ValueError(f"{f_name} must be boolean (or 0/1), got values {np.unique(f)[:5].tolist()}")
        f = f.astype(bool)
    return u, f


def _check_coverage(coverage: float) -> float:
    c = float(coverage)
    if not (0.0 < c <= 1.0):
        raise ValueError(f"coverage must be in (0, 1], got {coverage!r}")
    return c


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks; tied values get the mean of the ranks they span."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    starts = np.r_[0, np.flatnonzero(np.diff(xs)) + 1]  # first index of each tie group
    ends = np.r_[starts[1:], len(xs)]  # one past the last index
    group_rank = (starts + ends + 1) / 2.0  # mean of 1-based ranks starts+1 .. ends
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.repeat(group_rank, ends - starts)
    return ranks


def auroc(scores: ArrayLike, is_error: ArrayLike) -> float:
    """Area under the ROC curve of ``scores`` for detecting errors (Mann-Whitney U statistic).

    ``AUROC = P(score of a random error > score of a random correct input)``, ties counting 1/2
    (average ranks). 1 = the score ranks every error above every correct input, 0.5 = chance (or
    all scores tied), 0 = inverted. Higher ``scores`` must mean "more likely an error", so pass
    entropy as is and margins/confidences negated.

    Args:
        scores: (N,) uncertainty scores.
        is_error: (N,) bool, True where the model's prediction is wrong.

    Returns:
        AUROC as a Python float; ``nan`` if ``is_error`` is all True or all False (undefined).

    Example::

        >>> auroc([0.1, 0.2, 0.9], [False, False, True])
        1.0
    """
    s, e = _pair(scores, is_error, "scores", "is_error")
    n_err, n_ok = int(e.sum()), int((~e).sum())
    if n_err == 0 or n_ok == 0:
        return float("nan")
    ranks = _average_ranks(s)
    u = ranks[e].sum() - n_err * (n_err + 1) / 2.0
    return float(u / (n_err * n_ok))


def risk_coverage(uncertainty: ArrayLike, correct: ArrayLike) -> Tuple[np.ndarray, np.ndarray]:
    """Risk-coverage curve of selective prediction (Geifman & El-Yaniv, 2017).

    Accept the inputs with ``uncertainty <= t`` for every threshold ``t`` among the observed
    values; coverage = accepted fraction, risk = error rate among the accepted. Tied values are
    accepted together, so the curve does not depend on how ties happen to be sorted.

    Args:
        uncertainty: (N,) HIGH = uncertain.
        correct: (N,) bool, True where the prediction is right.

    Returns:
        ``(coverage, risk)``: float64 arrays of shape (U,), U = number of distinct uncertainty
        values; coverage strictly increasing and ending at 1.0, risk in [0, 1] (risk[-1] is the
        overall error rate).

    Example::

        >>> risk_coverage([0.1, 0.2, 0.3, 0.4], [True, True, False, True])
        (array([0.25, 0.5 , 0.75, 1.  ]), array([0.  , 0.  , 0.333..., 0.25 ]))
    """
    u, c = _pair(uncertainty, correct, "uncertainty", "correct")
    order = np.argsort(u, kind="mergesort")
    us, errs = u[order], (~c[order]).astype(np.float64)
    cum_err = np.cumsum(errs)  # (N,)
    last = np.r_[np.flatnonzero(np.diff(us)), len(us) - 1]  # last index of each tie group
    n_acc = last + 1.0
    return n_acc / len(us), cum_err[last] / n_acc


def aurc(uncertainty: ArrayLike, correct: ArrayLike) -> float:
    """Area under the risk-coverage curve (lower = better), ``mean_i risk(coverage = i/N)``.

    Within a tie group the risk is the group's expected value under random tie-breaking, so the
    result does not depend on the sort order of ties.
    """
    u, c = _pair(uncertainty, correct, "uncertainty", "correct")
    order = np.argsort(u, kind="mergesort")
    us, errs = u[order], (~c[order]).astype(np.float64)
    starts = np.r_[0, np.flatnonzero(np.diff(us)) + 1]  # first index of each tie group
    sizes = np.diff(np.r_[starts, len(us)])
    err_before = np.r_[0.0, np.cumsum(errs)][starts]  # errors accepted before each group
    group_err = np.add.reduceat(errs, starts) / sizes  # mean error inside each group
    k = np.arange(1, len(us) + 1)  # number of accepted inputs
    g = np.repeat(np.arange(len(starts)), sizes)  # group of the k-th accepted input
    expected_err = err_before[g] + (k - starts[g]) * group_err[g]  # (N,)
    return float(np.mean(expected_err / k))


def threshold_for_coverage(uncertainty: ArrayLike, coverage: float) -> float:
    """Smallest threshold ``t`` such that ``accept = uncertainty <= t`` accepts >= ``coverage``.

    ``t`` is the ``ceil(coverage * N)``-th smallest uncertainty. Values tied with ``t`` are all
    accepted, so the achieved coverage can exceed the request when scores have ties. Compute it
    on a validation split and store it as the deployed reject threshold.

    Args:
        uncertainty: (N,) HIGH = uncertain.
        coverage: requested fraction of accepted inputs in (0, 1].

    Returns:
        The threshold as a Python float.

    Example::

        >>> threshold_for_coverage([0.4, 0.1, 0.3, 0.2], 0.5)
        0.2
    """
    u = _vector(uncertainty, "uncertainty").astype(np.float64)
    if not np.isfinite(u).all():
        raise ValueError("uncertainty contains NaN or inf")
    c = _check_coverage(coverage)
    k = max(1, math.ceil(c * len(u) - 1e-9))  # number of inputs to accept
    return float(np.sort(u)[k - 1])


def accuracy_at_coverage(uncertainty: ArrayLike, correct: ArrayLike, coverage: float = 0.9) -> float:
    """Accuracy on the ``coverage`` fraction of inputs with the lowest uncertainty.

    Exactly ``k = ceil(coverage * N)`` inputs are accepted. If the cut falls inside a group of
    tied uncertainties, the tied inputs are counted fractionally (the expected accuracy under
    random tie-breaking), so a score with many ties (e.g. a saturated margin) is neither
    rewarded nor punished by the sort order.

    Args:
        uncertainty: (N,) HIGH = uncertain.
        correct: (N,) bool.
        coverage: fraction in (0, 1] (default 0.9). ``coverage=1`` gives the plain accuracy.

    Returns:
        Accuracy as a Python float.

    Example::

        >>> accuracy_at_coverage([0.1, 0.2, 0.3, 0.4], [True, True, True, False], 0.75)
        1.0
    """
    u, c = _pair(uncertainty, correct, "uncertainty", "correct")
    cov = _check_coverage(coverage)
    k = max(1, math.ceil(cov * len(u) - 1e-9))
    t = np.sort(u)[k - 1]
    below, tied = u < t, u == t
    n_below = int(below.sum())
    frac = (k - n_below) / int(tied.sum())  # share of the tie group that is accepted
    n_correct = c[below].sum() + frac * c[tied].sum()
    return float(n_correct / k)
