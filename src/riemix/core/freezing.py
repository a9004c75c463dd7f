"""Frozen experts for continual learning: hold chosen experts (and router rows) fixed while the others train.

A ``MoELoRALinear`` keeps two ``(E,)`` bool buffers, ``frozen_experts`` and ``frozen_router_rows``
(``MoELoRALinear.freeze_expert``); every riemix optimizer reads them at each step
(``RiemannianOptimizer.track_frozen``, done by ``build_optimizer``) and leaves those rows bit-identical.
This module works on a whole model:

- ``freeze_experts(model, experts, router=False)`` / ``unfreeze_experts(model, experts)``: ``experts`` is
  ``{module name: [expert indices]}`` or one list of indices for every MoE-LoRA layer; everything is checked
  before any mask changes;
- ``check_experts(model, experts)``: the spec checked and normalised, nothing changed;
- ``frozen_expert_map(model)``: which experts are frozen where;
- ``frozen_state_dict`` / ``split_frozen_state`` / ``load_frozen_state``: the masks in the adapter format
  (``<module>.frozen_experts``, ``<module>.frozen_router_rows``, bool ``(E,)``), written only for layers with
  something frozen, so an adapter without frozen experts (or one saved before they existed) has no such key
  and loads all-unfrozen.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from riemix.core.layer import MoELoRALinear, iter_moe_lora_layers

__all__ = [
    "FROZEN_SUFFIXES",
    "check_experts",
    "freeze_experts",
    "frozen_expert_map",
    "frozen_state_dict",
    "load_frozen_state",
    "split_frozen_state",
    "unfreeze_experts",
]

#: Adapter keys ``<module>.<suffix>`` of the frozen masks, each a bool ``(E,)`` tensor.
FROZEN_SUFFIXES: tuple[str, ...] = ("frozen_experts", "frozen_router_rows")

ExpertSpec = Mapping[str, Sequence[int]] | Sequence[int]


def _indices(value: object, where: str) -> Sequence[int]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{where} must be a list of expert indices, got {value!r}")
    return value


def _resolve(model: nn.Module, experts: ExpertSpec) -> dict[str, tuple[MoELoRALinear, list[int]]]:
    """``{layer name: (layer, sorted distinct indices)}`` for ``experts``, fully checked.

    Raises:
        TypeError: ``experts`` is neither a mapping nor a list, a key is not a str, or an index not an int.
        ValueError: the model has no MoE-LoRA layer, a name is not one of its MoE-LoRA layers, or an index
            is out of range for its layer (layer, index and E named).
    """
    layers = dict(iter_moe_lora_layers(model))
    if not layers:
        raise ValueError("model has no MoE-LoRA layers; call add_moe_lora first")
    if isinstance(experts, Mapping):
        items = []
        for name, value in experts.items():
            if not isinstance(name, str):
                raise TypeError(f"experts keys must be module names (str), got {name!r}")
            if name not in layers:
                known = ", ".join(repr(n) for n in list(layers)[:4]) + (", ..." if len(layers) > 4 else "")
                raise ValueError(
                    f"experts names unknown module {name!r}: not a MoE-LoRA layer of the model (its "
                    f"{len(layers)} MoE-LoRA layers: {known})"
                )
            items.append((name, _indices(value, f"experts[{name!r}]")))
    else:
        indices = _indices(experts, "experts (a dict of module name -> expert indices, or a list of indices)")
        items = [(name, indices) for name in layers]
    resolved = {}
    for name, indices in items:
        layer = layers[name]
        checked = set()
        for i in indices:
            try:
                checked.add(layer._check_expert_index(i))
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"layer {name!r}: {exc}") from None
        resolved[name] = (layer, sorted(checked))
    return resolved


def check_experts(model: nn.Module, experts: ExpertSpec) -> dict[str, list[int]]:
    """``experts`` checked against ``model`` and normalised: ``{module name: sorted distinct indices}``.

    Raises:
        TypeError, ValueError: as ``freeze_experts`` (malformed spec, unknown module, index out of range).
    """
    return {name: indices for name, (_, indices) in _resolve(model, experts).items()}


def freeze_experts(model: nn.Module, experts: ExpertSpec, router: bool = False) -> dict[str, list[int]]:
    """Freeze experts of a model's MoE-LoRA layers (``MoELoRALinear.freeze_expert`` for each).

    Args:
        model: a model carrying MoE-LoRA layers.
        experts: ``{module name: [expert indices]}``, or one list of indices applied to every MoE-LoRA layer.
        router: also freeze the experts' router rows (global gate entries).

    Returns:
        ``{module name: sorted indices}`` of what was asked for (the layers named, or every layer).

    Raises:
        TypeError: a malformed ``experts`` (not a mapping or list, a non-str key, a non-int index) or a
            non-bool ``router``.
        ValueError: no MoE-LoRA layer, an unknown module name, or an index out of range (layer, index and E
            named).  Nothing is frozen then.
    """
    if not isinstance(router, bool):
        raise TypeError(f"router must be a bool, got {router!r}")
    resolved = _resolve(model, experts)
    for layer, indices in resolved.values():
        for i in indices:
            layer.freeze_expert(i, router=router)
    return {name: indices for name, (_, indices) in resolved.items()}


def unfreeze_experts(model: nn.Module, experts: ExpertSpec) -> dict[str, list[int]]:
    """Unfreeze experts (and their router rows) of a model's MoE-LoRA layers; ``experts`` as ``freeze_experts``.

    The experts' optimizer state resumes where it was when they were frozen (see ``riemix.optim.base``).

    Returns:
        ``{module name: sorted indices}`` of what was asked for.

    Raises:
        TypeError, ValueError: as ``freeze_experts``; nothing is unfrozen then.
    """
    resolved = _resolve(model, experts)
    for layer, indices in resolved.values():
        for i in indices:
            layer.unfreeze_expert(i)
    return {name: indices for name, (_, indices) in resolved.items()}


def frozen_expert_map(model: nn.Module, router: bool = False) -> dict[str, list[int]]:
    """``{module name: frozen expert indices}`` for the layers with any (``router=True``: frozen router rows)."""
    name = "frozen_router_rows" if router else "frozen_experts"
    out = {}
    for module, layer in iter_moe_lora_layers(model):
        index = layer._frozen_index(name)
        if index is not None:
            out[module] = [int(i) for i in index.tolist()]
    return out


def frozen_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The masks of every layer with a frozen expert or router row, keyed ``<module>.<suffix>`` (CPU copies)."""
    state = {}
    for name, layer in iter_moe_lora_layers(model):
        masks = {suffix: layer._frozen_mask(suffix) for suffix in FROZEN_SUFFIXES}
        if any(layer._frozen_index(suffix) is not None for suffix in FROZEN_SUFFIXES):
            state.update({f"{name}.{suffix}": mask.detach().to("cpu").clone() for suffix, mask in masks.items()})
    return state


