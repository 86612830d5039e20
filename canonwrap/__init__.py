"""canonwrap: make frozen pretrained vision models invariant to rotations and flips with a learned
canonicalizer, train it with the published recipes, evaluate the worst case, export to ONNX.

``import canonwrap`` is light: torch and the package's own modules load on first use; timm,
transformers, onnx and onnxruntime only inside the functions that need them.
"""
from __future__ import annotations

import importlib
from typing import Any

from .version import __version__

_EXPORTS = {
    "wrap": "canonwrap.model",
    "CanonicalizedModel": "canonwrap.model",
    "CanonicalizationOutput": "canonwrap.model",
    "WrapConfig": "canonwrap.model",
    "load": "canonwrap.checkpoint",
    "fit": "canonwrap.train",
    "FitConfig": "canonwrap.train",
    "History": "canonwrap.train",
    "fit_head": "canonwrap.finetune",
    "evaluate": "canonwrap.evaluate",
    "EvalReport": "canonwrap.evaluate",
    "get_group": "canonwrap.groups",
    "list_groups": "canonwrap.groups",
    "Group": "canonwrap.groups",
    "create_canonicalizer": "canonwrap.canonicalizers",
    "list_canonicalizers": "canonwrap.canonicalizers",
    "create_backbone": "canonwrap.backbones",
    "list_backbone_sources": "canonwrap.backbones",
    "load_digits": "canonwrap.data",
    "create_optimizer": "canonwrap.optim",
    "list_optimizers": "canonwrap.optim",
    "create_attack": "canonwrap.attacks",
    "list_attacks": "canonwrap.attacks",
    "export_onnx": "converters.onnx_export",
    "verify_onnx": "converters.verify",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'canonwrap' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list:
    return sorted(__all__)
