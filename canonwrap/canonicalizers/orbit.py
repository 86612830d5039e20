"""Model-agnostic orbit canonicalizer (Panigrahi & Mondal, 2024).

Any non-equivariant encoder phi scores every element of the input's orbit:
``s_g = w . phi(g^-1 . x) + b``. Because the orbit of ``g' . x`` is the orbit of ``x`` permuted,
the scores permute with the input and the argmax is equivariant by construction (exact for 90-degree
rotations and flips; approximate for 45-degree elements, which interpolate).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from ..groups import Group, GroupWarp
from .base import Canonicalizer, ScoreOutput, register_canonicalizer
from .nets import SmallCNN, TimmEncoder, infer_num_features


@register_canonicalizer("orbit")
class OrbitCanonicalizer(Canonicalizer):
    """Orbit canonicalizer.

    Args:
        group: group name or :class:`Group`.
        in_chans: input channels.
        size: side of the (square, downscaled) input the scorer sees.
        network: ``None`` (built-in :class:`SmallCNN`), a timm model name, or an ``nn.Module``
            mapping (N, C, size, size) -> (N, D).
        width, embed_dim: built-in CNN width / embedding size.
        relational: score each element from the whole orbit instead of its own embedding alone:
            ``s_g = sum_h <W_h, e_{g o h}> + b`` with ``e_k = phi(k^-1 . x)``. The sum runs over the
            Cayley table, so the scores still permute with the input (equivariance is kept) while
            the scorer can compare an orientation with the others (e.g. a pose with its 180-degree
            turn); the default. ``False``: ``s_g = <w, e_g> + b``, the plain orbit scorer.
    Shapes: x (B, C, size, size) -> scores (B, G), embeddings (B, G, D).
    """

    def __init__(
        self,
        group: "str | Group",
        in_chans: int,
        size: int,
        network: "Optional[str | nn.Module]" = None,
        width: int = 16,
        embed_dim: int = 128,
        relational: bool = True,
    ) -> None:
        super().__init__(group, in_chans, size)
        if network is None:
            self.encoder: nn.Module = SmallCNN(in_chans, width, embed_dim, size=size)
        elif isinstance(network, str):
            self.encoder = TimmEncoder(network.removeprefix("timm:"), in_chans)
        elif isinstance(network, nn.Module):
            self.encoder = network
        else:
            raise TypeError(f"network must be None, a timm model name or an nn.Module; got {type(network).__name__}")
        dim = infer_num_features(self.encoder, in_chans, size)
        g = self.group.order
        self.relational = relational
        if relational:
            self.score_weight = nn.Parameter(torch.randn(g, dim) / dim**0.5)  # W_h, (G, D)
            self.score_bias = nn.Parameter(torch.zeros(()))
            cayley = self.group.cayley_table()  # [g, h] = g o h
            self.register_buffer("cayley", cayley, persistent=False)
        else:
            self.score = nn.Linear(dim, 1)
        self.orbit_warp = GroupWarp(self.group, size, size, inverse=True)  # entry g = g^-1 . x
        self.config = {
            "network": network if isinstance(network, str) or network is None else type(network).__qualname__,
            "width": width,
            "embed_dim": embed_dim,
            "relational": relational,
        }

    def forward(self, x: Tensor) -> ScoreOutput:
        b, c, h, w = x.shape
        orbit = self.orbit_warp.orbit(x)  # (B, G, C, h, w)
        g = orbit.shape[1]
        emb = self.encoder(orbit.reshape(b * g, c, h, w)).reshape(b, g, -1)  # (B, G, D)
        if self.relational:
            rel = emb[:, self.cayley]  # (B, G, G, D): [b, g, h] = e_{g o h}
            scores = torch.einsum("bghd,hd->bg", rel, self.score_weight) + self.score_bias  # (B, G)
        else:
            scores = self.score(emb).squeeze(-1)  # (B, G)
        return ScoreOutput(scores=scores, embeddings=emb)


def orbit_contrastive_loss(embeddings: Tensor) -> Tensor:
    """Mean |cos(phi(g x), phi(g' x))| over pairs g != g' (pushes orbit embeddings apart).

    embeddings (B, G, D) -> scalar.
    """
    z = torch.nn.functional.normalize(embeddings, dim=-1)  # (B, G, D)
    sim = z @ z.transpose(1, 2)  # (B, G, G)
    g = sim.shape[-1]
    off = ~torch.eye(g, dtype=torch.bool, device=sim.device)
    return sim[:, off].abs().mean()
