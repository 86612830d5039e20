"""A small GAN training loop that works with a plain discriminator or a :class:`DynamicMask`.

Losses: the non-saturating GAN loss (Goodfellow et al., 2014) with logits::

    L_D = softplus(-D(x)) + softplus(D(G(z)))        L_G = softplus(-D(G(z)))

One discriminator step then one generator step per iteration, Adam(lr, betas=(0.5, 0.999)) as in
DCGAN. When the discriminator is a :class:`DynamicMask`, ``dmd.step(L_D_fake)`` is called after every
discriminator step with its loss on the fresh fakes of that step (fakes of the current generator,
scored before the discriminator trains on them): the detector's input.

Example::

    >>> from canonwrap.gan import DCGANGenerator, DCGANDiscriminator, DynamicMask, train_gan
    >>> images = torch.rand(256, 1, 28, 28)                      # (N, 1, 28, 28) in [0, 1]
    >>> g, d = DCGANGenerator(z_dim=16, width=8), DCGANDiscriminator(width=8)
    >>> dmd = DynamicMask(d, layers=["block1", "block2"], ratio=0.5, period=5)
    >>> hist = train_gan(g, dmd, images, steps=10, batch_size=16, progress=False)
    >>> len(hist["d_loss"]), len(hist["masked"])
    (10, 10)
"""
from __future__ import annotations

import math
import os
import time
from typing import Any, Dict, Iterator, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from canonwrap.gan.mask import DynamicMask


def save_grid(images: torch.Tensor, path: str, nrow: int = 8, pad: int = 2) -> str:
    """Save images (N, C, H, W) in [0, 1] (C = 1 or 3) as one PNG grid; returns ``path``."""
    from PIL import Image  # lazy: optional at import time

    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images (N, 1|3, H, W), got {tuple(images.shape)}")
    x = images.detach().float().clamp(0, 1).cpu()  # (N, C, H, W)
    n, c, h, w = x.shape
    rows = math.ceil(n / nrow)
    grid = torch.ones(c, rows * (h + pad) + pad, nrow * (w + pad) + pad)  # white background
    for i in range(n):
        r, q = divmod(i, nrow)
        top, left = pad + r * (h + pad), pad + q * (w + pad)
        grid[:, top : top + h, left : left + w] = x[i]
    arr = (grid * 255).round().byte().permute(1, 2, 0).numpy()  # (H', W', C)
    Image.fromarray(arr[..., 0] if c == 1 else arr, mode="L" if c == 1 else "RGB").save(path)
    return path


