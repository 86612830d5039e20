"""``fit``: train the canonicalizer (and a new head, if any); the backbone stays frozen."""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .canonicalizers import orbit_contrastive_loss
from .data import as_loader, split_batch
from .groups import rotate, transform
from .losses import model_prior_target, prior_loss
from .model import CanonicalizedModel

AUGMENTS = ("group", "continuous", "none")


@dataclass
class FitConfig:
    """Hyperparameters of :func:`fit` (see its docstring)."""

    epochs: int = 5
    batch_size: int = 64
    lr: float = 1e-3
    optimizer: str = "adamw"
    rho: Optional[float] = None
    weight_decay: float = 1e-4
    prior_weight: float = 1.0
    task_weight: Optional[float] = None
    model_prior_weight: float = 0.0
    model_prior_temperature: float = 0.1
    contrastive_weight: float = 0.0
    augment: str = "group"
    jitter: int = 0
    train_head: bool = True
    seed: int = 0
    optimizer_kwargs: Dict[str, Any] = field(default_factory=dict)


@dataclass
class History:
    """Per-epoch records (dicts of floats) and the configuration used."""

    epochs: List[Dict[str, float]]
    config: Dict[str, Any]

    @property
    def last(self) -> Dict[str, float]:
        return self.epochs[-1] if self.epochs else {}

    def to_dict(self) -> Dict[str, Any]:
        return {"epochs": self.epochs, "config": self.config}


def _shift(x: Tensor, max_px: int, gen: torch.Generator) -> Tensor:
    """Random integer translation per sample (zeros enter at the border). x (B, C, H, W)."""
    b, _, h, w = x.shape
    d = torch.randint(-max_px, max_px + 1, (b, 2), generator=gen).to(x.device).float()  # (B, 2) pixels
    theta = torch.zeros(b, 2, 3, device=x.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, 0, 2] = -2 * d[:, 0] / max(w - 1, 1)
    theta[:, 1, 2] = -2 * d[:, 1] / max(h - 1, 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=True)
    return F.grid_sample(x, grid.to(x.dtype), mode="nearest", padding_mode="zeros", align_corners=True)


def _augment(model: CanonicalizedModel, x: Tensor, mode: str, gen: torch.Generator, jitter: int = 0) -> "tuple[Tensor, Tensor]":
    """Random group element g per sample applied to upright x (after an optional random shift of
    up to ``jitter`` pixels); returns (g . x, g)."""
    group = model.group
    if jitter:
        x = _shift(x, jitter, gen)
    g = torch.randint(group.order, (x.shape[0],), generator=gen).to(x.device)
    if mode == "none":
        return x, torch.zeros_like(g)
    xg = transform(x, group, g)
    if mode == "continuous":  # residual angle inside the element's cell: target stays g
        half = 180.0 / group.n_rotations
        delta = (torch.rand(x.shape[0], generator=gen) * 2 - 1).to(x.device) * half * 0.9
        xg = rotate(xg, delta).clamp(0, 1)
    return xg, g


def _make_optimizer(name: str, params: List[torch.nn.Parameter], lr: float, weight_decay: float, **kw: Any) -> torch.optim.Optimizer:
    from .optim import create_optimizer

    return create_optimizer(name, params, lr=lr, weight_decay=weight_decay, **kw)


