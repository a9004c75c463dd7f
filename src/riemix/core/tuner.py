"""Attach MoE-LoRA experts to the linear modules (``nn.Linear``, GPT-2's ``Conv1D``) of any PyTorch /
Hugging Face model.

``add_moe_lora`` finds the targeted modules (``find_target_modules``), wraps each in a ``MoELoRALinear``
(with E from ``MoELoRAConfig.experts_for_layer(layer_index(name))``) and freezes everything else;
``remove_moe_lora`` undoes it (the base layers back, PiSSA undone bit for bit, the ``requires_grad`` flags
restored).  ``iter_moe_lora_layers`` walks the wrapped layers.  A bitsandbytes-quantized model is wrapped
the same way (its layers are called, not read: ``riemix.core.layer``), except with ``init="pissa"``.
What an adapter saves is ``riemix.core.state``; the per-step schedules are ``riemix.core.schedules``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable

import torch
from torch import nn

from riemix.core.config import MoELoRAConfig
from riemix.core.init import pissa_original, pissa_residual, same_bits
from riemix.core.layer import (
    MoELoRALinear,
    guard_quantized_layers,
    is_linear_like,
    is_quantized_linear,
    iter_moe_lora_layers,
)
from riemix.core.schedules import scale_warmup_factor

__all__ = [
    "ADAPTED_MODEL_HOOKS",
    "add_moe_lora",
    "find_target_modules",
    "forget_adapter",
    "iter_moe_lora_layers",
    "layer_index",
    "linear_names",
    "remove_moe_lora",
    "set_record_routing",
    "set_submodule",
]

_log = logging.getLogger("riemix")

#: Called in order with the model at the end of every ``add_moe_lora`` (so of every ``load_adapter`` too).
#: The core tier imports no other tier; ``riemix/__init__.py`` registers
#: ``riemix.integrations.protect_save_pretrained`` here: ``save_pretrained`` refuses on an adapted model.
ADAPTED_MODEL_HOOKS: list[Callable[[nn.Module], object]] = []

_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")
_ANY_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def layer_index(module_name: str) -> int | None:
    """Transformer block index in a module name (``model.layers.3.self_attn.q_proj`` -> 3), or None."""
    match = _LAYER_INDEX.search(module_name) or _ANY_INDEX.search(module_name)
    return int(match.group(1)) if match else None


def linear_names(model: nn.Module) -> list[str]:
    """Sorted distinct last name components of the linear modules (``nn.Linear``, ``Conv1D``) of ``model``."""
    return sorted({name.rsplit(".", 1)[-1] for name, mod in model.named_modules() if is_linear_like(mod)})


def _matches(name: str, target: list[str] | str) -> bool:
    """Whether module ``name`` is targeted: a regex string (full match), or a list of suffixes and
    ``re:<regex>`` items (full match of the name)."""
    if isinstance(target, str):
        return re.fullmatch(target.removeprefix("re:"), name) is not None
    for t in target:
        if t.startswith("re:"):
            if re.fullmatch(t[3:], name):
                return True
        elif name == t or name.endswith("." + t):
            return True
    return False


def find_target_modules(model: nn.Module, config: MoELoRAConfig) -> list[str]:
    """Full names of the modules ``config.target_modules`` selects, in model order.

    Raises:
        ValueError: if nothing matches (the candidate linear names are listed), if a match is not an
            ``nn.Linear`` or ``Conv1D``, or if the model already carries MoE-LoRA adapters.
    """
    if any(isinstance(m, MoELoRALinear) for m in model.modules()):
        raise ValueError("model already has MoE-LoRA adapters; add_moe_lora must be called once per model")
    names = []
    for name, module in model.named_modules():
        if not name or not _matches(name, config.target_modules):
            continue
        if not is_linear_like(module):
            raise ValueError(
                f"target_modules {config.target_modules!r} matched {name!r}, which is a "
                f"{type(module).__name__}, not an nn.Linear or Conv1D"
            )
        names.append(name)
    if not names:
        raise ValueError(
            f"target_modules {config.target_modules!r} matched no module; "
            f"linear module names in this model: {linear_names(model)}"
        )
    return names


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def add_moe_lora(
    model: nn.Module,
    config: MoELoRAConfig,
    experts_per_module: dict[str, int] | None = None,
    ranks_per_module: dict[str, int | list[int]] | None = None,
) -> nn.Module:
    """Wrap the targeted ``nn.Linear`` modules with ``MoELoRALinear`` in place and freeze the rest.

    Args:
        model: any ``nn.Module`` (typically a Hugging Face ``PreTrainedModel``).
        config: the adapter configuration.
        experts_per_module: optional explicit expert count per module name (used by ``load_adapter`` to
            restore exactly the saved layout); overrides ``config.num_experts``.
        ranks_per_module: optional explicit rank per module name, one int or a list of one rank per expert
            (``load_adapter``: the saved ranks); overrides ``config.rank``.

    Returns:
        The same ``model``; only adapter parameters (A, B, router) require gradients afterwards.  The
        adapter configuration is kept as ``model.moe_lora_config`` and every parameter's previous
        ``requires_grad`` flag as ``model.moe_lora_requires_grad`` (``{name: flag}``, for
        ``remove_moe_lora``).

    Raises:
        ValueError: see ``find_target_modules`` and ``MoELoRAConfig.experts_for_layer`` / ``rank_for_layer``;
            ``init="pissa"`` on quantized (bitsandbytes) targets, or a model whose 4-bit layers bitsandbytes
            has already repacked for CPU inference (``guard_quantized_layers``).  Nothing is changed then.
    """
    targets = find_target_modules(model, config)
    counts = {
        name: (experts_per_module or {}).get(name) or config.experts_for_layer(layer_index(name))
        for name in targets
    }
    ranks = {
        name: (ranks_per_module or {}).get(name) or config.rank_for_layer(layer_index(name)) for name in targets
    }
    over = [name for name in targets if config.max_experts is not None and counts[name] > config.max_experts]
    if over:
        raise ValueError(
            f"max_experts must be >= the {counts[over[0]]} experts of {over[0]!r}, got {config.max_experts}"
        )
    quantized = [name for name in targets if is_quantized_linear(model.get_submodule(name))]
    if quantized and config.init == "pissa":
        kind = type(model.get_submodule(quantized[0])).__name__
        raise ValueError(
            f"init='pissa' factors the base weights, but {len(quantized)} targeted module(s) are quantized "
            f"(e.g. {quantized[0]!r}, a bitsandbytes {kind}): use another init (e.g. zero_b) or load the base "
            "without quantization"
        )
    guard_quantized_layers(model)  # 4-bit layers keep passing gradients on CPU (checked before any change)
    requires_grad = {name: param.requires_grad for name, param in model.named_parameters()}
    for param in model.parameters():
        param.requires_grad_(False)
    joint_fallback = []
    for name in targets:
        base = model.get_submodule(name)
        layer = MoELoRALinear(
            base,
            num_experts=counts[name],
            rank=ranks[name],
            alpha=config.alpha,
            top_k=config.top_k,
            routing=config.routing,
            gate_grad_power=config.gate_grad_power,
            dropout=config.dropout,
            use_rslora=config.use_rslora,
            init=config.init,
            router_init_std=config.router_init_std,
            router_temperature=config.router_temperature,
            router_noise_std=config.router_noise_std,
            top_p=config.top_p,
            expert_scales=config.expert_scales,
            init_b_std=config.init_b_std,
            expert_compute=config.expert_compute,
            recompute_hidden=config.recompute_hidden,
            mature_after_steps=config.mature_after_steps,
            maturity_temperature=config.maturity_temperature,
            maturity_anneal_steps=config.maturity_anneal_steps,
            max_experts=config.max_experts,
            capacity_policy=config.capacity_policy,
        )
        layer.scale_factor = scale_warmup_factor(0, config.scale_warmup_steps)
        layer.train(base.training)  # follow the wrapped module's mode (dropout / selection noise)
        if layer.init_info == "per_expert":
            joint_fallback.append(name)
        set_submodule(model, name, layer)
    if joint_fallback:
        _log.warning(
            "init='orthogonal': experts x rank exceeds in_features in %d module(s) (e.g. %s); their A rows "
            "are orthonormal per expert only (layer.init_info == 'per_expert')",
            len(joint_fallback),
            joint_fallback[0],
        )
    model.moe_lora_config = config
    model.moe_lora_requires_grad = requires_grad
    for hook in ADAPTED_MODEL_HOOKS:
        hook(model)
    return model


def _original_weight(name: str, layer: MoELoRALinear) -> torch.Tensor | None:
    """The base weight from before ``init="pissa"`` (None for other inits), checked to be exact."""
    if layer.pissa_down is None:
        return None
    residual, down, up = layer.base_weight, layer.pissa_down, layer.pissa_up
    if layer.pissa_fix_index is None or layer.pissa_fix_value is None:
        raise ValueError(
            f"cannot restore the original weight of {name!r} exactly: its PiSSA factors are set but the "
            "entries needed to undo the residual's rounding are not (pissa_fix_index / pissa_fix_value); "
            "reload the base model instead"
        )
    with torch.no_grad():
        weight = pissa_original(residual, down, up, layer.pissa_fix_index, layer.pissa_fix_value)
        if not same_bits(pissa_residual(weight, down, up), residual):
            raise ValueError(
                f"cannot restore the original weight of {name!r} exactly: its base weight is no longer the "
                "PiSSA residual it was given (changed, trained or cast since add_moe_lora / load_adapter); "
                "reload the base model instead"
            )
    return weight


def remove_moe_lora(model: nn.Module) -> nn.Module:
    """Undo ``add_moe_lora`` (or ``load_adapter``): put every wrapped ``nn.Linear`` back, in place.

    Each ``MoELoRALinear`` is replaced by its ``base_layer``; after ``init="pissa"`` the base weight, which
    holds the residual, gets the original weight back bit for bit (``riemix.core.init.pissa_original``).
    The ``requires_grad`` flags ``add_moe_lora`` recorded are restored and the ``moe_lora_config`` and
    ``moe_lora_requires_grad`` attributes are deleted, so the model is the one ``add_moe_lora`` was given.
    The adapter is discarded, not merged: save it first (``riemix.save_adapter``) to keep it.

    Every layer is checked before anything changes: on an error the model is left as it was.

    Args:
        model: a model carrying MoE-LoRA adapters.

    Returns:
        The same ``model`` (the base ``nn.Linear`` itself when ``model`` is a ``MoELoRALinear``).

    Raises:
        ValueError: if the model has no MoE-LoRA adapter, or a PiSSA layer's original weight cannot be
            rebuilt exactly (its base weight was changed after the residual was installed).
    """
    layers = list(iter_moe_lora_layers(model))
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no MoE-LoRA adapters (no MoELoRALinear module) to remove; "
            "remove_moe_lora undoes add_moe_lora or load_adapter"
        )
    originals = {name: _original_weight(name, layer) for name, layer in layers}
    with torch.no_grad():
        for name, layer in layers:
            if originals[name] is not None:
                layer.base_weight.copy_(originals[name])
    if layers[0][0] == "":  # the model is itself a MoELoRALinear (modules are listed parent first)
        return layers[0][1].base_layer
    for name, layer in layers:
        set_submodule(model, name, layer.base_layer)
    forget_adapter(model)
    return model


def forget_adapter(model: nn.Module) -> None:
    """Once no adapter layer is left: restore the ``requires_grad`` flags ``add_moe_lora`` recorded and delete
    its ``moe_lora_config`` / ``moe_lora_requires_grad`` attributes (``remove_moe_lora``, ``merge_adapter``)."""
    flags = getattr(model, "moe_lora_requires_grad", None) or {}
    for name, param in model.named_parameters():
        if name in flags:
            param.requires_grad_(flags[name])
    for attr in ("moe_lora_config", "moe_lora_requires_grad"):
        if hasattr(model, attr):
            delattr(model, attr)


def set_record_routing(model: nn.Module, enabled: bool = True) -> None:
    """Make every adapted layer keep (or stop keeping) its last router logits and gates.

    Router regularisers and routing diagnostics read ``layer.last_router_logits`` / ``layer.last_gates``.
    """
    for _, layer in iter_moe_lora_layers(model):
        layer.record_routing = enabled
