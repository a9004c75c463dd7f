"""Growing a model's experts mid-training: ``grow_experts`` adds experts and carries the optimizer along.

``MoELoRALinear.add_expert`` replaces a layer's stacked Parameters by larger ones (``riemix.core.growth``).
An optimizer built before holds the old Parameters, so ``replace_parameters`` moves it onto the new ones:

- every param group lists the new Parameter where the old one was (same position, so ``state_dict`` keeps
  its order and LR schedulers are untouched);
- every per-parameter state tensor of the parameter's shape (AdamW's ``exp_avg`` / ``exp_avg_sq``, SGD's
  ``momentum_buffer``) is copied into the leading corner of a zero tensor of the new shape: the old experts'
  moments are kept bit for bit and the new expert's start at zero; other entries (``step``) are kept as they
  are;
- a ``RiemannianOptimizer``'s LoRA pair registry names the new (A, B), and its preconditioner plans and
  update buffers (keyed by the old tensors and shapes) are dropped, to be rebuilt at the next step.

Hence the next step updates the old experts exactly as it would have without the growth (when R is
unchanged: bit for bit, as each expert's r x r system, each AdamW element and each momentum entry is
computed on its own), given the same gradients.  The step count of AdamW is per stacked tensor, so the new
expert's zero moments are bias-corrected with the tensor's count: its first updates are larger than those of
a fresh AdamW (up to (1 − β₁)/√(1 − β₂) ≈ 3.2x for β = (0.9, 0.999) in place of 1), until its second moment
has caught up (about 1/(1 − β₂) steps); a learning-rate warm-up after growing, or maturity routing, softens it.

At ``max_experts`` a layer's ``capacity_policy`` merges or evicts experts instead and the new expert takes the
freed slot (``riemix.core.capacity``): ``reset_expert_state`` zeroes the optimizer state of the slots involved
(merged, freed or evicted: every row of them in every stacked tensor's state) and keeps every other expert's
bit for bit; the same bias-correction remark holds for those slots.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from riemix.core.capacity import CapacityAction, add_at_capacity, choose_capacity_action
from riemix.core.growth import pad_corner
from riemix.core.layer import MoELoRALinear, iter_moe_lora_layers

__all__ = ["grow_experts", "replace_parameters", "reset_expert_state"]


def _adapter_parameters(layer: MoELoRALinear) -> dict[str, Tensor]:
    """The layer's stacked Parameters that ``add_expert`` replaces, by role."""
    params = {"lora_A": layer.lora_A, "lora_B": layer.lora_B, "gate": layer.gate_weight}
    if layer.expert_scale is not None:
        params["expert_scale"] = layer.expert_scale
    return params


def _inner_optimizer(optimizer: object) -> Optimizer:
    """``optimizer``, or the one a wrapper (Accelerate's ``AcceleratedOptimizer``) holds as ``.optimizer``."""
    inner = optimizer
    for _ in range(4):  # a wrapper of a wrapper at most, in practice
        if isinstance(inner, Optimizer):
            return inner
        inner = getattr(inner, "optimizer", None)
    raise TypeError(f"optimizer must be a torch.optim.Optimizer (or wrap one), got {type(optimizer).__name__}")


@torch.no_grad()
def replace_parameters(optimizer: Optimizer, replaced: Mapping[Tensor, Tensor]) -> None:
    """Move ``optimizer`` from old Parameters onto the larger ones that replace them (see the module docstring).

    Args:
        optimizer: any ``torch.optim.Optimizer`` (a ``RiemannianOptimizer``'s pair registry and plans too).
        replaced: old Parameter -> new Parameter, each new one at least as large as the old in every dim.
    """
    if not replaced:
        return
    for group in optimizer.param_groups:
        params = group["params"]
        for i, p in enumerate(params):
            if p in replaced:
                params[i] = replaced[p]
    for old, new in replaced.items():
        if old not in optimizer.state:
            continue
        state = optimizer.state.pop(old)
        optimizer.state[new] = {
            key: pad_corner(value, tuple(new.shape))
            if isinstance(value, Tensor) and value.dim() > 0 and value.shape == old.shape
            else value
            for key, value in state.items()
        }
    pairs = getattr(optimizer, "_pairs", None)
    if pairs is not None:  # a RiemannianOptimizer: its registry, plans and update buffers
        optimizer._pairs = [(replaced.get(a, a), replaced.get(b, b)) for a, b in pairs]
        optimizer._plans.clear()
        optimizer._scratch.clear()


@torch.no_grad()
def reset_expert_state(optimizer: Optimizer, params: Iterable[Tensor], experts: Sequence[int]) -> None:
    """Zero the optimizer state of rows ``experts`` (dim 0) of stacked ``params``; every other row is kept.

    Every per-parameter state tensor of the parameter's shape is written (AdamW's moments, SGD's momentum);
    scalar entries (``step``) are kept.  A ``RiemannianOptimizer``'s plans and update buffers are dropped.

    Args:
        optimizer: any ``torch.optim.Optimizer``.
        params: stacked Parameters with experts along dim 0 (``lora_A``, ``lora_B``, router weight, ...).
        experts: the expert rows to reset.
    """
    rows = list(experts)
    for p in params:
        for value in optimizer.state.get(p, {}).values():
            if isinstance(value, Tensor) and value.dim() > 0 and value.shape == p.shape:
                value[rows] = 0
    if getattr(optimizer, "_pairs", None) is not None:
        optimizer._plans.clear()
        optimizer._scratch.clear()


