"""Capacity of a layer (riemix.core.capacity): max_experts and the error / merge / evict policies, in fp64."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from riemix.core.capacity import CapacityAction, add_at_capacity, check_capacity, expert_usage, merge_experts
from riemix.core.config import MoELoRAConfig
from riemix.core.layer import MoELoRALinear
from riemix.core.tuner import add_moe_lora, iter_moe_lora_layers
from tests.helpers import make_tiny_llama

ALPHA = 4.0


def make_layer(e=4, ranks=2, policy="merge", max_experts=None, scales=False, routing="softmax_topk", seed=0):
    torch.manual_seed(seed)
    base = nn.Linear(7, 6, dtype=torch.float64)
    layer = MoELoRALinear(
        base,
        num_experts=e,
        rank=ranks,
        alpha=ALPHA,
        top_k=1,
        routing=routing,
        expert_scales=scales,
        max_experts=e if max_experts is None else max_experts,
        capacity_policy=policy,
    )
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.lora_B.mul_(layer.rank_mask().unsqueeze(1))  # keep the rank padding zero
        if scales:
            layer.expert_scale.uniform_(0.5, 1.5)
    return layer


def delta(layer, i):
    """Plain ΔWᵢ = sᵢ·(σᵢ ⊙ Bᵢ)Aᵢ at expert i's own rank, written out."""
    r = layer.expert_ranks[i]
    b = layer.lora_B[i, :, :r].detach()  # (out, r)
    if layer.expert_scale is not None:
        b = b * layer.expert_scale[i].detach().unsqueeze(1)
    return (ALPHA / r) * b @ layer.lora_A[i, :r].detach()  # (out, in)


def one_hot_delta(layer, i):
    gates = torch.zeros(layer.num_experts, dtype=torch.float64)
    gates[i] = 1.0
    return layer.delta_weight(gates).detach()


def snapshot(layer):
    return {
        "A": layer.lora_A.detach().clone(),
        "B": layer.lora_B.detach().clone(),
        "gate": layer.gate_weight.detach().clone(),
    }


def assert_rows_kept(layer, before, rows):
    for key, now in snapshot(layer).items():
        for i in rows:
            old = before[key][i]
            assert torch.equal(now[i][tuple(slice(0, n) for n in old.shape)], old), (key, i)


@pytest.mark.parametrize("scales", [False, True])
def test_merge_is_exact_when_the_summed_rank_fits(scales):
    layer = make_layer(ranks=[2, 3, 3, 2], scales=scales)
    with torch.no_grad():
        layer.lora_A[0, :2] = layer.lora_A[1, :2]  # ΔW₀ + ΔW₁ has rank <= 3: A₀'s rows lie in A₁'s span
    want = delta(layer, 0) + delta(layer, 1)
    before = snapshot(layer)
    usage = torch.tensor([0.1, 0.2, 0.9, 0.8], dtype=torch.float64)
    record = add_at_capacity(layer, usage=usage, name="blk")
    assert record == CapacityAction("blk", "merge", (1, 0), 0, record.error)
    assert record.error < 1e-12
    assert layer.num_experts == 4 and layer.expert_ranks == [2, 3, 3, 2]  # slot 0 is the new rank-2 expert
    torch.testing.assert_close(delta(layer, 1), want, rtol=0, atol=1e-12)
    torch.testing.assert_close(one_hot_delta(layer, 1), want, rtol=0, atol=1e-12)  # the forward's scaling too
    assert torch.equal(layer.lora_B[0], torch.zeros_like(layer.lora_B[0]))  # the new expert adds nothing
    assert torch.equal(layer.gate_weight[1], before["gate"][1])  # the kept slot's router row
    torch.testing.assert_close(layer.gate_weight[0], before["gate"][1:].mean(0), rtol=0, atol=0)
    assert_rows_kept(layer, before, [2, 3])
    if scales:
        assert torch.equal(layer.expert_scale[1], torch.ones(6, dtype=torch.float64))


