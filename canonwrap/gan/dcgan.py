"""A small DCGAN (Radford et al., ICLR 2016) for 28x28 grayscale images in [0, 1].

Generator:      z (B, z_dim) -> (B, 2w, 7, 7) -> (B, w, 14, 14) -> (B, 1, 28, 28), sigmoid output.
Discriminator:  (B, 1, 28, 28) -> block1 (B, w, 14, 14) -> block2 (B, 2w, 7, 7) -> head (B, 1) logit.

The discriminator's named blocks ``block1`` / ``block2`` are the natural layers for
:class:`canonwrap.gan.DynamicMask`.

Example::

    >>> g, d = DCGANGenerator(z_dim=32, width=16), DCGANDiscriminator(width=16)
    >>> d(g(torch.randn(4, 32))).shape
    torch.Size([4, 1])
"""
from __future__ import annotations

import torch
from torch import nn


def dcgan_init(module: nn.Module) -> None:
    """DCGAN weight init: conv/linear ~ N(0, 0.02), BatchNorm weight ~ N(1, 0.02), bias 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


class DCGANGenerator(nn.Module):
    """z (B, z_dim) -> images (B, 1, 28, 28) in [0, 1].

    Args:
        z_dim: latent size.
        width: channels of the 14x14 stage (the 7x7 stage has 2*width).
    """

    def __init__(self, z_dim: int = 64, width: int = 64) -> None:
        super().__init__()
        self.z_dim, self.width = z_dim, width
        self.project = nn.Sequential(
            nn.Linear(z_dim, 2 * width * 7 * 7, bias=False),
            nn.Unflatten(1, (2 * width, 7, 7)),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(inplace=True),
        )
        self.up1 = nn.Sequential(
            nn.ConvTranspose2d(2 * width, width, 4, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        )
        self.up2 = nn.ConvTranspose2d(width, 1, 4, stride=2, padding=1)
        dcgan_init(self)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.dim() != 2 or z.shape[1] != self.z_dim:
            raise ValueError(f"expected z of shape (B, {self.z_dim}), got {tuple(z.shape)}")
        x = self.project(z)  # (B, 2w, 7, 7)
        x = self.up1(x)  # (B, w, 14, 14)
        return torch.sigmoid(self.up2(x))  # (B, 1, 28, 28)


class DCGANDiscriminator(nn.Module):
    """images (B, 1, 28, 28) in [0, 1] -> logits (B, 1) (higher = "real").

    Args:
        width: channels of block1 (block2 has 2*width).
    """

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.width = width
        self.block1 = nn.Sequential(
            nn.Conv2d(1, width, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
        )
        self.block2 = nn.Sequential(
            nn.Conv2d(width, 2 * width, 4, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.LeakyReLU(0.2, inplace=True),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(2 * width * 7 * 7, 1))
        dcgan_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or tuple(x.shape[1:]) != (1, 28, 28):
            raise ValueError(f"expected images of shape (B, 1, 28, 28), got {tuple(x.shape)}")
        x = 2.0 * x - 1.0  # [0, 1] -> [-1, 1]
        x = self.block1(x)  # (B, w, 14, 14)
        x = self.block2(x)  # (B, 2w, 7, 7)
        return self.head(x)  # (B, 1)
