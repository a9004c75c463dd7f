"""riemix: mixture-of-LoRA-experts fine-tuning with gate-rescaled Riemannian preconditioned optimizers."""

from riemix.core.config import MoELoRAConfig
from riemix.core.functional import moe_lora_linear
from riemix.core.layer import MoELoRALinear
from riemix.core.tuner import add_moe_lora, iter_moe_lora_layers
from riemix.io.adapter import AdapterError, load_adapter, save_adapter
from riemix.optim import RiemannianAdamW, RiemannianSGD, build_optimizer

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
