"""Small non-equivariant scoring networks for the orbit canonicalizer."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


def conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SmallCNN(nn.Module):
    """(N, C, s, s) -> (N, embed_dim). Three strided conv blocks and a flattened 4x4 map.

    Deliberately NOT rotation invariant: the flatten keeps the spatial layout, so the embedding
    of an image and of its rotation differ, which is what the orbit canonicalizer needs.
    """

    def __init__(self, in_chans: int = 3, width: int = 16, embed_dim: int = 128, size: int = 0) -> None:
        super().__init__()
        side = size
        for _ in range(3):
            side = (side - 1) // 2 + 1  # three stride-2 convs
        # a fixed pooling when the 4x4 map divides evenly (exports with every ONNX exporter);
        # adaptive pooling otherwise
        pool: nn.Module = nn.AdaptiveAvgPool2d(4)
        if size > 0 and side % 4 == 0:
            pool = nn.Identity() if side == 4 else nn.AvgPool2d(side // 4)
        self.body = nn.Sequential(
            conv_bn(in_chans, width, 2),
            conv_bn(width, 2 * width, 2),
            conv_bn(2 * width, 2 * width, 2),
            pool,
        )
        self.proj = nn.Sequential(nn.Flatten(), nn.Linear(2 * width * 16, embed_dim), nn.ReLU(inplace=True))
        self.num_features = embed_dim

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.body(x))  # (N, D)


class TimmEncoder(nn.Module):
    """A timm model (classifier removed) as the orbit scoring network."""

    def __init__(self, name: str, in_chans: int, **kwargs: Any) -> None:
        super().__init__()
        import timm

        self.model = timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_chans, **kwargs)
        self.num_features = int(self.model.num_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


def infer_num_features(net: nn.Module, in_chans: int, size: int) -> int:
    """Embedding width of an arbitrary encoder, from ``num_features`` or one dry run."""
    if getattr(net, "num_features", None):
        return int(net.num_features)
    was_training = net.training
    net.eval()
    with torch.no_grad():
        out = net(torch.zeros(2, in_chans, size, size))
    net.train(was_training)
    if out.dim() != 2:
        raise ValueError(f"the orbit scoring network must return (N, D) embeddings; got shape {tuple(out.shape)}")
    return int(out.shape[1])
