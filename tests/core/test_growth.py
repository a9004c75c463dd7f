"""Growing experts: ``MoELoRALinear.add_expert`` and ``riemix.grow_experts`` on layers and a tiny Llama."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import riemix
from riemix.core.config import MoELoRAConfig
from riemix.core.init import zero_rank_padding
from riemix.core.layer import MoELoRALinear
from riemix.core.tuner import add_moe_lora, iter_moe_lora_layers
from tests.helpers import make_tiny_llama, tiny_inputs

F64 = torch.float64
D_IN, D_OUT = 9, 7


def trained_layer(routing="softmax_topk", k=2, ranks=(3, 3, 3, 3), seed=0, **kw) -> MoELoRALinear:
    """A layer with non-trivial B, router (or global gate) and scales, as after some training."""
    torch.manual_seed(seed)
    layer = MoELoRALinear(nn.Linear(D_IN, D_OUT), len(ranks), list(ranks), 4.0, k, routing, **kw).to(F64)
    with torch.no_grad():
        layer.lora_B.normal_()
        zero_rank_padding(layer)
        (layer.global_gate if layer.router is None else layer.router.weight).normal_()
        if layer.expert_scale is not None:
            layer.expert_scale.uniform_(0.5, 1.5)
    return layer


@pytest.mark.parametrize("rank", [None, 2, 6])
def test_add_expert_keeps_every_old_value_and_pads_with_zeros(rank):
    layer = trained_layer(expert_scales=True)
    old = {k: v.detach().clone() for k, v in layer.state_dict().items()}
    layer.lora_A.grad = torch.ones_like(layer.lora_A)
    index = layer.add_expert(rank)
    r_new = 3 if rank is None else rank
    big = max(3, r_new)
    assert index == 4 and layer.num_experts == 5 and layer.expert_ranks == [3, 3, 3, 3, r_new]
    assert (layer.rank, tuple(layer.lora_A.shape), tuple(layer.lora_B.shape)) == (big, (5, big, D_IN), (5, D_OUT, big))
    assert torch.equal(layer.lora_A[:4, :3], old["lora_A"]) and torch.equal(layer.lora_B[:4, :, :3], old["lora_B"])
    assert torch.equal(layer.router.weight[:4], old["router.weight"])
    assert torch.equal(layer.expert_scale[:4], old["expert_scale"])
    assert torch.equal(layer.expert_scale[4], torch.ones(D_OUT, dtype=F64))
    assert not layer.lora_B[4].any()  # the new expert adds nothing
    assert torch.equal(layer.router.weight[4], old["router.weight"].mean(0))
    pad = ~layer.rank_mask()
    assert not layer.lora_A[pad].any() and not layer.lora_B.transpose(1, 2)[pad].any()
    assert layer.lora_A[4, :r_new].abs().min() > 0
    assert torch.equal(layer.lora_A.grad[:4, :3], torch.ones(4, 3, D_IN, dtype=F64)) and not layer.lora_A.grad[4].any()
    assert layer.expert_age.tolist() == [0] * 5 and layer.router.out_features == 5
    assert layer.frozen_parameter_rows() == []
    assert (layer.scaling, layer.rank_scale is None) == (4.0 / 3, r_new == 3)


@pytest.mark.parametrize("init", ["zero_b", "gaussian", "orthogonal", "small_b"])
def test_the_new_experts_a_is_drawn_like_the_layers_init(init):
    torch.manual_seed(0)
    layer = MoELoRALinear(nn.Linear(256, 5), 2, 4, 8.0, 1, init=init)
    layer.add_expert(8)
    a = layer.lora_A[2].detach()  # (8, 256)
    if init == "gaussian":
        assert a.std().item() == pytest.approx(1 / 8, rel=0.1)
    elif init == "orthogonal":
        torch.testing.assert_close(a @ a.t(), torch.eye(8), atol=1e-5, rtol=0)
    else:  # Kaiming-uniform with a = √5: U(-1/√in, 1/√in)
        assert a.abs().max().item() <= 1 / math.sqrt(256)
        assert a.std().item() == pytest.approx(1 / math.sqrt(768), rel=0.1)
    assert not layer.lora_B[2].any()


def test_top2_output_is_unchanged_wherever_the_new_expert_takes_no_token():
    layer = trained_layer(k=2)
    x = torch.randn(400, D_IN, dtype=F64)
    with torch.no_grad():
        before = layer(x)
        layer.add_expert()
        after = layer(x)
        _, gates = layer.compute_gates(x)
    untouched = gates[:, 4] == 0
    assert untouched.any() and (~untouched).any()  # both kinds of tokens occur
    # the same terms; the products are one expert wider, which BLAS may block differently (the tiny-Llama
    # test below is bit-identical): equal up to that rounding
    torch.testing.assert_close(after[untouched], before[untouched], atol=1e-14, rtol=1e-14)
    assert not torch.allclose(after[~untouched], before[~untouched], atol=1e-6)
    # where it enters the top-2 it displaces an expert: the output is that of the renormalised gates
    base = layer.base_layer(x)
    delta = sum(gates[:, i : i + 1] * layer.scaling * (x @ layer.lora_A[i].t() @ layer.lora_B[i].t()) for i in range(5))
    torch.testing.assert_close(after, base + delta, atol=1e-12, rtol=1e-10)


def test_global_routing_growth_keeps_the_old_gates_and_gives_the_new_expert_gate_one():
    layer = trained_layer("global", k=4, router_temperature=0.7)
    probe = torch.zeros(1, D_IN, dtype=F64)
    _, before = layer.compute_gates(probe)
    x = torch.randn(6, D_IN, dtype=F64)
    y = layer(x)
    layer.add_expert()
    _, after = layer.compute_gates(probe)
    torch.testing.assert_close(after[0, :4], before[0], atol=1e-14, rtol=1e-13)
    assert after[0, 4].item() == pytest.approx(1.0, abs=1e-13)
    torch.testing.assert_close(layer(x), y, atol=1e-13, rtol=1e-12)


def test_the_new_expert_receives_gradient_under_dense_routing():
    layer = trained_layer(routing="dense", k=4)
    new = layer.add_expert()
    x = torch.randn(8, D_IN, dtype=F64)
    layer(x).pow(2).sum().backward()
    assert layer.lora_B.grad[new].abs().sum() > 0  # B first (A follows once B is non-zero)
    assert layer.router.weight.grad[new].abs().sum() > 0
    assert not layer.lora_A.grad[new].any()  # ∂L/∂Aᵢ goes through Bᵢ = 0, as for a zero_b start


@pytest.mark.parametrize("routing,rank", [("softmax_topk", None), ("softmax_topk", 8), ("topk_softmax", 2)])
def test_growing_a_top1_llama_leaves_its_logits_bit_identical(routing, rank):
    model = make_tiny_llama()
    add_moe_lora(model, MoELoRAConfig(num_experts=[3, 4], top_k=1, rank=4, routing=routing, expert_scales=True))
    torch.manual_seed(3)
    with torch.no_grad():  # as after training: B, the routers and the scales are not at their init
        for _, layer in iter_moe_lora_layers(model):
            layer.lora_B.normal_(std=0.5)
            layer.router.weight.normal_()
            layer.expert_scale.uniform_(0.5, 1.5)
    inputs = tiny_inputs()
    with torch.no_grad():
        before = model(**inputs).logits
    added = riemix.grow_experts(model, rank=rank)
    with torch.no_grad():
        after = model(**inputs).logits
    assert torch.equal(before, after)
    names = [n for n, _ in iter_moe_lora_layers(model)]
    assert added == {n: 3 if ".layers.0." in n else 4 for n in names}
    assert all(layer.num_experts == (4 if ".layers.0." in n else 5) for n, layer in iter_moe_lora_layers(model))


def test_grow_experts_grows_only_the_named_modules_and_twice_in_a_row():
    model = make_tiny_llama()
    add_moe_lora(model, MoELoRAConfig(num_experts=2, top_k=1, rank=2))
    names = [n for n, _ in iter_moe_lora_layers(model)]
    assert riemix.grow_experts(model, modules=[names[1]], rank=5) == {names[1]: 2}
    assert riemix.grow_experts(model, modules=[names[1]]) == {names[1]: 3}
    layers = dict(iter_moe_lora_layers(model))
    assert layers[names[1]].expert_ranks == [2, 2, 5, 2]
    assert all(layers[n].num_experts == 2 for n in names if n != names[1])


def test_add_expert_refuses_bad_ranks_and_pissa_layers():
    layer = trained_layer()
    for bad in (0, True, 2.0):
        with pytest.raises(ValueError, match=rf"add_expert: rank must be an int >= 1 or None, got {bad!r}"):
            layer.add_expert(bad)
    assert layer.num_experts == 4
    pissa = MoELoRALinear(nn.Linear(D_IN, D_OUT), 2, 2, 4.0, 1, init="pissa")
    with pytest.raises(ValueError, match=r"add_expert: this layer was initialised with init='pissa'"):
        pissa.add_expert()


def test_grow_experts_checks_everything_before_changing_anything():
    model = make_tiny_llama()
    add_moe_lora(model, MoELoRAConfig(num_experts=2, top_k=1, rank=2))
    with pytest.raises(ValueError, match=r"modules names 'nope', which is not a MoE-LoRA layer of the model"):
        riemix.grow_experts(model, modules=["nope"])
    with pytest.raises(TypeError, match=r"modules must be a list of module names, got the string 'q_proj'"):
        riemix.grow_experts(model, modules="q_proj")
    with pytest.raises(ValueError, match=r"rank must be an int >= 1 or None, got 0"):
        riemix.grow_experts(model, rank=0)
    with pytest.raises(TypeError, match=r"optimizer must be a torch.optim.Optimizer \(or wrap one\), got dict"):
        riemix.grow_experts(model, optimizer={})
    assert all(layer.num_experts == 2 for _, layer in iter_moe_lora_layers(model))
    with pytest.raises(ValueError, match=r"model has no MoE-LoRA layers; call add_moe_lora first"):
        riemix.grow_experts(nn.Linear(2, 2))
    pissa = make_tiny_llama()
    add_moe_lora(pissa, MoELoRAConfig(num_experts=2, top_k=1, rank=2, init="pissa"))
    match = r"cannot grow 'model.layers.0.self_attn.q_proj': it was initialised with init='pissa'"
    with pytest.raises(ValueError, match=match):
        riemix.grow_experts(pissa)
