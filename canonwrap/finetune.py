r"""``fit_head``: fine-tune the new head of a wrapped model (optionally with the canonicalizer) on a
frozen backbone, with any optimizer of :mod:`canonwrap.optim` (SGD, AdamW, SAM, ASAM, SAMAR) and a
clean or robust loss of :mod:`canonwrap.robust` (CE, PGD-AT, TRADES, D2R).

Three ways a batch reaches the loss:

* **cached features** (``cache_features="auto"``/``True``; head only, CE or the feature threat):
  ``z = backbone.features(normalize(canonicalize(x).images))`` is computed ONCE for the dataset
  (no_grad, eval mode, batched) and the head trains on the ``(z, y)`` tensors, so a SAM-family
  optimizer's second pass costs one head forward/backward. With ``augment="group"`` (or
  ``"continuous"``) the features are recomputed at the start of every epoch, each input under a
  fresh random group element (that is the per-epoch augmentation of cached mode);
* **per-batch features** (feature threat with ``cache_features=False``): the same features,
  computed for every batch;
* **pixels** (the input-space threat, ``train_canonicalizer=True`` or ``cache_features=False``):
  every closure call runs the whole wrapped model, ``head(features(normalize(canonicalize(x))))``.

Threat models of the robust losses (recorded in ``History.config["threat"]``):

* ``threat="input"`` (default, the honest one): Linf/L2 balls of radius ``eps`` in [0, 1] pixel
  space around the input; attack gradients flow through the frozen backbone and the
  canonicalizer's warp (the argmax choice itself has no gradient, see the benchmarks' notes);
* ``threat="feature"``: balls of radius ``eps`` *in feature units* around the frozen features
  ``z``; cheap (cached), but a different threat model: robustness to feature perturbations says
  nothing direct about pixel perturbations.

Example::

    >>> import canonwrap as cw
    >>> from canonwrap.finetune import fit_head
    >>> model = cw.wrap("canonwrap:digitnet", group="c4", num_classes=10)
    >>> hist = fit_head(model, (images, labels), epochs=3, optimizer="sam", rho=0.05)
    >>> hist = fit_head(model, (images, labels), loss="trades", eps=0.1, steps=5)  # pixel space
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._registry import unknown_name_message
from .attacks.base import Clamp, check_alpha, check_eps, check_norm, check_steps, eval_mode
from .attacks.pgd import PGD
from .data import as_loader, split_batch
from .losses import prior_loss
from .model import CanonicalizedModel
from .robust import D2R_MODES, cag, d2r_loss, kl_div
from .train import AUGMENTS, History, _augment

LOSSES = ("ce", "pgd_at", "trades", "d2r")
THREATS = ("input", "feature")
GUIDES = ("pretrained", "head")

# Options each loss accepts through ``**loss_kwargs`` (with their defaults).
LOSS_OPTIONS: Dict[str, Dict[str, Any]] = {
    "ce": {},
    "pgd_at": {"norm": "linf", "random_start": True},
    "trades": {"norm": "linf", "beta": 6.0},
    "d2r": {"norm": "linf", "beta": 30.0, "gap_weight": 20.0, "mode": "one_pass", "kl_reduction": "mean",
            "detach_guide": False},
}
PIXEL_EPS = 8 / 255  # default input-space radius (CIFAR's; pass eps=0.1..0.3 for digits)


@dataclass
class FitHeadConfig:
    """Everything :func:`fit_head` used (stored as ``History.config``). ``threat`` is None for CE;
    ``cached`` and ``guide`` are what actually ran (``guide`` may fall back to ``"head"``)."""

    epochs: int = 5
    batch_size: int = 128
    lr: Optional[float] = None
    optimizer: str = "adamw"
    rho: Optional[float] = None
    weight_decay: float = 1e-4
    loss: str = "ce"
    eps: Optional[float] = None
    alpha: Optional[float] = None
    steps: Optional[int] = None
    threat: Optional[str] = "input"
    cache_features: Any = "auto"
    augment: Optional[str] = None
    train_canonicalizer: bool = False
    prior_weight: float = 1.0
    guide: str = "pretrained"
    seed: int = 0
    optimizer_kwargs: Dict[str, Any] = field(default_factory=dict)
    loss_kwargs: Dict[str, Any] = field(default_factory=dict)
    cached: bool = False
    features_given: bool = False
    space: str = "pixels"
    threat_model: str = ""


# ----------------------------------------------------------------------------------------------
# pieces
# ----------------------------------------------------------------------------------------------
class _Out(NamedTuple):
    loss: Tensor
    terms: Dict[str, float]
    clean_logits: Optional[Tensor]  # (B, K) f(x) if the loss computed it
    adv_logits: Optional[Tensor]  # (B, K) f(x') if the loss computed it


class PixelHead(nn.Module):
    """pixels (B, C, H, W) in [0, 1] -> canonicalize -> normalize -> frozen features -> ``head``.

    ``head=None`` uses the pretrained classifier (``model.backbone.logits``). ``differentiable``
    uses the straight-through canonicalization (forward identical, gradients reach the scorer).
    """

    def __init__(self, model: CanonicalizedModel, head: Optional[nn.Module], differentiable: bool = False) -> None:
        super().__init__()
        self.model = model
        self.head = head
        self.differentiable = differentiable

    def forward(self, x: Tensor) -> Tensor:
        images = self.model.canonicalize(x, differentiable=self.differentiable).images  # (B, C, H, W)
        xn = self.model.normalize(images)
        if self.head is None:
            return self.model.backbone.logits(xn)  # (B, K)
        return self.head(self.model.backbone.features(xn))  # (B, K)


@contextlib.contextmanager
def _only_trainable(model: nn.Module, trainable: List[nn.Parameter]) -> Iterator[None]:
    """``requires_grad=False`` on every parameter of ``model`` not in ``trainable`` (restored on exit)."""
    keep = {id(p) for p in trainable}
    saved = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in saved:
            if id(p) not in keep:
                p.requires_grad_(False)
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


@torch.no_grad()
def extract_features(
    model: CanonicalizedModel,
    data: Any,
    batch_size: int = 256,
    augment: str = "none",
    generator: Optional[torch.Generator] = None,
    device: "str | torch.device | None" = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Frozen features of the canonicalized inputs, in eval mode, under no_grad.

    ``z = model.backbone.features(model.normalize(model.canonicalize(g . x).images))`` where ``g`` is
    a random group element per sample (``augment="group"`` / ``"continuous"``, drawn from
    ``generator``) or the identity (``"none"``).

    Args:
        model: a wrapped model. data: labelled Dataset / DataLoader / ``(images, labels)`` tuple.
    Returns:
        ``(features (N, D), labels (N,), elements (N,))`` on the model's device, in data order.
    """
    if augment not in AUGMENTS:
        raise ValueError(unknown_name_message("augment", augment, list(AUGMENTS)))
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    feats, labels, elems = [], [], []
    with eval_mode(model):
        for batch in as_loader(data, batch_size, shuffle=False):
            x, y = split_batch(batch)
            if y is None:
                raise ValueError("feature extraction needs labelled data: (image, label) pairs")
            x = x.to(dev)
            xg, g = _augment(model, x, augment, gen)  # (B, C, H, W), (B,)
            images = model.canonicalize(xg).images  # (B, C, H, W)
            feats.append(model.backbone.features(model.normalize(images)))  # (B, D)
            labels.append(y.to(dev))
            elems.append(g)
    if not feats:
        raise ValueError("feature extraction got an empty dataset")
    return torch.cat(feats), torch.cat(labels), torch.cat(elems)


