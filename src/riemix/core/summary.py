"""How many parameters a model trains, by kind: ``trainable_parameters``.

The adapter's parameters are found through ``riemix.core.state.ADAPTER_TENSORS`` (the one table of
adapter tensors), so a parameter counts as ``lora_A``, ``lora_B``, ``router`` or ``expert_scale`` because
it *is* that tensor of a ``MoELoRALinear``, not because of its name.
"""

from __future__ import annotations

import math

from torch import nn

from riemix.core.layer import iter_moe_lora_layers
from riemix.core.state import ADAPTER_TENSORS

__all__ = ["PARAMETER_KINDS", "logical_numel", "trainable_parameters"]

#: The kinds ``trainable_parameters`` counts, in its order (then ``"total"`` and ``"all"``).
PARAMETER_KINDS = ("lora_A", "lora_B", "router", "expert_scale", "other")

#: ``ADAPTER_TENSORS`` suffix -> kind (the router weight and the global gate are both "router").
_KIND_OF_SUFFIX = {
    "lora_A": "lora_A",
    "lora_B": "lora_B",
    "router.weight": "router",
    "global_gate": "router",
    "expert_scale": "expert_scale",
}


def trainable_parameters(model: nn.Module) -> dict[str, int]:
    """Count the parameters of ``model`` that require gradients, by kind.

    Each parameter is counted once (tied / shared parameters too).

    Args:
        model: any ``nn.Module``, with or without MoE-LoRA adapters.

    Returns:
        ``{"lora_A", "lora_B", "router", "expert_scale", "other", "total", "all"}`` (ints): the trainable
        elements of the experts' A and B, of the routers (router weights or ``routing="global"`` gate
        logits), of the ``expert_scales``, of anything else that trains (e.g. a classification head);
        ``total`` is their sum and ``all`` counts every parameter, trainable or not (a 4-bit quantized
        weight by its logical shape, see :func:`logical_numel`).
    """
    kind_of: dict[int, str] = {}
    for _, layer in iter_moe_lora_layers(model):
        for entry in ADAPTER_TENSORS:
            tensor = entry.get(layer)
            if entry.parameter and tensor is not None:
                kind_of[id(tensor)] = _KIND_OF_SUFFIX[entry.suffix]
    counts = dict.fromkeys(PARAMETER_KINDS, 0)
    everything = 0
    for param in model.parameters():
        everything += logical_numel(param)
        if param.requires_grad:
            counts[kind_of.get(id(param), "other")] += logical_numel(param)
    return {**counts, "total": sum(counts.values()), "all": everything}


def logical_numel(param: nn.Parameter) -> int:
    """The number of weights a parameter holds: a bitsandbytes 4-bit weight packs two into each byte of a
    ``(numel/2, 1)`` tensor, so it is counted by the shape its ``quant_state`` records, not by ``numel()``."""
    state = getattr(param, "quant_state", None)
    shape = getattr(state, "shape", None)
    return math.prod(shape) if shape is not None else param.numel()
