"""Fold MoE-LoRA adapters into the base weights wherever that is exact: ``merge_adapter``.

A layer computes ``y = x Wᵀ + b + s·f · Σᵢ gᵢ(x) · (σᵢ ⊙ Bᵢ) Aᵢ x`` (s: ``scaling``, f: ``scale_factor``,
σᵢ: the expert scales, dropout inactive in eval mode).  When the gates do not depend on x, the sum is one
fixed matrix and the layer is the plain linear map with weight

    W' = W + s·f · Σᵢ gᵢ · (σᵢ ⊙ Bᵢ) Aᵢ

That holds for ``routing="global"`` (gᵢ = E·softmax(w/T)ᵢ, a learned constant) and for any layer with a
single expert (its one gate is softmax over one logit: 1 in every mode).  The gates are taken from the
layer's own routing code (``MoELoRALinear.compute_gates``), so the temperature T and the mode's
multiplier are the forward's; the delta is computed in fp64 and W' rounded once to W's dtype.  Layers
whose gates depend on the input (a per-token router with E > 1) have no such W'.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from riemix.core.layer import MoELoRALinear, iter_moe_lora_layers
from riemix.core.tuner import forget_adapter, set_submodule

__all__ = ["constant_gates", "merge_adapter", "merged_weight", "unmergeable_layers"]

_log = logging.getLogger("riemix")


def constant_gates(layer: MoELoRALinear) -> torch.Tensor | None:
    """The layer's gates when they do not depend on the input, else None.

    Args:
        layer: a MoE-LoRA layer.

    Returns:
        ``(E,)`` gates (fp32, fp64 for an fp64 layer) for ``routing="global"`` or a single expert; None
        for a per-token router over several experts.
    """
    if layer.routing != "global" and layer.num_experts > 1:
        return None
    weight = layer.gate_weight
    probe = torch.zeros(1, layer.in_features, dtype=weight.dtype, device=weight.device)  # (1, in)
    with torch.no_grad():
        _, gates = layer.compute_gates(probe)  # (1, E): the global gate ignores x; one expert always gets 1
    return gates[0]


def merged_weight(layer: MoELoRALinear) -> torch.Tensor:
    """``W + s·f·Σᵢ gᵢ·(σᵢ ⊙ Bᵢ) Aᵢ`` for a layer with constant gates, in the base weight's dtype.

    Args:
        layer: a layer for which ``constant_gates`` is not None.

    Returns:
        ``(out, in)`` merged weight (the delta summed in fp64, rounded once).

    Raises:
        ValueError: the layer's gates depend on the input.
    """
    gates = constant_gates(layer)
    if gates is None:
        raise ValueError(
            f"cannot merge a layer with routing={layer.routing!r} and {layer.num_experts} experts: "
            "its gates depend on the input"
        )
    f64 = torch.float64
    with torch.no_grad():
        coef = gates.to(f64) * (layer.scaling * layer.scale_factor)  # (E,)
        lora_b = layer.effective_lora_b().detach().to(f64)  # (E, out, r): σᵢ ⊙ Bᵢ as the forward forms it
        lora_a = layer.lora_A.detach().to(f64)  # (E, r, in)
        delta = torch.einsum("e,eor,eri->oi", coef, lora_b, lora_a)  # (out, in)
        weight = layer.base_weight  # (out, in) (a Conv1D's transposed view); refused for a quantized base
        return (weight.detach().to(f64) + delta.to(weight.device)).to(weight.dtype)  # (out, in)


def unmergeable_layers(model: nn.Module) -> dict[str, str]:
    """The adapted layers whose gates depend on the input, with their routing mode.

    Args:
        model: a model carrying MoE-LoRA adapters (or none).

    Returns:
        ``{layer name: routing}`` in model order; empty when every layer merges exactly.
    """
    return {name: layer.routing for name, layer in iter_moe_lora_layers(model) if constant_gates(layer) is None}


def _describe(left: dict[str, str]) -> str:
    shown = ", ".join(f"{name} (routing={routing!r})" for name, routing in list(left.items())[:5])
    return shown + (f", ... ({len(left) - 5} more)" if len(left) > 5 else "")


def merge_adapter(model: nn.Module, strict: bool = True) -> nn.Module:
    """Fold every exactly mergeable MoE-LoRA layer into its base ``nn.Linear``, in place.

    Each mergeable ``MoELoRALinear`` (``routing="global"``, or a single expert) is replaced by its base
    ``nn.Linear`` carrying the merged weight ``merged_weight(layer)`` (a new parameter, in the base
    weight's dtype; the bias is kept).  In eval mode the merged model computes what the adapted one did,
    up to one rounding of the weight.  When every layer is merged the parameters' ``requires_grad`` flags
    from before ``add_moe_lora`` are restored and ``moe_lora_config`` / ``moe_lora_requires_grad`` are
    deleted, as ``riemix.remove_moe_lora`` does; the adapter itself is gone (save it first to keep it).

    Args:
        model: a model carrying MoE-LoRA adapters.
        strict: refuse (True) or leave in place (False, with a warning naming them) the layers whose
            gates depend on the input; ``unmergeable_layers`` lists them beforehand.  A quantized base
            (bitsandbytes) is refused: merging needs full-precision weights.

    Returns:
        The same ``model`` (the merged ``nn.Linear`` itself when ``model`` is a ``MoELoRALinear``).

    Raises:
        ValueError: the model has no MoE-LoRA adapter, or (``strict``) some layers have input-dependent
            gates (named, with their routing); nothing is changed then.
    """
    layers = list(iter_moe_lora_layers(model))
    if not layers:
        raise ValueError(f"{type(model).__name__} has no MoE-LoRA adapters (no MoELoRALinear module) to merge")
    quantized = [name for name, layer in layers if layer.quantized_base]
    if quantized:  # adding a delta to packed 4-bit / int8 codes would be wrong, not approximate
        raise ValueError(
            f"cannot merge into a quantized base ({len(quantized)} layer(s), e.g. {quantized[0]!r}): load the "
            "base in full precision (no quantization) and load the adapter onto it to merge"
        )
    left = unmergeable_layers(model)
    if left and strict:
        raise ValueError(
            f"cannot merge {len(left)} of {len(layers)} MoE-LoRA layer(s): their gates depend on the input "
            f"(a per-token router over several experts): {_describe(left)}; only routing='global' or "
            "single-expert layers merge exactly (strict=False merges those and leaves the others)"
        )
    merged = [(name, layer) for name, layer in layers if name not in left]
    for name, layer in merged:
        base = layer.base_layer
        weight = merged_weight(layer)  # (out, in)
        weight = weight.t().contiguous() if layer.transposed else weight  # a Conv1D stores (in, out)
        base.weight = nn.Parameter(weight, requires_grad=base.weight.requires_grad)
        if name == "":  # the model is itself the layer
            return base
        set_submodule(model, name, base)
    if left:
        _log.warning("merge_adapter: %d layer(s) left unmerged (input-dependent gates): %s", len(left), _describe(left))
        return model
    forget_adapter(model)
    return model