def head_sharpness(head: nn.Module, features: Tensor, labels: Tensor, rho: float = 0.05,
                   batch_size: int = 4096) -> Dict[str, float]:
    """SAM-style sharpness of a head on fixed features: ``S = f(w + ε) − f(w)``, ε = ρ·g/‖g‖.

    ``f`` = full-batch mean cross-entropy over ``(features (N, D), labels (N,))`` (no weight
    decay), ``g = ∇f(w)`` over all head parameters (global L2 norm). The head is restored exactly.
    Returns ``{"loss": f(w), "loss_perturbed": f(w + ε), "sharpness": S, "grad_norm": ‖g‖}``.
    """
    params = [p for p in head.parameters() if p.requires_grad]
    n = features.shape[0]

    def full_loss() -> Tensor:
        return sum(F.cross_entropy(head(features[i:i + batch_size]), labels[i:i + batch_size], reduction="sum")
                   for i in range(0, n, batch_size)) / n

    with eval_mode(head):
        loss = full_loss()
        grads = torch.autograd.grad(loss, params)
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        saved = [p.detach().clone() for p in params]
        try:
            with torch.no_grad():
                for p, g in zip(params, grads):
                    p.add_(g * (rho / (norm + 1e-12)))
                loss_p = full_loss()
        finally:
            with torch.no_grad():
                for p, s in zip(params, saved):
                    p.copy_(s)
    loss = loss.detach()
    return {"loss": float(loss), "loss_perturbed": float(loss_p), "sharpness": float(loss_p - loss),
            "grad_norm": float(norm)}


