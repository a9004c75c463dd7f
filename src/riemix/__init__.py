"""riemix: mixture-of-LoRA-experts fine-tuning with gate-rescaled Riemannian preconditioned optimizers."""

from .adapter import AdapterError, load_adapter, save_adapter
from .config import MoELoRAConfig
from .layer import MoELoRALinear, fused_moe_lora
from .tuner import add_moe_lora, iter_moe_lora_layers

__version__ = "0.1.0"

__all__ = [
    "AdapterError",
    "MoELoRAConfig",
    "MoELoRALinear",
    "RiemannianAdamW",
    "RiemannianSGD",
    "add_moe_lora",
    "build_optimizer",
    "fused_moe_lora",
    "iter_moe_lora_layers",
    "load_adapter",
    "save_adapter",
]


def __getattr__(name: str):
    # The optimizers live in riemix.optim; import lazily so the layer can be used on its own.
    if name in ("RiemannianAdamW", "RiemannianSGD", "build_optimizer"):
        from . import optim

        return getattr(optim, name)
    raise AttributeError(f"module 'riemix' has no attribute {name!r}")
