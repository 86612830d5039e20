"""Worst-case and uncertainty evaluation of a wrapped model: the report sections of ``cw.evaluate``.

Average accuracy hides the failures that hurt in production (Hartmann & Richter, 2023). Each
function below computes one section of the report (schema in :mod:`canonwrap.report`) and returns
it as a plain dict; :func:`canonwrap.evaluate` calls them and :func:`canonwrap.report.render_report`
draws them.

==================  =====================================================================
section             what
==================  =====================================================================
angles/per_element  :func:`rotation_sections` -- evaluate's accuracy vs angle and per element
adversarial         :func:`adversarial_section` -- FGSM / PGD through the whole wrapped model
                    vs eps, PGD through the straight-through canonicalizer (a gradient-masking
                    check: the hard argmax passes no gradient to the scores), the per-sample
                    worst case over all attacks, and the group attack (worst element / angle)
corruptions         :func:`corruption_section` -- accuracy per corruption and severity 1..5, and
                    how often the canonicalizer keeps its clean choice of element
calibration         :func:`calibration_section` -- reliability bins, ECE / NLL / Brier before and
                    after temperature scaling (T fitted by :func:`calibrate_temperature` on a
                    validation split and stored in ``model.temperature``)
risk_coverage       :func:`uncertainty_section` -- per score: AUROC for detecting the model's
                    errors, AURC, accuracy at a coverage (default 90%), risk-coverage curves
==================  =====================================================================

Uncertainty scores (HIGH = uncertain), see :data:`SCORES`:

- ``entropy``: predictive entropy of ``softmax(logits / T)``.
- ``max_prob``: ``1 - max_k softmax(logits / T)_k`` (the usual baseline).
- ``canon_margin``: ``1 - (top-1 - top-2 of softmax(orbit scores))``: the canonicalizer is unsure
  of the orientation.
- ``ensemble``: mutual information of the members of an :class:`~canonwrap.ensemble.EnsembleHead`
  (raw member probabilities, no temperature).
- ``mc_dropout``: mutual information of MC-dropout samples of the head (dropout in the head only,
  features computed once).

Every score is judged against the model's own deterministic prediction ``argmax model(x)``.

Example::

    >>> rep = cw.evaluate(model, test, attacks=["fgsm", "pgd", "group"], corruptions=True,
    ...                   uncertainty=True, calibration_data=val, report_dir="runs/eval")
    >>> rep.uncertainty["metrics"]["entropy"]["auroc"], float(model.temperature)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from ._registry import Registry, unknown_name_message
from .ensemble import has_dropout, head_forward, is_ensemble

__all__ = [
    "SCORES",
    "AdversarialConfig",
    "CorruptionConfig",
    "UncertaintyConfig",
    "UncertaintyOutputs",
    "as_adversarial_config",
    "as_corruption_config",
    "as_uncertainty_config",
    "rotation_sections",
    "adversarial_section",
    "corruption_section",
    "calibrate_temperature",
    "predict_uncertainty",
    "calibration_section",
    "uncertainty_section",
    "random_rotation",
    "summary_lines",
    "evaluate_sections",
    "report_dict",
]

SCORES: Registry[str] = Registry("uncertainty score")
for _name, _doc in (
    ("entropy", "predictive entropy of softmax(logits / T)"),
    ("max_prob", "1 - max softmax(logits / T)"),
    ("canon_margin", "1 - (top-1 - top-2) of the softmaxed orbit scores"),
    ("ensemble", "mutual information of the ensemble-head members (needs an EnsembleHead)"),
    ("mc_dropout", "mutual information of MC-dropout samples of the head (needs dropout in the head)"),
):
    SCORES.register(_name)(_doc)

EPS_ATTACKS = ("fgsm", "pgd", "pgd_l2")


# ---------------------------------------------------------------------------------------- configs
@dataclass
class AdversarialConfig:
    """What :func:`adversarial_section` runs.

    attacks: registered attack names (:func:`canonwrap.attacks.list_attacks`); ``fgsm``, ``pgd``,
        ``pgd_l2`` sweep ``eps`` (in each attack's own norm), ``group`` runs the group attack.
    eps: perturbation budgets in [0, 1] pixel units; 0 is the clean accuracy.
    steps: PGD iterations; step size ``alpha = 2.5 * eps / steps`` (Madry et al.) unless given in
        ``attack_kwargs``.
    straight_through: also run PGD through the straight-through canonicalizer (forward = the hard
        choice, backward = softmax gradient into the scores): the plain gradient ignores the choice
        of element, so a gap between the two reveals gradient masking.
    group_angles: rotation angles (degrees) the group attack also tries; ``None``: elements only.
    attack_kwargs: ``{name: {kwarg: value}}`` passed to the attack (e.g. ``{"pgd": {"random_start": False}}``).
    max_samples: attack at most this many inputs (the first ones); ``None`` = all.
    seed: seed of PGD's random start (the global RNG is left untouched).
    """

    attacks: Tuple[str, ...] = ("fgsm", "pgd", "group")
    eps: Tuple[float, ...] = (0.0, 1 / 255, 2 / 255, 4 / 255, 8 / 255, 16 / 255)
    steps: int = 10
    straight_through: bool = True
    group_angles: Optional[Tuple[float, ...]] = tuple(float(a) for a in range(0, 360, 15))
    attack_kwargs: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    max_samples: Optional[int] = 1000
    seed: int = 0


@dataclass
class CorruptionConfig:
    """What :func:`corruption_section` runs: ``corruptions`` (names from
    :func:`canonwrap.corruptions.list_corruptions`; empty = all), ``severities`` (subset of 1..5),
    ``seed`` (noise; batch i uses ``seed + i``)."""

    corruptions: Tuple[str, ...] = ()
    severities: Tuple[int, ...] = (1, 2, 3, 4, 5)
    seed: int = 0


@dataclass
class UncertaintyConfig:
    """What :func:`predict_uncertainty` / :func:`calibration_section` / :func:`uncertainty_section` compute.

    scores: names from :data:`SCORES`; empty = every score the model supports (``ensemble`` needs
        an ensemble head, ``mc_dropout`` dropout in the head); a requested score the model cannot
        give is an error.
    coverage: operating point of "accuracy at coverage" and of the reported threshold, in (0, 1].
    n_bins: equal-width bins of ECE and the reliability diagram.
    mc_samples: MC-dropout samples.
    rotate: rotate every evaluation (and calibration) input by a random angle in [0, 360) -- the
        deployment setting of a canonicalized model; ``False`` uses the inputs as given.
    disagreement: ``"mutual_info"`` or ``"vote"`` (see :func:`canonwrap.metrics.ensemble_disagreement`).
    max_curve_points: risk-coverage curves are thinned to at most this many points in the report.
    seed: seed of the rotations and of the MC-dropout masks.
    """

    scores: Tuple[str, ...] = ()
    coverage: float = 0.9
    n_bins: int = 15
    mc_samples: int = 20
    rotate: bool = True
    disagreement: str = "mutual_info"
    max_curve_points: int = 256
    seed: int = 0


def _from_mapping(cls: type, spec: Mapping[str, Any], what: str) -> Any:
    valid = [f.name for f in fields(cls)]
    for key in spec:
        if key not in valid:
            raise TypeError(unknown_name_message(f"{what} option", key, valid))
    return cls(**dict(spec))


def _names(value: Any, what: str) -> Tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    try:
        names = tuple(value)
    except TypeError:
        raise TypeError(f"{what} must be a name or a sequence of names; got {type(value).__name__} {value!r}") from None
    if not all(isinstance(n, str) for n in names):
        raise TypeError(f"{what} must be names (str); got {names!r}")
    return names


def _coerce(spec: Any, cls: type, what: str, field_name: str) -> Any:
    """``None``/``False`` -> None; ``True`` -> ``cls()``; a config -> a copy; a dict -> its fields;
    a name or list of names -> ``cls(field_name=names)``. Validation is the caller's."""
    if spec is None or spec is False:
        return None
    if spec is True:
        return cls()
    if isinstance(spec, cls):
        return replace(spec)  # normalized copy; the caller's config is not modified
    if isinstance(spec, Mapping):
        return _from_mapping(cls, spec, what)
    return cls(**{field_name: _names(spec, what)})


def as_adversarial_config(spec: Any) -> Optional[AdversarialConfig]:
    """``None``/``False`` -> None; ``True`` -> defaults; a name or list of names -> those attacks;
    a dict -> :class:`AdversarialConfig` fields; a config is validated and returned."""
    cfg = _coerce(spec, AdversarialConfig, "attacks", "attacks")
    if cfg is None:
        return None
    from .attacks import ATTACKS
    from .attacks.base import check_eps, check_steps

    cfg.attacks = tuple(str(a).lower() for a in _names(cfg.attacks, "attacks"))
    if not cfg.attacks:
        raise ValueError("attacks is empty; expected names such as ['fgsm', 'pgd', 'group']")
    for name in cfg.attacks:
        ATTACKS.get(name)  # KeyError with the valid names and the nearest match
        if name not in EPS_ATTACKS + ("group",):
            raise ValueError(f"attack {name!r} is registered but not supported by evaluate; use one of {list(EPS_ATTACKS + ('group',))}")
    for name in cfg.attack_kwargs:
        if name.lower() not in cfg.attacks:
            raise ValueError(f"attack_kwargs has {name!r}, which is not in attacks {list(cfg.attacks)}")
    try:
        cfg.eps = tuple(check_eps(e) for e in cfg.eps)
    except TypeError:
        raise TypeError(f"eps must be a sequence of numbers >= 0; got {cfg.eps!r}") from None
    if not cfg.eps:
        raise ValueError("eps is empty; expected budgets such as (0, 2/255, 8/255)")
    check_steps(cfg.steps)
    if cfg.max_samples is not None and (isinstance(cfg.max_samples, bool) or not isinstance(cfg.max_samples, int) or cfg.max_samples < 1):
        raise ValueError(f"max_samples must be None or an int >= 1; got {cfg.max_samples!r}")
    if cfg.group_angles is not None:
        cfg.group_angles = tuple(float(a) for a in cfg.group_angles)
    return cfg


def as_corruption_config(spec: Any) -> Optional[CorruptionConfig]:
    """``None``/``False`` -> None; ``True`` -> all corruptions; names / dict / config as for attacks."""
    cfg = _coerce(spec, CorruptionConfig, "corruptions", "corruptions")
    if cfg is None:
        return None
    from .corruptions import CORRUPTIONS, SEVERITIES, list_corruptions

    names = tuple(str(c).lower() for c in _names(cfg.corruptions, "corruptions")) or tuple(list_corruptions())
    for name in names:
        CORRUPTIONS.get(name)  # KeyError with the valid names and the nearest match
    cfg.corruptions = names
    sev = tuple(cfg.severities)
    if not sev or any(isinstance(s, bool) or not isinstance(s, int) or s not in SEVERITIES for s in sev):
        raise ValueError(f"severities must be a non-empty sequence of ints in {list(SEVERITIES)}; got {cfg.severities!r}")
    cfg.severities = sev
    return cfg


def as_uncertainty_config(spec: Any) -> Optional[UncertaintyConfig]:
    """``None``/``False`` -> None; ``True`` -> defaults; a score name or list of names; a dict of
    :class:`UncertaintyConfig` fields; a config (validated)."""
    cfg = _coerce(spec, UncertaintyConfig, "uncertainty scores", "scores")
    if cfg is None:
        return None
    cfg.scores = tuple(str(s).lower() for s in _names(cfg.scores, "scores"))
    for name in cfg.scores:
        SCORES.get(name)
    c = cfg.coverage
    if isinstance(c, bool) or not isinstance(c, (int, float)) or not (0.0 < float(c) <= 1.0):
        raise ValueError(f"coverage must be a number in (0, 1]; got {c!r}")
    if isinstance(cfg.n_bins, bool) or not isinstance(cfg.n_bins, int) or cfg.n_bins < 1:
        raise ValueError(f"n_bins must be an int >= 1; got {cfg.n_bins!r}")
    if isinstance(cfg.mc_samples, bool) or not isinstance(cfg.mc_samples, int) or cfg.mc_samples < 2:
        raise ValueError(f"mc_samples must be an int >= 2; got {cfg.mc_samples!r}")
    if cfg.disagreement not in ("mutual_info", "vote"):
        raise ValueError(f"disagreement must be 'mutual_info' or 'vote'; got {cfg.disagreement!r}")
    return cfg


def available_scores(model: Any) -> List[str]:
    """The scores ``model`` supports (``ensemble`` / ``mc_dropout`` depend on its head)."""
    names = ["entropy", "max_prob", "canon_margin"]
    if is_ensemble(model.head):
        names.append("ensemble")
    if has_dropout(model.head):
        names.append("mc_dropout")
    return names


def resolve_scores(model: Any, cfg: UncertaintyConfig) -> List[str]:
    """The scores to compute: ``cfg.scores`` (each must be supported) or all supported ones."""
    have = available_scores(model)
    if not cfg.scores:
        return have
    for name in cfg.scores:
        if name not in have:
            need = "an EnsembleHead (model.head = canonwrap.ensemble.fit_ensemble(model, data))" if name == "ensemble" else (
                "dropout in the head (canonwrap.ensemble.add_mc_dropout, or fit_ensemble(..., dropout=p))")
            raise ValueError(f"uncertainty score {name!r} needs {need}; this model supports {have}")
    return list(cfg.scores)


# ---------------------------------------------------------------------------------------- helpers
def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def random_rotation(x: Tensor, seed: int = 0) -> Tuple[Tensor, Tensor]:
    """Rotate each image by its own uniform random angle in [0, 360) (bilinear, zeros outside).

    x (N, C, H, W) in [0, 1] -> (rotated (N, C, H, W) in [0, 1], angles (N,) degrees). Seeded; the
    global RNG is not touched.
    """
    from .groups import rotate

    gen = torch.Generator().manual_seed(seed)
    angles = torch.rand(x.shape[0], generator=gen) * 360.0  # (N,)
    return rotate(x, angles.to(x.device)).clamp(0, 1), angles


@torch.no_grad()
def _predict(model: Any, x: Tensor, batch_size: int) -> Tuple[Tensor, Tensor]:
    """(predictions (N,), chosen elements (N,)) on CPU."""
    dev = _device(model)
    preds, elems = [], []
    for i in range(0, x.shape[0], batch_size):
        out = model.canonicalize(x[i : i + batch_size].to(dev))
        preds.append(model.head_logits(model.normalize(out.images)).argmax(1).cpu())
        elems.append(out.index.cpu())
    return torch.cat(preds), torch.cat(elems)


def _thin(cov: np.ndarray, risk: np.ndarray, n: int) -> Tuple[np.ndarray, np.ndarray]:
    if len(cov) <= n:
        return cov, risk
    idx = np.unique(np.linspace(0, len(cov) - 1, n).round().astype(int))  # keeps the first and last
    return cov[idx], risk[idx]


def _mean(t: Tensor) -> float:
    return float(t.float().mean()) if t.numel() else float("nan")


# ---------------------------------------------------------------------------------- rotations
def rotation_sections(report: Any) -> Dict[str, Dict[str, Any]]:
    """``angles`` and ``per_element`` sections from an :class:`~canonwrap.evaluate.EvalReport`
    (evaluate's own numbers; wrapped and, when evaluated, frozen)."""
    series = [("wrapped", report.wrapped)] + ([("frozen", report.frozen)] if report.frozen is not None else [])
    out: Dict[str, Dict[str, Any]] = {}
    if report.wrapped.angles:
        out["angles"] = {"angles": list(report.wrapped.angles), "accuracy": {n: list(m.angle_acc) for n, m in series}}
    metrics = {}
    for n, m in series:
        row = {"upright": m.upright, "worst element": min(m.per_element), **{f"{k.upper()}-avg": v for k, v in m.group_avg.items()}}
        if m.angle_acc:
            row.update({"angle-avg": m.angle_avg, "worst angle": m.angle_min})
        metrics[n] = row
    out["per_element"] = {"elements": list(report.elements), "accuracy": {n: list(m.per_element) for n, m in series}, "metrics": metrics}
    return out


# -------------------------------------------------------------------------------- adversarial
class StraightThrough(nn.Module):
    """The wrapped model with a straight-through canonicalizer: same forward values as ``model(x)``,
    but the backward pass also flows through ``softmax(scores)`` into the choice of element.
    Builds the whole orbit (B, |G|, C, H, W): use moderate batches for large images."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        out = self.model.canonicalize(x, differentiable=True)
        return self.model.head_logits(self.model.normalize(out.images))  # (B, K)


def _attack_kwargs(name: str, eps: float, cfg: AdversarialConfig) -> Dict[str, Any]:
    kw: Dict[str, Any] = {"eps": eps}
    if name in ("pgd", "pgd_l2"):
        kw.update(steps=cfg.steps, alpha=2.5 * eps / cfg.steps)
    kw.update(cfg.attack_kwargs.get(name, {}))
    return kw


def _attack_correct(attack: Any, model: Any, x: Tensor, y: Tensor, batch_size: int) -> Tensor:
    dev = _device(model)
    correct = []
    for i in range(0, x.shape[0], batch_size):
        xb, yb = x[i : i + batch_size].to(dev), y[i : i + batch_size].to(dev)
        x_adv = attack(xb, yb)
        with torch.no_grad():
            correct.append((model(x_adv).argmax(1) == yb).cpu())
    return torch.cat(correct)


def adversarial_section(
    model: Any, x: Tensor, y: Tensor, config: Any = True, batch_size: int = 256
) -> Dict[str, Any]:
    """Adversarial accuracy vs eps through the whole wrapped model, plus the group attack.

    Args:
        model: a wrapped model.
        x: (N, C, H, W) pixels in [0, 1]; y: (N,) labels (the first ``max_samples`` are attacked).
        config: anything :func:`as_adversarial_config` accepts.
    Returns:
        The ``adversarial`` section: ``eps``, ``accuracy`` ``{attack: [P]}`` (plus
        ``"pgd (straight-through)"`` and ``"worst"`` = correct under every attack), ``norm``,
        ``metrics`` (a table; the group attack row), ``group_attack`` (clean / all-elements /
        all-angles / worst-case accuracy and how often each element was the worst),
        ``masking_gap`` (max over eps of PGD minus straight-through PGD accuracy), ``n``.
    """
    from .attacks import create_attack
    from .attacks.group import GroupAttack

    cfg = as_adversarial_config(config)
    if cfg is None:
        raise ValueError("adversarial_section needs a config (got None/False)")
    n = x.shape[0] if cfg.max_samples is None else min(cfg.max_samples, x.shape[0])
    x, y = x[:n], y[:n]
    was_training = model.training
    model.eval()
    out: Dict[str, Any] = {"eps": list(cfg.eps), "accuracy": {}, "n": int(n)}
    try:
        clean = (_predict(model, x, batch_size)[0] == y)  # (N,)
        eps_attacks = [a for a in cfg.attacks if a in EPS_ATTACKS]
        runs: List[Tuple[str, str, Any]] = [(a, a, model) for a in eps_attacks]
        if cfg.straight_through and "pgd" in eps_attacks:
            runs.append(("pgd (straight-through)", "pgd", StraightThrough(model)))
        worst: List[Tensor] = [clean.clone() for _ in cfg.eps]
        with torch.random.fork_rng(devices=[_device(model)] if _device(model).type == "cuda" else []):
            torch.manual_seed(cfg.seed)
            for label, name, target in runs:
                accs = []
                for k, eps in enumerate(cfg.eps):
                    if eps == 0:
                        correct = clean
                    else:
                        attack = create_attack(name, target, **_attack_kwargs(name, eps, cfg))
                        correct = _attack_correct(attack, model, x, y, batch_size)
                    worst[k] &= correct
                    accs.append(_mean(correct))
                out["accuracy"][label] = accs
        if runs:
            out["accuracy"]["worst"] = [_mean(w) for w in worst]
        out["norm"] = "linf" if "pgd_l2" not in eps_attacks else ("l2" if eps_attacks == ["pgd_l2"] else "linf (fgsm, pgd) / l2 (pgd_l2)")
        if "pgd (straight-through)" in out["accuracy"]:
            gaps = [a - b for a, b in zip(out["accuracy"]["pgd"], out["accuracy"]["pgd (straight-through)"])]
            out["masking_gap"] = max(gaps)
        if "group" in cfg.attacks:
            out["group_attack"] = _group_attack(model, x, y, cfg, batch_size, GroupAttack)
            g = out["group_attack"]
            out["metrics"] = {"group attack": {k: g[k] for k in ("clean", "all elements", "all angles", "worst case") if g.get(k) is not None}}
    finally:
        model.train(was_training)
    if not out["accuracy"]:  # group attack only: no eps curve, keep the section renderable
        out["accuracy"] = {"clean": [_mean(clean)] * len(cfg.eps)}
    return out


def _group_attack(model: Any, x: Tensor, y: Tensor, cfg: AdversarialConfig, batch_size: int, cls: Any) -> Dict[str, Any]:
    dev = _device(model)
    attack = cls(model, group=model.group, angles=cfg.group_angles)
    keys = ("correct_clean", "correct_group", "correct_angles", "correct")
    acc: Dict[str, List[Tensor]] = {k: [] for k in keys}
    worst = []
    for i in range(0, x.shape[0], batch_size):
        res = attack.evaluate(x[i : i + batch_size].to(dev), y[i : i + batch_size].to(dev))
        for k in keys:
            if getattr(res, k) is not None:
                acc[k].append(getattr(res, k).cpu())
        worst.append(res.worst_element.cpu())
    counts = torch.bincount(torch.cat(worst), minlength=model.group.order)
    names = [model.group.describe(e) for e in range(model.group.order)]
    return {
        "clean": _mean(torch.cat(acc["correct_clean"])),
        "all elements": _mean(torch.cat(acc["correct_group"])),
        "all angles": _mean(torch.cat(acc["correct_angles"])) if acc["correct_angles"] else None,
        "worst case": _mean(torch.cat(acc["correct"])),
        "angles": list(cfg.group_angles) if cfg.group_angles is not None else None,
        "worst_element_share": {n: int(c) / max(int(counts.sum()), 1) for n, c in zip(names, counts)},
    }


# -------------------------------------------------------------------------------- corruptions
def corruption_section(model: Any, x: Tensor, y: Tensor, config: Any = True, batch_size: int = 256) -> Dict[str, Any]:
    """Accuracy under each corruption and severity (:mod:`canonwrap.corruptions`).

    Returns the ``corruptions`` section: ``severities``, ``accuracy`` ``{name: [S]}``, ``clean``,
    ``element_agreement`` ``{name: [S]}`` (fraction of inputs for which the canonicalizer picks the
    same element as on the clean input) and a ``metrics`` table (mean accuracy, accuracy at the
    highest severity, mean element agreement).
    """
    from .corruptions import apply_corruption

    cfg = as_corruption_config(config)
    if cfg is None:
        raise ValueError("corruption_section needs a config (got None/False)")
    dev = _device(model)
    was_training = model.training
    model.eval()
    try:
        clean_pred, clean_elem = _predict(model, x, batch_size)
        acc: Dict[str, List[float]] = {}
        agree: Dict[str, List[float]] = {}
        for name in cfg.corruptions:
            acc[name], agree[name] = [], []
            for sev in cfg.severities:
                correct, same = [], []
                for b, i in enumerate(range(0, x.shape[0], batch_size)):
                    xc = apply_corruption(name, x[i : i + batch_size].to(dev), sev, seed=cfg.seed + b)
                    with torch.no_grad():
                        out = model.canonicalize(xc)
                        pred = model.head_logits(model.normalize(out.images)).argmax(1).cpu()
                    correct.append(pred == y[i : i + batch_size])
                    same.append(out.index.cpu() == clean_elem[i : i + batch_size])
                acc[name].append(_mean(torch.cat(correct)))
                agree[name].append(_mean(torch.cat(same)))
    finally:
        model.train(was_training)
    top = max(cfg.severities)
    metrics = {
        name: {"mean": float(np.mean(acc[name])), f"severity {top}": acc[name][cfg.severities.index(top)],
               "element agreement": float(np.mean(agree[name]))}
        for name in cfg.corruptions
    }
    return {"severities": list(cfg.severities), "accuracy": acc, "clean": _mean(clean_pred == y),
            "element_agreement": agree, "metrics": metrics}


# ------------------------------------------------------------------------ calibration / scores
@dataclass
class UncertaintyOutputs:
    """Per-input outputs of :func:`predict_uncertainty` (CPU tensors).

    logits (N, K) raw; temperature T used for probabilities; pred (N,) = argmax logits;
    element (N,) chosen group element; scores ``{name: (N,)}`` HIGH = uncertain.
    """

    logits: Tensor
    temperature: float
    pred: Tensor
    element: Tensor
    scores: Dict[str, Tensor]

    @property
    def probs(self) -> Tensor:
        return (self.logits.double() / self.temperature).softmax(-1)  # (N, K)


@torch.no_grad()
def predict_uncertainty(
    model: Any,
    x: Tensor,
    config: Any = True,
    batch_size: int = 256,
    temperature: Optional[float] = None,
) -> UncertaintyOutputs:
    """Logits and every requested uncertainty score, one canonicalizer + backbone pass per batch.

    Args:
        model: a wrapped model (eval mode is used; modes are restored).
        x: (N, C, H, W) pixels in [0, 1], used as given (rotate them first if wanted:
            :func:`random_rotation`; ``config.rotate`` is applied by ``evaluate``, not here).
        config: anything :func:`as_uncertainty_config` accepts.
        temperature: T for the probabilities (default: ``model.temperature``).
    Returns:
        :class:`UncertaintyOutputs`.
    """
    from .metrics import canon_margin, ensemble_disagreement, mc_dropout_predict, predictive_entropy

    cfg = as_uncertainty_config(config)
    if cfg is None:
        raise ValueError("predict_uncertainty needs a config (got None/False)")
    names = resolve_scores(model, cfg)
    t = float(model.temperature) if temperature is None else float(temperature)
    if not (math.isfinite(t) and t > 0):
        raise ValueError(f"temperature must be a finite number > 0; got {t}")
    dev = _device(model)
    was_training = model.training
    model.eval()
    logits_all, elems, scores = [], [], {n: [] for n in names}
    try:
        for b, i in enumerate(range(0, x.shape[0], batch_size)):
            out = model.canonicalize(x[i : i + batch_size].to(dev))
            logits, feats, members = head_forward(model, model.normalize(out.images))  # (B, K), (B, D), (M, B, K)
            probs = (logits.double() / t).softmax(-1)  # (B, K)
            if "entropy" in scores:
                scores["entropy"].append(predictive_entropy(probs).cpu())
            if "max_prob" in scores:
                scores["max_prob"].append((1 - probs.max(-1).values).cpu())
            if "canon_margin" in scores:
                scores["canon_margin"].append((1 - canon_margin(out.scores.double())).cpu())
            if "ensemble" in scores:
                scores["ensemble"].append(ensemble_disagreement(members.double().softmax(-1), cfg.disagreement).cpu())
            if "mc_dropout" in scores:
                samples = mc_dropout_predict(model.head, feats, cfg.mc_samples, module=model.head, seed=cfg.seed + b)  # (S, B, K)
                scores["mc_dropout"].append(ensemble_disagreement(samples.double(), cfg.disagreement).cpu())
            logits_all.append(logits.float().cpu())
            elems.append(out.index.cpu())
    finally:
        model.train(was_training)
    logits = torch.cat(logits_all)
    return UncertaintyOutputs(logits, t, logits.argmax(1), torch.cat(elems), {n: torch.cat(v).float() for n, v in scores.items()})


@torch.no_grad()
def _collect_logits(model: Any, x: Tensor, batch_size: int) -> Tensor:
    dev = _device(model)
    out = []
    for i in range(0, x.shape[0], batch_size):
        out.append(model(x[i : i + batch_size].to(dev)).float().cpu())
    return torch.cat(out)


def calibrate_temperature(
    model: Any, data: Any, rotate: bool = True, seed: int = 1, batch_size: int = 256, **fit_kwargs: Any
) -> float:
    """Fit the temperature on a validation split and store it in ``model.temperature``.

    T minimizes the NLL of ``softmax(logits / T)`` (Guo et al., 2017; golden-section search,
    :func:`canonwrap.metrics.fit_temperature`). It is a buffer of the model, so ``model.save`` /
    ``cw.load`` and ``export_onnx(uncertainty=True)`` keep it; ``model(x)`` still returns raw logits.

    Args:
        model: a wrapped model (modified: its ``temperature`` buffer).
        data: labelled validation data (Dataset / DataLoader / (images, labels)); NOT the test set.
        rotate: rotate each input by a random angle first (match the deployment setting).
        seed: seed of those rotations.
        **fit_kwargs: ``t_min``, ``t_max``, ``tol``, ``max_iter`` of ``fit_temperature``.
    Returns:
        The fitted temperature, as stored (float32).

    Example::
        >>> T = calibrate_temperature(model, (val_x, val_y)); model.save("ckpt")
    """
    from .evaluate import _collect
    from .metrics import fit_temperature

    x, y = _collect(data, batch_size)
    if rotate:
        x, _ = random_rotation(x, seed)
    was_training = model.training
    model.eval()
    try:
        logits = _collect_logits(model, x, batch_size)
    finally:
        model.train(was_training)
    model.temperature.fill_(fit_temperature(logits, y, **fit_kwargs))
    return float(model.temperature)  # the stored (float32) value


def _calibration_row(probs: Tensor, y: Tensor, logits_t: Tensor, n_bins: int, t: float) -> Dict[str, float]:
    from .metrics import brier, ece, nll

    return {"ece": ece(probs, y, n_bins), "nll": nll(logits_t, y, kind="logits"), "brier": brier(probs, y),
            "accuracy": _mean(probs.argmax(1) == y), "temperature": t}


def calibration_section(outputs: UncertaintyOutputs, y: Tensor, n_bins: int = 15) -> Dict[str, Any]:
    """Reliability bins and ECE / NLL / Brier before (T = 1) and after temperature scaling
    (``outputs.temperature``; only "T = 1" when it is 1). Returns the ``calibration`` section."""
    from .metrics import reliability_bins

    z = outputs.logits.double()  # (N, K)
    rows = [(1.0, "before (T = 1)")]
    if abs(outputs.temperature - 1.0) > 1e-9:
        rows.append((outputs.temperature, f"after (T = {outputs.temperature:.3g})"))
    else:
        rows = [(1.0, "T = 1")]
    bins, metrics = {}, {}
    for t, label in rows:
        probs = (z / t).softmax(-1)
        bins[label] = reliability_bins(probs, y, n_bins)
        metrics[label] = _calibration_row(probs, y, z / t, n_bins, t)
    return {"bins": bins, "metrics": metrics, "n_bins": n_bins}


def uncertainty_section(outputs: UncertaintyOutputs, y: Tensor, coverage: float = 0.9, max_curve_points: int = 256) -> Dict[str, Any]:
    """Error detection and selective prediction per score. Returns the ``risk_coverage`` section:
    ``curves`` ``{score: {coverage, risk}}`` and ``metrics`` ``{score: {auroc, aurc,
    acc@<coverage>, threshold@<coverage>}}`` plus ``accuracy`` (all inputs), ``coverage``, ``n``.
    ``threshold@c`` is the score value that accepts a fraction c of THESE inputs (compute a deployed
    threshold on validation data: :func:`converters.uncertainty.reject_threshold`)."""
    from .metrics import accuracy_at_coverage, aurc, auroc, risk_coverage, threshold_for_coverage

    if isinstance(coverage, bool) or not isinstance(coverage, (int, float)) or not (0.0 < float(coverage) <= 1.0):
        raise ValueError(f"coverage must be a number in (0, 1]; got {coverage!r}")
    correct = (outputs.pred == y).numpy()  # (N,)
    tag = f"{100 * coverage:g}%"
    curves, metrics = {}, {}
    for name, s in outputs.scores.items():
        cov, risk = risk_coverage(s, correct)
        cov, risk = _thin(cov, risk, max_curve_points)
        curves[name] = {"coverage": cov.tolist(), "risk": risk.tolist()}
        metrics[name] = {"auroc": auroc(s, ~correct), "aurc": aurc(s, correct),
                         f"acc@{tag}": accuracy_at_coverage(s, correct, coverage),
                         f"threshold@{tag}": threshold_for_coverage(s, coverage)}
    return {"curves": curves, "metrics": metrics, "accuracy": float(correct.mean()), "coverage": float(coverage),
            "n": int(len(correct))}


# ------------------------------------------------------------------------------------ summary
def summary_lines(report: Any) -> List[str]:
    """Printable lines for the worst-case / uncertainty sections of an EvalReport (empty if none)."""
    lines: List[str] = []
    adv = getattr(report, "adversarial", None)
    if adv:
        for name, accs in adv["accuracy"].items():
            pts = ", ".join(f"{e:.3g}:{100 * a:.1f}%" for e, a in zip(adv["eps"], accs))
            lines.append(f"adversarial {name:<24} eps->acc {pts}")
        if adv.get("masking_gap") is not None:
            lines.append(f"gradient-masking check: max(PGD - straight-through PGD) = {100 * adv['masking_gap']:.1f} points")
        g = adv.get("group_attack")
        if g:
            lines.append(f"group attack: clean {100 * g['clean']:.1f}%, all elements {100 * g['all elements']:.1f}%, "
                         f"worst case {100 * g['worst case']:.1f}%")
    cor = getattr(report, "corruptions", None)
    if cor:
        for name, accs in cor["accuracy"].items():
            lines.append(f"corruption {name:<16} severity->acc " + ", ".join(f"{s}:{100 * a:.1f}%" for s, a in zip(cor["severities"], accs)))
    cal = getattr(report, "calibration", None)
    if cal:
        for label, m in cal["metrics"].items():
            lines.append(f"calibration {label:<18} ECE {m['ece']:.4f}  NLL {m['nll']:.4f}  Brier {m['brier']:.4f}")
    unc = getattr(report, "uncertainty", None)
    if unc:
        for name, m in unc["metrics"].items():
            acc_key = next(k for k in m if k.startswith("acc@"))
            lines.append(f"uncertainty {name:<13} AUROC {m['auroc']:.3f}  AURC {m['aurc']:.4f}  {acc_key} {100 * m[acc_key]:.1f}%")
    return lines


# ------------------------------------------------------------------------- evaluate's driver
def evaluate_sections(
    model: Any,
    x: Tensor,
    y: Tensor,
    attacks: Optional[AdversarialConfig] = None,
    corruptions: Optional[CorruptionConfig] = None,
    uncertainty: Optional[UncertaintyConfig] = None,
    calibration_data: Any = None,
    batch_size: int = 256,
) -> Dict[str, Any]:
    """Run the requested sections on test inputs ``x`` (N, C, H, W) / ``y`` (N,).

    With ``calibration_data`` the temperature is fitted on it first and stored in the model
    (:func:`calibrate_temperature`). Returns ``{"adversarial", "corruptions", "calibration",
    "uncertainty", "meta"}`` entries for the sections that ran (the fields of EvalReport).
    """
    out: Dict[str, Any] = {}
    meta: Dict[str, Any] = {}
    if calibration_data is not None and uncertainty is None:
        uncertainty = UncertaintyConfig()
    if attacks is not None:
        out["adversarial"] = adversarial_section(model, x, y, attacks, batch_size)
    if corruptions is not None:
        out["corruptions"] = corruption_section(model, x, y, corruptions, batch_size)
    if uncertainty is not None:
        if calibration_data is not None:
            meta["temperature_fitted_on"] = "calibration_data" + (" (randomly rotated)" if uncertainty.rotate else "")
            calibrate_temperature(model, calibration_data, rotate=uncertainty.rotate, seed=uncertainty.seed + 1, batch_size=batch_size)
        xu = random_rotation(x, uncertainty.seed)[0] if uncertainty.rotate else x
        res = predict_uncertainty(model, xu, uncertainty, batch_size)
        out["calibration"] = calibration_section(res, y, uncertainty.n_bins)
        out["uncertainty"] = uncertainty_section(res, y, uncertainty.coverage, uncertainty.max_curve_points)
        inputs = "test set, each input rotated by a random angle" if uncertainty.rotate else "test set as given"
        out["calibration"]["inputs"] = out["uncertainty"]["inputs"] = inputs
        meta["uncertainty_inputs"] = inputs
    meta["temperature"] = float(model.temperature)
    out["meta"] = meta
    return out


def report_dict(report: Any, title: Optional[str] = None) -> Dict[str, Any]:
    """An EvalReport as the dict :func:`canonwrap.report.render_report` draws (schema there)."""
    w = report.wrapped
    g = report.group
    summary: Dict[str, Any] = {"upright_acc": w.upright, f"{g}_avg_acc": w.group_avg.get(g),
                               "c4_avg_acc": w.group_avg.get("c4"), "c8_avg_acc": w.group_avg.get("c8"),
                               "worst_element_acc": min(w.per_element)}
    if w.angle_acc:
        summary.update(angle_avg_acc=w.angle_avg, worst_angle_acc=w.angle_min)
    if report.frozen is not None:
        summary.update(frozen_upright_acc=report.frozen.upright, frozen_c8_avg_acc=report.frozen.group_avg.get("c8"))
    rep: Dict[str, Any] = {
        "title": title or f"canonwrap report ({g.upper()})",
        "meta": {"group": g, "n_test": report.n, "elements": len(report.elements), **(report.meta or {})},
        "summary": summary,
    }
    rep.update(rotation_sections(report))
    adv = report.adversarial
    if adv:
        rep["adversarial"] = adv
        top = max(range(len(adv["eps"])), key=lambda k: adv["eps"][k])
        key = "worst" if "worst" in adv["accuracy"] else next(iter(adv["accuracy"]))
        summary[f"adversarial_acc@eps={adv['eps'][top]:.4g}"] = adv["accuracy"][key][top]
        if adv.get("masking_gap") is not None:
            summary["masking_gap"] = adv["masking_gap"]
        if adv.get("group_attack"):
            summary["group_attack_acc"] = adv["group_attack"]["worst case"]
    cor = report.corruptions
    if cor:
        rep["corruptions"] = cor
        summary["corruption_mean_acc"] = float(np.mean([a for accs in cor["accuracy"].values() for a in accs]))
        summary[f"corruption_severity{max(cor['severities'])}_acc"] = float(np.mean([m[f"severity {max(cor['severities'])}"] for m in cor["metrics"].values()]))
    cal = report.calibration
    if cal:
        rep["calibration"] = cal
        for label, m in cal["metrics"].items():
            summary[f"ece {label}"] = m["ece"]
    unc = report.uncertainty
    if unc:
        rep["risk_coverage"] = unc
        for name, m in unc["metrics"].items():
            summary[f"auroc {name}"] = m["auroc"]
        tag = f"acc@{100 * unc['coverage']:g}%"
        best = max(unc["metrics"], key=lambda n: unc["metrics"][n][tag])
        summary[f"{tag} (best: {best})"] = unc["metrics"][best][tag]
    return rep