def fit(
    model: CanonicalizedModel,
    data: Any,
    epochs: int = 5,
    batch_size: int = 64,
    lr: float = 1e-3,
    val_data: Any = None,
    device: "str | torch.device | None" = None,
    progress: bool = True,
    loss: Optional[str] = None,
    **kwargs: Any,
) -> History:
    """Train the canonicalizer (and the new head, if the model has one). The backbone is frozen.

    With ``loss="pgd_at" | "trades" | "d2r"`` (or ``loss="ce", cache_features=True``) the new head
    is trained by :func:`canonwrap.finetune.fit_head` instead (robust losses, cached features);
    all other keyword arguments are passed on to it.

    Args:
        model: from :func:`canonwrap.wrap`.
        data: Dataset / DataLoader yielding ``(image, label)`` or images alone; images are float
            pixels in [0, 1] in the model's canonical (upright) pose.
        epochs, batch_size, lr: the usual.
        val_data: optional labelled data; upright and group-averaged accuracy logged per epoch.
        device: ``"cpu"``, ``"cuda"``...; default: where the model is.
        progress: show a progress bar.
        **kwargs: fields of :class:`FitConfig`:
            ``prior_weight`` (1.0) canonicalization prior; ``augment`` ("group") applies a random
            element g to each upright sample and supervises the canonicalizer with g
            ("continuous" adds a residual angle inside the element's cell, "none" = plain prior
            towards identity); ``jitter`` (0) random shifts of up to that many pixels first; ``task_weight`` (default 1.0 when labels are present, else 0) the
            task loss through the frozen model via the straight-through argmax;
            ``model_prior_weight`` / ``model_prior_temperature`` the model-driven prior;
            ``contrastive_weight`` the orbit-contrastive loss (orbit canonicalizer only);
            ``optimizer`` ("adamw", "sgd", "sam", "asam", "samar", ... see
            :func:`canonwrap.list_optimizers`), ``rho`` (SAM family), ``weight_decay``,
            ``optimizer_kwargs``, ``train_head``, ``seed``.

    Returns:
        History with one dict per epoch: losses, ``orientation_acc`` (the canonicalizer picked the
        applied element), ``task_acc``, ``seconds``, and validation accuracies if ``val_data``.
    """
    if loss is not None and (loss != "ce" or "cache_features" in kwargs or "threat" in kwargs):
        from .finetune import fit_head

        return fit_head(model, data, epochs=epochs, batch_size=batch_size, lr=lr, loss=loss,
                        val_data=val_data, device=device, progress=progress, **kwargs)
    unknown = set(kwargs) - set(FitConfig.__dataclass_fields__)
    if unknown:
        from ._registry import unknown_name_message

        name = sorted(unknown)[0]
        valid = set(FitConfig.__dataclass_fields__) | {"val_data", "device", "progress"}
        raise TypeError(unknown_name_message("fit argument", name, sorted(valid)))
    cfg = FitConfig(epochs=epochs, batch_size=batch_size, lr=lr, **kwargs)
    if cfg.augment not in AUGMENTS:
        raise ValueError(f"augment must be one of {AUGMENTS}; got {cfg.augment!r}")
    if cfg.epochs < 1 or cfg.batch_size < 1 or not cfg.lr > 0:
        raise ValueError(f"need epochs >= 1, batch_size >= 1, lr > 0; got {cfg.epochs}, {cfg.batch_size}, {cfg.lr}")
    if cfg.contrastive_weight and model.config.canonicalizer != "orbit":
        raise ValueError("contrastive_weight needs the orbit canonicalizer (it uses orbit embeddings)")
    if device is not None:
        model.to(device)
    dev = next(model.parameters()).device
    gen = torch.Generator().manual_seed(cfg.seed)  # augmentation; the global RNG is left alone
    loader = as_loader(data, cfg.batch_size, shuffle=True, seed=cfg.seed)

    params = list(model.canonicalizer.parameters())
    if model.head is not None and cfg.train_head:
        params += list(model.head.parameters())
    params = [p for p in params if p.requires_grad]
    opt_kwargs = dict(cfg.optimizer_kwargs)
    if cfg.rho is not None:
        opt_kwargs["rho"] = cfg.rho
    if cfg.optimizer.lower() in ("sam", "asam", "samar"):
        opt_kwargs.setdefault("model", model)  # BatchNorm statistics updated by the first pass only
    opt = _make_optimizer(cfg.optimizer, params, cfg.lr, cfg.weight_decay, **opt_kwargs)
    steps_total = cfg.epochs * max(len(loader), 1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps_total) / steps_total)))
    sam_like = hasattr(opt, "first_step")

    from tqdm.auto import tqdm

    records: List[Dict[str, float]] = []
    for epoch in range(cfg.epochs):
        model.train()
        sums: Dict[str, float] = {}
        n_seen = 0
        t0 = time.perf_counter()
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress, leave=False)
        for batch in bar:
            x, y = split_batch(batch)
            x = x.to(dev, non_blocking=True)
            y = y.to(dev) if y is not None else None
            task_w = cfg.task_weight if cfg.task_weight is not None else (1.0 if y is not None else 0.0)
            if task_w and y is None:
                raise ValueError("task_weight > 0 needs labelled data (image, label)")
            xg, g = _augment(model, x, cfg.augment, gen, cfg.jitter)
            soft_target = None
            if cfg.model_prior_weight:
                orbit = model.undo.orbit(xg)  # (B, G, C, H, W), entry k = k^-1 . xg
                soft_target = model_prior_target(
                    lambda z: model.head_logits(model.normalize(z)), orbit, y, cfg.model_prior_temperature
                )

            stats: Dict[str, Any] = {}  # filled by the closure (SAM calls it twice; the last call wins)

            def closure() -> Tensor:
                opt.zero_grad(set_to_none=True)
                out = model.canonicalize(xg, differentiable=bool(task_w))
                terms: Dict[str, Tensor] = {}
                if cfg.prior_weight:
                    terms["prior"] = cfg.prior_weight * prior_loss(out.scores, g)
                if task_w:
                    logits = model.head_logits(model.normalize(out.images))
                    terms["task"] = task_w * F.cross_entropy(logits, y)
                    stats.setdefault("task_correct", float((logits.argmax(1) == y).sum()))
                if soft_target is not None:
                    terms["model_prior"] = cfg.model_prior_weight * prior_loss(out.scores, soft_target)
                if cfg.contrastive_weight:
                    terms["contrastive"] = cfg.contrastive_weight * orbit_contrastive_loss(out.embeddings)
                if not terms:
                    raise ValueError("every loss weight is zero: nothing to train")
                loss = sum(terms.values())
                loss.backward()
                if "terms" not in stats:  # record the first pass (at w, not at w + eps)
                    stats["terms"] = {k: float(v.detach()) for k, v in terms.items()}
                    stats["orient"] = float((out.index == g).sum())
                return loss

            if sam_like:
                loss = opt.step(closure)
            else:
                loss = closure()
                opt.step()
            sched.step()
            bs = x.shape[0]
            n_seen += bs
            sums["loss"] = sums.get("loss", 0.0) + float(loss.detach()) * bs
            for k, v in stats["terms"].items():
                sums[f"{k}_loss"] = sums.get(f"{k}_loss", 0.0) + v * bs
            sums["orientation_acc"] = sums.get("orientation_acc", 0.0) + stats["orient"]
            if task_w:
                sums["task_acc"] = sums.get("task_acc", 0.0) + stats["task_correct"]
            bar.set_postfix(loss=f"{sums['loss'] / n_seen:.3f}", orient=f"{sums['orientation_acc'] / n_seen:.3f}")
        rec = {k: v / max(n_seen, 1) for k, v in sums.items()}
        rec.update(epoch=epoch + 1, seconds=time.perf_counter() - t0, lr=opt.param_groups[0]["lr"])
        if val_data is not None:
            from .evaluate import evaluate

            rep = evaluate(model, val_data, angles=None, baseline=False, batch_size=max(cfg.batch_size, 256))
            rec.update(val_upright=rep.wrapped.upright, val_group_avg=rep.wrapped.group_avg[model.group.name])
        records.append(rec)
        if progress:
            shown = {k: round(v, 4) for k, v in rec.items() if k != "epoch"}
            tqdm.write(f"epoch {epoch + 1}/{cfg.epochs} {shown}")
    model.eval()
    return History(records, asdict(cfg))
