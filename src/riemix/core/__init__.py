"""The core tier: the MoE-LoRA math and its state, on PyTorch and safetensors alone.

Nothing here imports ``transformers``, ``accelerate`` or any other riemix tier (only ``riemix.core.*``);
``tests/core/test_imports.py`` enforces it.  Everything above (``io``, ``hub``, ``training``,
``diagnostics``, ``cli``) builds on these modules:

    config.py        MoELoRAConfig and every enumeration (routing modes, inits, regulariser modes)
    routing.py       route(): router logits -> gates; the gate-rescaling coefficients
    sparse.py        the sparse expert path (selected token-expert pairs only) and when to take it
    functional.py    moe_lora_linear (the fused autograd function) and reference_moe_lora_linear
    init.py          the adapter initialisations (zero_b, gaussian, orthogonal, pissa, small_b)
    maturity.py      maturity routing: dense while an expert is young (the routing in force from the ages)
    growth.py        grow_layer: one more expert without changing the output (MoELoRALinear.add_expert)
    geometry.py      Gram / cosine similarity / singular values / effective rank of the expert factors
    capacity.py      max_experts: merge / evict experts to free a slot for a new one (capacity_policy)
    dynamic.py       per-expert ranks, add_expert and the maturity state (a mixin of MoELoRALinear)
    layer.py         MoELoRALinear, iter_moe_lora_layers
    tuner.py         add_moe_lora: find and wrap the targeted nn.Linear modules; remove_moe_lora undoes it
    state.py         the table of adapter tensors -> state dict, expected shapes
    freezing.py      freeze_experts / unfreeze_experts over a model; the frozen masks in the adapter format
    summary.py       trainable_parameters: trainable parameter counts by kind (A, B, router, other)
    schedules.py     LR multiplier, scale warm-up, router temperature, set_training_progress
    regularizers.py  auxiliary losses, inject_gradients, apply_regularizers over a model

The import graph inside the tier runs top to bottom in that list (config first, regularizers last).
"""

from riemix.core.capacity import CapacityAction, merge_experts
from riemix.core.config import (
    CAPACITY_POLICIES,
    DENSE_MODES,
    EXPERT_COMPUTE_MODES,
    INIT_MODES,
    REGULARIZER_MODES,
    ROUTING_MODES,
    TOPK_MODES,
    MoELoRAConfig,
)
from riemix.core.freezing import freeze_experts, unfreeze_experts
from riemix.core.functional import RouteSpec, moe_lora_linear, reference_moe_lora_linear
from riemix.core.geometry import cosine_similarity_a, cosine_similarity_ba, effective_rank, expert_singular_values
from riemix.core.layer import MoELoRALinear, iter_moe_lora_layers
from riemix.core.regularizers import (
    REGULARIZERS,
    apply_regularizers,
    inject_gradients,
    regularizer_terms,
    scale_anchor_loss,
)
from riemix.core.routing import route
from riemix.core.schedules import linear_schedule, set_training_progress
from riemix.core.sparse import SPARSE_MAX_DENSITY, sparse_moe_lora_linear, use_sparse_experts
from riemix.core.state import ADAPTER_TENSORS, adapter_state_dict, adapter_tensor_shapes
from riemix.core.summary import PARAMETER_KINDS, trainable_parameters
from riemix.core.tuner import add_moe_lora, find_target_modules, layer_index, linear_names, remove_moe_lora

__all__ = [
    "ADAPTER_TENSORS",
    "CAPACITY_POLICIES",
    "DENSE_MODES",
    "EXPERT_COMPUTE_MODES",
    "INIT_MODES",
    "PARAMETER_KINDS",
    "REGULARIZERS",
    "REGULARIZER_MODES",
    "ROUTING_MODES",
    "SPARSE_MAX_DENSITY",
    "TOPK_MODES",
    "CapacityAction",
    "MoELoRAConfig",
    "MoELoRALinear",
    "RouteSpec",
    "adapter_state_dict",
    "adapter_tensor_shapes",
    "add_moe_lora",
    "apply_regularizers",
    "cosine_similarity_a",
    "cosine_similarity_ba",
    "effective_rank",
    "expert_singular_values",
    "find_target_modules",
    "freeze_experts",
    "inject_gradients",
    "iter_moe_lora_layers",
    "layer_index",
    "linear_names",
    "linear_schedule",
    "merge_experts",
    "moe_lora_linear",
    "reference_moe_lora_linear",
    "regularizer_terms",
    "remove_moe_lora",
    "route",
    "scale_anchor_loss",
    "set_training_progress",
    "sparse_moe_lora_linear",
    "trainable_parameters",
    "unfreeze_experts",
    "use_sparse_experts",
]