def _feature_classifier(model: CanonicalizedModel, probe: Tensor, num_classes: int) -> Optional[nn.Module]:
    """The pretrained classifier as a module on ``backbone.features`` (timm ``get_classifier()``,
    or a ``classifier`` / ``fc`` / ``head`` Linear), if it reproduces ``backbone.logits`` on ``probe``."""
    module = getattr(model.backbone, "module", model.backbone)
    candidates = []
    if hasattr(module, "get_classifier"):
        try:
            candidates.append(module.get_classifier())
        except Exception:  # noqa: BLE001 - a custom get_classifier may not apply
            pass
    candidates += [getattr(module, name, None) for name in ("classifier", "fc", "head")]
    with torch.no_grad(), eval_mode(model):
        xn = model.normalize(model.canonicalize(probe).images)
        feats, logits = model.backbone.features(xn), model.backbone.logits(xn)  # (B, D), (B, K)
        for cand in candidates:
            if isinstance(cand, nn.Linear) and cand.in_features == feats.shape[1] and cand.out_features == num_classes:
                if torch.allclose(cand(feats), logits, rtol=1e-4, atol=1e-4):
                    return cand
    return None


class ShuffledBatches:
    """Batches of indices (lists) over ``range(n)``, a fresh permutation from ``generator`` on every
    pass: the batch order of both the cached and the pixel path (so they see the same batches)."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator) -> None:
        self.n, self.batch_size, self.generator = int(n), int(batch_size), generator

    def __iter__(self) -> Iterator[List[int]]:
        perm = torch.randperm(self.n, generator=self.generator)  # (n,)
        for i in range(0, self.n, self.batch_size):
            yield perm[i:i + self.batch_size].tolist()

    def __len__(self) -> int:
        return (self.n + self.batch_size - 1) // self.batch_size


def _choose(kind: str, value: Any, valid: Tuple[Any, ...]) -> Any:
    key = value.lower() if isinstance(value, str) else value
    if key not in valid:
        raise ValueError(unknown_name_message(kind, value, [str(v) for v in valid]))
    return key


@dataclass
class _Objective:
    """A loss over whatever the batch is (pixels or features): ``generate`` then ``loss``."""

    name: str
    target: Callable[[Tensor], Tensor]  # f, the trained model: inputs -> logits (B, K)
    guide: Optional[Callable[[Tensor], Tensor]]  # g (D2R only)
    eps: float
    alpha: float
    steps: int
    clamp: Clamp
    options: Dict[str, Any]

    def generate(self, x: Tensor, y: Tensor) -> Optional[Tensor]:
        """Adversarial inputs x' (like x, detached), models in eval mode; ``None`` for CE."""
        o = self.options
        if self.name == "pgd_at":
            attack = PGD(self.target, eps=self.eps, alpha=self.alpha, steps=self.steps,
                         random_start=o["random_start"], norm=o["norm"], clamp=self.clamp)
            return attack(x, y)
        if self.name == "trades":  # TRADES' inner max = CAG with guide = target = f
            return cag(self.target, self.target, x, self.eps, self.alpha, self.steps, o["norm"], self.clamp)
        if self.name == "d2r":
            return cag(self.guide, self.target, x, self.eps, self.alpha, self.steps, o["norm"], self.clamp)
        return None

    def loss(self, x: Tensor, y: Tensor, x_adv: Optional[Tensor], stage: Optional[str] = None) -> _Out:
        """The loss at the current weights for fixed ``x_adv`` (so SAM's second pass reuses it)."""
        f, o = self.target, self.options
        if self.name == "ce":
            logits = f(x)  # (B, K)
            ce = F.cross_entropy(logits, y)
            return _Out(ce, {"ce": float(ce.detach())}, logits, None)
        if self.name == "pgd_at":  # Madry: CE(f(x'), y), as canonwrap.robust.pgd_at_loss
            adv = f(x_adv)  # (B, K)
            ce = F.cross_entropy(adv, y)
            return _Out(ce, {"adv_ce": float(ce.detach())}, None, adv)
        if self.name == "trades":  # CE(f(x), y) + beta KL(p_f(x) || p_f(x')), as canonwrap.robust.trades_loss
            nat, adv = f(x), f(x_adv)  # (B, K) each
            natural, robust = F.cross_entropy(nat, y), kl_div(nat, adv, "batchmean")
            return _Out(natural + o["beta"] * robust,
                        {"natural": float(natural.detach()), "robust": float(robust.detach())}, nat, adv)
        out = d2r_loss(self.guide, f, x, y, x_adv, alpha=o["gap_weight"], beta=o["beta"], mode=o["mode"],
                       stage=stage, kl_reduction=o["kl_reduction"], detach_guide=o["detach_guide"])
        terms = {k: v for k, v in out.terms().items() if k != "loss"}
        return _Out(out.loss, terms, None, None)


def _default_lr(optimizer: str, optimizer_kwargs: Dict[str, Any]) -> float:
    base = optimizer if optimizer in ("sgd", "adam", "adamw") else str(optimizer_kwargs.get("base", "sgd")).lower()
    return 0.05 if base == "sgd" else 3e-3


