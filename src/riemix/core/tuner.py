"""Attach MoE-LoRA experts to the ``nn.Linear`` modules of any PyTorch / Hugging Face model."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator

import torch
from torch import nn

from riemix.core.config import MoELoRAConfig
from riemix.core.layer import MoELoRALinear

__all__ = [
    "add_moe_lora",
    "find_target_modules",
    "iter_moe_lora_layers",
    "layer_index",
    "linear_names",
    "adapter_state_dict",
    "adapter_tensor_shapes",
    "ADAPTER_PARAM_SUFFIXES",
    "scale_warmup_factor",
    "router_temperature_at",
    "set_scale_progress",
    "set_router_temperature",
    "set_training_progress",
    "scale_anchor_loss",
]

_log = logging.getLogger("riemix")

#: Names (relative to a ``MoELoRALinear``) of the tensors that can make up an adapter.
ADAPTER_PARAM_SUFFIXES = (
    "lora_A",
    "lora_B",
    "router.weight",
    "global_gate",
    "expert_scale",
    "pissa_down",
    "pissa_up",
)

_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")
_ANY_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def layer_index(module_name: str) -> int | None:
    """Transformer block index in a module name (``model.layers.3.self_attn.q_proj`` -> 3), or None."""
    match = _LAYER_INDEX.search(module_name) or _ANY_INDEX.search(module_name)
    return int(match.group(1)) if match else None


def linear_names(model: nn.Module) -> list[str]:
    """Sorted distinct last name components of the ``nn.Linear`` modules of ``model``."""
    return sorted(
        {name.rsplit(".", 1)[-1] for name, mod in model.named_modules() if isinstance(mod, nn.Linear)}
    )


def _matches(name: str, target: list[str] | str) -> bool:
    if isinstance(target, str):
        return re.fullmatch(target, name) is not None
    return any(name == t or name.endswith("." + t) for t in target)


def find_target_modules(model: nn.Module, config: MoELoRAConfig) -> list[str]:
    """Full names of the modules ``config.target_modules`` selects, in model order.

    Raises:
        ValueError: if nothing matches (the candidate Linear names are listed), if a match is not an
            ``nn.Linear``, or if the model already carries MoE-LoRA adapters.
    """
    if any(isinstance(m, MoELoRALinear) for m in model.modules()):
        raise ValueError("model already has MoE-LoRA adapters; add_moe_lora must be called once per model")
    names = []
    for name, module in model.named_modules():
        if not name or not _matches(name, config.target_modules):
            continue
        if not isinstance(module, nn.Linear):
            raise ValueError(
                f"target_modules {config.target_modules!r} matched {name!r}, which is a "
                f"{type(module).__name__}, not an nn.Linear"
            )
        names.append(name)
    if not names:
        raise ValueError(
            f"target_modules {config.target_modules!r} matched no module; "
            f"nn.Linear names in this model: {linear_names(model)}"
        )
    return names


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def add_moe_lora(
    model: nn.Module, config: MoELoRAConfig, experts_per_module: dict[str, int] | None = None
) -> nn.Module:
    """Wrap the targeted ``nn.Linear`` modules with ``MoELoRALinear`` in place and freeze the rest.

    Args:
        model: any ``nn.Module`` (typically a Hugging Face ``PreTrainedModel``).
        config: the adapter configuration.
        experts_per_module: optional explicit expert count per module name (used by ``load_adapter`` to
            restore exactly the saved layout); overrides ``config.num_experts``.

    Returns:
        The same ``model``; only adapter parameters (A, B, router) require gradients afterwards.

    Raises:
        ValueError: see ``find_target_modules`` and ``MoELoRAConfig.experts_for_layer``.
    """
    targets = find_target_modules(model, config)
    counts = {
        name: (experts_per_module or {}).get(name) or config.experts_for_layer(layer_index(name))
        for name in targets
    }
    for param in model.parameters():
        param.requires_grad_(False)
    joint_fallback = []
    for name in targets:
        base = model.get_submodule(name)
        layer = MoELoRALinear(
            base,
            num_experts=counts[name],
            rank=config.rank,
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
        )
        layer.scale_factor = scale_warmup_factor(0, config.scale_warmup_steps)
        layer.train(base.training)  # follow the wrapped module's mode (dropout / selection noise)
        if layer.init_info == "per_expert":
            joint_fallback.append(name)
        _set_submodule(model, name, layer)
    if joint_fallback:
        _log.warning(
            "init='orthogonal': experts x rank exceeds in_features in %d module(s) (e.g. %s); their A rows "
            "are orthonormal per expert only (layer.init_info == 'per_expert')",
            len(joint_fallback),
            joint_fallback[0],
        )
    model.moe_lora_config = config
    return model


def iter_moe_lora_layers(model: nn.Module) -> Iterator[tuple[str, MoELoRALinear]]:
    """Yield ``(name, layer)`` for every ``MoELoRALinear`` in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, MoELoRALinear):
            yield name, module


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors only, keyed ``<module>.<suffix>`` (see ``ADAPTER_PARAM_SUFFIXES``).

    Always ``lora_A`` and ``lora_B``; ``router.weight`` (per-token routing) or ``global_gate``
    (``routing="global"``); ``expert_scale`` with ``expert_scales``; ``pissa_down``/``pissa_up`` (the part of
    the base weight that ``init="pissa"`` moved into the experts) for PiSSA layers.
    """
    state = {}
    for name, layer in iter_moe_lora_layers(model):
        state[f"{name}.lora_A"] = layer.lora_A.detach()
        state[f"{name}.lora_B"] = layer.lora_B.detach()
        if layer.router is not None:
            state[f"{name}.router.weight"] = layer.router.weight.detach()
        else:
            state[f"{name}.global_gate"] = layer.global_gate.detach()
        if layer.expert_scale is not None:
            state[f"{name}.expert_scale"] = layer.expert_scale.detach()
        if layer.pissa_down is not None:
            state[f"{name}.pissa_down"] = layer.pissa_down
            state[f"{name}.pissa_up"] = layer.pissa_up
    return state


def adapter_tensor_shapes(
    config: MoELoRAConfig, name: str, num_experts: int, rank: int, in_features: int, out_features: int
) -> dict[str, tuple[int, ...]]:
    """Expected ``adapter_state_dict`` keys and shapes of one module under ``config``."""
    e, r = num_experts, rank
    shapes: dict[str, tuple[int, ...]] = {
        f"{name}.lora_A": (e, r, in_features),
        f"{name}.lora_B": (e, out_features, r),
    }
    if config.routing == "global":
        shapes[f"{name}.global_gate"] = (e,)
    else:
        shapes[f"{name}.router.weight"] = (e, in_features)
    if config.expert_scales:
        shapes[f"{name}.expert_scale"] = (e, out_features)
    if config.init == "pissa":
        shapes[f"{name}.pissa_down"] = (e * r, in_features)
        shapes[f"{name}.pissa_up"] = (out_features, e * r)
    return shapes


# ---------------------------------------------------------------- schedules and the scale anchor
def scale_warmup_factor(step: int, warmup_steps: int) -> float:
    """Adapter-scale multiplier after ``step`` optimizer steps: ``min(1, step / warmup_steps)`` (1 if 0)."""
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, max(0, step) / warmup_steps)


def router_temperature_at(step: int, total_steps: int, start: float, final: float | None) -> float:
    """Router temperature after ``step`` of ``total_steps`` steps: linear from ``start`` to ``final``.

    ``final=None`` (or ``total_steps <= 0``) keeps ``start``; from ``total_steps`` on it is ``final``.
    """
    if final is None:
        return float(start)
    if total_steps <= 0:
        return float(final)
    frac = min(1.0, max(0, step) / total_steps)
    return float(start + (final - start) * frac)


def set_scale_progress(model: nn.Module, step: int) -> float:
    """Set every layer's ``scale_factor`` for optimizer step ``step`` (a pure function of the step).

    Returns:
        The factor set (1.0 without ``scale_warmup_steps``).
    """
    config = getattr(model, "moe_lora_config", None)
    factor = scale_warmup_factor(step, config.scale_warmup_steps if config is not None else 0)
    for _, layer in iter_moe_lora_layers(model):
        layer.scale_factor = factor
    return factor


def set_router_temperature(model: nn.Module, step: int, total_steps: int) -> float:
    """Set every layer's ``router_temperature`` for step ``step`` of ``total_steps`` (linear decay).

    Returns:
        The temperature set.
    """
    config = getattr(model, "moe_lora_config", None)
    if config is None:
        return 1.0
    temp = router_temperature_at(
        step, total_steps, config.router_temperature, config.router_temperature_final
    )
    for _, layer in iter_moe_lora_layers(model):
        layer.router_temperature = temp
    return temp


def set_training_progress(model: nn.Module, step: int, total_steps: int) -> dict[str, float]:
    """Both schedules at once (the trainer calls this before every optimizer step).

    Returns:
        ``{"adapter_scale_factor": f, "router_temperature": T}``.
    """
    return {
        "adapter_scale_factor": set_scale_progress(model, step),
        "router_temperature": set_router_temperature(model, step, total_steps),
    }


def scale_anchor_loss(model: nn.Module) -> torch.Tensor | None:
    """β·Σ over layers of ‖σ − 1‖² (sum over experts and channels) for the expert scale vectors σ.

    β is ``model.moe_lora_config.scale_anchor_beta``; the initial value of every scale is 1.

    Returns:
        A scalar tensor, or None when β = 0 or the model has no expert scales.
    """
    config = getattr(model, "moe_lora_config", None)
    if config is None or not config.scale_anchor_beta:
        return None
    terms = [
        (layer.expert_scale - 1.0).pow(2).sum()
        for _, layer in iter_moe_lora_layers(model)
        if layer.expert_scale is not None
    ]
    if not terms:
        return None
    return config.scale_anchor_beta * torch.stack(terms).sum()