def test_merge_truncation_error_is_the_svd_tail_energy():
    layer = make_layer(ranks=2)
    want = delta(layer, 2) + delta(layer, 3)  # generic: rank 4 > 2
    s = torch.linalg.svdvals(want)
    tail = math.sqrt(float((s[2:] ** 2).sum()) / float((s**2).sum()))
    best = torch.linalg.svd(want)
    best2 = best.U[:, :2] @ torch.diag(best.S[:2]) @ best.Vh[:2]
    usage = torch.tensor([0.9, 0.8, 0.1, 0.2], dtype=torch.float64)
    log = []
    slot = layer.add_expert(usage=usage, capacity_log=log)
    (record,) = log
    assert (record.experts, slot) == ((3, 2), 2)
    assert tail > 0.01 and record.error == pytest.approx(tail, rel=1e-12)
    merged = delta(layer, 3)
    assert float(torch.linalg.norm(want - merged) / torch.linalg.norm(want)) == pytest.approx(tail, rel=1e-10)
    torch.testing.assert_close(merged, best2, rtol=0, atol=1e-12)  # the best rank-2 approximation


def test_merge_chooses_the_most_similar_pair_among_low_usage_experts():
    layer = make_layer(e=5)
    with torch.no_grad():
        layer.lora_A[3] = layer.lora_A[0]
        layer.lora_B[3] = 2 * layer.lora_B[0]  # 0 and 3 identical in direction, but 3 is used a lot
        layer.lora_A[2] = layer.lora_A[1]
        layer.lora_B[2] = layer.lora_B[1] + 0.1 * layer.lora_B[4]  # 1 and 2 close
    cos = torch.nn.functional.cosine_similarity
    flat = [delta(layer, i).flatten() for i in range(5)]
    assert float(cos(flat[0], flat[3], dim=0)) > float(cos(flat[1], flat[2], dim=0)) > 0.9
    assert abs(float(cos(flat[0], flat[1], dim=0))) < 0.9 and abs(float(cos(flat[0], flat[2], dim=0))) < 0.9
    usage = torch.tensor([0.1, 0.3, 0.2, 0.9, 0.8], dtype=torch.float64)  # lower median 0.3: {0, 1, 2}
    record = add_at_capacity(layer, usage=usage)
    assert (record.action, record.experts, record.slot) == ("merge", (1, 2), 2)  # kept: the higher usage


def test_evict_drops_the_least_used_expert_and_keeps_the_others():
    layer = make_layer(policy="evict")
    before = snapshot(layer)
    with torch.no_grad():
        layer.expert_age.fill_(5)
    record = add_at_capacity(layer, usage=torch.tensor([0.5, 0.1, 0.3, 0.2]), name="m")
    assert record == CapacityAction("m", "evict", (1,), 1, None)
    assert torch.equal(layer.lora_B[1], torch.zeros_like(layer.lora_B[1]))
    assert not torch.equal(layer.lora_A[1], before["A"][1])  # a fresh A
    assert layer.expert_ages == [5, 0, 5, 5]
    assert_rows_kept(layer, before, [0, 2, 3])


def test_evict_with_a_larger_rank_widens_the_stack():
    layer = make_layer(policy="evict")
    before = snapshot(layer)
    slot = layer.add_expert(rank=5, usage=torch.tensor([0.5, 0.4, 0.3, 0.6]))
    assert slot == 2 and layer.expert_ranks == [2, 2, 5, 2] and layer.rank == 5
    assert layer.lora_A.shape == (4, 5, 7) and layer.lora_B.shape == (4, 6, 5)
    assert_rows_kept(layer, before, [0, 1, 3])
    assert torch.equal(layer.lora_A[0, 2:], torch.zeros(3, 7, dtype=torch.float64))  # padding stays zero


def test_default_usage_is_the_recorded_mean_gate_else_all_equal():
    layer = make_layer(policy="evict")
    assert torch.equal(expert_usage(layer), torch.zeros(4, dtype=torch.float64))
    assert add_at_capacity(layer).experts == (0,)  # all equal: the lowest index
    layer.last_gates = torch.tensor([[0.5, 0.2, 0.0, 0.3], [0.5, 0.0, 0.2, 0.3]], dtype=torch.float64)
    torch.testing.assert_close(expert_usage(layer), torch.tensor([0.5, 0.1, 0.1, 0.3], dtype=torch.float64))
    assert add_at_capacity(layer).experts == (1,)  # ties: the lowest index


