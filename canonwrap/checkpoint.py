"""Checkpoints: ``config.json`` + ``model.safetensors``; never pickle."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from torch import nn

from .model import CanonicalizedModel, WrapConfig, wrap

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def save_model(model: CanonicalizedModel, path: "str | Path", include_backbone: bool = True) -> Path:
    """Save ``model`` to directory ``path``; returns it."""
    from safetensors.torch import save_file

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if not include_backbone:
        state = {k: v for k, v in state.items() if not k.startswith("backbone.")}
    raw = json.loads(model.config.to_json())
    raw["includes_backbone"] = include_backbone
    (out / CONFIG_NAME).write_text(json.dumps(raw, indent=2))
    save_file(_dedupe_shared(state), str(out / WEIGHTS_NAME), metadata={"format": "pt", "canonwrap": model.config.version})
    return out


def _dedupe_shared(state: Dict[str, Any]) -> Dict[str, Any]:
    """safetensors refuses tensors sharing memory (tied weights); store independent copies."""
    seen: Dict[int, str] = {}
    out = {}
    for k, v in state.items():
        ptr = v.data_ptr()
        out[k] = v.clone() if ptr in seen and v.numel() > 0 else v
        seen.setdefault(ptr, k)
    return out


def load(
    path: "str | Path",
    backbone: Optional[nn.Module] = None,
    map_location: str = "cpu",
    group: Optional[str] = None,
    canonicalizer: Optional[str] = None,
) -> CanonicalizedModel:
    """Load a model saved with :meth:`CanonicalizedModel.save`.

    ``backbone`` is required when the model wrapped a plain ``nn.Module`` (its architecture cannot
    be rebuilt from the config); it must match the saved architecture. ``group`` /
    ``canonicalizer``, when given, are checked against the checkpoint (a clear error on mismatch
    instead of a model that is invariant to the wrong group).
    """
    from safetensors.torch import load_file

    root = Path(path)
    if not (root / CONFIG_NAME).exists():
        raise FileNotFoundError(f"no canonwrap checkpoint at {root}: expected {root / CONFIG_NAME} and {WEIGHTS_NAME}")
    raw = json.loads((root / CONFIG_NAME).read_text())
    cfg = WrapConfig.from_dict(raw)
    for what, wanted, saved in (("group", group, cfg.group), ("canonicalizer", canonicalizer, cfg.canonicalizer)):
        if wanted is not None and wanted.lower() != saved:
            raise ValueError(f"checkpoint {root} has {what} {saved!r}; expected {wanted!r}")
    source = cfg.backbone.get("source")
    if backbone is not None:  # the caller's module (e.g. a checkpoint saved without backbone weights)
        spec: Any = backbone
        bb_kwargs: Dict[str, Any] = {}
    elif source == "module":
        raise ValueError(
            f"this checkpoint wrapped a plain nn.Module ({cfg.backbone.get('class')}); "
            "pass load(path, backbone=<module of that architecture>)"
        )
    else:
        spec = f"{source}:{cfg.backbone['name']}"
        bb_kwargs = dict(cfg.backbone.get("kwargs", {}))
    model = wrap(
        spec,
        group=cfg.group,
        canonicalizer=cfg.canonicalizer,
        num_classes=cfg.num_classes,
        class_names=cfg.class_names,
        canon_size=cfg.canon_size,
        mean=cfg.mean,
        std=cfg.std,
        input_size=cfg.input_size,
        canonicalizer_kwargs=cfg.canonicalizer_kwargs,
        backbone_kwargs=bb_kwargs,
    )
    state = load_file(str(root / WEIGHTS_NAME), device=map_location)
    state.setdefault("temperature", torch.ones(1))  # checkpoints from before temperature scaling
    expected = model.state_dict()
    if not raw.get("includes_backbone", True):
        expected = {k: v for k, v in expected.items() if not k.startswith("backbone.")}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or mismatched:
        raise ValueError(
            f"checkpoint {root} does not match the architecture its config describes "
            f"(group {cfg.group}, canonicalizer {cfg.canonicalizer}, backbone {cfg.backbone}): "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}, "
            f"shape mismatches {mismatched[:5]}"
        )
    model.load_state_dict(state, strict=False)
    return model.eval()
