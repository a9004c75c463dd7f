"""riemix.diagnostics.monitor: routing and weight diagnostics on constructed cases (trainer wiring: tests/training)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from riemix.core.geometry import effective_rank, expert_singular_values
from riemix.core.layer import MoELoRALinear
from riemix.core.routing import route
from riemix.diagnostics.monitor import (
    RoutingMonitor,
    coefficient_of_variation,
    collect_diagnostics,
    compact_diagnostics,
    expert_grad_norms,
    gate_entropy,
    usage_entropy,
    weight_diagnostics,
)

D = torch.float64


def forced_gates(n=10, e=4, expert=2):
    logits = torch.zeros(n, e)
    logits[:, expert] = 100.0
    gates, _ = route(logits, "softmax_topk", 1)  # (N, E): one-hot on `expert`
    return gates


def test_forced_router_has_zero_entropy_and_e_minus_1_dead():
    mon = RoutingMonitor()
    mon.update("layer", forced_gates())
    s = mon.summary()
    lay = s["layers"]["layer"]
    assert lay["entropy"] == 0.0 and lay["usage_entropy"] == 0.0
    assert lay["dead_experts"] == [0, 1, 3] and lay["num_dead"] == 3
    assert lay["usage"] == [0.0, 0.0, 1.0, 0.0] and lay["mean_gate"] == [0.0, 0.0, 1.0, 0.0]
    assert lay["load_cv"] == pytest.approx(math.sqrt(3))  # one of E loaded: √(E−1)
    assert s["overall"]["dead_experts"] == 3 and s["overall"]["experts"] == 4


def test_uniform_dense_routing_has_entropy_log_e_and_no_dead():
    gates, _ = route(torch.zeros(6, 4), "dense", 4)  # every gate 1/4
    mon = RoutingMonitor()
    mon.update("layer", gates)
    lay = mon.summary()["layers"]["layer"]
    assert lay["entropy"] == pytest.approx(math.log(4))
    assert lay["usage_entropy"] == pytest.approx(math.log(4))
    assert lay["num_dead"] == 0 and lay["load_cv"] == 0.0
    assert lay["usage"] == [1.0] * 4 and lay["mean_gate"] == pytest.approx([0.25] * 4)
    assert gate_entropy(gates) == pytest.approx(math.log(4))


def test_monitor_window_mask_and_reset():
    mon = RoutingMonitor()
    # step 1: tokens 0,1 real on expert 0; token 2 is padding on expert 3 (must not count)
    g1 = torch.tensor([[1.0, 0, 0, 0], [1.0, 0, 0, 0], [0, 0, 0, 1.0]])
    mon.update("a", g1, torch.tensor([[1, 1, 0]]))
    # step 2: two tokens split top-2 between experts 1 and 0 with gates (.5, .5)
    mon.update("a", torch.tensor([[0.5, 0.5, 0, 0], [0.5, 0.5, 0, 0]]))
    lay = mon.summary()["layers"]["a"]
    assert lay["tokens"] == 4
    assert lay["usage"] == [1.0, 0.5, 0.0, 0.0]  # expert 0 selected by 4/4 tokens, expert 1 by 2/4
    assert lay["load_share"] == pytest.approx([4 / 6, 2 / 6, 0.0, 0.0])
    assert lay["mean_gate"] == pytest.approx([0.75, 0.25, 0.0, 0.0])
    assert lay["entropy"] == pytest.approx(2 * math.log(2) / 4)  # two tokens with entropy log 2
    assert lay["usage_entropy"] == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert lay["dead_experts"] == [2, 3]
    mon.reset()
    assert mon.summary()["layers"] == {}


def test_monitor_validation():
    mon = RoutingMonitor()
    with pytest.raises(ValueError, match=r"mask has 2 elements for 3 tokens"):
        mon.update("a", torch.ones(3, 2) / 2, torch.ones(2))
    with pytest.raises(ValueError, match=r"gates must be 2-D \(N, E\)"):
        mon.update("a", torch.ones(3))
    mon.update("a", torch.ones(3, 2) / 2)
    with pytest.raises(ValueError, match=r"layer 'a': gates have 3 experts, earlier 2"):
        mon.update("a", torch.ones(3, 3) / 3)


def test_usage_entropy_and_cv_small_cases():
    assert usage_entropy(torch.tensor([0.0, 2.0])) == 0.0
    assert usage_entropy(torch.tensor([1.0, 1.0, 1.0])) == pytest.approx(math.log(3))
    assert usage_entropy(torch.zeros(3)) == 0.0
    # loads (1, 3): mean 2, population std 1 -> CV 0.5
    assert coefficient_of_variation(torch.tensor([1.0, 3.0])) == pytest.approx(0.5)
    assert coefficient_of_variation(torch.zeros(2)) == 0.0


def test_weight_diagnostics_identical_experts():
    torch.manual_seed(1)
    a1, b1 = torch.randn(2, 5, dtype=D), torch.randn(4, 2, dtype=D)
    a2, b2 = torch.randn(2, 5, dtype=D), torch.randn(4, 2, dtype=D)
    a = torch.stack([a1, a1, a2])  # experts 0 and 1 identical
    b = torch.stack([b1, b1, b2])
    w = weight_diagnostics(a, b)
    assert w["similarity"][0][1] == pytest.approx(1.0) and w["similarity"][0][0] == pytest.approx(1.0)
    assert w["similarity_a"][0][1] == pytest.approx(1.0)
    assert w["similar_pairs"] == 1 and w["max_similarity"] == pytest.approx(1.0)  # the pair (0, 1) only
    assert w["effective_rank"] == pytest.approx(effective_rank(expert_singular_values(a, b)).tolist())
    # zero B: BA similarities are 0 (no NaN), effective rank 0
    z = weight_diagnostics(a, torch.zeros_like(b))
    assert z["similar_pairs"] == 0 and z["effective_rank"] == [0.0, 0.0, 0.0]
    assert w["untrained_experts"] == [] and z["untrained_experts"] == [0, 1, 2]
    b_half = b.clone()
    b_half[1] = 0.0
    assert weight_diagnostics(a, b_half)["untrained_experts"] == [1]  # B exactly zero: never updated
    with pytest.raises(ValueError, match=r"threshold must be in \[-1, 1\], got 2.0"):
        weight_diagnostics(a, b, threshold=2.0)


def test_expert_grad_norms():
    a = torch.zeros(2, 1, 3, requires_grad=True)
    b = torch.zeros(2, 4, 1, requires_grad=True)
    assert expert_grad_norms(a, b)["total"] == [0.0, 0.0]  # no grads yet
    a.grad = torch.tensor([[[3.0, 0.0, 0.0]], [[0.0, 0.0, 0.0]]])
    b.grad = torch.zeros(2, 4, 1)
    b.grad[0, 0, 0] = 4.0
    n = expert_grad_norms(a, b)
    assert n["A"] == [3.0, 0.0] and n["B"] == [4.0, 0.0] and n["total"] == [5.0, 0.0]


def test_collect_and_compact_on_a_layer():
    torch.manual_seed(0)
    layer = MoELoRALinear(torch.nn.Linear(5, 3).double(), 4, 2, 2.0, 1)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[1, 0] = 100.0  # feature 0 > 0 for every token below: all go to expert 1
        layer.lora_B.normal_()
    layer.record_routing = True
    x = torch.randn(6, 5, dtype=D)
    x[:, 0] = x[:, 0].abs() + 0.1
    layer(x).sum().backward()
    mon = RoutingMonitor()
    mon.update_model([("l", layer)], torch.ones(2, 3))
    grads = {"l": expert_grad_norms(layer.lora_A, layer.lora_B)}
    full = collect_diagnostics([("l", layer)], mon, grads, step=7)
    lay = full["layers"]["l"]
    assert full["step"] == 7 and lay["dead_experts"] == [0, 2, 3] and lay["entropy"] == 0.0
    # only expert 1 trained: its norm is that of its A and B gradients together
    g1 = torch.cat([layer.lora_A.grad[1].flatten(), layer.lora_B.grad[1].flatten()])
    assert lay["grad_norm"]["total"][0] == 0.0 and lay["grad_norm"]["total"][1] == pytest.approx(g1.norm().item())
    assert g1.norm() > 0
    want_erank = effective_rank(expert_singular_values(layer.lora_A.detach(), layer.lora_B.detach()))
    assert lay["rank"] == 2 and lay["effective_rank"] == pytest.approx(want_erank.tolist())
    small = compact_diagnostics(full)
    assert small["layers"]["l"]["dead"] == 3 and small["overall"]["dead_experts"] == 3
    json.dumps(full)  # JSON-serialisable as written to diagnostics.json


def test_package_exports_the_monitor_api():
    import riemix.diagnostics as diagnostics
    from riemix.core import geometry
    from riemix.diagnostics import monitor

    for name in diagnostics.__all__:
        assert any(getattr(diagnostics, name) is getattr(m, name, None) for m in (monitor, geometry)), name
    assert set(monitor.__all__) <= set(diagnostics.__all__)
    assert {"effective_rank", "expert_singular_values"} <= set(diagnostics.__all__)