# ----------------------------------------------------------------------------------------------
# fit_head
# ----------------------------------------------------------------------------------------------
def fit_head(
    model: CanonicalizedModel,
    data: Any,
    epochs: int = 5,
    batch_size: int = 128,
    lr: Optional[float] = None,
    optimizer: str = "adamw",
    rho: Optional[float] = None,
    loss: str = "ce",
    eps: Optional[float] = None,
    alpha: Optional[float] = None,
    steps: Optional[int] = None,
    threat: str = "input",
    cache_features: Any = "auto",
    augment: Optional[str] = None,
    train_canonicalizer: bool = False,
    prior_weight: float = 1.0,
    guide: str = "pretrained",
    val_data: Any = None,
    features: Optional[Tuple[Tensor, Tensor]] = None,
    weight_decay: float = 1e-4,
    optimizer_kwargs: Optional[Dict[str, Any]] = None,
    device: "str | torch.device | None" = None,
    seed: int = 0,
    progress: bool = True,
    **loss_kwargs: Any,
) -> History:
    r"""Train the new head (``model.head``) on the frozen backbone with a clean or robust loss.

    The backbone never changes (weights and BatchNorm buffers); the canonicalizer is frozen and in
    eval mode unless ``train_canonicalizer=True``. See the module docstring for the three data
    paths (cached features, per-batch features, pixels) and the two threat models.

    Losses (``loss``), with ``f`` = the head (features) or the wrapped model (pixels):

    * ``"ce"``: CE(f(x), y).
    * ``"pgd_at"`` (Madry et al., 2018): CE(f(x'), y), x' = PGD(eps, alpha, steps, random start).
    * ``"trades"`` (Zhang et al., 2019): CE(f(x), y) + beta·KL(p_f(x) ‖ p_f(x')), x' maximising the
      KL (``beta`` = 6).
    * ``"d2r"`` (Liu et al., 2025): guide g and target f = ``model.head`` share the frozen backbone;
      x' = CAG(g, f); loss = CE(g(x), y) + MSE(f(x'), g(x)) + gap_weight·|KL(p_f(x)‖p_g(x)) −
      KL(p_g(x)‖p_f(x))| + beta·KL(p_f(x')‖p_g(x)) (``gap_weight`` = 20 is the paper's α, renamed
      because ``alpha`` is the attack step; ``beta`` = 30). ``guide="pretrained"`` (default): g is the
      pretrained classifier (``model.backbone.logits``, frozen) when it exists with the head's
      number of classes (it assumes the same label order), else — and with ``guide="head"`` — g is a
      second linear head on the same features, trained jointly (CE and, as released, the other
      terms). ``mode="one_pass"`` (released) or ``"two_stage"`` (adversarial terms step, then clean
      terms step, per batch). ``History.config["guide"]`` says which guide ran.

    With a SAM-family optimizer the attack runs once per batch at w; the second pass at w+ε reuses x'.

    Args:
        model: from ``cw.wrap(..., num_classes=N)`` (needs ``model.head``).
        data: labelled Dataset / DataLoader / ``(images, labels)`` tuple; pixels in [0, 1], upright.
        epochs, batch_size, weight_decay: the usual (cosine LR decay per step, as :func:`canonwrap.fit`).
        lr: default 0.05 for SGD-based optimizers (incl. the SAM family's default base), 3e-3 for
            Adam/AdamW-based ones.
        optimizer: ``"sgd"``, ``"adam"``, ``"adamw"``, ``"sam"``, ``"asam"``, ``"samar"`` (see
            :func:`canonwrap.list_optimizers`); ``rho`` for the SAM family; ``optimizer_kwargs``
            e.g. ``{"base": "adamw"}`` or SAMAR's λ options.
        loss: ``"ce"``, ``"pgd_at"``, ``"trades"``, ``"d2r"``.
        eps, alpha, steps: attack radius, step size and steps of the robust losses. Pixel space:
            eps default 8/255; feature space: eps is required (feature units). alpha default eps/4,
            steps default 10.
        threat: ``"input"`` (pixel space, default) or ``"feature"``; ignored for CE (recorded as None).
        cache_features: ``"auto"`` (cache whenever only the head trains and nothing attacks pixels),
            ``True`` (require it; error if impossible) or ``False`` (naive: recompute per batch).
        augment: ``"none"``, ``"group"``, ``"continuous"`` (a random group element per input, fresh
            each epoch when cached, each batch otherwise). Default: ``"group"`` when
            ``train_canonicalizer`` else ``"none"``.
        train_canonicalizer: also train the canonicalizer (pixel path, straight-through task
            gradient plus ``prior_weight`` × the canonicalization prior towards the applied element).
        guide: ``"pretrained"`` or ``"head"`` (D2R only).
        val_data: labelled data; ``val_upright`` accuracy logged per epoch.
        features: precomputed ``(features (N, D), labels (N,))`` of ``data`` from
            :func:`extract_features` with the current canonicalizer, to reuse them across runs
            (hyperparameter sweeps, seeds); cached mode without augmentation only. ``data`` is still
            used for small probes (D2R's guide check).
        device: where to train (default: where the model is). seed: shuffling, augmentation, attacks.
        progress: progress bars and a line per epoch.
        **loss_kwargs: ``pgd_at``: ``norm``, ``random_start``; ``trades``: ``norm``, ``beta``;
            ``d2r``: ``norm``, ``beta``, ``gap_weight``, ``mode``, ``kl_reduction``, ``detach_guide``.

    Returns:
        :class:`canonwrap.train.History`; per epoch: ``loss``, ``<term>_loss`` (each loss term,
        unweighted), ``train_acc`` (clean, training batches), ``train_adv_acc`` (robust losses),
        ``sharpness`` / ``lam`` (SAM family: mean f(w+ε)−f(w) of the steps, SAMAR's λ),
        ``seconds`` (training, without feature extraction), ``feature_seconds``, ``lr`` and
        ``val_upright`` if ``val_data``. ``config`` holds :class:`FitHeadConfig` (incl. ``threat``,
        ``threat_model``, ``cached``, ``guide``).

    Example::

        >>> model = cw.wrap("canonwrap:digitnet", group="c4", num_classes=10)
        >>> hist = fit_head(model, (x, y), optimizer="samar", rho=0.05, epochs=3)      # cached
        >>> hist = fit_head(model, (x, y), loss="pgd_at", eps=0.1, alpha=0.025, steps=5)
        >>> hist.config["threat"], hist.last["train_adv_acc"]
    """
    if not isinstance(model, CanonicalizedModel):
        raise TypeError(f"fit_head expects a wrapped model from cw.wrap(...); got {type(model).__name__}")
    if model.head is None or not list(model.head.parameters()):
        raise ValueError("fit_head trains model.head, but this model has no new head; wrap with "
                         "cw.wrap(backbone, num_classes=N) (or use cw.fit to train only the canonicalizer)")
    cfg, options = _resolve(FitHeadConfig(
        epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer, rho=rho, weight_decay=weight_decay,
        loss=loss, eps=eps, alpha=alpha, steps=steps, threat=threat, cache_features=cache_features, augment=augment,
        train_canonicalizer=train_canonicalizer, prior_weight=prior_weight, guide=guide, seed=seed,
        optimizer_kwargs=dict(optimizer_kwargs or {}), loss_kwargs=dict(loss_kwargs),
        features_given=features is not None,
    ))
    if features is not None:
        _check_features(features)
    if device is not None:
        model.to(device)
    dev = next(model.parameters()).device
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    objective, trainable, guide_head, cfg.guide = _build_objective(model, cfg, options, data, dev)

    from .optim import create_optimizer

    opt_kwargs = dict(cfg.optimizer_kwargs)
    if rho is not None:
        opt_kwargs["rho"] = rho
    if cfg.optimizer in ("sam", "asam", "samar"):  # BatchNorm statistics updated by the first pass only
        opt_kwargs.setdefault("model", model.head if cfg.space == "features" else model)
    opt = create_optimizer(cfg.optimizer, trainable, lr=cfg.lr, weight_decay=weight_decay, **opt_kwargs)

    # ---------------------------------------------------------------- data: cached features or pixels
    feats = labels = None
    feature_seconds = 0.0
    if cfg.cached and features is not None:
        feats, labels = features[0].to(dev), features[1].to(dev)  # (N, D), (N,)
    elif cfg.cached:
        t0 = time.perf_counter()
        feats, labels, _ = extract_features(model, data, max(batch_size, 256), cfg.augment, gen, dev)  # (N, D), (N,)
        feature_seconds = time.perf_counter() - t0
    if cfg.cached:
        loader: Any = ShuffledBatches(feats.shape[0], batch_size, torch.Generator().manual_seed(seed))
    else:
        loader = _pixel_loader(data, batch_size, seed)
    total = epochs * max(len(loader), 1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    val = None  # cached validation features (the head is all that changes)
    if val_data is not None and cfg.cached:
        val = extract_features(model, val_data, max(batch_size, 256), device=dev)[:2]

    from tqdm.auto import tqdm

    records: List[Dict[str, float]] = []
    with _only_trainable(model, trainable):
        for epoch in range(epochs):
            if cfg.cached and epoch > 0 and cfg.augment != "none":  # fresh group elements each epoch
                t0 = time.perf_counter()
                feats, labels, _ = extract_features(model, data, max(batch_size, 256), cfg.augment, gen, dev)
                feature_seconds = time.perf_counter() - t0
            model.train()
            if not train_canonicalizer:
                model.canonicalizer.eval()  # frozen: its BatchNorm statistics stay fixed
            if guide_head is not None:
                guide_head.train()
            sums: Dict[str, float] = {}
            n_seen = 0
            t0 = time.perf_counter()
            bar = tqdm(loader, total=len(loader), desc=f"epoch {epoch + 1}/{epochs}", disable=not progress, leave=False)
            for batch in bar:
                if cfg.cached:
                    idx = torch.as_tensor(batch, device=feats.device)  # (B,) indices into the cached features
                    xb, y, g = feats[idx], labels[idx], None  # (B, D), (B,)
                else:
                    xb, y, g = _pixel_batch(model, batch, cfg, gen, dev)
                rec = _train_batch(model, objective, opt, xb, y, g, cfg, options)
                sched.step()
                bs = int(y.shape[0])
                n_seen += bs
                for k, v in rec.items():
                    sums[k] = sums.get(k, 0.0) + v * bs
                bar.set_postfix(loss=f"{sums['loss'] / n_seen:.3f}", acc=f"{sums['train_acc'] / n_seen:.3f}")
            out = {k: v / max(n_seen, 1) for k, v in sums.items()}
            out.update(epoch=epoch + 1, seconds=time.perf_counter() - t0, feature_seconds=feature_seconds,
                       lr=opt.param_groups[0]["lr"])
            feature_seconds = 0.0
            if hasattr(opt, "lam"):
                out["lam"] = float(opt.lam)
            if val_data is not None:
                out["val_upright"] = _val_upright(model, val_data, val, batch_size, dev)
            records.append(out)
            if progress:
                shown = {k: round(v, 4) for k, v in out.items() if k != "epoch"}
                tqdm.write(f"epoch {epoch + 1}/{epochs} {shown}")
    model.eval()
    return History(records, asdict(cfg))


# ----------------------------------------------------------------------------------------------
# the pieces of fit_head
# ----------------------------------------------------------------------------------------------
def _resolve(cfg: FitHeadConfig) -> Tuple[FitHeadConfig, Dict[str, Any]]:
    """Check the arguments; return the config with every default filled in and the loss options."""
    from .optim import list_optimizers

    loss = _choose("loss", cfg.loss, LOSSES)
    threat = _choose("threat", cfg.threat, THREATS)
    _choose("guide", cfg.guide, GUIDES)
    if not (isinstance(cfg.cache_features, bool) or cfg.cache_features == "auto"):
        raise ValueError(f"cache_features must be 'auto', True or False; got {cfg.cache_features!r}")
    if not isinstance(cfg.optimizer, str):
        raise TypeError(f"optimizer must be a name (str); got {type(cfg.optimizer).__name__}")
    optimizer = cfg.optimizer.lower()
    if optimizer not in list_optimizers():
        raise ValueError(unknown_name_message("optimizer", optimizer, list_optimizers()))
    for name in ("epochs", "batch_size"):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1; got {value!r}")
    lr = _default_lr(optimizer, cfg.optimizer_kwargs) if cfg.lr is None else cfg.lr
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"lr must be a number > 0; got {lr!r}")

    options = dict(LOSS_OPTIONS[loss])
    unknown = sorted(set(cfg.loss_kwargs) - set(options))
    if unknown:
        raise TypeError(f"loss {loss!r} got unexpected argument(s) {unknown}; it accepts {sorted(options) or 'none'}"
                        " (fit_head's own arguments are epochs, batch_size, lr, optimizer, rho, eps, alpha, steps, "
                        "threat, cache_features, augment, train_canonicalizer, prior_weight, guide, val_data, ...)")
    options.update(cfg.loss_kwargs)
    if "norm" in options:
        options["norm"] = check_norm(options["norm"])
    if loss == "d2r" and options["mode"] not in D2R_MODES:
        raise ValueError(unknown_name_message("D2R mode", options["mode"], list(D2R_MODES)))

    eps, alpha, steps, threat_used = cfg.eps, cfg.alpha, cfg.steps, None
    if loss == "ce":
        if any(v is not None for v in (eps, alpha, steps)):
            raise ValueError("eps/alpha/steps are options of the robust losses (pgd_at, trades, d2r); loss='ce' got "
                             f"eps={eps}, alpha={alpha}, steps={steps}")
    else:
        threat_used = threat
        if eps is None and threat == "feature":
            raise ValueError("threat='feature' needs eps in FEATURE units (the scale of model.backbone.features, "
                             "e.g. a fraction of the features' std); pixel-space defaults do not apply")
        eps = check_eps(PIXEL_EPS if eps is None else eps)
        alpha = check_alpha(alpha if alpha is not None else (eps / 4 if eps > 0 else 1e-3))
        steps = check_steps(steps if steps is not None else 10)
    if cfg.train_canonicalizer and threat_used == "feature":
        raise ValueError("threat='feature' attacks the frozen features, which needs a frozen canonicalizer; "
                         "use threat='input' with train_canonicalizer=True")
    augment = ("group" if cfg.train_canonicalizer else "none") if cfg.augment is None else cfg.augment
    if augment not in AUGMENTS:
        raise ValueError(unknown_name_message("augment", augment, list(AUGMENTS)))
    cacheable = not cfg.train_canonicalizer and threat_used in (None, "feature")
    if cfg.cache_features is True and not cacheable:
        why = "train_canonicalizer=True" if cfg.train_canonicalizer else "the input-space attack needs pixels"
        raise ValueError(f"cache_features=True is impossible here: {why}. Use cache_features='auto'")
    cached = cacheable and cfg.cache_features is not False
    if cfg.features_given and (not cached or augment != "none"):
        raise ValueError("features= (precomputed) needs cached mode without augmentation: only the head trains, "
                         "no input-space attack, cache_features not False, augment='none'")
    resolved = replace(
        cfg, lr=float(lr), optimizer=optimizer, loss=loss, eps=eps, alpha=alpha, steps=steps, threat=threat_used,
        augment=augment, guide=cfg.guide.lower(), cached=cached,
        space="features" if (cached or threat_used == "feature") else "pixels",
        threat_model=_describe_threat(threat_used, options.get("norm"), eps))
    return resolved, options


