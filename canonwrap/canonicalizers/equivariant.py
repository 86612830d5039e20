"""Group-equivariant CNN canonicalizer (Kaba et al., 2023; Mondal et al., 2023) in plain PyTorch.

Layers act on the regular representation: features are (B, C, G, H, W). The lifting convolution
correlates the image with every transformed copy of each filter; a group convolution transforms
its filter spatially by ``g`` and permutes the filter's group axis by ``g^-1``. Filters are
transformed with the same warp tables as images (exact for 90-degree elements and flips,
bilinear for 45-degree ones), so the transformed weights are a pure function of the parameters
and export as constants. The final layer has one channel; averaging it over space (inside a
disc, to limit boundary effects) gives one score per element with
``scores(g . x)[g o k] = scores(x)[k]``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..groups import Group, apply_orbit, get_group, warp_tables
from .base import Canonicalizer, ScoreOutput, register_canonicalizer


class _FilterWarp(nn.Module):
    """Transforms k x k filters by every group element: (O, I, k, k) -> (O, G, I, k, k)."""

    def __init__(self, group: Group, k: int) -> None:
        super().__init__()
        index, weight = warp_tables(group, k, k)
        self.register_buffer("index", index, persistent=False)
        self.register_buffer("weight", weight, persistent=False)

    def forward(self, w: Tensor) -> Tensor:
        return apply_orbit(w, self.index, self.weight)


class LiftingConv(nn.Module):
    """Z^2 -> G lifting convolution. x (B, C_in, H, W) -> (B, C_out, G, H, W)."""

    def __init__(self, group: Group, cin: int, cout: int, k: int) -> None:
        super().__init__()
        self.group, self.cout = group, cout
        self.weight = nn.Parameter(torch.randn(cout, cin, k, k) * math.sqrt(2.0 / (cin * k * k)))
        self.bias = nn.Parameter(torch.zeros(cout))
        self.warp = _FilterWarp(group, k)

    def forward(self, x: Tensor) -> Tensor:
        g = self.group.order
        w = self.warp(self.weight)  # (O, G, I, k, k)
        w = w.reshape(self.cout * g, *w.shape[2:])  # (O*G, I, k, k)
        y = F.conv2d(x, w, self.bias.repeat_interleave(g), padding=w.shape[-1] // 2)  # (B, O*G, H, W)
        return y.reshape(x.shape[0], self.cout, g, *y.shape[-2:])


class GroupConv(nn.Module):
    """G -> G convolution. x (B, C_in, G, H, W) -> (B, C_out, G, H, W).

    Output element ``g`` uses filter ``W_g[:, :, h] = g . W[:, :, g^-1 h]``.
    """

    def __init__(self, group: Group, cin: int, cout: int, k: int) -> None:
        super().__init__()
        g = group.order
        self.group, self.cin, self.cout = group, cin, cout
        self.weight = nn.Parameter(torch.randn(cout, cin, g, k, k) * math.sqrt(2.0 / (cin * g * k * k)))
        self.bias = nn.Parameter(torch.zeros(cout))
        self.warp = _FilterWarp(group, k)
        perm = torch.tensor([[group.compose(group.inverse(a), b) for b in range(g)] for a in range(g)])
        self.register_buffer("perm", perm, persistent=False)  # (G_out, G_in): g^-1 o h

    def forward(self, x: Tensor) -> Tensor:
        g, k = self.group.order, self.weight.shape[-1]
        w = self.warp(self.weight.reshape(self.cout, self.cin * g, k, k))  # (O, G, I*G, k, k)
        w = w.reshape(self.cout, g, self.cin, g, k, k)  # (O, G_out, I, G_in', k, k)
        w = w[:, torch.arange(g, device=w.device).view(g, 1), :, self.perm]  # (G_out, G_in, O, I, k, k)
        w = w.permute(2, 0, 3, 1, 4, 5).reshape(self.cout * g, self.cin * g, k, k)  # (O*G, I*G, k, k)
        b, _, _, h, wd = x.shape
        y = F.conv2d(x.reshape(b, self.cin * g, h, wd), w, self.bias.repeat_interleave(g), padding=k // 2)
        return y.reshape(b, self.cout, g, h, wd)


class GroupBatchNorm(nn.BatchNorm3d):
    """BatchNorm with statistics shared over the group axis (keeps equivariance)."""


@register_canonicalizer("equivariant")
class EquivariantCanonicalizer(Canonicalizer):
    """Small G-CNN: lifting conv, ``depth - 1`` group convs (BN + ReLU), 1-channel group conv,
    disc-masked spatial mean. x (B, C, size, size) -> scores (B, G).

    Args:
        group, in_chans, size: as for every canonicalizer.
        width: channels per group element.
        depth: number of convolutions before the scoring layer.
        kernel_size: odd filter size (5 keeps 45-degree filter rotations reasonable).
    """

    def __init__(
        self, group: "str | Group", in_chans: int, size: int, width: int = 8, depth: int = 3, kernel_size: int = 5
    ) -> None:
        super().__init__(group, in_chans, size)
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd; got {kernel_size}")
        grp = get_group(group)
        layers: list = [LiftingConv(grp, in_chans, width, kernel_size), GroupBatchNorm(width), nn.ReLU()]
        for _ in range(depth - 1):
            layers += [GroupConv(grp, width, width, kernel_size), GroupBatchNorm(width), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.head = GroupConv(grp, width, 1, kernel_size)
        r = (size - 1) / 2.0
        yy, xx = torch.meshgrid(torch.arange(size) - r, torch.arange(size) - r, indexing="ij")
        disc = ((yy**2 + xx**2) <= r**2).float()
        self.register_buffer("disc", disc / disc.sum(), persistent=False)  # (size, size)
        self.config = {"width": width, "depth": depth, "kernel_size": kernel_size}

    def forward(self, x: Tensor) -> ScoreOutput:
        y = self.head(self.body(x))  # (B, 1, G, H, W)
        scores = (y[:, 0] * self.disc).sum(dim=(-2, -1))  # (B, G)
        return ScoreOutput(scores=scores)
