"""Canonicalization networks: orbit (model-agnostic) and equivariant (G-CNN)."""
from .base import CANONICALIZERS, Canonicalizer, ScoreOutput, create_canonicalizer, list_canonicalizers
from .equivariant import EquivariantCanonicalizer
from .orbit import OrbitCanonicalizer, orbit_contrastive_loss

__all__ = [
    "CANONICALIZERS",
    "Canonicalizer",
    "ScoreOutput",
    "create_canonicalizer",
    "list_canonicalizers",
    "OrbitCanonicalizer",
    "EquivariantCanonicalizer",
    "orbit_contrastive_loss",
]