def _check_features(features: Any) -> None:
    ok = (isinstance(features, (tuple, list)) and len(features) == 2 and all(isinstance(t, Tensor) for t in features)
          and features[0].dim() == 2 and features[1].dim() == 1 and features[0].shape[0] == features[1].shape[0])
    if not ok:
        got = ([tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__ for t in features]
               if isinstance(features, (tuple, list)) else type(features).__name__)
        raise ValueError(f"features must be a (features (N, D), labels (N,)) pair of tensors; got {got}")


def _build_objective(
    model: CanonicalizedModel, cfg: FitHeadConfig, options: Dict[str, Any], data: Any, dev: torch.device
) -> Tuple[_Objective, List[nn.Parameter], Optional[nn.Module], str]:
    """(objective, trainable parameters, the trained guide head or None, the guide actually used)."""
    num_classes = int(model.num_classes)
    trainable = list(model.head.parameters())
    if cfg.train_canonicalizer:
        trainable += list(model.canonicalizer.parameters())
    guide_used, guide_head, pretrained_on_features = cfg.guide, None, None
    if cfg.loss == "d2r":
        probe = _first_images(data, dev)
        if cfg.guide == "pretrained" and model.backbone.pretrained_cfg.num_classes == num_classes:
            if cfg.space == "features":  # the pretrained classifier as a module on the features, if found
                pretrained_on_features = _feature_classifier(model, probe, num_classes)
                guide_used = "pretrained" if pretrained_on_features is not None else "head"
        else:
            guide_used = "head"
        if guide_used == "head":
            dim = model.head.in_features if isinstance(model.head, nn.Linear) else _feature_dim(model, probe)
            guide_head = nn.Linear(dim, num_classes).to(dev)
            trainable += list(guide_head.parameters())
    if cfg.space == "features":
        target: Callable[[Tensor], Tensor] = model.head
        guide_fn: Optional[Callable[[Tensor], Tensor]] = pretrained_on_features
        if guide_head is not None:
            guide_fn = guide_head
        clamp: Clamp = None
    else:
        target = PixelHead(model, model.head, differentiable=cfg.train_canonicalizer)
        guide_fn = PixelHead(model, guide_head) if cfg.loss == "d2r" else None  # head None = pretrained classifier
        clamp = (0.0, 1.0)
    objective = _Objective(cfg.loss, target, guide_fn, float(cfg.eps or 0.0), float(cfg.alpha or 0.0),
                           int(cfg.steps or 0), clamp, options)
    return objective, trainable, guide_head, guide_used


