"""add_moe_lora on tiny Hugging Face models: a (config x model) matrix through shared checks."""

from __future__ import annotations

import pytest
import torch

from riemix import MoELoRAConfig, MoELoRALinear, add_moe_lora, iter_moe_lora_layers
from riemix.core.tuner import layer_index, linear_names
from tests.helpers import TINY_MODELS, make_tiny_llama, tiny_inputs

CONFIGS = {
    "softmax_topk": dict(num_experts=4, top_k=2, rank=2, routing="softmax_topk", gate_grad_power=0.5),
    "topk_softmax_p0": dict(num_experts=3, top_k=1, rank=4, routing="topk_softmax", gate_grad_power=0.0),
    "dense_rslora": dict(num_experts=2, top_k=2, rank=1, routing="dense", use_rslora=True, dropout=0.1),
    "per_layer": dict(num_experts=[2, 6], top_k=2, rank=2, init="gaussian"),
}


def _outputs(model):
    out = model(**tiny_inputs())
    return out.logits


@pytest.mark.parametrize("model_name", list(TINY_MODELS))
@pytest.mark.parametrize("cfg_name", list(CONFIGS))
def test_matrix_shared_checks(model_name, cfg_name):
    factory, targets = TINY_MODELS[model_name]
    model = factory()
    before = _outputs(model).detach()
    originals = dict(model.named_modules())
    cfg = MoELoRAConfig(target_modules=targets, **CONFIGS[cfg_name])
    assert add_moe_lora(model, cfg) is model

    # 1. every targeted module wrapped, with the right layout
    layers = dict(iter_moe_lora_layers(model))
    assert len(layers) == 4 * 2
    for name, layer in layers.items():
        assert layer.base_layer is originals[name]  # the model's own Linear, wrapped in place
        assert layer.num_experts == cfg.experts_for_layer(layer_index(name))
        assert layer.lora_A.shape == (layer.num_experts, cfg.rank, layer.in_features)
        assert layer.lora_B.shape == (layer.num_experts, layer.out_features, cfg.rank)
        assert layer.router.weight.shape == (layer.num_experts, layer.in_features)
    # 2. only adapter parameters train
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B", "router.weight")) for n in trainable)
    assert len(trainable) == 3 * len(layers)
    # 3. outputs unchanged at step 0 (eval mode: dropout off)
    assert torch.equal(_outputs(model), before)
    # 4. gradients reach B (A and router get zero while B = 0) and are finite
    model.train()
    _outputs(model).float().pow(2).mean().backward()
    for layer in layers.values():
        assert layer.lora_B.grad is not None and torch.isfinite(layer.lora_B.grad).all()
    assert any(layer.lora_B.grad.abs().sum() > 0 for layer in layers.values())


def test_regex_and_suffix_matching(tiny_llama):
    cfg = MoELoRAConfig(num_experts=2, top_k=1, target_modules=r"model\.layers\.1\.mlp\.(up|down)_proj")
    add_moe_lora(tiny_llama, cfg)
    assert sorted(n for n, _ in iter_moe_lora_layers(tiny_llama)) == [
        "model.layers.1.mlp.down_proj",
        "model.layers.1.mlp.up_proj",
    ]


def test_more_experts_in_higher_layers(tiny_llama):
    cfg = MoELoRAConfig(num_experts=lambda i: 2 * (i + 1), top_k=2, target_modules=["q_proj"])
    add_moe_lora(tiny_llama, cfg)
    assert {n: m.num_experts for n, m in iter_moe_lora_layers(tiny_llama)} == {
        "model.layers.0.self_attn.q_proj": 2,
        "model.layers.1.self_attn.q_proj": 4,
    }


def test_linear_names():
    assert linear_names(make_tiny_llama()) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
    )


def test_layer_index_parsing():
    assert layer_index("model.layers.12.self_attn.q_proj") == 12
    assert layer_index("bert.encoder.layer.3.attention.self.query") == 3
    assert layer_index("transformer.h.5.attn.c_attn") == 5
    assert layer_index("lm_head") is None


def test_no_match_lists_candidates(tiny_llama):
    with pytest.raises(ValueError, match=r"matched no module; linear module names in this model: \[.*'q_proj'.*\]"):
        add_moe_lora(tiny_llama, MoELoRAConfig(num_experts=2, top_k=1, target_modules=["query"]))


def test_non_linear_target_rejected(tiny_llama):
    with pytest.raises(ValueError, match=r"matched 'model.layers.0.self_attn', which is a LlamaAttention"):
        add_moe_lora(tiny_llama, MoELoRAConfig(num_experts=2, top_k=1, target_modules=["self_attn"]))


def test_adding_twice_rejected(tiny_llama):
    cfg = MoELoRAConfig(num_experts=2, top_k=1, target_modules=["q_proj"])
    add_moe_lora(tiny_llama, cfg)
    with pytest.raises(ValueError, match="already has MoE-LoRA adapters"):
        add_moe_lora(tiny_llama, cfg)


def test_top_k_checked_against_resolved_layer_count(tiny_llama):
    cfg = MoELoRAConfig(num_experts=lambda i: 1 + i, top_k=2, target_modules=["q_proj"])
    with pytest.raises(ValueError, match=r"top_k must be in 1..num_experts \(1\) for layer 0, got 2"):
        add_moe_lora(tiny_llama, cfg)
    assert not any(isinstance(m, MoELoRALinear) for m in tiny_llama.modules())  # nothing half-applied
