"""Training riemix adapters with ``transformers.Trainer`` and TRL, and saving them safely from there.

Modules:
    options: ``RiemixOptions`` (regularisers, diagnostics, optimizer groups) and ``riemix_optimizer``
        (riemix's optimizer and schedule for ``Trainer(optimizers=...)``).
    callback: ``RiemixCallback``: schedules (scale warm-up, router temperature) and diagnostics per step.
    trainer: ``RiemixTrainer`` / ``RiemixTrainerMixin``: the callback plus regularisers, optimizer and
        adapter-only ``save_model`` / checkpoints that resume.
    save: ``protect_save_pretrained`` (``save_pretrained`` refuses on an adapted model) and the adapter-only
        trainer directories.

``callback`` and ``trainer`` import ``transformers``; they are loaded on first use, so importing this package
(or ``save`` / ``options``) does not.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from riemix.integrations.options import LR_SCHEDULES, RiemixOptions, riemix_optimizer
from riemix.integrations.save import (
    TRAINABLE_NAME,
    AdaptedSaveError,
    is_adapter_dir,
    is_save_protected,
    load_adapter_weights,
    protect_save_pretrained,
    save_trainer_adapter,
)

if TYPE_CHECKING:
    from riemix.integrations.callback import RiemixCallback, flat_diagnostics
    from riemix.integrations.trainer import RiemixTrainer, RiemixTrainerMixin

__all__ = [
    "LR_SCHEDULES",
    "TRAINABLE_NAME",
    "AdaptedSaveError",
    "RiemixCallback",
    "RiemixOptions",
    "RiemixTrainer",
    "RiemixTrainerMixin",
    "flat_diagnostics",
    "is_adapter_dir",
    "is_save_protected",
    "load_adapter_weights",
    "protect_save_pretrained",
    "riemix_optimizer",
    "save_trainer_adapter",
]

_LAZY = {
    "RiemixCallback": "riemix.integrations.callback",
    "flat_diagnostics": "riemix.integrations.callback",
    "RiemixTrainer": "riemix.integrations.trainer",
    "RiemixTrainerMixin": "riemix.integrations.trainer",
}


def __getattr__(name: str) -> Any:
    """The ``transformers``-dependent names, imported when first asked for."""
    if name not in _LAZY:
        raise AttributeError(f"module 'riemix.integrations' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
