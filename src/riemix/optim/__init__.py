"""Riemannian preconditioned optimizers for mixtures of LoRA experts (Zhang & Pilanci, ICML 2024).

Implements the scaled-gradient updates of "Riemannian Preconditioned LoRA for Fine-Tuning Foundation
Models", batched over experts and layers. Parameters outside ``lora_pairs`` (routers, anything else) get
the plain SGD / AdamW update. Modules:

- ``precondition``: the preconditioning formula, per expert (reference) and batched (fast path);
- ``base``: validation, LoRA pair registry, grad clipping and the two-phase step shared by both optimizers;
- ``rsgd`` / ``radamw``: ``RiemannianSGD`` / ``RiemannianAdamW``;
- ``groups``: ``build_optimizer`` (param groups of a MoE-LoRA model) and ``OPTIMIZER_NAMES``;
- ``growth``: ``grow_experts`` (one more expert per layer, the optimizer's state carried along) and
  ``replace_parameters``.
"""

from riemix.optim.groups import OPTIMIZER_NAMES, build_optimizer
from riemix.optim.growth import grow_experts, replace_parameters
from riemix.optim.radamw import RiemannianAdamW
from riemix.optim.rsgd import RiemannianSGD

__all__ = [
    "OPTIMIZER_NAMES",
    "RiemannianAdamW",
    "RiemannianSGD",
    "build_optimizer",
    "grow_experts",
    "replace_parameters",
]
