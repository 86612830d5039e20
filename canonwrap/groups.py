"""Planar symmetry groups (C4, C8, D4, D8) and export-safe, batched application to images.

Element ``e`` of a group with ``n`` rotations is the map ``x -> R(k * 360/n) F^f x`` with
``k = e % n`` and ``f = e // n``: first an optional horizontal flip ``F``, then a counter-clockwise
rotation ``R`` (as the image is displayed, row 0 at the top). Element 0 is the identity.

Applying elements to images never branches on data. Every element is precomputed as a *warp table*
for a given image size: for each output pixel, ``K`` source pixel indices and weights. Elements that
are multiples of 90 degrees (and flips) are exact pixel permutations (one tap, weight 1); 45-degree
elements are bilinear (four taps, zeros outside the image). A per-sample choice is then a gather
over the table (``table[index]``) followed by a gather over pixels, which exports to ONNX as
Gather/GatherElements with a dynamic batch: no interpolation op, no Python loop, no float-only
kernels (GridSample) on the deployment path.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._registry import Registry

GROUPS: Registry["Group"] = Registry("group")


@dataclass(frozen=True)
class Group:
    """A finite planar group: ``n_rotations`` rotations, optionally with flips (dihedral)."""

    name: str
    n_rotations: int
    flips: bool

    @property
    def order(self) -> int:
        return self.n_rotations * (2 if self.flips else 1)

    def __len__(self) -> int:
        return self.order

    def _check(self, e: int) -> int:
        if not 0 <= int(e) < self.order:
            raise IndexError(f"group {self.name} has elements 0..{self.order - 1}; got {e}")
        return int(e)

    def rotation(self, e: int) -> int:
        """Rotation step ``k`` of element ``e`` (angle = k * 360 / n)."""
        return self._check(e) % self.n_rotations

    def flip(self, e: int) -> bool:
        return self._check(e) >= self.n_rotations

    def angle(self, e: int) -> float:
        """Counter-clockwise rotation angle of element ``e`` in degrees."""
        return self.rotation(e) * 360.0 / self.n_rotations

    def is_exact(self, e: int) -> bool:
        """True when the element is a pixel permutation (multiple of 90 degrees, optional flip)."""
        return (self.angle(e) % 90.0) == 0.0

    @property
    def exact(self) -> bool:
        """True when every element is a pixel permutation (no interpolation anywhere)."""
        return all(self.is_exact(e) for e in range(self.order))

    def element(self, rotation: int, flip: bool = False) -> int:
        if flip and not self.flips:
            raise ValueError(f"group {self.name} has no flips")
        return (rotation % self.n_rotations) + (self.n_rotations if flip else 0)

    def compose(self, a: int, b: int) -> int:
        """Index of ``a o b`` (apply ``b`` first). Uses F R_k F = R_{-k}."""
        ka, fa, kb, fb = self.rotation(a), self.flip(a), self.rotation(b), self.flip(b)
        k = ka + (-kb if fa else kb)
        return self.element(k, fa != fb)

    def inverse(self, e: int) -> int:
        k, f = self.rotation(e), self.flip(e)
        return self.element(k if f else -k, f)  # a flip-rotation is its own inverse

    def describe(self, e: int) -> str:
        return f"{'flip+' if self.flip(e) else ''}rot{self.angle(e):g}"

    def elements(self) -> List[int]:
        return list(range(self.order))

    def cayley_table(self) -> Tensor:
        """(G, G) long tensor, ``table[a, b] = a o b``."""
        return torch.tensor([[self.compose(a, b) for b in range(self.order)] for a in range(self.order)])

    def inverse_table(self) -> Tensor:
        """(G,) long tensor, ``table[e] = e^-1``."""
        return torch.tensor([self.inverse(e) for e in range(self.order)])

    def warp_tables(self, height: int, width: int) -> Tuple[Tensor, Tensor]:
        """Warp tables for images of ``height x width``; see :func:`warp_tables`."""
        return warp_tables(self, height, width)


for _name, _n, _f in [("c2", 2, False), ("c4", 4, False), ("c8", 8, False), ("d4", 4, True), ("d8", 8, True)]:
    GROUPS.register(_name)(Group(_name, _n, _f))


def get_group(name: "str | Group") -> Group:
    """Group by name (``c4``, ``c8``, ``d4``, ``d8``, ``c2``); unknown names list the valid ones."""
    if isinstance(name, Group):
        return name
    return GROUPS.get(name)


def list_groups() -> List[str]:
    return GROUPS.names()


def _source_coords(angle_deg: float, flip: bool, height: int, width: int) -> Tuple[Tensor, Tensor]:
    """Source pixel coordinates (row, col), each (H, W) float64, for output = g . input.

    Pixel centres, origin at the image centre, y up. ``out(p) = in(g^-1 p)`` with
    ``g^-1 = F^f R(-angle)``.
    """
    i = torch.arange(height, dtype=torch.float64).view(-1, 1).expand(height, width)
    j = torch.arange(width, dtype=torch.float64).view(1, -1).expand(height, width)
    u = j - (width - 1) / 2.0
    v = (height - 1) / 2.0 - i
    t = math.radians(angle_deg)
    c, s = math.cos(t), math.sin(t)
    if angle_deg % 90.0 == 0.0:  # exact trig for the permutation elements
        c, s = float(round(c)), float(round(s))
    us, vs = u * c + v * s, -u * s + v * c
    if flip:
        us = -us
    return (height - 1) / 2.0 - vs, us + (width - 1) / 2.0


@lru_cache(maxsize=64)
def _warp_tables_cached(n: int, flips: bool, height: int, width: int) -> Tuple[Tensor, Tensor]:
    group = Group(f"_{n}{flips}", n, flips)
    taps = 1 if group.exact else 4
    index = torch.zeros(group.order, taps, height * width, dtype=torch.long)
    weight = torch.zeros(group.order, taps, height * width, dtype=torch.float32)
    for e in range(group.order):
        ri, rj = _source_coords(group.angle(e), group.flip(e), height, width)
        if group.is_exact(e):
            ii, jj = ri.round().long().flatten(), rj.round().long().flatten()
            index[e, 0] = ii * width + jj
            weight[e, 0] = 1.0
            continue
        i0, j0 = ri.floor(), rj.floor()
        di, dj = (ri - i0).flatten(), (rj - j0).flatten()
        i0, j0 = i0.long().flatten(), j0.long().flatten()
        corners = [(0, 0, (1 - di) * (1 - dj)), (0, 1, (1 - di) * dj), (1, 0, di * (1 - dj)), (1, 1, di * dj)]
        for t, (oi, oj, w) in enumerate(corners):
            ii, jj = i0 + oi, j0 + oj
            inside = (ii >= 0) & (ii < height) & (jj >= 0) & (jj < width)
            index[e, t] = torch.where(inside, ii * width + jj, torch.zeros_like(ii))
            weight[e, t] = torch.where(inside, w, torch.zeros_like(w)).float()
    return index, weight


def warp_tables(group: "str | Group", height: int, width: int) -> Tuple[Tensor, Tensor]:
    """Precomputed per-element warps for ``height x width`` images.

    Returns ``index`` (G, K, H*W) long and ``weight`` (G, K, H*W) float32 with ``K = 1`` for groups
    of exact elements and ``K = 4`` (bilinear taps) otherwise; exact elements use weight
    ``(1, 0, 0, 0)`` so they stay bit-exact. ``(g . x)[p] = sum_k weight[g, k, p] * x[index[g, k, p]]``.
    """
    group = get_group(group)
    if group.n_rotations % 2 == 0 and group.n_rotations > 2 and height != width:
        raise ValueError(
            f"group {group.name} rotates by 90 degrees, which needs square images; got {height}x{width}"
        )
    index, weight = _warp_tables_cached(group.n_rotations, group.flips, int(height), int(width))
    return index.clone(), weight.clone()


def apply_warp(x: Tensor, index: Tensor, weight: Tensor) -> Tensor:
    """Per-sample warp. x (B, C, H, W); index/weight (B, K, H*W) -> (B, C, H, W)."""
    b, c, h, w = x.shape
    flat = x.reshape(b, c, h * w)  # (B, C, HW)
    out = None
    for t in range(index.shape[1]):  # K <= 4 taps, a static loop (no data-dependent control flow)
        tap = torch.gather(flat, 2, index[:, t].unsqueeze(1).expand(b, c, h * w))  # (B, C, HW)
        if index.shape[1] > 1:
            tap = tap * weight[:, t].unsqueeze(1).to(tap.dtype)
        out = tap if out is None else out + tap
    return out.reshape(b, c, h, w)


def apply_orbit(x: Tensor, index: Tensor, weight: Tensor) -> Tensor:
    """Every element applied to every sample. x (B, C, H, W); tables (G, K, H*W) -> (B, G, C, H, W)."""
    b, c, h, w = x.shape
    g, k, _ = index.shape
    flat = x.reshape(b, c, h * w)
    out = None
    for t in range(k):  # static loop over <= 4 taps
        tap = flat[:, :, index[:, t]]  # (B, C, G, HW)
        if k > 1:
            tap = tap * weight[:, t].to(tap.dtype)
        out = tap if out is None else out + tap
    return out.permute(0, 2, 1, 3).reshape(b, g, c, h, w)


class GroupWarp(nn.Module):
    """Applies group elements to fixed-size images with precomputed tables (export-safe).

    ``forward(x, element)`` returns ``element[b] . x[b]`` for each sample; ``orbit(x)`` returns all
    ``|G|`` transformed copies. ``inverse=True`` tables apply ``g^-1`` instead of ``g``.
    """

    def __init__(self, group: "str | Group", height: int, width: int, inverse: bool = False) -> None:
        super().__init__()
        self.group = get_group(group)
        self.size = (int(height), int(width))
        index, weight = warp_tables(self.group, height, width)
        if inverse:
            inv = self.group.inverse_table()
            index, weight = index[inv], weight[inv]
        self.register_buffer("index", index, persistent=False)
        self.register_buffer("weight", weight, persistent=False)

    def _check(self, x: Tensor) -> None:
        if tuple(x.shape[-2:]) != self.size:
            raise ValueError(f"GroupWarp built for {self.size[0]}x{self.size[1]} images; got {tuple(x.shape)}")

    def forward(self, x: Tensor, element: Tensor) -> Tensor:
        """x (B, C, H, W), element (B,) long -> (B, C, H, W)."""
        self._check(x)
        return apply_warp(x, self.index[element], self.weight[element])

    def orbit(self, x: Tensor) -> Tensor:
        """x (B, C, H, W) -> (B, G, C, H, W), entry g is ``g . x`` (or ``g^-1 . x`` if inverse)."""
        self._check(x)
        return apply_orbit(x, self.index, self.weight)


def transform(x: Tensor, group: "str | Group", element: "int | Tensor") -> Tensor:
    """Apply one element (int) or per-sample elements ((B,) tensor) to images (B, C, H, W)."""
    group = get_group(group)
    index, weight = warp_tables(group, x.shape[-2], x.shape[-1])
    index, weight = index.to(x.device), weight.to(x.device)
    if isinstance(element, int):
        element = torch.full((x.shape[0],), group._check(element), dtype=torch.long, device=x.device)
    return apply_warp(x, index[element], weight[element])


def rotate(x: Tensor, angle_deg: "float | Tensor", flip: bool = False) -> Tensor:
    """Rotate images counter-clockwise by arbitrary angles (bilinear, zeros outside).

    x (B, C, H, W); angle a float or (B,) tensor in degrees. Same convention as the group elements:
    ``rotate(x, 90)`` equals ``torch.rot90(x, 1, (-2, -1))`` for square images (up to float error).
    For evaluation and augmentation; deployment uses :class:`GroupWarp`.
    """
    b, _, h, w = x.shape
    angle = torch.as_tensor(angle_deg, dtype=torch.float32, device=x.device).reshape(-1).expand(b)
    t = torch.deg2rad(angle).view(b, 1, 1)
    c, s = torch.cos(t), torch.sin(t)
    i = torch.arange(h, dtype=torch.float32, device=x.device).view(1, h, 1)
    j = torch.arange(w, dtype=torch.float32, device=x.device).view(1, 1, w)
    u = j - (w - 1) / 2.0
    v = (h - 1) / 2.0 - i
    us, vs = u * c + v * s, -u * s + v * c  # (B, H, W)
    if flip:
        us = -us
    gx = us / max((w - 1) / 2.0, 1e-12)  # column -> [-1, 1] (align_corners=True)
    gy = -vs / max((h - 1) / 2.0, 1e-12)  # row -> [-1, 1]
    grid = torch.stack([gx, gy], dim=-1).to(x.dtype)  # (B, H, W, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
