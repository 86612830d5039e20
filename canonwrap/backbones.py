"""Frozen backbones behind one small contract, from timm, Hugging Face transformers or nn.Modules.

Every backbone is a :class:`Backbone` (an ``nn.Module``) with

* ``logits(x)``  x normalized pixels (B, C, H, W) -> (B, K) the pretrained classifier's logits,
* ``features(x)`` -> (B, D) pooled pre-logit features (for a new head),
* ``pretrained_cfg``: mean, std, input size, number of classes and features,
* ``spec``: a JSON-serializable dict that rebuilds the architecture (used by checkpoints).

Specs are strings ``"<source>:<name>"``: ``timm:resnet50``, ``hf:/path/to/dir`` (or a hub id),
``hf-base:/path`` (``AutoModel`` features only), ``canonwrap:digitnet`` (built-in models).
timm and transformers are imported only inside the functions that need them.
"""
from __future__ import annotations

import abc
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ._registry import Registry, unknown_name_message

SOURCES: Registry[Callable[..., "Backbone"]] = Registry("backbone source")
BUILTIN: Registry[Callable[..., nn.Module]] = Registry("built-in backbone")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class PretrainedCfg:
    """What a backbone expects: normalization, input size (C, H, W) and output sizes."""

    mean: Tuple[float, ...] = IMAGENET_MEAN
    std: Tuple[float, ...] = IMAGENET_STD
    input_size: Tuple[int, int, int] = (3, 224, 224)
    num_classes: int = 0
    num_features: int = 0
    fixed_input_size: bool = True

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


class Backbone(nn.Module, abc.ABC):
    """Base class: wraps a frozen module. Subclasses implement ``logits`` and ``features``."""

    def __init__(self, module: nn.Module, cfg: PretrainedCfg, spec: Dict[str, Any]) -> None:
        super().__init__()
        self.module = module
        self.pretrained_cfg = cfg
        self.spec = spec

    @abc.abstractmethod
    def logits(self, x: Tensor) -> Tensor:
        """Normalized pixels (B, C, H, W) -> (B, K) logits of the pretrained classifier."""

    @abc.abstractmethod
    def features(self, x: Tensor) -> Tensor:
        """Normalized pixels (B, C, H, W) -> (B, D) pooled pre-logit features."""

    def forward(self, x: Tensor) -> Tensor:
        return self.logits(x)


def _resolve_cfg(base: PretrainedCfg, overrides: Dict[str, Any]) -> PretrainedCfg:
    for key, value in overrides.items():
        if value is None:
            continue
        if not hasattr(base, key):
            raise TypeError(f"unknown pretrained_cfg field {key!r}; expected one of {list(asdict(base))}")
        setattr(base, key, tuple(value) if isinstance(value, (list, tuple)) else value)
    if len(base.mean) != base.input_size[0] or len(base.std) != base.input_size[0]:
        raise ValueError(
            f"mean/std need one value per input channel ({base.input_size[0]}); got mean={base.mean} std={base.std}"
        )
    return base


# --------------------------------------------------------------------------------------- timm
class TimmBackbone(Backbone):
    def logits(self, x: Tensor) -> Tensor:
        return self.module(x)

    def features(self, x: Tensor) -> Tensor:
        return self.module.forward_head(self.module.forward_features(x), pre_logits=True)


@SOURCES.register("timm")
def _timm(name: str, pretrained: bool = False, checkpoint_path: Optional[str] = None, **kwargs: Any) -> Backbone:
    import timm

    if name not in timm.list_models() and name.split(".")[0] not in timm.list_models():
        raise KeyError(unknown_name_message("timm model", name, timm.list_models()))
    if checkpoint_path is not None and not Path(checkpoint_path).exists():
        raise FileNotFoundError(f"timm checkpoint_path does not exist: {checkpoint_path}")
    create_kwargs = dict(kwargs)
    if checkpoint_path is not None:  # local weights through timm's own pretrained loading path
        overlay: Dict[str, Any] = dict(file=str(checkpoint_path))
        if "num_classes" in kwargs:  # the file's classifier matches: keep it (timm drops "adapted" heads)
            overlay["num_classes"] = kwargs["num_classes"]
        create_kwargs["pretrained_cfg_overlay"] = overlay
        pretrained = True
    module = timm.create_model(name, pretrained=pretrained, **create_kwargs)
    pc = module.pretrained_cfg
    cfg = PretrainedCfg(
        mean=tuple(pc.get("mean", IMAGENET_MEAN)),
        std=tuple(pc.get("std", IMAGENET_STD)),
        input_size=tuple(pc.get("input_size", (3, 224, 224))),
        num_classes=int(module.num_classes),
        num_features=int(module.num_features),
        fixed_input_size=bool(pc.get("fixed_input_size", False)),
    )
    in_chans = kwargs.get("in_chans")
    if in_chans is not None and in_chans != cfg.input_size[0]:
        cfg.input_size = (in_chans,) + tuple(cfg.input_size[1:])
        cfg.mean, cfg.std = (cfg.mean * in_chans)[:in_chans], (cfg.std * in_chans)[:in_chans]
    img_size = kwargs.get("img_size")
    if img_size is not None:
        hw = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        cfg.input_size = (cfg.input_size[0],) + hw
    spec = {"source": "timm", "name": name, "kwargs": kwargs}
    return TimmBackbone(module, cfg, spec)


