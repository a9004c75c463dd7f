"""Maturity routing: dense while a layer has an immature expert, its own top-k once all are mature."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from riemix.core.config import MoELoRAConfig
from riemix.core.layer import MoELoRALinear
from riemix.core.maturity import MaturityPolicy, check_maturity_policy, maturity_routing
from riemix.core.routing import route
from riemix.core.schedules import advance_maturity, set_maturity
from riemix.core.tuner import add_moe_lora, iter_moe_lora_layers
from tests.helpers import make_tiny_llama

F64 = torch.float64


def layer_with_maturity(after=3, k=1, **kw) -> MoELoRALinear:
    torch.manual_seed(0)
    layer = MoELoRALinear(nn.Linear(6, 5), 4, 2, 4.0, k, mature_after_steps=after, **kw).to(F64)
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.router.weight.normal_()
    return layer


def active_per_token(layer, x):
    _, gates = layer.compute_gates(x)
    return (gates > 0).sum(-1)


def test_maturity_routing_is_dense_until_the_youngest_is_mature_then_anneals():
    policy = MaturityPolicy(after_steps=10, temperature=3.0, anneal_steps=4)
    assert maturity_routing([12, 9], policy, "softmax_topk", 1, 1.0) == ("dense", 2, 3.0, 1)
    assert maturity_routing([12, 9], policy, "global", 2, 1.0) == ("global", 2, 3.0, 1)
    assert maturity_routing([12, 10], policy, "softmax_topk", 1, 1.0) == ("softmax_topk", 1, 3.0, 0)
    assert maturity_routing([13, 11], policy, "softmax_topk", 1, 1.0) == ("softmax_topk", 1, 2.5, 0)
    assert maturity_routing([20, 14], policy, "softmax_topk", 1, 1.0) == ("softmax_topk", 1, 1.0, 0)
    assert maturity_routing([0, 0], MaturityPolicy(), "top_p", 2, 0.7) == ("top_p", 2, 0.7, 0)  # off
    assert maturity_routing([0, 5], MaturityPolicy(5), "softmax_topk", 1, 0.7) == ("dense", 2, 0.7, 1)


def test_a_layer_routes_densely_while_an_expert_is_immature_and_top_k_after():
    layer = layer_with_maturity(after=3, k=1)
    x = torch.randn(20, 6, dtype=F64)
    assert (active_per_token(layer, x) == 4).all()  # born at age 0: dense
    for step in range(3):
        assert advance_maturity(layer, step) == (4 if step < 2 else 0)
    assert layer.expert_ages == [3, 3, 3, 3]
    assert (active_per_token(layer, x) == 1).all()  # mature: top-1
    new = layer.add_expert()
    assert (active_per_token(layer, x) == 5).all() and layer.routing_now().immature == 1
    for step in range(3, 6):
        advance_maturity(layer, step)
    assert layer.expert_ages == [6, 6, 6, 6, 3] and (active_per_token(layer, x) == 1).all()
    # the forward applies what compute_gates reports: dense gates reach the output
    layer.set_maturity(10)
    y = layer(x)
    _, gates = layer.compute_gates(x)
    experts = [layer.scaling * (x @ layer.lora_A[i].t() @ layer.lora_B[i].t()) for i in range(new + 1)]
    delta = sum(gates[:, i : i + 1] * e_i for i, e_i in enumerate(experts))
    torch.testing.assert_close(y, layer.base_layer(x) + delta, atol=1e-12, rtol=1e-10)


def test_the_dense_temperature_and_its_anneal_reach_the_gates():
    layer = layer_with_maturity(after=2, k=2, maturity_temperature=4.0, maturity_anneal_steps=4)
    x = torch.randn(7, 6, dtype=F64)
    logits = x @ layer.router.weight.t()
    expected = [("dense", 4.0), ("dense", 4.0), ("softmax_topk", 4.0), ("softmax_topk", 3.25)]  # by age
    for step, (mode, temp) in enumerate(expected):
        _, gates = layer.compute_gates(x)
        want, _ = route(logits, mode, 2 if mode != "dense" else 4, temp)
        torch.testing.assert_close(gates, want, atol=1e-14, rtol=0, msg=f"age {step}")
        advance_maturity(layer, step)
    layer.mark_mature()
    assert layer.expert_ages == [6, 6, 6, 6] and layer.routing_now().temperature == 1.0


def test_each_step_is_counted_once_and_only_with_maturity_on():
    layer = layer_with_maturity(after=5)
    for step in (0, 0, 1, 1, 1, 2):
        advance_maturity(layer, step)
    assert layer.expert_ages == [3, 3, 3, 3]
    off = layer_with_maturity(after=0)
    advance_maturity(off, 7)
    assert off.expert_ages == [0, 0, 0, 0] and off.routing_now().mode == "softmax_topk"


def test_a_sparse_layer_computes_densely_while_it_routes_densely():
    layer = layer_with_maturity(after=1, k=1, expert_compute="sparse")
    assert not layer.sparse_experts
    x = torch.randn(5, 6, dtype=F64, requires_grad=True)
    layer(x).sum().backward()
    assert layer.lora_B.grad.abs().sum(dim=(1, 2)).min() > 0  # every expert received gradient
    advance_maturity(layer, 0)
    assert layer.sparse_experts


@pytest.mark.parametrize(
    "args,match",
    [
        ((-1, None, 0), r"maturity after_steps must be an int >= 0, got -1"),
        ((True, None, 0), r"maturity after_steps must be an int >= 0, got True"),
        ((3, 0.0, 0), r"maturity temperature must be > 0 or None, got 0.0"),
        ((3, None, 1.5), r"maturity anneal_steps must be an int >= 0, got 1.5"),
    ],
)
def test_bad_maturity_settings_are_refused(args, match):
    with pytest.raises(ValueError, match=match):
        check_maturity_policy(*args)
    with pytest.raises(ValueError, match=match):
        layer_with_maturity().set_maturity(*args)


def test_set_maturity_on_a_model_updates_its_config_and_keeps_trained_experts_mature():
    model = make_tiny_llama()
    add_moe_lora(model, MoELoRAConfig(num_experts=3, top_k=1, rank=2))
    set_maturity(model, 4, temperature=2.0, anneal_steps=1)
    cfg = model.moe_lora_config
    assert (cfg.mature_after_steps, cfg.maturity_temperature, cfg.maturity_anneal_steps) == (4, 2.0, 1)
    layers = [layer for _, layer in iter_moe_lora_layers(model)]
    assert all(layer.expert_ages == [5, 5, 5] and layer.routing_now().immature == 0 for layer in layers)
    with pytest.raises(ValueError, match=r"maturity_temperature must be > 0 or None, got -1.0"):
        set_maturity(model, 4, temperature=-1.0)
    assert layers[0].maturity == MaturityPolicy(4, 2.0, 1)  # nothing changed
    fresh = make_tiny_llama()
    add_moe_lora(fresh, MoELoRAConfig(num_experts=3, top_k=1, rank=2, mature_after_steps=2))
    assert all(layer.routing_now().mode == "dense" for _, layer in iter_moe_lora_layers(fresh))  # born young
