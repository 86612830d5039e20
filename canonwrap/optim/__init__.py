"""Sharpness-aware optimizers (SAM, ASAM, SAMAR) and an optimizer factory.

``SAM`` / ``ASAM`` / ``SAMAR`` wrap any ``torch.optim`` optimizer; ``step(closure)`` runs both passes.
``create_optimizer(name, params, **kw)`` builds sgd / adam / adamw / sam / asam / samar by name.
"""
from .registry import OPTIMIZERS, create_optimizer, list_optimizers
from .sam import ASAM, SAM, SAMStepStats, disable_running_stats
from .samar import SAMAR

__all__ = [
    "SAM",
    "ASAM",
    "SAMAR",
    "SAMStepStats",
    "disable_running_stats",
    "create_optimizer",
    "list_optimizers",
    "OPTIMIZERS",
]