# ------------------------------------------------------------------------------ transformers
def _read_hf_preprocessor(path: str) -> Dict[str, Any]:
    """mean/std/size from a local ``preprocessor_config.json`` (empty dict when absent)."""
    file = Path(path) / "preprocessor_config.json"
    if not file.exists():
        return {}
    raw = json.loads(file.read_text())
    out: Dict[str, Any] = {}
    if "image_mean" in raw:
        out["mean"] = tuple(float(v) for v in raw["image_mean"])
    if "image_std" in raw:
        out["std"] = tuple(float(v) for v in raw["image_std"])
    size = raw.get("crop_size") if raw.get("do_center_crop") else raw.get("size")
    if isinstance(size, dict):
        if "height" in size and "width" in size:
            out["hw"] = (int(size["height"]), int(size["width"]))
        elif "shortest_edge" in size:
            out["hw"] = (int(size["shortest_edge"]),) * 2
    elif isinstance(size, int):
        out["hw"] = (size, size)
    return out


def _hf_path(name: str) -> str:
    """A local directory if it exists; a hub id (``org/name``) is passed through; anything that
    looks like a path but does not exist is an error (instead of a confusing hub lookup)."""
    expanded = os.path.expanduser(name)
    if Path(expanded).exists():
        return expanded
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise FileNotFoundError(f"Hugging Face model directory does not exist: {name}")
    return name


def _hf_cfg(module: nn.Module, path: str, num_classes: int, num_features: int) -> PretrainedCfg:
    pre = _read_hf_preprocessor(path) if Path(path).exists() else {}
    config = module.config
    size = getattr(config, "image_size", 224)
    hw = pre.get("hw", (size, size) if isinstance(size, int) else tuple(size))
    chans = int(getattr(config, "num_channels", 3))
    return PretrainedCfg(
        mean=pre.get("mean", (0.5,) * chans),
        std=pre.get("std", (0.5,) * chans),
        input_size=(chans, int(hw[0]), int(hw[1])),
        num_classes=num_classes,
        num_features=num_features,
        fixed_input_size=True,
    )


def _hf_pool(outputs: Any, use_pooler: bool = True) -> Tensor:
    """(B, D) pooled features from a transformers base-model output (the pooler only when its
    weights were loaded, else the CLS token / spatial mean)."""
    pooled = getattr(outputs, "pooler_output", None) if use_pooler else None
    if pooled is not None:
        return pooled.flatten(1)
    hidden = outputs.last_hidden_state
    if hidden.dim() == 4:  # (B, D, h, w) conv features
        return hidden.mean(dim=(2, 3))
    return hidden[:, 0]  # (B, T, D): CLS token


class HFClassifierBackbone(Backbone):
    def logits(self, x: Tensor) -> Tensor:
        return self.module(pixel_values=x).logits

    def features(self, x: Tensor) -> Tensor:
        base = getattr(self.module, self.module.base_model_prefix)
        return _hf_pool(base(pixel_values=x))


class HFBaseBackbone(Backbone):
    use_pooler: bool = True

    def logits(self, x: Tensor) -> Tensor:
        raise RuntimeError(
            "this Hugging Face backbone was loaded with AutoModel (no classifier); wrap it with num_classes=N"
        )

    def features(self, x: Tensor) -> Tensor:
        return _hf_pool(self.module(pixel_values=x), self.use_pooler)


@SOURCES.register("hf")
def _hf(name: str, **kwargs: Any) -> Backbone:
    from transformers import AutoModelForImageClassification

    path = _hf_path(name)
    module = AutoModelForImageClassification.from_pretrained(path, **kwargs)
    num_features = int(getattr(module.config, "hidden_size", 0) or getattr(module.config, "hidden_sizes", [0])[-1])
    cfg = _hf_cfg(module, path, int(module.config.num_labels), num_features)
    return HFClassifierBackbone(module, cfg, {"source": "hf", "name": name, "kwargs": kwargs})


@SOURCES.register("hf-base")
def _hf_base(name: str, **kwargs: Any) -> Backbone:
    from transformers import AutoModel

    path = _hf_path(name)
    module, info = AutoModel.from_pretrained(path, output_loading_info=True, **kwargs)
    num_features = int(getattr(module.config, "hidden_size", 0) or getattr(module.config, "hidden_sizes", [0])[-1])
    cfg = _hf_cfg(module, path, 0, num_features)
    bb = HFBaseBackbone(module, cfg, {"source": "hf-base", "name": name, "kwargs": kwargs})
    # a classifier checkpoint loaded as AutoModel has no pooler weights: a fresh random pooler
    # would make the features random, so fall back to the CLS token / spatial mean
    bb.use_pooler = not any("pooler" in k for k in info.get("missing_keys", []))
    return bb