def _pixel_batch(model: CanonicalizedModel, batch: Any, cfg: FitHeadConfig, gen: torch.Generator,
                 dev: torch.device) -> Tuple[Tensor, Tensor, Tensor]:
    """(inputs the loss sees: pixels (B, C, H, W) or per-batch features (B, D), labels (B,), elements (B,))."""
    x, y = split_batch(batch)
    if y is None:
        raise ValueError("feature extraction needs labelled data: (image, label) pairs")
    xg, g = _augment(model, x.to(dev), cfg.augment, gen)  # (B, C, H, W), (B,)
    if cfg.space == "features":  # feature threat without a cache: per-batch features
        with torch.no_grad(), eval_mode(model):
            xg = model.backbone.features(model.normalize(model.canonicalize(xg).images))  # (B, D)
    return xg, y.to(dev), g


def _train_batch(model: CanonicalizedModel, objective: _Objective, opt: torch.optim.Optimizer, xb: Tensor, y: Tensor,
                 g: Optional[Tensor], cfg: FitHeadConfig, options: Dict[str, Any]) -> Dict[str, float]:
    """Attack once (at w), then one optimizer step (two for D2R's two stages); return the batch's stats."""
    x_adv = objective.generate(xb, y)  # None for CE
    stages = ("adv", "clean") if cfg.loss == "d2r" and options["mode"] == "two_stage" else (None,)
    rec: Dict[str, float] = {}
    clean = adv = None
    for stage in stages:
        first: Dict[str, Any] = {}

        def closure() -> Tensor:
            opt.zero_grad(set_to_none=True)
            out = objective.loss(xb, y, x_adv, stage)  # x_adv fixed: SAM's second pass reuses it
            total = out.loss
            terms = dict(out.terms)
            if cfg.train_canonicalizer and cfg.prior_weight:
                prior = prior_loss(model.canonicalizer(model.scorer_input(xb)).scores, g)  # scores (B, G)
                total = total + cfg.prior_weight * prior
                terms["prior"] = float(prior.detach())
            total.backward()
            if not first:  # record the first pass (at w, not at w + eps)
                first.update(terms=terms, clean=out.clean_logits, adv=out.adv_logits)
            return total

        if hasattr(opt, "first_step"):  # SAM family: both passes inside step(closure)
            value = opt.step(closure)
            stats = getattr(opt, "last_stats", None)
            if stats is not None and stats.grad_norm is not None:
                rec["sharpness"] = rec.get("sharpness", 0.0) + float(stats.sharpness)
        else:
            value = closure()
            opt.step()
        rec["loss"] = rec.get("loss", 0.0) + float(value.detach() if isinstance(value, Tensor) else value)
        rec.update({f"{k}_loss": v for k, v in first["terms"].items()})
        clean = first["clean"] if first["clean"] is not None else clean
        adv = first["adv"] if first["adv"] is not None else adv
    if clean is None:
        with torch.no_grad():
            clean = objective.target(xb)  # (B, K)
    rec["train_acc"] = float((clean.detach().argmax(1) == y).float().mean())
    if adv is not None:
        rec["train_adv_acc"] = float((adv.detach().argmax(1) == y).float().mean())
    return rec