def _check_usage(usage: Mapping[str, Tensor] | None, names: list[str]) -> dict[str, Tensor]:
    if usage is None:
        return {}
    if not isinstance(usage, Mapping):
        raise TypeError(f"usage must map module names to (E,) tensors, got {type(usage).__name__}")
    unknown = [n for n in usage if n not in names]
    if unknown:
        raise ValueError(f"usage names {unknown[0]!r}, which is not a MoE-LoRA layer being grown")
    return dict(usage)


def grow_experts(
    model: nn.Module,
    optimizer: object | None = None,
    rank: int | None = None,
    modules: Iterable[str] | None = None,
    usage: Mapping[str, Tensor] | None = None,
    capacity_log: list[CapacityAction] | None = None,
) -> dict[str, int]:
    """Add one expert to MoE-LoRA layers of ``model`` (``MoELoRALinear.add_expert``) and update ``optimizer``.

    Each new expert has B = 0, an A drawn like its layer's initialisation and the mean router row
    (``riemix.core.growth``): the model's outputs are unchanged for every token the new experts do not take
    (every token under top-1 routing).  The optimizer, when given, keeps every existing expert's state and
    continues bit-identically for them (``replace_parameters``).  Growing is cheap: a copy of each layer's
    adapter tensors and of their optimizer state.

    A layer at its ``max_experts`` applies its ``capacity_policy`` (``riemix.core.capacity``): ``"error"``
    raises; ``"merge"`` / ``"evict"`` free a slot (E unchanged) that the new expert takes, reset the optimizer
    state of the slots involved and keep every other expert's (``reset_expert_state``).

    Args:
        model: a model carrying MoE-LoRA layers (not wrapped by DDP / FSDP: wrap it after growing).
        optimizer: the optimizer training it (a ``torch.optim.Optimizer``, or a wrapper holding one as
            ``.optimizer``), or None.
        rank: the new experts' rank (None: each layer's ``expert_ranks[0]``, the rank it was created with);
            a larger rank than a layer's R widens its stacked tensors.
        modules: names of the layers to grow (None: every MoE-LoRA layer).
        usage: ``{module name: (E,) usage}`` for the capacity actions (e.g. mean gates over recent tokens);
            a layer not named uses ``riemix.core.capacity.expert_usage``'s default.
        capacity_log: a list each ``CapacityAction`` taken is appended to (also logged at INFO).

    Returns:
        ``{module name: index of its new expert}``, in the order grown (a reused slot at capacity).

    Raises:
        ValueError: no MoE-LoRA layer, an unknown module name, a bad ``rank`` or ``usage``, a PiSSA layer, or
            a full layer whose policy is ``"error"`` or which has too few unfrozen experts (each named);
            nothing is changed then.
        TypeError: ``modules`` is a single string, ``usage`` not a mapping, or ``optimizer`` not an optimizer.
    """
    layers = dict(iter_moe_lora_layers(model))
    if not layers:
        raise ValueError("model has no MoE-LoRA layers; call add_moe_lora first")
    if isinstance(modules, str):
        raise TypeError(f"modules must be a list of module names, got the string {modules!r}")
    names = list(layers) if modules is None else list(dict.fromkeys(modules))
    unknown = [n for n in names if n not in layers]
    if unknown:
        raise ValueError(f"modules names {unknown[0]!r}, which is not a MoE-LoRA layer of the model")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rank must be an int >= 1 or None, got {rank!r}")
    pissa = [n for n in names if layers[n].pissa_down is not None]
    if pissa:
        raise ValueError(f"cannot grow {pissa[0]!r}: it was initialised with init='pissa' (see add_expert)")
    usage = _check_usage(usage, names)
    full = [n for n in names if layers[n].max_experts is not None and layers[n].num_experts >= layers[n].max_experts]
    for name in full:  # every refusal before anything changes
        choose_capacity_action(layers[name], usage.get(name), name)
    inner = None if optimizer is None else _inner_optimizer(optimizer)
    replaced: dict[Tensor, Tensor] = {}
    resets: list[tuple[MoELoRALinear, tuple[int, ...]]] = []
    added: dict[str, int] = {}
    for name in names:
        layer = layers[name]
        before = _adapter_parameters(layer)
        if name in full:
            record = add_at_capacity(layer, rank, usage.get(name), name)
            added[name] = record.slot
            resets.append((layer, record.experts))
            if capacity_log is not None:
                capacity_log.append(record)
        else:
            added[name] = layer.add_expert(rank)
        after = _adapter_parameters(layer)
        replaced.update({before[role]: after[role] for role in before if before[role] is not after[role]})
    if inner is not None:
        replace_parameters(inner, replaced)
        for layer, experts in resets:
            reset_expert_state(inner, _adapter_parameters(layer).values(), experts)
    return added
