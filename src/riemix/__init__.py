"""riemix: mixture-of-LoRA-experts fine-tuning with gate-rescaled Riemannian preconditioned optimizers.

``import riemix`` loads the core, ``io`` and ``optim`` tiers only; ``load_model`` (from ``riemix.hub``,
which brings ``transformers`` when it loads a model), ``export_model`` (from ``riemix.ship``) and the
``transformers.Trainer`` integration (``RiemixTrainer``, ``RiemixCallback``, ``RiemixOptions``,
``riemix_optimizer``, from ``riemix.integrations``) are imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from riemix.core.config import MoELoRAConfig
from riemix.core.freezing import freeze_experts, unfreeze_experts
from riemix.core.functional import moe_lora_linear
from riemix.core.layer import MoELoRALinear
from riemix.core.merge import merge_adapter
from riemix.core.summary import trainable_parameters
from riemix.core.tuner import ADAPTED_MODEL_HOOKS, add_moe_lora, iter_moe_lora_layers, remove_moe_lora
from riemix.integrations.save import protect_save_pretrained
from riemix.io.adapter import AdapterError, load_adapter, save_adapter
from riemix.optim import RiemannianAdamW, RiemannianSGD, build_optimizer, grow_experts

if TYPE_CHECKING:
    from riemix.hub.loading import load_model
    from riemix.integrations import RiemixCallback, RiemixOptions, RiemixTrainer, riemix_optimizer
    from riemix.ship.export import export_model

__version__ = "0.1.0"

if protect_save_pretrained not in ADAPTED_MODEL_HOOKS:  # save_pretrained refuses on an adapted model
    ADAPTED_MODEL_HOOKS.append(protect_save_pretrained)

__all__ = [
    "AdapterError",
    "MoELoRAConfig",
    "MoELoRALinear",
    "RiemannianAdamW",
    "RiemannianSGD",
    "RiemixCallback",
    "RiemixOptions",
    "RiemixTrainer",
    "add_moe_lora",
    "build_optimizer",
    "export_model",
    "grow_experts",
    "freeze_experts",
    "iter_moe_lora_layers",
    "load_adapter",
    "load_model",
    "merge_adapter",
    "moe_lora_linear",
    "remove_moe_lora",
    "riemix_optimizer",
    "save_adapter",
    "trainable_parameters",
    "unfreeze_experts",
]


#: The names ``riemix`` re-exports from ``riemix.integrations``, imported on first use.
_INTEGRATIONS = ("RiemixCallback", "RiemixOptions", "RiemixTrainer", "riemix_optimizer")


def __getattr__(name: str) -> Any:
    """``riemix.load_model`` / ``riemix.export_model`` / the ``Trainer`` integration: imported from their tier
    when first asked for."""
    if name == "load_model":
        from riemix.hub.loading import load_model

        globals()["load_model"] = load_model
        return load_model
    if name == "export_model":
        from riemix.ship.export import export_model

        globals()["export_model"] = export_model
        return export_model
    if name in _INTEGRATIONS:
        import riemix.integrations

        value = getattr(riemix.integrations, name)  # RiemixTrainer / RiemixCallback bring transformers
        globals()[name] = value
        return value
    raise AttributeError(f"module 'riemix' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
