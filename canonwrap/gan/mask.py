"""DynamicMask: a dynamically masked discriminator (DMD) as a wrapper around any discriminator.

Paper: Zhang et al., "Dynamically Masked Discriminator for Generative Adversarial Networks",
NeurIPS 2023 (no official code released). Generated samples form a non-stationary stream; when the
discriminator stops adapting to the newest fakes ("retardation", see
:class:`canonwrap.gan.detector.RetardationDetector`), a random part of its feature maps is masked
for a fixed number of discriminator steps so that it has to rely on other features. Masked and
unmasked periods alternate.

How the wrapper works (our implementation choices, all explicit):

* The discriminator is not edited: forward hooks sit on the named submodules ``layers``. While
  unmasked a hook returns ``None``, so outputs are bitwise identical to the bare discriminator.
* A mask is sampled ONCE when a period starts and stays fixed for the whole period (``period``
  discriminator steps); it is shared by all samples of a batch and by every forward in the
  period (the discriminator step and the generator step alike).
* Mask kinds, for a layer output of shape ``(B, C, H, W)``: ``"spatial"`` zeros ``round(ratio*H*W)``
  positions ``(1, 1, H, W)``; ``"channel"`` zeros ``round(ratio*C)`` channels ``(1, C, 1, 1)``.
  Token outputs ``(B, N, D)``: spatial masks tokens ``(1, N, 1)``, channel masks features
  ``(1, 1, D)``. Flat outputs ``(B, F)``: channel only ``(1, F)``. With ``rescale=True`` the kept
  features are multiplied by ``n / (n - k)`` (inverted-dropout scaling) so activation magnitudes
  stay comparable between masked and unmasked periods.
* State machine, advanced by one :meth:`DynamicMask.step` call per discriminator step with the
  detector's input (its loss on fresh fakes): unmasked -> the detector sees the value; when it
  fires, masking is ON from the next step for ``period`` steps, then OFF again and the detector
  starts a new window. Values are not fed to the detector while masked (they would measure the
  masked network).

Example::

    >>> import torch
    >>> from canonwrap.gan import DynamicMask, RetardationDetector, DCGANDiscriminator
    >>> disc = DCGANDiscriminator(width=8)
    >>> dmd = DynamicMask(disc, layers=["block1", "block2"], ratio=0.5, period=50,
    ...                   detector=RetardationDetector(window=32, threshold=1.0), seed=0)
    >>> fake = torch.rand(4, 1, 28, 28)
    >>> scores = dmd(fake)                                  # (4, 1), = disc(fake) while unmasked
    >>> loss_fake = torch.nn.functional.softplus(scores).mean()
    >>> info = dmd.step(loss_fake)                          # once per discriminator step
    >>> info.masked, info.fired
    (False, False)
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from canonwrap._registry import unknown_name_message
from canonwrap.gan.detector import Number, RetardationDetector

MASK_KINDS = ("spatial", "channel")


@dataclass
class MaskStep:
    """What one :meth:`DynamicMask.step` did (for logging).

    step: discriminator steps counted so far (1-based).
    masked: the mask was applied during this step's forwards.
    statistic: the detector's improvement statistic; NaN when not evaluated (window still
        filling, or the step was masked).
    fired: the detector fired at this step; masking starts with the next step.
    remaining: masked steps left after this one (0 when unmasked).
    """

    step: int
    masked: bool
    statistic: float
    fired: bool
    remaining: int


def _mask_layout(shape: Tuple[int, ...], kind: str, layer: str) -> Tuple[int, Tuple[int, ...]]:
    """Number of maskable units ``n`` and the broadcast view of the mask for an output
    whose per-sample shape (batch dim removed) is ``shape``."""
    if len(shape) == 3:  # (C, H, W)
        c, h, w = shape
        return (c, (1, c, 1, 1)) if kind == "channel" else (h * w, (1, 1, h, w))
    if len(shape) == 2:  # (N, D) tokens
        n, d = shape
        return (d, (1, 1, d)) if kind == "channel" else (n, (1, n, 1))
    if len(shape) == 1:  # (F,)
        if kind == "spatial":
            raise ValueError(f"layer {layer!r} outputs flat features (B, {shape[0]}); a spatial "
                             "mask needs (B, C, H, W) or (B, N, D): use kind='channel'")
        return shape[0], (1, shape[0])
    raise ValueError(f"layer {layer!r}: cannot mask an output of shape (B, *{tuple(shape)}); "
                     "expected (B, F), (B, N, D) or (B, C, H, W)")


class DynamicMask(nn.Module):
    """Wrap a discriminator so that its features are masked in periods chosen by a detector.

    Args:
        discriminator: any ``nn.Module``; it is not modified apart from forward hooks on
            ``layers`` (removed by :meth:`remove`).
        layers: names of submodules (as in ``discriminator.named_modules()``) whose outputs get
            masked, e.g. ``["block1", "block2"]``.
        ratio: fraction of units (positions or channels) zeroed per masked layer, in (0, 1).
        period: number of discriminator steps a mask stays on (fixed mask for the whole period).
        kind: ``"spatial"`` or ``"channel"``.
        detector: decides when masking starts; default ``RetardationDetector()`` (window 32,
            threshold 1.0).
        seed: seed of the mask sampler (a private ``torch.Generator``; global RNG untouched).
        rescale: multiply kept units by ``n / (n - k)`` (inverted-dropout scaling).

    Shapes: ``forward`` takes whatever the discriminator takes and returns its output, e.g.
    ``(B, 1, 28, 28) -> (B, 1)``.

    ``state_dict()`` holds the discriminator's tensors under ``discriminator.*`` plus the mask
    state under ``_extra_state`` (active flag, remaining steps, step/period counters, the mask
    tensors, the sampler's RNG state and the detector window).
    """

    def __init__(
        self,
        discriminator: nn.Module,
        layers: Union[str, Sequence[str]],
        ratio: float = 0.5,
        period: int = 100,
        kind: str = "spatial",
        detector: Optional[RetardationDetector] = None,
        seed: int = 0,
        rescale: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(discriminator, nn.Module):
            raise TypeError(f"discriminator must be an nn.Module, got {type(discriminator).__name__}")
        if isinstance(discriminator, DynamicMask):
            raise TypeError("discriminator is already a DynamicMask; wrap the bare discriminator")
        if isinstance(layers, str):
            layers = [layers]
        layers = list(layers)
        if not layers or not all(isinstance(n, str) for n in layers):
            raise ValueError(f"layers must be a non-empty list of submodule names, got {layers!r}")
        if isinstance(ratio, bool) or not isinstance(ratio, (float, int)) or not 0.0 < ratio < 1.0:
            raise ValueError(f"ratio must be a number strictly between 0 and 1, got {ratio!r}")
        if isinstance(period, bool) or not isinstance(period, int) or period <= 0:
            raise ValueError(f"period must be a positive int (discriminator steps), got {period!r}")
        if kind not in MASK_KINDS:
            raise ValueError(unknown_name_message("mask kind", kind, list(MASK_KINDS)))
        if detector is None:
            detector = RetardationDetector()
        if not isinstance(detector, RetardationDetector):
            raise TypeError(f"detector must be a RetardationDetector, got {type(detector).__name__}")

        modules = dict(discriminator.named_modules())
        valid = [name for name in modules if name]
        for name in layers:
            if name not in modules or not name:
                raise ValueError(unknown_name_message("discriminator layer", name, valid))
        if len(set(layers)) != len(layers):
            raise ValueError(f"layers contains duplicates: {layers}")

        self.discriminator = discriminator
        self.layers: List[str] = layers
        self.ratio = float(ratio)
        self.period = period
        self.kind = kind
        self.detector = detector
        self.seed = seed
        self.rescale = rescale

        self.active = False
        self.remaining = 0
        self.steps = 0
        self.periods = 0
        self.masks: Dict[str, torch.Tensor] = {}  # layer -> float32 CPU keep-mask (broadcast view)
        self._shapes: Dict[str, Tuple[int, ...]] = {}  # layer -> last per-sample output shape
        self._device_masks: Dict[str, torch.Tensor] = {}  # cache of masks on the output's device
        self._gen = torch.Generator().manual_seed(seed)
        self._handles = [modules[name].register_forward_hook(partial(self._hook, name))
                         for name in layers]

    # ------------------------------------------------------------------ forward / hooks
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the discriminator (masked while a period is active)."""
        if self._handles is None:
            raise RuntimeError("this DynamicMask was removed; call the discriminator directly")
        return self.discriminator(*args, **kwargs)

    def _hook(self, name: str, module: nn.Module, inputs: Any, output: Any) -> Optional[torch.Tensor]:
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"layer {name!r} returned {type(output).__name__}; DynamicMask can only "
                            "mask layers that return a single tensor")
        shape = tuple(output.shape[1:])
        if not self.active:
            self._shapes[name] = shape
            return None
        mask = self._device_masks.get(name)
        if mask is None or mask.device != output.device or mask.dtype != output.dtype:
            if name not in self.masks or self._shapes.get(name) != shape:
                if name in self.masks:
                    raise RuntimeError(f"layer {name!r} output shape changed within a masked period "
                                       f"from (B, *{self._shapes[name]}) to (B, *{shape})")
                self._shapes[name] = shape
                self.masks[name] = self._sample(name, shape)
            mask = self.masks[name].to(device=output.device, dtype=output.dtype)
            self._device_masks[name] = mask
        return output * mask  # (B, ...) * broadcast keep-mask

    def _sample(self, name: str, shape: Tuple[int, ...]) -> torch.Tensor:
        """Keep-mask for one layer: exactly ``k = round(ratio * n)`` of ``n`` units zeroed."""
        n, view = _mask_layout(shape, self.kind, name)
        if n < 2:
            raise ValueError(f"layer {name!r} has {n} {self.kind} unit(s); nothing to mask")
        k = min(max(int(round(self.ratio * n)), 1), n - 1)
        drop = torch.randperm(n, generator=self._gen)[:k]  # (k,)
        keep = torch.ones(n)
        keep[drop] = 0.0
        if self.rescale:
            keep *= n / (n - k)
        return keep.view(view)

    # ------------------------------------------------------------------ state machine
    def step(self, value: Number) -> MaskStep:
        """Advance one discriminator step.

        Args:
            value: measured on FRESH fakes during this step, lower = discriminator better: its loss
                on them (recommended) or its mean raw score on them. A tensor is reduced by mean.

        Returns:
            :class:`MaskStep` (masked during this step?, detector statistic, fired?, remaining).
        """
        if self._handles is None:
            raise RuntimeError("this DynamicMask was removed")
        self.steps += 1
        if self.active:
            self.remaining -= 1
            if self.remaining == 0:
                self.end_period()
            return MaskStep(self.steps, True, float("nan"), False, self.remaining)
        out = self.detector.update(value)
        if out.fired:
            self.start_period()
        return MaskStep(self.steps, False, out.statistic, out.fired, self.remaining)

    update = step  # alias: ``dmd.update(loss_fake)``

    def start_period(self) -> None:
        """Turn masking on now for ``period`` steps with freshly sampled masks."""
        self.active = True
        self.remaining = self.period
        self.periods += 1
        self._device_masks = {}
        self.masks = {name: self._sample(name, self._shapes[name])
                      for name in self.layers if name in self._shapes}
        self.detector.reset()

    def end_period(self) -> None:
        """Turn masking off now; the detector starts a new window."""
        self.active = False
        self.remaining = 0
        self.masks = {}
        self._device_masks = {}
        self.detector.reset()

    # ------------------------------------------------------------------ removal / state
    def remove(self) -> nn.Module:
        """Remove the hooks and return the original (unmodified) discriminator."""
        if self._handles is not None:
            for handle in self._handles:
                handle.remove()
            self._handles = None
        self.active = False
        self.masks = {}
        self._device_masks = {}
        return self.discriminator

    def get_extra_state(self) -> Dict[str, Any]:
        return {
            "layers": list(self.layers), "kind": self.kind, "ratio": self.ratio,
            "period": self.period, "rescale": self.rescale, "seed": self.seed,
            "active": self.active, "remaining": self.remaining, "steps": self.steps,
            "periods": self.periods,
            "masks": {k: v.clone() for k, v in self.masks.items()},
            "shapes": {k: list(v) for k, v in self._shapes.items()},
            "rng": self._gen.get_state(),
            "detector": self.detector.state_dict(),
        }

    def set_extra_state(self, state: Dict[str, Any]) -> None:
        if list(state["layers"]) != self.layers or state["kind"] != self.kind:
            raise ValueError(f"saved mask state is for layers={state['layers']} kind={state['kind']!r}, "
                             f"this DynamicMask has layers={self.layers} kind={self.kind!r}")
        self.ratio = float(state["ratio"])
        self.period = int(state["period"])
        self.rescale = bool(state["rescale"])
        self.seed = state["seed"]
        self.active = bool(state["active"])
        self.remaining = int(state["remaining"])
        self.steps = int(state["steps"])
        self.periods = int(state["periods"])
        self.masks = {k: v.clone().float().cpu() for k, v in state["masks"].items()}
        self._shapes = {k: tuple(v) for k, v in state["shapes"].items()}
        self._device_masks = {}
        self._gen.set_state(state["rng"])
        self.detector.load_state_dict(state["detector"])

    def extra_repr(self) -> str:
        return (f"layers={self.layers}, kind={self.kind!r}, ratio={self.ratio}, period={self.period}, "
                f"active={self.active}, remaining={self.remaining}")
