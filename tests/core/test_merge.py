"""``merge_adapter``: a merged model computes what the adapted one did, wherever the gates are constant."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

from riemix import MoELoRAConfig, MoELoRALinear, add_moe_lora, iter_moe_lora_layers, merge_adapter
from riemix.core.merge import constant_gates, merged_weight, unmergeable_layers
from tests.helpers import F64, make_tiny_llama, tiny_inputs

TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]


def adapted_llama(dtype=torch.float64, seed: int = 0, **adapter) -> nn.Module:
    """A tiny Llama with random non-zero A, B, gates, expert scales, a scale factor and a temperature."""
    model = make_tiny_llama(dtype=dtype)
    torch.manual_seed(seed)
    opts = {"num_experts": 3, "top_k": 2, "rank": 2, "routing": "global", "expert_scales": True, **adapter}
    add_moe_lora(model, MoELoRAConfig(target_modules=TARGETS, **opts))
    gen = torch.Generator().manual_seed(seed)
    for _, layer in iter_moe_lora_layers(model):
        with torch.no_grad():
            for p in (layer.lora_A, layer.lora_B, layer.gate_weight):
                p.copy_(torch.randn(p.shape, generator=gen, dtype=F64).to(p.dtype) * 0.5)
            if layer.expert_scale is not None:
                layer.expert_scale.copy_(torch.rand(layer.expert_scale.shape, generator=gen, dtype=F64) + 0.5)
        layer.scale_factor = 0.6
        layer.router_temperature = 1.7
    return model.eval()


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**tiny_inputs()).logits  # (B, T, V)


def test_global_routing_merges_exactly_in_fp64():
    model = adapted_llama()
    want = logits(model)
    assert (want - logits(make_tiny_llama(dtype=F64))).abs().max() > 1e-2  # the adapter matters
    merged = merge_adapter(copy.deepcopy(model))
    assert not any(isinstance(m, MoELoRALinear) for m in merged.modules())
    q = merged.model.layers[0].self_attn.q_proj
    assert type(q) is nn.Linear and q.weight.dtype == F64
    torch.testing.assert_close(logits(merged), want, atol=1e-11, rtol=0)


def test_global_routing_merges_closely_in_fp32():
    model = adapted_llama(dtype=torch.float32)
    merged = merge_adapter(copy.deepcopy(model))
    assert merged.model.layers[1].mlp.down_proj.weight.dtype == torch.float32
    torch.testing.assert_close(logits(merged), logits(model), atol=1e-5, rtol=1e-5)


def test_the_merged_weight_is_w_plus_the_gated_delta():
    layer = dict(iter_moe_lora_layers(adapted_llama()))["model.layers.0.self_attn.q_proj"]
    gates = 3 * torch.softmax(layer.global_gate.detach() / 1.7, dim=0)  # E·softmax(w/T)
    delta = sum(gates[i] * (layer.lora_B[i] * layer.expert_scale[i].unsqueeze(-1)) @ layer.lora_A[i] for i in range(3))
    torch.testing.assert_close(constant_gates(layer), gates, atol=1e-15, rtol=0)
    want = layer.base_layer.weight + layer.scaling * 0.6 * delta
    torch.testing.assert_close(merged_weight(layer), want.detach(), atol=1e-14, rtol=0)


@pytest.mark.parametrize("routing", ["softmax_topk", "topk_softmax", "dense", "top_p"])
def test_a_single_expert_merges_in_every_routing(routing):
    model = adapted_llama(num_experts=1, top_k=1, routing=routing, top_p=0.5)
    assert unmergeable_layers(model) == {}
    torch.testing.assert_close(logits(merge_adapter(copy.deepcopy(model))), logits(model), atol=1e-11, rtol=0)


def test_merging_restores_the_requires_grad_flags_and_drops_the_adapter_attributes():
    plain = make_tiny_llama(dtype=F64)
    before = {name: p.requires_grad for name, p in plain.named_parameters()}
    model = merge_adapter(adapted_llama())
    assert {name: p.requires_grad for name, p in model.named_parameters()} == before
    assert not hasattr(model, "moe_lora_config") and not hasattr(model, "moe_lora_requires_grad")


def test_per_token_routing_is_refused_naming_the_layers_and_nothing_changes():
    model = adapted_llama(routing="softmax_topk", expert_scales=False)
    want = logits(model)
    with pytest.raises(
        ValueError, match=r"cannot merge 8 of 8 MoE-LoRA layer\(s\): their gates depend on the input"
    ) as exc:
        merge_adapter(model)
    assert "model.layers.0.self_attn.q_proj (routing='softmax_topk')" in str(exc.value)
    assert "strict=False" in str(exc.value)
    assert len(list(iter_moe_lora_layers(model))) == 8
    torch.testing.assert_close(logits(model), want, atol=0, rtol=0)


def test_strict_false_merges_the_constant_layers_and_leaves_the_others(caplog):
    model = adapted_llama(num_experts=[1, 4], top_k=1, routing="softmax_topk")  # block 0: one expert
    want = logits(model)
    left = unmergeable_layers(model)
    assert sorted(left) == [
        f"model.layers.1.{m}" for m in ("mlp.down_proj", "self_attn.o_proj", "self_attn.q_proj", "self_attn.v_proj")
    ]
    with caplog.at_level(logging.WARNING, logger="riemix"):
        merged = merge_adapter(model, strict=False)
    assert "4 layer(s) left unmerged" in caplog.text and "model.layers.1.self_attn.q_proj" in caplog.text
    assert [name for name, _ in iter_moe_lora_layers(merged)] == list(left)
    assert type(merged.model.layers[0].self_attn.q_proj) is nn.Linear
    assert hasattr(merged, "moe_lora_config")  # still an adapted model
    torch.testing.assert_close(logits(merged), want, atol=1e-11, rtol=0)


def test_a_pissa_layer_merges_onto_its_residual():
    model = make_tiny_llama(dtype=F64)
    original = logits(model)
    torch.manual_seed(0)
    add_moe_lora(model, MoELoRAConfig(num_experts=3, rank=2, routing="global", init="pissa", target_modules=TARGETS))
    torch.testing.assert_close(logits(copy.deepcopy(model)), original, atol=1e-10, rtol=0)  # PiSSA starts unchanged
    with torch.no_grad():
        for _, layer in iter_moe_lora_layers(model):
            layer.global_gate.copy_(torch.tensor([0.5, -0.3, 0.1], dtype=F64))  # now the experts weigh otherwise
    want = logits(model)
    assert (want - original).abs().max() > 1e-3
    torch.testing.assert_close(logits(merge_adapter(model)), want, atol=1e-10, rtol=0)


def test_a_lone_layer_merges_into_a_linear():
    base = nn.Linear(5, 4, dtype=F64).requires_grad_(False)
    layer = MoELoRALinear(base, num_experts=2, rank=2, alpha=2.0, top_k=2, routing="global")
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.global_gate.copy_(torch.tensor([0.3, -0.2], dtype=F64))
    x = torch.randn(3, 5, dtype=F64)
    want = layer(x)
    merged = merge_adapter(layer)
    assert type(merged) is nn.Linear
    torch.testing.assert_close(merged(x), want, atol=1e-14, rtol=0)


def test_a_model_without_adapters_is_refused():
    with pytest.raises(ValueError, match="LlamaForCausalLM has no MoE-LoRA adapters .* to merge"):
        merge_adapter(make_tiny_llama())


def test_merged_weight_of_a_per_token_layer_is_refused():
    layer = dict(iter_moe_lora_layers(adapted_llama(routing="dense")))["model.layers.0.self_attn.q_proj"]
    assert constant_gates(layer) is None
    with pytest.raises(ValueError, match=r"routing='dense' and 3 experts: its gates depend on the input"):
        merged_weight(layer)
