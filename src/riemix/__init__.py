"""riemix: mixture-of-LoRA-experts fine-tuning with gate-rescaled Riemannian preconditioned optimizers.

``import riemix`` loads the core, ``io`` and ``optim`` tiers only; ``load_model`` (from ``riemix.hub``,
which brings ``transformers`` when it loads a model) is imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from riemix.core.config import MoELoRAConfig
from riemix.core.functional import moe_lora_linear
from riemix.core.layer import MoELoRALinear
from riemix.core.summary import trainable_parameters
from riemix.core.tuner import add_moe_lora, iter_moe_lora_layers, remove_moe_lora
from riemix.io.adapter import AdapterError, load_adapter, save_adapter
from riemix.optim import RiemannianAdamW, RiemannianSGD, build_optimizer

if TYPE_CHECKING:
    from riemix.hub.loading import load_model

__version__ = "0.1.0"

__all__ = [
    "AdapterError",
    "MoELoRAConfig",
    "MoELoRALinear",
    "RiemannianAdamW",
    "RiemannianSGD",
    "add_moe_lora",
    "build_optimizer",
    "iter_moe_lora_layers",
    "load_adapter",
    "load_model",
    "moe_lora_linear",
    "remove_moe_lora",
    "save_adapter",
    "trainable_parameters",
]


def __getattr__(name: str) -> Any:
    """``riemix.load_model``: imported from ``riemix.hub.loading`` when first asked for."""
    if name == "load_model":
        from riemix.hub.loading import load_model

        globals()["load_model"] = load_model
        return load_model
    raise AttributeError(f"module 'riemix' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
