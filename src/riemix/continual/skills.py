"""Skill routing: send each example to its skill's experts only (``ContinualConfig.skill_routing``).

While a task trains, its examples (and each replayed exemplar) go to the experts of the skill they belong
to; when the model is evaluated, each example goes to the skill whose centroid in the novelty detector's
library is nearest to its base-model embedding.  The routing is a selection bias on every MoE-LoRA layer
(``MoELoRALinear.selection_bias``): 0 for the skill's experts, ``EXCLUDED`` for the others, so top-k picks
among the skill's experts and the gates come from the router as usual.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from riemix.core.tuner import iter_moe_lora_layers

__all__ = ["EXCLUDED", "nearest_skills", "per_example", "routed", "skill_biases"]

#: The selection bias of an expert outside the example's skill (finite: no inf arithmetic in the routing).
EXCLUDED = -1e9


def skill_biases(model: nn.Module, experts: Mapping[str, Sequence[int]]) -> dict[str, torch.Tensor]:
    """``{layer: (E,) bias}``: 0 for the experts ``experts[layer]`` lists, ``EXCLUDED`` for the others.

    Raises:
        ValueError: a layer that ``experts`` does not list, or lists with no expert.
    """
    out = {}
    for name, layer in iter_moe_lora_layers(model):
        mine = list(experts.get(name, []))
        if not mine:
            raise ValueError(f"skill routing: layer {name!r} has no expert of this skill")
        bias = torch.full((layer.num_experts,), EXCLUDED)  # (E,)
        bias[mine] = 0.0
        out[name] = bias
    return out


def per_example(biases: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``{layer: (B, E)}`` from one ``skill_biases`` result per example of a batch."""
    return {name: torch.stack([b[name] for b in biases]) for name in biases[0]}


@contextlib.contextmanager
def routed(model: nn.Module, biases: Mapping[str, torch.Tensor] | None) -> Iterator[None]:
    """Set every layer's ``selection_bias`` from ``biases`` inside the block (None: leave the routing as is)."""
    if biases is None:
        yield
        return
    layers = dict(iter_moe_lora_layers(model))
    for name, bias in biases.items():
        layers[name].selection_bias = bias
    try:
        yield
    finally:
        for name in biases:
            layers[name].selection_bias = None


def nearest_skills(embeddings: torch.Tensor, centroids: torch.Tensor) -> list[int]:
    """The index of the centroid (cosine) nearest to each embedding: ``(n, H)``, ``(k, H)`` → n ints."""
    sims = F.normalize(embeddings.float(), dim=1) @ F.normalize(centroids.float(), dim=1).T  # (n, k)
    return sims.argmax(dim=1).tolist()
