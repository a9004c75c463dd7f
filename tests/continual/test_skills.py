"""Skill routing helpers: biases per skill, the routing context, and the nearest skill of an embedding."""

import pytest
import torch

from riemix import MoELoRAConfig, add_moe_lora, iter_moe_lora_layers
from riemix.continual.skills import EXCLUDED, nearest_skills, per_example, routed, skill_biases
from tests.helpers import make_tiny_llama


def adapted(num_experts=3):
    model = make_tiny_llama()
    add_moe_lora(model, MoELoRAConfig(num_experts=num_experts, top_k=1, rank=2, target_modules=["q_proj"]))
    return model


def test_biases_allow_only_the_skill_experts_and_routed_restores_the_layers():
    model = adapted()
    names = [n for n, _ in iter_moe_lora_layers(model)]
    biases = skill_biases(model, {n: [1] for n in names})
    assert all(b.tolist() == [EXCLUDED, 0.0, EXCLUDED] for b in biases.values())
    batch = per_example([biases, skill_biases(model, {n: [0, 2] for n in names})])
    assert batch[names[0]].shape == (2, 3)
    with routed(model, batch):
        assert all(layer.selection_bias is batch[n] for n, layer in iter_moe_lora_layers(model))
    assert all(layer.selection_bias is None for _, layer in iter_moe_lora_layers(model))


def test_a_layer_without_an_expert_of_the_skill_is_named():
    model = adapted()
    with pytest.raises(ValueError, match=r"skill routing: layer 'model.layers.0.self_attn.q_proj' has no expert"):
        skill_biases(model, {})


def test_nearest_skills_is_the_closest_centroid_by_cosine():
    centroids = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    emb = torch.tensor([[5.0, 1.0], [0.1, 3.0], [-1.0, 0.2]])
    assert nearest_skills(emb, centroids) == [0, 1, 1]
