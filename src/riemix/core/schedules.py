"""Schedules: pure functions of the optimizer step, and the setters that apply them to a model.

- ``linear_schedule``: the learning-rate multiplier (linear warm-up, then linear decay or constant);
- ``scale_warmup_factor``: the adapter-scale multiplier f in [0, 1] (``MoELoRAConfig.scale_warmup_steps``);
- ``router_temperature_at``: the router temperature T, linear from ``router_temperature`` to
  ``router_temperature_final``.

``set_scale_progress`` / ``set_router_temperature`` / ``set_training_progress`` write f and T into every
``MoELoRALinear`` of a model; the trainer calls ``set_training_progress`` before every optimizer step, so
the layer state is a function of the step alone (a resumed run continues exactly).

Maturity routing (``riemix.core.maturity``): ``advance_maturity`` counts one optimizer step of age for every
expert (the trainer calls it once per step); the ages are saved with the adapter, so a resumed run continues
exactly too.  ``set_maturity`` sets the policy of every layer and of the model's config (which is what the
adapter file keeps).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from torch import nn

from riemix.core.layer import iter_moe_lora_layers

__all__ = [
    "advance_maturity",
    "linear_schedule",
    "scale_warmup_factor",
    "router_temperature_at",
    "set_maturity",
    "set_scale_progress",
    "set_router_temperature",
    "set_training_progress",
]


def linear_schedule(warmup_steps: int, total_steps: int, kind: str = "linear") -> Callable[[int], float]:
    """LR multiplier: linear warm-up, then linear decay to 0 (``kind="linear"``) or constant.

    Args:
        warmup_steps: steps of linear warm-up (0: none).
        total_steps: the step at which the linear decay reaches 0.
        kind: ``"linear"`` or ``"constant"`` (after the warm-up).

    Returns:
        ``step -> factor``, for ``torch.optim.lr_scheduler.LambdaLR``.
    """

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if kind == "constant":
            return 1.0
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


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
    temp = router_temperature_at(step, total_steps, config.router_temperature, config.router_temperature_final)
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


def advance_maturity(model: nn.Module, step: int) -> int:
    """Count optimizer step ``step`` in every expert's age (``MoELoRALinear.advance_age``); call once per step.

    Each layer counts a given ``step`` once (calling again with the same step changes nothing), and only
    layers with maturity routing on (``maturity.after_steps`` > 0) count at all.

    Args:
        model: a model carrying MoE-LoRA layers.
        step: the optimizer step being taken (any int; only its change matters).

    Returns:
        The number of immature experts left in the model after counting.
    """
    immature = 0
    for _, layer in iter_moe_lora_layers(model):
        layer.advance_age(step)
        immature += layer.routing_now().immature
    return immature


def set_maturity(model: nn.Module, after_steps: int, temperature: float | None = None, anneal_steps: int = 0) -> None:
    """Set the maturity policy of every MoE-LoRA layer and of ``model.moe_lora_config`` (so adapters keep it).

    Ages are counted only while maturity is on, so a layer on which it was off gets its existing experts
    marked mature (``MoELoRALinear.mark_mature``): turning it on for a trained adapter, then growing, makes
    only the new experts immature.  (For a dense start of a fresh adapter set ``MoELoRAConfig.mature_after_steps``
    before ``add_moe_lora``: its experts are born at age 0.)

    Args:
        model: a model carrying MoE-LoRA layers.
        after_steps: age (optimizer steps) at which an expert is mature (0: maturity routing off).
        temperature: router temperature of the dense routing while an expert is immature (None: the
            router temperature).
        anneal_steps: steps over which the temperature returns to the router temperature afterwards.

    Raises:
        ValueError: invalid settings (named), or a PiSSA adapter with ``after_steps`` > 0; nothing changes.
    """
    config = getattr(model, "moe_lora_config", None)
    if config is not None:  # validated by the config (names the field) before any layer changes
        config = dataclasses.replace(
            config,
            mature_after_steps=after_steps,
            maturity_temperature=temperature,
            maturity_anneal_steps=anneal_steps,
        )
    layers = [layer for _, layer in iter_moe_lora_layers(model)]
    for layer in layers:
        was_off = layer.maturity.after_steps <= 0
        layer.set_maturity(after_steps, temperature, anneal_steps)
        if was_off:
            layer.mark_mature()
    if config is not None:
        model.moe_lora_config = config
