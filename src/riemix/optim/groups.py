"""``build_optimizer``: param groups of a MoE-LoRA model and the optimizer names (``OPTIMIZER_NAMES``)."""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.optim import Optimizer

from riemix.core.layer import MoELoRALinear, iter_moe_lora_layers
from riemix.optim.base import RiemannianOptimizer, check_option
from riemix.optim.radamw import RiemannianAdamW
from riemix.optim.rsgd import RiemannianSGD

__all__ = ["OPTIMIZER_NAMES", "build_optimizer"]

# name -> (class, precondition): the one table of optimizer names
_OPTIMIZERS: dict[str, tuple[type[RiemannianOptimizer], bool]] = {
    "sgd": (RiemannianSGD, False),
    "adamw": (RiemannianAdamW, False),
    "rsgd": (RiemannianSGD, True),
    "radamw": (RiemannianAdamW, True),
}
OPTIMIZER_NAMES: tuple[str, ...] = tuple(sorted(_OPTIMIZERS))  # ("adamw", "radamw", "rsgd", "sgd")


def _param_groups(model: nn.Module, lr: float, gate_lr: float, loraplus_ratio: float, gate_max_grad_norm: float | None):
    """The non-empty param groups ``lora_A``, ``lora_B``, ``router``, ``other`` and the (A, B) pairs."""
    seen: set[int] = set()
    a_params, b_params, router_params = [], [], []
    pairs: list[tuple[nn.Parameter, nn.Parameter]] = []

    def take(p: nn.Parameter, bucket: list[nn.Parameter]) -> bool:
        if not p.requires_grad or id(p) in seen:
            return False
        seen.add(id(p))
        bucket.append(p)
        return True

    for module in model.modules():
        if isinstance(module, MoELoRALinear):
            has_a, has_b = take(module.lora_A, a_params), take(module.lora_B, b_params)
            if has_a and has_b:
                pairs.append((module.lora_A, module.lora_B))
            for p in module.router.parameters() if module.router is not None else ():
                take(p, router_params)
            if module.global_gate is not None:
                take(module.global_gate, router_params)  # routing="global": gate logits train like a router
    other = [p for p in model.parameters() if p.requires_grad and id(p) not in seen]
    spec = (
        ("lora_A", a_params, {"lr": lr}),
        ("lora_B", b_params, {"lr": lr * loraplus_ratio}),
        ("router", router_params, {"lr": gate_lr, "max_grad_norm": gate_max_grad_norm}),
        ("other", other, {"lr": lr}),
    )
    return [{"params": ps, "name": gname, **opts} for gname, ps, opts in spec if ps], pairs


def build_optimizer(
    model: nn.Module,
    name: str,
    lr: float,
    gate_lr: float | None = None,
    reg: float = 1e-6,
    weight_decay: float = 0.0,
    loraplus_ratio: float = 1.0,
    gate_max_grad_norm: float | None = None,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float | None = None,
    momentum: float = 0.0,
    reference_compat: bool = False,
    **kwargs: Any,
) -> Optimizer:
    """Build an optimizer over the trainable parameters of a model adapted with MoE-LoRA layers.

    Param groups (empty ones omitted), each tagged with a ``"name"`` key:
    ``lora_A`` (lr), ``lora_B`` (lr * loraplus_ratio), ``router`` (router weights and ``global_gate``
    logits; gate_lr, max_grad_norm = gate_max_grad_norm) and ``other`` (lr; e.g. expert scale
    vectors). Weight decay is the same for every group, router included.
    A and B of a layer are paired (by identity) only when both are trainable; an unpaired factor gets
    the plain update. Every MoE-LoRA layer is tracked for frozen experts (``RiemannianOptimizer.track_frozen``):
    experts frozen with ``MoELoRALinear.freeze_expert`` / ``riemix.freeze_experts``, before or after the
    optimizer is built, stay bit-identical through its steps.

    Args:
        model: Model containing ``MoELoRALinear`` layers.
        name: One of ``OPTIMIZER_NAMES``: "sgd", "adamw" (plain updates) or "rsgd", "radamw"
            (preconditioned), case-insensitive.
        lr: Base learning rate (>= 0).
        gate_lr: Router learning rate; defaults to ``lr``.
        reg: Ridge term delta of the preconditioner.
        weight_decay: Weight decay of every group.
        loraplus_ratio: LoRA+ multiplier of the B learning rate (> 0).
        gate_max_grad_norm: Grad-norm clip of the router group (None: no clipping).
        betas: AdamW betas (ignored by SGD).
        eps: AdamW eps; None picks the optimizer default (ignored by SGD).
        momentum: SGD momentum (ignored by AdamW).
        reference_compat: See ``RiemannianAdamW`` / ``RiemannianSGD``.
        **kwargs: Extra keyword arguments for the optimizer class (e.g. ``nesterov``).

    Returns:
        The configured ``RiemannianAdamW`` or ``RiemannianSGD``.

    Raises:
        ValueError: Unknown name, invalid lr / gate_lr / loraplus_ratio, a model without MoE-LoRA layers,
            or no trainable parameters.
    """
    key = name.lower() if isinstance(name, str) else name
    if key not in _OPTIMIZERS:
        raise ValueError(f"Unknown optimizer {name!r}; valid names: {', '.join(OPTIMIZER_NAMES)}")
    gate_lr = lr if gate_lr is None else gate_lr
    check_option(lr >= 0.0, "lr", lr)
    check_option(gate_lr >= 0.0, "gate_lr", gate_lr)
    check_option(loraplus_ratio > 0.0, "loraplus_ratio", loraplus_ratio)
    if next(iter_moe_lora_layers(model), None) is None:  # else every trainable base weight would be trained
        raise ValueError("model has no MoE-LoRA layers; call add_moe_lora first")
    groups, pairs = _param_groups(model, lr, gate_lr, loraplus_ratio, gate_max_grad_norm)
    if not groups:
        raise ValueError("model has no trainable parameters; call add_moe_lora first")
    cls, precondition = _OPTIMIZERS[key]
    options: dict[str, Any] = dict(
        lr=lr, weight_decay=weight_decay, reg=reg, precondition=precondition,
        reference_compat=reference_compat, lora_pairs=pairs,
    )  # fmt: skip
    if cls is RiemannianAdamW:
        options.update(betas=betas, eps=eps)
    else:
        options.update(momentum=momentum)
    options.update(kwargs)
    optimizer = cls(groups, **options)
    optimizer.track_frozen(*(layer for _, layer in iter_moe_lora_layers(model)))
    return optimizer
