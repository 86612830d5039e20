"""The wrapped model: frozen backbone behind a learned canonicalizer.

    pixels in [0,1] (B, C, H, W)
      -> downscale + normalize -> canonicalizer scores (B, G) -> h = argmax
      -> h^-1 . pixels (exact gather for 90-degree elements, bilinear taps for 45-degree ones)
      -> normalize -> frozen backbone -> pretrained classifier or new head -> logits (B, K)

The canonical image is warped in pixel space (zeros outside the image = black) and normalized
afterwards; the scorer sees the normalized downscaled image.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .version import __version__
from .backbones import Backbone, create_backbone
from .canonicalizers import Canonicalizer, create_canonicalizer
from .groups import GroupWarp, get_group
from .validation import check_pixels


@dataclass
class WrapConfig:
    """Everything needed to rebuild a wrapped model (serialized as ``config.json``)."""

    backbone: Dict[str, Any]
    group: str = "c8"
    canonicalizer: str = "orbit"
    canonicalizer_kwargs: Dict[str, Any] = field(default_factory=dict)
    canon_size: int = 64
    mean: Tuple[float, ...] = ()
    std: Tuple[float, ...] = ()
    input_size: Tuple[int, int, int] = (3, 224, 224)
    num_classes: Optional[int] = None
    class_names: Optional[List[str]] = None
    canonicalizer_config: Dict[str, Any] = field(default_factory=dict)
    version: str = __version__

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_dict(cls, raw: Dict[str, Any]) -> "WrapConfig":
        known = {k: v for k, v in raw.items() if k in cls.__dataclass_fields__}
        for key in ("mean", "std", "input_size"):
            known[key] = tuple(known[key])
        return cls(**known)


@dataclass
class CanonicalizationOutput:
    """images (B, C, H, W) canonical pixels; index (B,) chosen element h (the input is h . canonical);
    scores (B, G); embeddings (B, G, D) or None."""

    images: Tensor
    index: Tensor
    scores: Tensor
    embeddings: Optional[Tensor] = None


class CanonicalizedModel(nn.Module):
    """Frozen ``backbone`` made invariant to ``canonicalizer.group`` (see module docstring).

    ``model(x)`` returns logits; ``model.canonicalize(x)`` the canonicalization; ``model.frozen_logits(x)``
    the unwrapped backbone (same normalization) for comparisons.
    """

    def __init__(
        self,
        backbone: Backbone,
        canonicalizer: Canonicalizer,
        config: WrapConfig,
        head: Optional[nn.Module] = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.canonicalizer = canonicalizer
        self.head = head
        self.config = config
        self.group = get_group(config.group)
        c, h, w = config.input_size
        self.register_buffer("mean", torch.tensor(config.mean, dtype=torch.float32).view(1, c, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(config.std, dtype=torch.float32).view(1, c, 1, 1), persistent=False)
        self.undo = GroupWarp(self.group, h, w, inverse=True)  # undo(x, h) = h^-1 . x
        # calibration temperature T (probabilities = softmax(logits / T)); saved in checkpoints, set by
        # canonwrap.worstcase.calibrate_temperature. model(x) returns raw logits: only the uncertainty
        # paths (evaluate(uncertainty=...), export_onnx(uncertainty=True)) apply it.
        self.register_buffer("temperature", torch.ones(1))
        self.check_inputs = True

    # ------------------------------------------------------------------ properties / modes
    @property
    def input_size(self) -> Tuple[int, int, int]:
        return tuple(self.config.input_size)  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return self.config.num_classes or self.backbone.pretrained_cfg.num_classes

    def train(self, mode: bool = True) -> "CanonicalizedModel":
        super().train(mode)
        self.backbone.eval()  # frozen: BatchNorm statistics and dropout stay fixed
        return self

    def trainable_parameters(self) -> List[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    # ------------------------------------------------------------------------------ pieces
    def normalize(self, x: Tensor) -> Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def scorer_input(self, x: Tensor) -> Tensor:
        """(B, C, H, W) pixels -> (B, C, s, s) normalized, downscaled input of the canonicalizer."""
        s = self.config.canon_size
        if x.shape[-1] != s or x.shape[-2] != s:
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=False)
        return self.normalize(x)

    def head_logits(self, x_norm: Tensor) -> Tensor:
        """Normalized canonical images -> logits (backbone classifier or the new head)."""
        if self.head is None:
            return self.backbone.logits(x_norm)
        return self.head(self.backbone.features(x_norm))

    def canonicalize(self, x: Tensor, differentiable: bool = False) -> CanonicalizationOutput:
        """Pick the element that brings each input to the canonical pose and undo it.

        x (B, C, H, W) pixels in [0, 1]. With ``differentiable=True`` the images are a
        straight-through mix over the whole orbit (forward = hard choice, backward = softmax
        gradient), so a task loss on them trains the canonicalizer.
        """
        self._check(x)
        out = self.canonicalizer(self.scorer_input(x))
        index = out.scores.argmax(dim=1)  # (B,)
        if not differentiable:
            images = self.undo(x, index)  # (B, C, H, W)
        else:
            soft = out.scores.softmax(dim=1)  # (B, G)
            hard = F.one_hot(index, soft.shape[1]).to(soft.dtype)
            weights = hard - soft.detach() + soft  # straight-through
            orbit = self.undo.orbit(x)  # (B, G, C, H, W), entry g = g^-1 . x
            images = torch.einsum("bg,bgchw->bchw", weights, orbit)
        return CanonicalizationOutput(images, index, out.scores, out.embeddings)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, C, H, W) float pixels in [0, 1] -> logits (B, K)."""
        return self.head_logits(self.normalize(self.canonicalize(x).images))

    def forward_with_element(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """(logits (B, K), chosen element (B,), scores (B, G)): the exported graph's outputs."""
        out = self.canonicalize(x)
        return self.head_logits(self.normalize(out.images)), out.index, out.scores

    def frozen_logits(self, x: Tensor) -> Tensor:
        """The model without canonicalization (same normalization and head)."""
        self._check(x)
        return self.head_logits(self.normalize(x))

    def _check(self, x: Tensor) -> None:
        if self.check_inputs:
            check_pixels(x, self.input_size)

    # ------------------------------------------------------------------------- checkpoints
    def save(self, path: "str | Path", include_backbone: bool = True) -> Path:
        """Write ``config.json`` + ``model.safetensors`` (canonicalizer, head and, by default, the
        backbone weights so the reloaded model is bit-identical). Returns the directory."""
        from .checkpoint import save_model

        return save_model(self, path, include_backbone=include_backbone)


def wrap(
    backbone: "str | nn.Module | Backbone",
    group: str = "c8",
    canonicalizer: str = "orbit",
    num_classes: Optional[int] = None,
    class_names: Optional[Sequence[str]] = None,
    canon_size: Optional[int] = None,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    input_size: Optional[Sequence[int]] = None,
    canonicalizer_kwargs: Optional[Dict[str, Any]] = None,
    backbone_kwargs: Optional[Dict[str, Any]] = None,
) -> CanonicalizedModel:
    """Wrap a frozen pretrained classifier behind a learned canonicalizer.

    Args:
        backbone: ``"timm:<name>"``, ``"hf:<local dir or hub id>"``, ``"hf-base:<dir>"`` (features
            only; needs ``num_classes``), ``"canonwrap:<builtin>"`` or an ``nn.Module``.
        group: ``c4``, ``c8``, ``d4``, ``d8`` (see :func:`canonwrap.list_groups`).
        canonicalizer: ``orbit`` or ``equivariant`` (see :func:`canonwrap.list_canonicalizers`).
        num_classes: add a new trainable linear head with this many classes on pooled features.
        class_names: optional label names (stored in checkpoints and ONNX metadata).
        canon_size: side of the downscaled image the canonicalizer scores (default min(H, 64)).
        mean, std, input_size: override what the backbone's config says (required for plain
            modules without a ``pretrained_cfg``).
        canonicalizer_kwargs: e.g. ``{"network": "resnet18"}`` or ``{"width": 16}``.
        backbone_kwargs: passed to the backbone factory (e.g. ``{"pretrained": True}`` for timm).

    Example:
        >>> model = wrap("timm:resnet18", group="c4", canonicalizer="orbit")
    """
    group_obj = get_group(group)
    overrides = {"mean": mean, "std": std, "input_size": input_size}
    bb = create_backbone(backbone, overrides, **(backbone_kwargs or {}))
    cfg = bb.pretrained_cfg
    c, h, w = cfg.input_size
    if num_classes is None and cfg.num_classes <= 0:
        raise ValueError(
            f"backbone {bb.spec.get('name', bb.spec.get('class'))!r} has no classifier; pass num_classes=N to add a head"
        )
    size = int(canon_size or min(h, w, 64))
    canon_kwargs = dict(canonicalizer_kwargs or {})
    canon = create_canonicalizer(canonicalizer, group_obj, in_chans=c, size=size, **canon_kwargs)
    head = None
    if num_classes is not None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1; got {num_classes}")
        dim = cfg.num_features or _probe_features(bb, cfg.input_size)
        head = nn.Linear(dim, num_classes)
    n_out = num_classes or cfg.num_classes
    if class_names is not None and len(class_names) != n_out:
        raise ValueError(f"class_names has {len(class_names)} entries; the model has {n_out} classes")
    config = WrapConfig(
        backbone=bb.spec,
        group=group_obj.name,
        canonicalizer=canonicalizer.lower(),
        canonicalizer_kwargs={k: v for k, v in canon_kwargs.items() if not isinstance(v, nn.Module)},
        canon_size=size,
        mean=tuple(float(v) for v in cfg.mean),
        std=tuple(float(v) for v in cfg.std),
        input_size=(int(c), int(h), int(w)),
        num_classes=num_classes,
        class_names=list(class_names) if class_names is not None else None,
        canonicalizer_config=canon.config,
    )
    return CanonicalizedModel(bb, canon, config, head).eval()  # inference-ready; fit() switches modes itself


def _probe_features(bb: Backbone, input_size: Sequence[int]) -> int:
    with torch.no_grad():
        feats = bb.features(torch.zeros(1, *input_size))
    if feats.dim() != 2:
        raise ValueError(f"backbone features must be (B, D); got shape {tuple(feats.shape)}")
    return int(feats.shape[1])
