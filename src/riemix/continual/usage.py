"""Which experts serve which skill: mean router gates per layer over a skill's tokens, and layer sizes."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from riemix.core.freezing import frozen_expert_map
from riemix.core.tuner import iter_moe_lora_layers, set_record_routing
from riemix.tasks import LMItem, collate_lm

__all__ = ["expert_usage", "layer_sizes"]


@torch.no_grad()
def expert_usage(
    model: nn.Module, items: list[LMItem], tokenizer, device: torch.device | str = "cpu", batch_size: int = 16
) -> dict[str, list[float]]:
    """``{layer: [mean gate of each expert]}`` over the non-padding tokens of ``items`` (each row sums to 1
    under normalised routing: the share of the skill's tokens each expert serves).

    Args:
        model: a model carrying MoE-LoRA layers.
        items: encoded examples of one skill (``riemix.tasks.encode_train``).
        tokenizer: the model's tokenizer (its pad id).
        device: where the model is.
        batch_size: examples per forward pass.
    """
    layers = list(iter_moe_lora_layers(model))
    sums = {name: torch.zeros(layer.num_experts, dtype=torch.float64) for name, layer in layers}  # (E,)
    tokens = 0
    was_training = model.training
    model.eval()
    set_record_routing(model, True)
    try:
        for start in range(0, len(items), batch_size):
            batch = collate_lm(items[start : start + batch_size], tokenizer.pad_token_id)
            mask = batch["attention_mask"].to(device)  # (b, T)
            model(input_ids=batch["input_ids"].to(device), attention_mask=mask)
            keep = mask.reshape(-1).bool()  # (b*T,)
            tokens += int(keep.sum())
            for name, layer in layers:
                sums[name] += layer.last_gates[keep].double().sum(0).cpu()  # (E,)
    finally:
        set_record_routing(model, False)
        model.train(was_training)
    return {name: [round(float(v) / max(tokens, 1), 6) for v in total] for name, total in sums.items()}


def layer_sizes(model: nn.Module) -> dict[str, Any]:
    """``{"experts": {layer: E}, "ranks": {layer: expert ranks}, "frozen": {layer: frozen indices}}``."""
    layers = list(iter_moe_lora_layers(model))
    frozen = frozen_expert_map(model)
    return {
        "experts": {name: layer.num_experts for name, layer in layers},
        "ranks": {name: list(layer.expert_ranks) for name, layer in layers},
        "frozen": {name: frozen.get(name, []) for name, _ in layers},
    }
