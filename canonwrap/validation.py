"""Input checks with errors that say what was expected and what arrived."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def _exporting() -> bool:
    return bool(
        torch.jit.is_tracing()
        or torch.compiler.is_compiling()
        or torch.onnx.is_in_onnx_export()
    )


def check_pixels(x: Tensor, input_size: Sequence[int], tol: float = 1e-4) -> None:
    """Check ``x`` is float pixels in [0, 1] of shape (B, *input_size).

    Raises TypeError/ValueError naming the expected and received shape, dtype or range. The value
    range check is skipped while tracing/exporting (it is data dependent).
    """
    c, h, w = (int(v) for v in input_size)
    expected = f"(B, {c}, {h}, {w}) float pixels in [0, 1]"
    if not isinstance(x, Tensor):
        raise TypeError(f"expected a torch.Tensor of {expected}; got {type(x).__name__}")
    if not torch.is_floating_point(x):
        raise TypeError(
            f"expected {expected}; got dtype {x.dtype}. Convert integer images with x.float() / 255"
        )
    if x.dim() != 4:
        hint = " (add a batch dimension with x.unsqueeze(0))" if x.dim() == 3 else ""
        raise ValueError(f"expected {expected}; got shape {tuple(x.shape)}{hint}")
    if x.shape[1] != c:
        hint = " (channels-last input? use x.permute(0, 3, 1, 2))" if x.shape[-1] == c else ""
        raise ValueError(f"expected {c} channels, {expected}; got shape {tuple(x.shape)}{hint}")
    if x.shape[2] != h or x.shape[3] != w:
        raise ValueError(
            f"expected spatial size {h}x{w}, {expected}; got shape {tuple(x.shape)}. Resize the input first"
        )
    if _exporting() or x.numel() == 0:
        return
    lo, hi = float(x.detach().min()), float(x.detach().max())
    if lo < -tol or hi > 1 + tol or lo != lo or hi != hi:
        hint = " (0-255 pixels? divide by 255)" if hi > 1.5 else ""
        raise ValueError(f"expected pixel values in [0, 1]; got min {lo:.4g}, max {hi:.4g}{hint}")