def split_frozen_state(
    tensors: dict[str, torch.Tensor], num_experts: Mapping[str, int]
) -> dict[str, dict[str, torch.Tensor]]:
    """Take the frozen masks out of adapter ``tensors`` (in place) and check them.

    Args:
        tensors: adapter tensors keyed ``<module>.<suffix>``; the mask entries are removed.
        num_experts: E of every adapted module.

    Returns:
        ``{module: {suffix: bool (E,) mask}}`` for the modules with masks.

    Raises:
        ValueError: a mask of a module not in ``num_experts``, or one that is not a bool ``(E,)`` tensor (key,
            dtype / shape and E named).  ``tensors`` is unchanged then.
    """
    masks: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        module, _, suffix = key.rpartition(".")
        if suffix not in FROZEN_SUFFIXES:
            continue
        if module not in num_experts:
            raise ValueError(f"{key}: frozen mask of module {module!r}, which is not adapted")
        e = num_experts[module]
        if value.dtype != torch.bool or tuple(value.shape) != (e,):
            raise ValueError(
                f"{key}: a frozen mask must be a bool tensor of shape ({e},) (num_experts={e}), "
                f"got {value.dtype} of shape {tuple(value.shape)}"
            )
        masks.setdefault(module, {})[suffix] = value
    for module, found in masks.items():
        for suffix in found:
            del tensors[f"{module}.{suffix}"]
    return masks


@torch.no_grad()
def load_frozen_state(model: nn.Module, masks: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
    """Set every MoE-LoRA layer's frozen masks from ``split_frozen_state``'s output; absent ones: all unfrozen.

    Raises:
        ValueError: a module of ``masks`` is not a MoE-LoRA layer of the model, or a mask has another E.
    """
    layers = dict(iter_moe_lora_layers(model))
    for module, found in masks.items():
        layer = layers.get(module)
        if layer is None:
            raise ValueError(f"frozen masks of module {module!r}, which is not a MoE-LoRA layer of the model")
        for suffix, mask in found.items():
            if tuple(mask.shape) != (layer.num_experts,):
                raise ValueError(
                    f"{module}.{suffix}: shape {tuple(mask.shape)}, the layer has num_experts={layer.num_experts}"
                )
    for name, layer in layers.items():
        for suffix in FROZEN_SUFFIXES:
            mask = masks.get(name, {}).get(suffix)
            target = layer._frozen_mask(suffix)
            if mask is None:
                target.zero_()
            else:
                target.copy_(mask.to(target.device))
