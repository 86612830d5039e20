"""SAM and ASAM: sharpness-aware minimization as a ``torch.optim.Optimizer`` wrapper.

SAM (Foret et al., "Sharpness-Aware Minimization for Efficiently Improving Generalization", ICLR 2021)
minimizes ``max_{‖ε‖ ≤ ρ} f(w + ε)`` with the first-order ascent step

    ε = ρ · g / ‖g‖,            g = ∇f(w),  ‖·‖ the global L2 norm over all parameters,

and then updates ``w`` with the base optimizer using the gradient at ``w + ε``.

ASAM (Kwon et al., "ASAM: Adaptive Sharpness-Aware Minimization", ICML 2021) makes the neighbourhood
scale-invariant with ``T = |w| + η``:

    ε = ρ · T² g / ‖T g‖,       so that  ‖T⁻¹ ε‖ = ρ.

The wrapper follows davda54/sam (``first_step`` / ``second_step`` / ``step(closure)``) and fixes the
pitfalls users hit with it:

* ``step(closure)`` runs BOTH passes and returns the loss at ``w`` (first pass).
* BatchNorm running statistics: pass ``model=`` and the second (perturbed) forward pass runs inside
  :func:`disable_running_stats`, so running mean/var and ``num_batches_tracked`` change once per step.
  With the manual API wrap your second forward in ``with disable_running_stats(model):`` yourself.
* ``state_dict`` holds the base optimizer's state (momentum, Adam moments) and ``load_state_dict``
  relinks ``param_groups`` with the base optimizer, so LR schedulers keep working after a reload.
* ``rho=0`` skips the perturbation and the second pass: bit-for-bit the base optimizer.
* Gradient clipping: clip inside the closure right after ``backward()`` (it then applies to both
  passes; a global-norm clip of the first pass does not change ε, which is normalized), or, with the
  manual API, between the second ``backward()`` and ``second_step()``.
* Gradient accumulation: accumulate inside the closure (loop over micro-batches, ``backward()`` each,
  return the summed loss); both passes then see the full-batch gradient. Calling ``first_step``
  per micro-batch (the broken pattern) raises a clear error the second time.
* bf16 autocast works (run the closure's forward under ``torch.autocast(..., dtype=torch.bfloat16)``).
  fp16 ``GradScaler`` is NOT supported: ``scaler.step(opt)`` calls ``step()`` without a closure and
  raises a ``RuntimeError`` saying so (``scaler.step(opt, closure)`` is refused by PyTorch itself).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Union

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim import Optimizer

Closure = Callable[[], Any]
OptimizerLike = Union[type, Optimizer]


@dataclass
class SAMStepStats:
    """What one ``step(closure)`` measured (detached; tensors stay on the loss's device).

    Attributes:
        loss: f(w), the closure's loss at the current weights (first pass).
        loss_perturbed: f(w + ε) (second pass); equals ``loss`` when no perturbation ran (rho = 0).
        sharpness: f(w + ε) − f(w).
        grad_norm: ‖g‖ (SAM) or ‖T g‖ (ASAM) of the first-pass gradient; ``None`` when rho = 0.
        lam: the weight λ of the perturbed gradient used in this update (1.0 for SAM/ASAM).
    """

    loss: Any
    loss_perturbed: Any
    sharpness: Any
    grad_norm: Optional[torch.Tensor]
    lam: float = 1.0


@contextlib.contextmanager
def disable_running_stats(model: Optional[nn.Module]) -> Iterator[None]:
    """Within the block, BatchNorm layers normalize with batch statistics but update nothing.

    Sets ``track_running_stats = False`` on every ``_BatchNorm`` module of ``model`` (in training mode
    BatchNorm then uses the batch statistics, exactly as before, and leaves ``running_mean``,
    ``running_var`` and ``num_batches_tracked`` untouched), restoring the flags on exit.
    Use it around SAM's second (perturbed) forward pass. ``model=None`` is a no-op.

    Example::

        loss_fn(model(x), y).backward()
        opt.first_step(zero_grad=True)
        with disable_running_stats(model):
            loss_fn(model(x), y).backward()
        opt.second_step(zero_grad=True)
    """
    if model is None:
        yield
        return
    if not isinstance(model, nn.Module):
        raise TypeError(f"disable_running_stats expects an nn.Module or None, got {type(model).__name__}")
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    saved = [m.track_running_stats for m in bns]
    try:
        for m in bns:
            m.track_running_stats = False
        yield
    finally:
        for m, flag in zip(bns, saved):
            m.track_running_stats = flag


def _check_nonneg(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float >= 0, got {type(value).__name__} {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite float >= 0, got {value!r}")
    return float(value)


class SAM(Optimizer):
    r"""Sharpness-Aware Minimization (Foret et al., 2021) around any base optimizer; ASAM with ``adaptive``.

    Each step: g = ∇f(w); ε = ρ·g/‖g‖ (ASAM: ε = ρ·T²g/‖Tg‖, T = |w| + η, norms global over all
    parameters of the groups with ρ > 0); w ← w + ε; g' = ∇f(w + ε); restore w exactly (saved copy,
    no subtraction); base-optimizer step with g'.

    Args:
        params: parameters or parameter groups (groups may set their own ``rho``/``adaptive``/``eta``
            and base options such as ``lr``). May be ``None`` when ``base_optimizer`` is an instance.
        base_optimizer: an optimizer class (``torch.optim.SGD``) constructed as
            ``base_optimizer(param_groups, **base_kwargs)``, or an already constructed optimizer over the
            same parameters (then ``base_kwargs`` must be empty).
        rho: neighbourhood radius ρ >= 0 (SAM ~0.05, ASAM ~0.5-2). ``rho=0`` is the base optimizer.
        adaptive: ASAM's scale-invariant neighbourhood.
        eta: η >= 0 in T = |w| + η (ASAM only).
        model: optional module; if given, ``step(closure)`` runs the second pass inside
            :func:`disable_running_stats` so BatchNorm statistics are updated once per step.
        **base_kwargs: passed to the base optimizer class (``lr``, ``momentum``, ``weight_decay`` ...).

    The wrapper shares ``param_groups`` with the base optimizer (LR schedulers attached to the wrapper
    change the base learning rate). ``step(closure)`` returns f(w); ``step_with_stats(closure)`` returns
    a :class:`SAMStepStats` (also readable afterwards as ``last_stats``).

    Shapes: any parameter shapes; ε has the shape of each parameter.

    Example::

        opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, model=model)

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)   # x: (B, C, H, W), y: (B,)
            loss.backward()
            return loss

        loss = opt.step(closure)                  # both passes; loss at w
        stats = opt.step_with_stats(closure)      # stats.sharpness = f(w + ε) - f(w)
    """

    def __init__(
        self,
        params: Optional[Iterable[Any]],
        base_optimizer: OptimizerLike,
        rho: float = 0.05,
        adaptive: bool = False,
        eta: float = 0.01,
        model: Optional[nn.Module] = None,
        **base_kwargs: Any,
    ) -> None:
        rho = _check_nonneg("rho", rho)
        eta = _check_nonneg("eta", eta)
        if not isinstance(adaptive, bool):
            raise TypeError(f"adaptive must be a bool, got {type(adaptive).__name__} {adaptive!r}")
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module or None, got {type(model).__name__}")
        if isinstance(base_optimizer, SAM) or (isinstance(base_optimizer, type) and issubclass(base_optimizer, SAM)):
            raise TypeError("base_optimizer must be a plain optimizer (SGD, AdamW, ...), not a SAM-family wrapper")
        defaults = dict(rho=rho, adaptive=adaptive, eta=eta)

        if isinstance(base_optimizer, Optimizer):
            if base_kwargs:
                raise TypeError(
                    f"base_optimizer is already constructed; got extra base options {sorted(base_kwargs)} "
                    "(pass them when constructing it, or pass the class instead)")
            base_params = [p for g in base_optimizer.param_groups for p in g["params"]]
            if params is not None:
                given = [p for g in _as_groups(params) for p in g["params"]]
                if {id(p) for p in given} != {id(p) for p in base_params}:
                    raise ValueError("params must be the parameters of the constructed base_optimizer "
                                     "(or None to take them from it)")
            # Optimizer.__init__ setdefaults rho/adaptive/eta into the base optimizer's own group dicts.
            super().__init__(base_optimizer.param_groups, defaults)
            self.base_optimizer = base_optimizer
        elif isinstance(base_optimizer, type) and issubclass(base_optimizer, Optimizer):
            if params is None:
                raise ValueError("params is None; it may be None only when base_optimizer is a constructed optimizer")
            super().__init__(params, {**defaults, **base_kwargs})
            self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        else:
            raise TypeError(
                "base_optimizer must be a torch.optim.Optimizer subclass (e.g. torch.optim.SGD) or instance, "
                f"got {base_optimizer!r}; for names like 'sgd' use canonwrap.optim.create_optimizer")
        self.param_groups = self.base_optimizer.param_groups  # shared dicts: schedulers see one lr
        for i, group in enumerate(self.param_groups):  # per-group overrides get the same checks
            _check_nonneg(f"param_groups[{i}]['rho']", group["rho"])
            _check_nonneg(f"param_groups[{i}]['eta']", group["eta"])
        self.defaults.update(self.base_optimizer.defaults)
        self.model = model
        self.last_stats: Optional[SAMStepStats] = None
        self._perturbed = False

    # ------------------------------------------------------------------ two-pass API
    def _perturbs(self) -> bool:
        return any(g["rho"] > 0 for g in self.param_groups)

    @torch.no_grad()
    def _grad_norm(self) -> torch.Tensor:
        """‖g‖ (or ‖T g‖ for adaptive groups) over the parameters of groups with rho > 0; a 0-dim fp32 tensor."""
        norms: List[torch.Tensor] = []
        device = None
        for group in self.param_groups:
            if group["rho"] <= 0:
                continue
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.float()
                if group["adaptive"]:
                    g = (p.detach().float().abs() + group["eta"]) * g  # T g
                if device is None:
                    device = p.device
                norms.append(torch.linalg.vector_norm(g).to(device))
        if not norms:
            return torch.zeros(())
        return torch.linalg.vector_norm(torch.stack(norms))

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> torch.Tensor:
        """Ascent step w ← w + ε from the current gradients; saves w exactly. Returns ‖g‖ (ASAM: ‖Tg‖)."""
        if self._perturbed:
            raise RuntimeError(
                "first_step called twice without second_step. For gradient accumulation, accumulate all "
                "micro-batches inside the closure (or before first_step), then call first_step once.")
        grad_norm = self._grad_norm()
        for group in self.param_groups:
            if group["rho"] <= 0:
                continue
            scale = group["rho"] / (grad_norm + 1e-12)
            for p in group["params"]:
                if p.grad is None:
                    continue
                self.state[p]["old_p"] = p.detach().clone()
                e_w = p.grad.float() * scale.to(p.device)  # ε, same shape as p
                if group["adaptive"]:
                    e_w = e_w * (p.detach().float().abs() + group["eta"]) ** 2  # T² g
                p.add_(e_w.to(p.dtype))
        self._perturbed = True
        if zero_grad:
            self.zero_grad()
        return grad_norm

    @torch.no_grad()
    def _restore(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                old = self.state[p].pop("old_p", None)
                if old is not None:
                    p.copy_(old)  # exact restore, no w + ε - ε rounding
        self._perturbed = False

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore w and take the base optimizer's step with the gradient currently in ``.grad`` (at w+ε)."""
        if not self._perturbed:
            raise RuntimeError("second_step called without a preceding first_step")
        self._restore()
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    # ------------------------------------------------------------------ closure API
    def step(self, closure: Optional[Closure] = None) -> Any:  # type: ignore[override]
        """Run both passes with ``closure`` (zero_grad + forward + backward, returns the loss); return f(w)."""
        if closure is None:
            raise RuntimeError(
                f"{type(self).__name__}.step needs a closure that computes the loss and calls backward(), "
                "because SAM evaluates the gradient twice; or call first_step()/second_step() yourself. "
                "(fp16 torch.amp.GradScaler is not supported: scaler.step(optimizer) calls step() without a "
                "closure. Use bf16 autocast instead.)")
        self.last_stats = self._two_pass(closure)
        return self.last_stats.loss

    def step_with_stats(self, closure: Closure) -> SAMStepStats:
        """Like ``step(closure)`` but returns the :class:`SAMStepStats` (loss, f(w+ε), sharpness, ...)."""
        self.step(closure)  # through step() so optimizer hooks and LR-scheduler bookkeeping run
        assert self.last_stats is not None
        return self.last_stats

    def _two_pass(self, closure: Closure) -> SAMStepStats:
        if self._perturbed:
            raise RuntimeError("step(closure) called between first_step and second_step")
        closure = torch.enable_grad()(closure)
        loss = closure()
        if loss is None:
            raise ValueError("the closure must return the loss (got None)")
        loss_d = _detach(loss)
        if not self._perturbs():  # rho = 0: exactly the base optimizer
            self.base_optimizer.step()
            return SAMStepStats(loss_d, loss_d, loss_d - loss_d, None)
        grad_norm = self.first_step(zero_grad=True)
        try:
            with disable_running_stats(self.model):
                loss_p = _detach(closure())
        except BaseException:
            self._restore()  # never leave the weights perturbed
            raise
        self.second_step()
        return SAMStepStats(loss_d, loss_p, loss_p - loss_d, grad_norm)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:  # type: ignore[override]
        """The base optimizer's state dict (its state + the shared param_groups incl. rho/adaptive/eta)."""
        if self._perturbed:
            raise RuntimeError("state_dict called between first_step and second_step (weights are perturbed)")
        sd = self.base_optimizer.state_dict()
        extra = self._extra_state()
        if extra:
            sd["sam"] = extra
        return sd

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:  # type: ignore[override]
        """Load into the base optimizer and relink ``param_groups`` (which the base replaces).

        Accepts this wrapper's ``state_dict()`` or a plain base-optimizer state dict (warm start from
        an SGD/AdamW checkpoint; the wrapper's constructor rho/adaptive/eta then apply).
        """
        state_dict = dict(state_dict)
        extra = state_dict.pop("sam", None)
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups
        for group in self.param_groups:  # a plain base-optimizer checkpoint has no rho/adaptive/eta
            for key in ("rho", "adaptive", "eta"):
                group.setdefault(key, self.defaults[key])
        self._load_extra_state(extra or {})

    def _extra_state(self) -> Dict[str, Any]:
        return {}

    def _load_extra_state(self, extra: Dict[str, Any]) -> None:
        return None

    def __repr__(self) -> str:
        rhos = sorted({g["rho"] for g in self.param_groups})
        return f"{type(self).__name__}(rho={rhos if len(rhos) > 1 else rhos[0]}, base={self.base_optimizer!r})"


class ASAM(SAM):
    """Adaptive SAM (Kwon et al., 2021): ``SAM(..., adaptive=True)`` with ε = ρ·T²g/‖Tg‖, T = |w| + η.

    Default ``rho=0.5`` (ASAM's neighbourhood is measured in T⁻¹-scaled units, typical 0.5-2).

    Example::

        opt = ASAM(model.parameters(), torch.optim.SGD, rho=0.5, eta=0.01, lr=0.1, momentum=0.9)
    """

    def __init__(
        self,
        params: Optional[Iterable[Any]],
        base_optimizer: OptimizerLike,
        rho: float = 0.5,
        eta: float = 0.01,
        model: Optional[nn.Module] = None,
        **base_kwargs: Any,
    ) -> None:
        super().__init__(params, base_optimizer, rho=rho, adaptive=True, eta=eta, model=model, **base_kwargs)


def _as_groups(params: Iterable[Any]) -> List[Dict[str, Any]]:
    params = list(params)
    if params and isinstance(params[0], dict):
        return [dict(g, params=list(g["params"])) for g in params]
    return [{"params": params}]


def _detach(x: Any) -> Any:
    return x.detach() if isinstance(x, torch.Tensor) else x