def _batches(data: Union[torch.Tensor, DataLoader], batch_size: int,
             gen: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless stream of image batches (B, C, H, W) from a tensor or a DataLoader."""
    if isinstance(data, torch.Tensor):
        while True:
            idx = torch.randint(0, data.shape[0], (batch_size,), generator=gen)
            yield data[idx]
    else:
        while True:
            for batch in data:
                yield batch[0] if isinstance(batch, (list, tuple)) else batch


def train_gan(
    generator: nn.Module,
    discriminator: nn.Module,
    data: Union[torch.Tensor, DataLoader],
    steps: int = 1000,
    batch_size: int = 64,
    lr: float = 2e-4,
    z_dim: Optional[int] = None,
    out_dir: Optional[str] = None,
    sample_every: int = 0,
    seed: int = 0,
    device: Optional[Union[str, torch.device]] = None,
    progress: bool = True,
) -> Dict[str, Any]:
    """Train a GAN for ``steps`` iterations (1 discriminator + 1 generator step each).

    Args:
        generator: maps z (B, z_dim) to images (B, C, H, W) in [0, 1].
        discriminator: maps images to logits (B, 1) or (B,); a plain module or a
            :class:`DynamicMask` (then its state machine is stepped every discriminator step).
        data: images (N, C, H, W) in [0, 1] (sampled with replacement), or a DataLoader yielding
            images or (images, labels).
        steps: iterations. batch_size: for tensor data. lr: Adam lr of both players.
        z_dim: latent size; default ``generator.z_dim``.
        out_dir: where sample grids go (``samples_{step:06d}.png``); None = no files.
        sample_every: save a grid every this many steps (and at the end); 0 = only at the end.
        seed: seeds the latent and batch sampling (a private generator; model init is yours).
        device: default the generator's device.
        progress: show a tqdm progress bar.

    Returns:
        history dict of per-step lists: ``d_loss``, ``d_loss_real``, ``d_loss_fake``, ``g_loss``,
        ``masked`` (bool, mask applied during the D step), ``statistic`` (detector, NaN when not
        evaluated or no DynamicMask), ``fired``, ``d_step_time`` (seconds, forward + backward +
        optimizer + mask bookkeeping); plus ``samples`` (PNG paths) and ``periods``.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if z_dim is None:
        z_dim = getattr(generator, "z_dim", None)
        if z_dim is None:
            raise ValueError("z_dim not given and the generator has no `z_dim` attribute")
    if device is None:
        device = next(generator.parameters()).device
    device = torch.device(device)
    if isinstance(data, torch.Tensor):
        if data.dim() != 4:
            raise ValueError(f"data tensor must be (N, C, H, W), got {tuple(data.shape)}")
        lo, hi = float(data.min()), float(data.max())
        if lo < 0.0 or hi > 1.0:
            raise ValueError(f"data must be images in [0, 1], got values in [{lo:.3g}, {hi:.3g}]")
    elif not isinstance(data, DataLoader):
        raise TypeError(f"data must be a tensor (N, C, H, W) or a DataLoader, got {type(data).__name__}")
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)

    dmd = discriminator if isinstance(discriminator, DynamicMask) else None
    generator.to(device).train()
    discriminator.to(device).train()
    opt_g = torch.optim.Adam(generator.parameters(), lr=lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=lr, betas=(0.5, 0.999))
    gen = torch.Generator().manual_seed(seed)
    fixed_z = torch.randn(64, z_dim, generator=gen).to(device)  # (64, z_dim)
    batches = _batches(data, batch_size, gen)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    keys = ["d_loss", "d_loss_real", "d_loss_fake", "g_loss", "masked", "statistic", "fired",
            "d_step_time"]
    hist: Dict[str, Any] = {k: [] for k in keys}
    hist["samples"] = []

    def sample(step: int) -> None:
        if out_dir is None:
            return
        generator.eval()
        with torch.no_grad():
            imgs = generator(fixed_z)  # (64, C, H, W)
        generator.train()
        hist["samples"].append(save_grid(imgs, os.path.join(out_dir, f"samples_{step:06d}.png")))

    bar = range(1, steps + 1)
    if progress:
        from tqdm.auto import tqdm  # lazy

        bar = tqdm(bar, desc="train_gan", dynamic_ncols=True)
    for step in bar:
        real = next(batches).to(device, non_blocking=True)  # (B, C, H, W)
        b = real.shape[0]
        z = torch.randn(b, z_dim, generator=gen).to(device)  # (B, z_dim)
        fake = generator(z)  # (B, C, H, W)

        # ---- discriminator step (timed, including the DynamicMask bookkeeping)
        sync()
        t0 = time.perf_counter()
        loss_real = F.softplus(-discriminator(real)).mean()
        loss_fake = F.softplus(discriminator(fake.detach())).mean()  # on FRESH fakes
        d_loss = loss_real + loss_fake
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()
        info = dmd.step(loss_fake.detach()) if dmd is not None else None
        sync()
        hist["d_step_time"].append(time.perf_counter() - t0)

        # ---- generator step (non-saturating loss)
        g_loss = F.softplus(-discriminator(fake)).mean()  # D (masked if a period is on) scores G
        opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        opt_g.step()

        hist["d_loss"].append(d_loss.item())
        hist["d_loss_real"].append(loss_real.item())
        hist["d_loss_fake"].append(loss_fake.item())
        hist["g_loss"].append(g_loss.item())
        hist["masked"].append(bool(info.masked) if info else False)
        hist["statistic"].append(info.statistic if info else float("nan"))
        hist["fired"].append(bool(info.fired) if info else False)
        if progress and (step % 10 == 0 or step == steps):
            bar.set_postfix(d=f"{hist['d_loss'][-1]:.3f}", g=f"{hist['g_loss'][-1]:.3f}",
                            mask="on" if dmd is not None and dmd.active else "off")
        if sample_every and step % sample_every == 0 and step != steps:
            sample(step)
    sample(steps)
    hist["periods"] = dmd.periods if dmd is not None else 0
    return hist
