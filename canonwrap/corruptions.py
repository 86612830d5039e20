"""Common image corruptions with 5 severities, batched and deterministic with a seed.

In the spirit of ImageNet-C / CIFAR-10-C (Hendrycks & Dietterich, ICLR 2019), re-implemented in
torch on whole batches (no PIL, no per-image loops). Images are float tensors in [0, 1] with
shape (B, C, H, W), *before* mean/std normalization; outputs are clamped to [0, 1] and keep the
input's shape, dtype and device.

===============  ===============================================  ===============================
name             operation                                        severity 1 .. 5
===============  ===============================================  ===============================
gaussian_noise   x + sigma * N(0, I)                              sigma 0.08 0.12 0.18 0.26 0.38
gaussian_blur    separable Gaussian conv, replicate padding       sigma 0.5 1.0 1.5 2.0 3.0 px
brightness       x + delta                                        delta 0.1 0.2 0.3 0.4 0.5
contrast         (x - mean) * c + mean, mean per image            c 0.4 0.3 0.2 0.1 0.05
quantization     round(x * (2^b - 1)) / (2^b - 1)                 bits 5 4 3 2 1
===============  ===============================================  ===============================

Noise and contrast levels are ImageNet-C's. Blur sigmas are in pixels and chosen for small
images (28-64 px; ImageNet-C uses 1-6 px at 224 px).

Example::

    >>> x = torch.rand(8, 3, 32, 32)
    >>> list_corruptions()
    ['brightness', 'contrast', 'gaussian_blur', 'gaussian_noise', 'quantization']
    >>> y = apply_corruption("gaussian_noise", x, severity=3, seed=0)   # (8, 3, 32, 32) in [0, 1]
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Tuple

import torch
import torch.nn.functional as F

from canonwrap._registry import Registry

__all__ = ["Corruption", "CORRUPTIONS", "apply_corruption", "list_corruptions", "SEVERITIES"]

SEVERITIES: Tuple[int, ...] = (1, 2, 3, 4, 5)


@dataclass(frozen=True)
class Corruption:
    """A corruption: ``fn(x, level, generator)`` applied with ``levels[severity - 1]``."""

    name: str
    levels: Tuple[float, ...]
    fn: Callable[[torch.Tensor, float, torch.Generator], torch.Tensor]
    description: str = ""


CORRUPTIONS: Registry[Corruption] = Registry("corruption")


def _register(name: str, levels: Tuple[float, ...], description: str):
    def deco(fn):
        CORRUPTIONS.register(name)(Corruption(name, tuple(levels), fn, description))
        return fn

    return deco


# ----------------------------------------------------------------------------- the corruptions
@_register("gaussian_noise", (0.08, 0.12, 0.18, 0.26, 0.38), "additive i.i.d. Gaussian noise, std = level")
def _gaussian_noise(x: torch.Tensor, sigma: float, gen: torch.Generator) -> torch.Tensor:
    noise = torch.randn(x.shape, generator=gen, device=x.device, dtype=torch.float32)  # (B, C, H, W)
    return x + sigma * noise.to(x.dtype)


def _gaussian_kernel1d(sigma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    radius = max(1, math.ceil(3.0 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return (k / k.sum()).to(dtype=dtype, device=device)  # (2r+1,)


@_register("gaussian_blur", (0.5, 1.0, 1.5, 2.0, 3.0), "separable Gaussian blur, std in pixels = level")
def _gaussian_blur(x: torch.Tensor, sigma: float, gen: torch.Generator) -> torch.Tensor:
    b, c, h, w = x.shape
    k = _gaussian_kernel1d(sigma, x.dtype, x.device)  # (K,)
    r = (k.numel() - 1) // 2
    y = x.reshape(b * c, 1, h, w)  # one channel per conv "image": (B*C, 1, H, W)
    y = F.conv2d(F.pad(y, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))  # horizontal
    y = F.conv2d(F.pad(y, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))  # vertical
    return y.reshape(b, c, h, w)


@_register("brightness", (0.1, 0.2, 0.3, 0.4, 0.5), "add a constant = level to every pixel")
def _brightness(x: torch.Tensor, delta: float, gen: torch.Generator) -> torch.Tensor:
    return x + delta


@_register("contrast", (0.4, 0.3, 0.2, 0.1, 0.05), "shrink towards the per-image mean by factor = level")
def _contrast(x: torch.Tensor, factor: float, gen: torch.Generator) -> torch.Tensor:
    mean = x.mean(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
    return (x - mean) * factor + mean


@_register("quantization", (5, 4, 3, 2, 1), "reduce the bit depth per channel to level bits")
def _quantization(x: torch.Tensor, bits: float, gen: torch.Generator) -> torch.Tensor:
    q = float(2 ** int(bits) - 1)
    return torch.round(x.clamp(0, 1) * q) / q


# ----------------------------------------------------------------------------- public API
def list_corruptions() -> List[str]:
    """Names of the registered corruptions, sorted."""
    return CORRUPTIONS.names()


def apply_corruption(name: str, x: torch.Tensor, severity: int, seed: int = 0) -> torch.Tensor:
    """Corrupt a batch of images.

    Args:
        name: a name from :func:`list_corruptions` (case-insensitive).
        x: (B, C, H, W) floating-point images in [0, 1] (unnormalized).
        severity: int in 1..5 (5 = strongest).
        seed: seed of the random corruptions (gaussian_noise); the same ``(x, seed)`` gives the
            same output on the same device, and the global RNG is not touched.

    Returns:
        (B, C, H, W) tensor in [0, 1], same dtype and device as ``x``.

    Raises:
        KeyError: unknown name (lists the valid names and the nearest match).
        ValueError / TypeError: bad severity, shape, dtype or value range.
    """
    corruption = CORRUPTIONS.get(name)
    if isinstance(severity, bool) or not isinstance(severity, int) or severity not in SEVERITIES:
        raise ValueError(f"severity must be an int in {SEVERITIES[0]}..{SEVERITIES[-1]}, got {severity!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor of shape (B, C, H, W), got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(f"x must have shape (B, C, H, W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x must be floating point in [0, 1], got dtype {x.dtype} (convert with x.float() / 255)")
    if x.numel() and (float(x.min()) < -1e-6 or float(x.max()) > 1 + 1e-6):
        raise ValueError(
            f"x must be an image in [0, 1] before normalization, got values in [{float(x.min()):.3g}, {float(x.max()):.3g}]"
        )
    gen = torch.Generator(device=x.device)
    gen.manual_seed(seed)
    with torch.no_grad():
        out = corruption.fn(x, corruption.levels[severity - 1], gen)
    return out.clamp(0.0, 1.0).to(x.dtype)
