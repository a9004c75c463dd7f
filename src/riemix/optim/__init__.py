"""Riemannian preconditioned optimizers for mixtures of LoRA experts (Zhang & Pilanci, ICML 2024).

Implements the scaled-gradient updates of "Riemannian Preconditioned LoRA for Fine-Tuning Foundation
Models", batched over experts and layers. Parameters outside ``lora_pairs`` (routers, anything else) get
the plain SGD / AdamW update. Modules:

- ``precondition``: the preconditioning formula, per expert (reference) and batched (fast path);
- ``base``: validation, LoRA pair registry, grad clipping and the two-phase step shared by both optimizers;
- ``rsgd`` / ``radamw``: ``RiemannianSGD`` / ``RiemannianAdamW``;
- ``groups``: ``build_optimizer`` (param groups of a MoE-LoRA model) and ``OPTIMIZER_NAMES``;
- ``growth``: ``grow_experts`` (one more expert per layer, the optimizer's state carried along; capacity
  actions at ``max_experts``), ``replace_parameters`` and ``reset_expert_state``.
"""

from riemix.optim.groups import OPTIMIZER_NAMES, build_optimizer
from riemix.optim.growth import grow_experts, replace_parameters, reset_expert_state
from riemix.optim.radamw import RiemannianAdamW
from riemix.optim.rsgd import RiemannianSGD

__all__ = [
    "OPTIMIZER_NAMES",
    "RiemannianAdamW",
    "RiemannianSGD",
    "build_optimizer",
    "grow_experts",
    "replace_parameters",
    "reset_expert_state",
]