def test_frozen_experts_are_never_merged_or_evicted():
    layer = make_layer(policy="evict")
    layer.freeze_expert(1)
    layer.freeze_expert(3, router=True)
    layer.unfreeze_expert(3)
    layer._frozen_mask("frozen_router_rows")[3] = True  # a frozen router row alone protects too
    assert add_at_capacity(layer, usage=torch.tensor([0.5, 0.1, 0.3, 0.0])).experts == (2,)
    merging = make_layer(policy="merge")
    for i in (0, 1, 2):
        merging.freeze_expert(i)
    with pytest.raises(ValueError, match=r"layer 'x'.*capacity_policy='merge' needs 2 unfrozen.*only 1 of 4"):
        add_at_capacity(merging, name="x")
    merging.unfreeze_expert(1)
    record = add_at_capacity(merging, usage=torch.tensor([0.0, 0.9, 0.0, 0.1]), name="x")
    assert record.experts == (1, 3)  # the two unfrozen ones, even though 1 is not low-usage


def test_policy_error_raises_naming_the_layer_and_the_options():
    layer = make_layer(policy="error")
    with pytest.raises(ValueError, match=r"max_experts=4; capacity_policy='error'.*\('error', 'merge', 'evict'\)"):
        layer.add_expert()
    with pytest.raises(ValueError, match=r"layer 'q_proj' has num_experts=4 = max_experts=4"):
        add_at_capacity(layer, name="q_proj")


def test_growth_below_max_experts_adds_experts():
    layer = make_layer(e=2, max_experts=3, policy="evict")
    assert layer.add_expert() == 2 and layer.num_experts == 3
    assert layer.add_expert(usage=torch.tensor([0.3, 0.1, 0.2])) == 1 and layer.num_experts == 3


def test_global_routing_new_logit_takes_the_mean_softmax_weight_of_the_others():
    layer = make_layer(policy="evict", routing="global")
    with torch.no_grad():
        layer.global_gate.normal_()
    add_at_capacity(layer, usage=torch.tensor([0.5, 0.1, 0.3, 0.2]))
    w = torch.exp(layer.global_gate.detach() / layer.router_temperature)
    torch.testing.assert_close(w[1], w[[0, 2, 3]].mean(), rtol=1e-14, atol=0)


def test_bad_arguments_are_named():
    layer = make_layer()
    with pytest.raises(ValueError, match=r"usage must be a finite \(4,\) tensor .*got \(3,\)"):
        expert_usage(layer, torch.ones(3))
    with pytest.raises(ValueError, match=r"usage must be a finite \(4,\) tensor .*got list"):
        expert_usage(layer, [1, 2, 3, 4])
    with pytest.raises(ValueError, match=r"keep and drop must differ, got 1 and 1"):
        merge_experts(layer, 1, 1)
    with pytest.raises(ValueError, match=r"rank must be <= the layer's stacked rank R=2, got 3"):
        merge_experts(layer, 0, 1, rank=3)
    with pytest.raises(ValueError, match=r"max_experts must be None or an int >= num_experts \(4\), got 3"):
        check_capacity(3, "merge", 4)
    with pytest.raises(ValueError, match=r"capacity_policy must be one of .*got 'drop'"):
        check_capacity(None, "drop", 4)
    with pytest.raises(ValueError, match=r"max_experts must be None or an int >= num_experts \(4\), got 2"):
        make_layer(max_experts=2)


def test_add_moe_lora_gives_every_layer_the_capacity_and_checks_loaded_counts():
    model = make_tiny_llama()
    add_moe_lora(model, MoELoRAConfig(num_experts=2, top_k=1, max_experts=3, capacity_policy="evict"))
    assert {(m.max_experts, m.capacity_policy) for _, m in iter_moe_lora_layers(model)} == {(3, "evict")}
    fresh = make_tiny_llama()
    name = next(iter(dict(iter_moe_lora_layers(model))))
    with pytest.raises(ValueError, match=rf"max_experts must be >= the 4 experts of '{name}', got 3"):
        add_moe_lora(fresh, MoELoRAConfig(num_experts=2, top_k=1, max_experts=3), experts_per_module={name: 4})
    assert not list(iter_moe_lora_layers(fresh))
