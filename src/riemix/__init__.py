"""riemix: mixture-of-LoRA-experts fine-tuning with gate-rescaled Riemannian preconditioned optimizers."""

from .adapter import AdapterError, load_adapter, save_adapter
from .config import MoELoRAConfig
from .layer import MoELoRALinear, moe_lora_linear
from .optim import RiemannianAdamW, RiemannianSGD, build_optimizer
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
    "moe_lora_linear",
    "iter_moe_lora_layers",
    "load_adapter",
    "save_adapter",
]
