"""Canonicalizer contract and registry.

A canonicalizer maps a (downscaled, normalized) image batch to one score per group element:
``scores[b, g]`` is high when ``g^-1 . x[b]`` is in the canonical pose, so the chosen element is
``h = argmax_g scores`` and the canonical image is ``h^-1 . x``. Both families are equivariant:
``scores(g . x)[g o k] = scores(x)[k]``, hence ``h(g . x) = g o h(x)`` and the canonical image is
invariant.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

from torch import Tensor, nn

from .._registry import Registry
from ..groups import Group, get_group

CANONICALIZERS: Registry[Callable[..., "Canonicalizer"]] = Registry("canonicalizer")


@dataclass
class ScoreOutput:
    """scores (B, G); embeddings (B, G, D) for orbit canonicalizers (None otherwise)."""

    scores: Tensor
    embeddings: Optional[Tensor] = None


class Canonicalizer(nn.Module, abc.ABC):
    """Base class. ``config`` holds the constructor arguments (serialized in checkpoints)."""

    name: str = ""

    def __init__(self, group: "str | Group", in_chans: int, size: int) -> None:
        super().__init__()
        self.group = get_group(group)
        self.in_chans = int(in_chans)
        self.size = int(size)
        self.config: Dict[str, Any] = {}

    @abc.abstractmethod
    def forward(self, x: Tensor) -> ScoreOutput:
        """x (B, C, size, size) normalized -> ScoreOutput with scores (B, G)."""


def register_canonicalizer(name: str) -> Callable:
    return CANONICALIZERS.register(name)


def create_canonicalizer(name: str, group: "str | Group", in_chans: int, size: int, **kwargs: Any) -> Canonicalizer:
    """Factory: ``create_canonicalizer("orbit", "c8", in_chans=3, size=64, width=32)``."""
    canon = CANONICALIZERS.get(name)(group=group, in_chans=in_chans, size=size, **kwargs)
    canon.name = name.lower()
    return canon


def list_canonicalizers() -> List[str]:
    return CANONICALIZERS.names()
