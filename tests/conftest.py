"""Shared tiny fixtures for the core test suite (CPU, one thread, no downloads).

Fixtures that return *functions* (``smooth_images``, ``oriented_images``, ``tiny_model``) keep the
tests free of ``from conftest import ...``. Everything is seeded; models are tiny.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _disc(size: int, frac: float) -> Tensor:
    """(size, size) 0/1 mask of a centred disc of radius ``frac * (size - 1) / 2``."""
    r = (size - 1) / 2.0
    yy, xx = torch.meshgrid(torch.arange(size) - r, torch.arange(size) - r, indexing="ij")
    return ((yy**2 + xx**2) <= (frac * r) ** 2).float()


def make_smooth_images(n: int, size: int = 32, channels: int = 1, low: int = 6, seed: int = 0, frac: float = 0.85) -> Tensor:
    """Smooth random images in [0, 1]: ``low x low`` uniform noise upsampled (bicubic) to
    ``size x size`` and zeroed outside a centred disc, so that 45-degree rotations (bilinear)
    change them only mildly and nothing leaves the frame. Returns (n, channels, size, size)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.rand(n, channels, low, low, generator=g)  # (n, C, low, low)
    x = F.interpolate(z, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)  # (n, C, S, S)
    return x * _disc(size, frac)


def make_oriented_images(n: int, size: int = 32, channels: int = 1, seed: int = 0) -> Tensor:
    """Smooth images with a natural "up": a faint smooth texture plus a bright blob above the
    centre (jittered), inside a disc. A canonicalizer learns their pose in a few hundred steps.
    Returns (n, channels, size, size) in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    tex = make_smooth_images(n, size, channels, low=5, seed=seed + 1000, frac=1.0)  # (n, C, S, S)
    r = (size - 1) / 2.0
    yy, xx = torch.meshgrid(torch.arange(size) - r, torch.arange(size) - r, indexing="ij")
    jitter = (torch.rand(n, 2, generator=g) - 0.5) * 3.0  # (n, 2) pixels
    by = (-0.5 * r + jitter[:, 0]).view(n, 1, 1, 1)
    bx = jitter[:, 1].view(n, 1, 1, 1)
    blob = torch.exp(-((yy - by) ** 2 + (xx - bx) ** 2) / (2 * (size / 12.0) ** 2))  # (n, 1, S, S)
    return ((0.4 * tex + 0.6 * blob) * _disc(size, 0.85)).clamp(0, 1)


class TinyNet(nn.Module):
    """A plain classifier that is NOT in canonwrap's zoo: conv + BatchNorm + dropout + linear.
    Input (B, 3, 16, 16) -> (B, num_classes). No ``pretrained_cfg``: wrapping needs input_size."""

    def __init__(self, num_classes: int = 4, width: int = 8) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten()
        )
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.drop(self.body(x)))


SMALL_ORBIT = {"width": 4, "embed_dim": 16}
SMALL_EQUIVARIANT = {"width": 4, "depth": 2, "kernel_size": 5}


def small_canon_kwargs(canonicalizer: str) -> dict:
    return dict(SMALL_ORBIT if canonicalizer == "orbit" else SMALL_EQUIVARIANT)


@pytest.fixture(scope="session")
def smooth_images() -> Callable[..., Tensor]:
    return make_smooth_images


@pytest.fixture(scope="session")
def oriented_images() -> Callable[..., Tensor]:
    return make_oriented_images


@pytest.fixture(scope="session")
def tiny_net_cls() -> type:
    return TinyNet


@pytest.fixture(scope="session")
def tiny_model() -> Callable[..., Any]:
    """``tiny_model(group="c4", canonicalizer="orbit", seed=0, **wrap_kwargs)``: the built-in
    ``canonwrap:digitnet`` (input (1, 32, 32)) behind a small canonicalizer scoring 16x16 copies,
    in eval mode."""

    def build(group: str = "c4", canonicalizer: str = "orbit", seed: int = 0, **kwargs: Any):
        import canonwrap as cw

        torch.manual_seed(seed)
        kwargs.setdefault("canon_size", 16)
        kwargs.setdefault("canonicalizer_kwargs", small_canon_kwargs(canonicalizer))
        return cw.wrap("canonwrap:digitnet", group=group, canonicalizer=canonicalizer, **kwargs).eval()

    return build


def _write_preprocessor(path: Path, mean: list, std: list, size: dict) -> None:
    (path / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": mean, "image_std": std, "size": size, "do_normalize": True, "do_resize": True})
    )


HF_VIT_MEAN, HF_VIT_STD = [0.1, 0.2, 0.3], [0.5, 0.6, 0.7]


@pytest.fixture(scope="session")
def hf_vit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ``ViTForImageClassification`` (32x32 input, 3 labels) saved with ``save_pretrained``
    plus a ``ViTImageProcessor`` config (mean HF_VIT_MEAN, std HF_VIT_STD, 32x32)."""
    pytest.importorskip("transformers")
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    out = tmp_path_factory.mktemp("hf_vit")
    torch.manual_seed(0)
    cfg = ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, num_labels=3,
    )
    ViTForImageClassification(cfg).eval().save_pretrained(out)
    ViTImageProcessor(image_mean=HF_VIT_MEAN, image_std=HF_VIT_STD, size={"height": 32, "width": 32}).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def hf_convnext_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ``ConvNextForImageClassification`` (2 stages, 4 labels) with a hand-written
    ``preprocessor_config.json`` (mean 0.4, std 0.2, shortest_edge 24)."""
    pytest.importorskip("transformers")
    from transformers import ConvNextConfig, ConvNextForImageClassification

    out = tmp_path_factory.mktemp("hf_convnext")
    torch.manual_seed(0)
    cfg = ConvNextConfig(num_channels=3, num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=4)
    ConvNextForImageClassification(cfg).eval().save_pretrained(out)
    _write_preprocessor(out, [0.4] * 3, [0.2] * 3, {"shortest_edge": 24})
    return out