# ------------------------------------------------------------------------- plain nn.Modules
class ModuleBackbone(Backbone):
    """A user module. ``logits`` is its output; ``features`` uses ``forward_features`` /
    ``forward_head(pre_logits=True)`` when present (timm contract), else the module's output."""

    def logits(self, x: Tensor) -> Tensor:
        out = self.module(x)
        return out.logits if hasattr(out, "logits") else out

    def features(self, x: Tensor) -> Tensor:
        if hasattr(self.module, "forward_features") and hasattr(self.module, "forward_head"):
            return self.module.forward_head(self.module.forward_features(x), pre_logits=True)
        return self.logits(x)


def from_module(
    module: nn.Module,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    input_size: Optional[Sequence[int]] = None,
    spec: Optional[Dict[str, Any]] = None,
) -> Backbone:
    """Backbone from a user module; mean/std/input_size from ``module.pretrained_cfg`` or given."""
    pc = dict(getattr(module, "pretrained_cfg", {}) or {})
    size = tuple(input_size or pc.get("input_size") or ())
    if len(size) != 3:
        raise ValueError(
            "a plain nn.Module backbone needs input_size=(C, H, W) (or a pretrained_cfg with input_size); "
            f"got {input_size!r}"
        )
    chans = size[0]
    num_classes = getattr(module, "num_classes", None)
    if num_classes is None:  # e.g. torchvision classifiers: count the outputs with one dry run
        num_classes = _probe_outputs(module, size)
    cfg = PretrainedCfg(
        mean=tuple(mean or pc.get("mean") or (0.0,) * chans),
        std=tuple(std or pc.get("std") or (1.0,) * chans),
        input_size=tuple(int(s) for s in size),
        num_classes=int(num_classes or 0),
        num_features=int(getattr(module, "num_features", 0) or 0),
    )
    cfg = _resolve_cfg(cfg, {})
    builtin = getattr(module, "builtin_spec", None)  # built-in architectures can be rebuilt by name
    if spec is None and builtin is not None:
        spec = {"source": "canonwrap", **builtin}
    return ModuleBackbone(module, cfg, spec or {"source": "module", "class": type(module).__qualname__})


def _probe_outputs(module: nn.Module, size: Sequence[int]) -> int:
    """Width of a module's (B, K) output for one zero input (0 when it is not 2-D)."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            out = module(torch.zeros(1, *size))
    finally:
        module.train(was_training)
    out = out.logits if hasattr(out, "logits") else out
    return int(out.shape[1]) if isinstance(out, Tensor) and out.dim() == 2 else 0


@SOURCES.register("canonwrap")
def _builtin(name: str, **kwargs: Any) -> Backbone:
    from . import zoo  # noqa: F401  (registers the built-in architectures)

    module = BUILTIN.get(name)(**kwargs)
    return from_module(module, spec={"source": "canonwrap", "name": name, "kwargs": kwargs})


def split_spec(spec: str) -> Tuple[str, str]:
    if ":" not in spec:
        raise ValueError(
            f"backbone spec must look like '<source>:<name>' with source in {SOURCES.names()} "
            f"(e.g. 'timm:resnet50', 'hf:/path/to/model'); got {spec!r}"
        )
    source, name = spec.split(":", 1)
    SOURCES.get(source)  # raises with the valid list
    return source, name


def create_backbone(
    backbone: "str | nn.Module | Backbone",
    pretrained_cfg: Optional[Dict[str, Any]] = None,
    **kwargs: Any,
) -> Backbone:
    """Build a frozen backbone from a spec string or a module; ``pretrained_cfg`` overrides
    mean/std/input_size. Parameters are frozen (no grad) and the module is put in eval mode."""
    overrides = dict(pretrained_cfg or {})
    if isinstance(backbone, Backbone):
        bb = backbone
    elif isinstance(backbone, nn.Module):
        bb = from_module(backbone, overrides.pop("mean", None), overrides.pop("std", None), overrides.pop("input_size", None))
    elif isinstance(backbone, str):
        source, name = split_spec(backbone)
        bb = SOURCES.get(source)(name, **kwargs)
    else:
        raise TypeError(f"backbone must be a spec string, an nn.Module or a Backbone; got {type(backbone).__name__}")
    bb.pretrained_cfg = _resolve_cfg(bb.pretrained_cfg, overrides)
    freeze(bb)
    return bb


def freeze(module: nn.Module) -> nn.Module:
    """No gradients, eval mode (BatchNorm statistics and dropout fixed)."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()


def list_backbone_sources() -> list:
    return SOURCES.names()


def register_builtin(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Register a built-in architecture (reachable as ``canonwrap:<name>``)."""
    return BUILTIN.register(name)
