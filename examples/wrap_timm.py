"""Wrap a timm model, train its canonicalizer and a new head on real digits, export, verify.

    python examples/wrap_timm.py --model resnet18 --epochs 2

Any timm model name works (``pretrained=True`` loads timm's weights where a download is possible;
``--checkpoint weights.safetensors`` loads local weights through timm's own loading path).
The digits are upsampled to the model's input size and repeated to 3 channels.
"""
import argparse

import torch
import torch.nn.functional as F

import canonwrap as cw


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--n", type=int, default=1000)
    a = p.parse_args()

    kwargs = {"checkpoint_path": a.checkpoint} if a.checkpoint else {}
    model = cw.wrap(f"timm:{a.model}", group="c4", num_classes=10, input_size=(3, a.size, a.size),
                    backbone_kwargs=kwargs)
    data = cw.load_digits()

    def rgb(x: torch.Tensor) -> torch.Tensor:  # (N, 1, 32, 32) -> (N, 3, size, size)
        return F.interpolate(x, size=(a.size, a.size), mode="bilinear", align_corners=False).clamp(0, 1).repeat(1, 3, 1, 1)

    train = (rgb(data.train_x[: a.n]), data.train_y[: a.n])
    test = (rgb(data.test_x[:300]), data.test_y[:300])
    cw.fit(model, train, epochs=a.epochs, batch_size=32)
    print(cw.evaluate(model, test, angles=None).table())
    cw.export_onnx(model, f"{a.model}-c4.onnx")
    print(cw.verify_onnx(f"{a.model}-c4.onnx", model, test[0][:32]).summary())


if __name__ == "__main__":
    main()