# ----------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------
def _describe_threat(threat: Optional[str], norm: Optional[str], eps: Optional[float]) -> str:
    if threat is None:
        return "none (clean training)"
    if threat == "input":
        return f"input space: {norm} ball of radius {eps:g} in [0, 1] pixels, through the whole wrapped model"
    return (f"FEATURE space: {norm} ball of radius {eps:g} in feature units around the frozen backbone's "
            "features (not a pixel-space threat model)")


def _pixel_loader(data: Any, batch_size: int, seed: int) -> Any:
    """A DataLoader in :class:`ShuffledBatches` order (a user's DataLoader is used as it is)."""
    from torch.utils.data import DataLoader

    if isinstance(data, DataLoader):
        return data
    dataset = as_loader(data, batch_size, shuffle=False).dataset  # tuple / tensor -> Dataset
    try:
        n = len(dataset)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError("fit_head needs a sized dataset (len(data)) or a DataLoader") from None
    sampler = ShuffledBatches(n, batch_size, torch.Generator().manual_seed(seed))
    return DataLoader(dataset, batch_sampler=sampler, generator=torch.Generator().manual_seed(seed))


def _first_images(data: Any, dev: torch.device, n: int = 8) -> Tensor:
    x, _ = split_batch(next(iter(as_loader(data, n, shuffle=False))))
    return x[:n].to(dev)


@torch.no_grad()
def _feature_dim(model: CanonicalizedModel, probe: Tensor) -> int:
    with eval_mode(model):
        return int(model.backbone.features(model.normalize(model.canonicalize(probe).images)).shape[1])


@torch.no_grad()
def _val_upright(model: CanonicalizedModel, val_data: Any, cached: Optional[Tuple[Tensor, Tensor]],
                 batch_size: int, dev: torch.device) -> float:
    """Upright accuracy of the wrapped model (from cached validation features when available)."""
    with eval_mode(model):
        if cached is not None:
            vf, vy = cached
            return float((model.head(vf).argmax(1) == vy).float().mean())
        correct = n = 0
        for batch in as_loader(val_data, max(batch_size, 256), shuffle=False):
            x, y = split_batch(batch)
            if y is None:
                raise ValueError("val_data must be labelled: (image, label) pairs")
            correct += int((model(x.to(dev)).argmax(1) == y.to(dev)).sum())
            n += int(y.shape[0])
    return correct / max(n, 1)
