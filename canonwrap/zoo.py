"""Built-in architectures reachable as ``canonwrap:<name>`` (tiny models for demos and tests)."""
from __future__ import annotations

from torch import Tensor, nn

from .backbones import register_builtin


class DigitNet(nn.Module):
    """A small CNN classifier for 32x32 grayscale digits, with timm's feature contract.

    ``forward_features`` (B, 1, 32, 32) -> (B, 4 * width, 4, 4); ``forward_head(pre_logits=True)`` -> (B, 128).
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 1, width: int = 16, img_size: int = 32) -> None:
        super().__init__()
        # lets checkpoints of a wrapped DigitNet rebuild it by name ("canonwrap:digitnet")
        self.builtin_spec = {"name": "digitnet", "kwargs": dict(num_classes=num_classes, in_chans=in_chans, width=width, img_size=img_size)}

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            )

        self.features = nn.Sequential(block(in_chans, width), block(width, 2 * width), block(2 * width, 4 * width))
        self.num_classes = num_classes
        self.fc = nn.Sequential(nn.Flatten(), nn.Dropout(0.3), nn.Linear(4 * width * (img_size // 8) ** 2, 128), nn.ReLU(inplace=True))
        self.classifier = nn.Linear(128, num_classes)
        self.num_features = 128
        self.pretrained_cfg = {"mean": (0.1307,), "std": (0.3081,), "input_size": (in_chans, img_size, img_size)}

    def forward_features(self, x: Tensor) -> Tensor:
        return self.features(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.fc(x)
        return x if pre_logits else self.classifier(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


@register_builtin("digitnet")
def digitnet(**kwargs) -> DigitNet:
    return DigitNet(**kwargs)
