"""Pictures people would rather look at than read (matplotlib imported lazily, Agg canvas)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def _figure(w: float, h: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def plot_angle_sweep(report: Any, path: "str | Path") -> Path:
    """Accuracy vs rotation angle, frozen vs wrapped, with the group's elements marked."""
    fig = _figure(7, 3.6)
    ax = fig.add_subplot(1, 1, 1)
    for name, m in (("frozen", report.frozen), ("wrapped", report.wrapped)):
        if m is not None and m.angle_acc:
            ax.plot(m.angles, [100 * a for a in m.angle_acc], marker="o", ms=3, label=name)
    step = 360.0 / len([e for e in report.elements if not e.startswith("flip")])
    for k in range(int(round(360 / step))):
        ax.axvline(k * step, color="0.85", lw=0.8, zorder=0)
    ax.set_xlabel("rotation angle (degrees)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 101)
    ax.set_title(f"Accuracy vs rotation ({report.group.upper()} canonicalizer; grey lines: group elements)")
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(str(path))
    return Path(path)


@torch.no_grad()
def plot_canonicalization(model: Any, images: torch.Tensor, path: "str | Path", seed: int = 0) -> Path:
    """Rows: a randomly rotated input, and its canonicalized version with the chosen element."""
    from .groups import rotate

    gen = torch.Generator().manual_seed(seed)
    angles = torch.rand(images.shape[0], generator=gen) * 360
    x = rotate(images, angles).clamp(0, 1)
    was = model.training
    model.eval()
    out = model.canonicalize(x.to(next(model.parameters()).device))
    model.train(was)
    n = x.shape[0]
    fig = _figure(1.3 * n, 3.4)
    for i in range(n):
        for row, (img, title) in enumerate(
            ((x[i], f"in {angles[i]:.0f}°"), (out.images[i].cpu(), f"undo {model.group.describe(int(out.index[i]))}"))
        ):
            ax = fig.add_subplot(2, n, row * n + i + 1)
            arr = img.permute(1, 2, 0).numpy()
            ax.imshow(arr[..., 0] if arr.shape[-1] == 1 else arr, cmap="gray", vmin=0, vmax=1)
            ax.set_title(title, fontsize=7, pad=2)
            ax.axis("off")
    fig.suptitle("inputs (top) and canonicalized (bottom)", fontsize=9)
    fig.tight_layout()
    fig.savefig(str(path))
    return Path(path)
