"""Retardation detector for the dynamically masked discriminator (DMD).

Paper: Zhang et al., "Dynamically Masked Discriminator for Generative Adversarial Networks",
NeurIPS 2023 (no official code). The paper treats generated samples as a non-stationary stream
and asks whether the discriminator still *adapts* to the newest fakes. When it stops adapting
("retardation") its features are masked for a while (see :mod:`canonwrap.gan.mask`).

Our detector (the paper gives no formula we could check, so this is our explicit choice):

* Input, once per discriminator step: a scalar ``v_t`` measured on FRESH fakes, i.e. samples of the
  current generator the discriminator has not been trained on yet, where *lower means the
  discriminator rejects them better*: its loss on those fakes (recommended), or its mean raw
  score on them (logit, higher = "real").
* Window: the last ``W = window`` values, split into an older half ``o`` and a newer half ``n``
  (``h = W // 2`` values each).
* Statistic (Welch's t of the improvement)::

      t = (mean(o) - mean(n)) / sqrt(var(o) / h + var(n) / h + eps**2)

  ``t >> 0``: the discriminator's loss on new fakes keeps falling, it is adapting.
  ``t ~ 0`` (or < 0): its loss on each new generation of fakes is flat or rising, it has stopped
  learning from the stream.
* Rule: once the window is full, fire when ``t < threshold``. After a firing the window is
  cleared (the caller also clears it when a masked period ends), so the next decision uses
  ``W`` fresh values.

Example::

    >>> det = RetardationDetector(window=8, threshold=1.0)
    >>> for v in [1.0] * 8:
    ...     out = det.update(v)
    >>> out.fired, out.statistic
    (True, 0.0)
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Deque, Dict, Sequence, Union

import torch

Number = Union[float, int, torch.Tensor]


def improvement_statistic(values: Sequence[float], eps: float = 1e-8) -> float:
    """Welch t statistic of ``mean(older half) - mean(newer half)`` of ``values``.

    Args:
        values: oldest first, at least 4 values; an odd count drops the oldest value.
        eps: added (squared) to the variance term so a constant sequence gives 0, not NaN.

    Returns:
        the statistic (float); large positive = still improving (values decreasing).
    """
    if len(values) < 4:
        raise ValueError(f"improvement_statistic needs at least 4 values, got {len(values)}")
    h = len(values) // 2
    old, new = list(values)[-2 * h : -h], list(values)[-h:]
    m_old, m_new = sum(old) / h, sum(new) / h
    v_old = sum((x - m_old) ** 2 for x in old) / (h - 1)
    v_new = sum((x - m_new) ** 2 for x in new) / (h - 1)
    return (m_old - m_new) / math.sqrt(v_old / h + v_new / h + eps**2)


@dataclass
class DetectorOutput:
    """Result of one :meth:`RetardationDetector.update`.

    statistic: the improvement t statistic, NaN while the window is not full.
    fired: True when the window is full and ``statistic < threshold``.
    filled: how many values the window holds (after this update).
    """

    statistic: float
    fired: bool
    filled: int


def _to_float(value: Number) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() == 0:
            raise ValueError("detector value is an empty tensor")
        return float(value.detach().float().mean())
    if isinstance(value, (float, int)) and not isinstance(value, bool):
        return float(value)
    raise TypeError(f"detector value must be a float or a tensor, got {type(value).__name__}")


class RetardationDetector:
    """Fires when the discriminator stops improving on fresh fakes (see the module docstring).

    Args:
        window: number of most recent values compared (older half vs newer half); even, >= 4.
        threshold: fire when the improvement t statistic falls below this value. With the default
            1.0 a flat (stalled) noisy sequence fires ~84% of the windows it is checked on and a
            clearly falling one almost never.
        eps: numerical floor of the statistic's denominator.

    Shapes: ``update`` takes a float or a tensor of any shape (reduced by its mean), e.g. the
    per-sample losses ``(B,)`` or the scores ``(B, 1)`` on fresh fakes.
    """

    def __init__(self, window: int = 32, threshold: float = 1.0, eps: float = 1e-8) -> None:
        if not isinstance(window, int) or isinstance(window, bool) or window < 4 or window % 2:
            raise ValueError(f"window must be an even int >= 4, got {window!r}")
        if not math.isfinite(float(threshold)):
            raise ValueError(f"threshold must be a finite number, got {threshold!r}")
        self.window = window
        self.threshold = float(threshold)
        self.eps = float(eps)
        self.values: Deque[float] = deque(maxlen=window)

    def update(self, value: Number) -> DetectorOutput:
        """Append one value (lower = discriminator better on fresh fakes) and test the window."""
        self.values.append(_to_float(value))
        if len(self.values) < self.window:
            return DetectorOutput(statistic=float("nan"), fired=False, filled=len(self.values))
        stat = improvement_statistic(self.values, self.eps)
        fired = stat < self.threshold
        filled = len(self.values)
        if fired:
            self.reset()
        return DetectorOutput(statistic=stat, fired=fired, filled=filled)

    def reset(self) -> None:
        """Clear the window (the next decision needs ``window`` new values)."""
        self.values.clear()

    def state_dict(self) -> Dict[str, Any]:
        return {"window": self.window, "threshold": self.threshold, "eps": self.eps,
                "values": list(self.values)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if int(state["window"]) != self.window:
            raise ValueError(f"detector window mismatch: saved {state['window']}, this one {self.window}")
        self.threshold = float(state["threshold"])
        self.eps = float(state["eps"])
        self.values = deque((float(v) for v in state["values"]), maxlen=self.window)

    def __repr__(self) -> str:
        return (f"RetardationDetector(window={self.window}, threshold={self.threshold}, "
                f"filled={len(self.values)})")
