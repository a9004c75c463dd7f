"""build_optimizer (riemix.optim.groups): parameter groups of a model, their options, and validation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from riemix import MoELoRAConfig, add_moe_lora, iter_moe_lora_layers
from riemix.optim import OPTIMIZER_NAMES, RiemannianAdamW, RiemannianSGD, build_optimizer
from tests.helpers import F64, ids, make_tiny_llama, moe_layer, moe_stack, ref_precond


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(name="adam", lr=0.1), "valid names: adamw, radamw, rsgd, sgd"),
        (dict(name="radamw", lr=-0.1), "Invalid lr"),
        (dict(name="radamw", lr=0.1, gate_lr=-1.0), "Invalid gate_lr"),
        (dict(name="radamw", lr=0.1, loraplus_ratio=0.0), "Invalid loraplus_ratio"),
        (dict(name="rsgd", lr=0.1, gate_max_grad_norm=0.0), "Invalid max_grad_norm"),
    ],
)
def test_build_optimizer_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_optimizer(moe_stack(), **kwargs)


def test_build_optimizer_rejects_frozen_model():
    with pytest.raises(ValueError, match="no trainable parameters; call add_moe_lora first"):
        build_optimizer(moe_stack().requires_grad_(False), "radamw", lr=0.1)


def test_build_optimizer_rejects_a_model_without_adapters():
    """Without adapters every trainable base weight would land in the "other" group and be trained."""
    with pytest.raises(ValueError, match="model has no MoE-LoRA layers; call add_moe_lora first"):
        build_optimizer(torch.nn.Sequential(torch.nn.Linear(4, 4)), "radamw", lr=0.1)


@pytest.mark.parametrize("name", ["RAdamW", "adamw", "rsgd", "SGD"])
def test_build_optimizer_groups(name):
    model = moe_stack()
    opt = build_optimizer(
        model, name, lr=0.01, gate_lr=0.002, loraplus_ratio=4.0, gate_max_grad_norm=1.0, weight_decay=0.1,
        momentum=0.9, reg=1e-4,
    )  # fmt: skip
    assert type(opt) is (RiemannianAdamW if "adam" in name.lower() else RiemannianSGD)
    groups = {g["name"]: g for g in opt.param_groups}
    assert list(groups) == ["lora_A", "lora_B", "router", "other"]
    layers = [model[0], model[2]]
    assert ids(groups["lora_A"]["params"]) == ids(m.lora_A for m in layers)
    assert ids(groups["lora_B"]["params"]) == ids(m.lora_B for m in layers)
    assert ids(groups["router"]["params"]) == ids(m.router.weight for m in layers)
    assert ids(groups["other"]["params"]) == ids(model[1].parameters())
    assert [groups[k]["lr"] for k in groups] == [0.01, 0.04, 0.002, 0.01]
    assert groups["router"]["max_grad_norm"] == 1.0 and groups["lora_A"]["max_grad_norm"] is None
    assert all(g["weight_decay"] == 0.1 and g["reg"] == 1e-4 for g in opt.param_groups)
    assert all(g["precondition"] == name.lower().startswith("r") for g in opt.param_groups)
    if isinstance(opt, RiemannianSGD):
        assert groups["lora_A"]["momentum"] == 0.9
    assert {(id(a), id(b)) for a, b in opt._pairs} == {(id(m.lora_A), id(m.lora_B)) for m in layers}
    x = torch.randn(7, 6, dtype=F64)
    model(x).pow(2).sum().backward()
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()  # runs end to end on the tiny model: every group moves its parameters, the frozen base stays
    for p, p0 in zip(model.parameters(), before, strict=True):
        assert torch.isfinite(p).all() and torch.equal(p, p0) != p.requires_grad


def test_build_optimizer_matches_manual_preconditioned_step():
    model = moe_stack()
    x = torch.randn(7, 6, dtype=F64)
    model(x).pow(2).sum().backward()
    layers = [model[0], model[2]]
    before = {m: (m.lora_A.detach().clone(), m.lora_B.detach().clone()) for m in layers}
    build_optimizer(model, "rsgd", lr=0.1, loraplus_ratio=2.0, reg=1e-3).step()
    for m in layers:
        a0, b0 = before[m]
        pa, pb = ref_precond(a0, b0, m.lora_A.grad, m.lora_B.grad, 1e-3)
        torch.testing.assert_close(m.lora_A.detach(), a0 - 0.1 * pa, atol=1e-12, rtol=0)
        torch.testing.assert_close(m.lora_B.detach(), b0 - 0.2 * pb, atol=1e-12, rtol=0)


def test_build_optimizer_frozen_b_and_omitted_groups():
    model = nn.Sequential(moe_layer(4, 3), moe_layer(3, 3))
    model[1].lora_B.requires_grad_(False)
    model[0].router.requires_grad_(False)
    model[1].router.requires_grad_(False)
    opt = build_optimizer(model, "radamw", lr=0.01, eps=1e-7, betas=(0.8, 0.9))
    assert [g["name"] for g in opt.param_groups] == ["lora_A", "lora_B"]
    assert [len(g["params"]) for g in opt.param_groups] == [2, 1]
    assert opt.param_groups[0]["eps"] == 1e-7 and opt.param_groups[0]["betas"] == (0.8, 0.9)
    assert len(opt._pairs) == 1  # layer 1's A is unpaired: its B is frozen
    assert sorted(OPTIMIZER_NAMES) == ["adamw", "radamw", "rsgd", "sgd"]



def test_optimizer_groups_for_global_gate_and_scales():
    cfg = MoELoRAConfig(num_experts=3, top_k=1, rank=2, routing="global", expert_scales=True)
    model = add_moe_lora(make_tiny_llama(), cfg)
    opt = build_optimizer(model, "radamw", lr=1e-3, gate_lr=5e-4)
    groups = {g["name"]: g for g in opt.param_groups}
    layers = [layer for _, layer in iter_moe_lora_layers(model)]
    router_ids = {id(p) for p in groups["router"]["params"]}
    other_ids = {id(p) for p in groups["other"]["params"]}
    assert router_ids == {id(layer.global_gate) for layer in layers} and groups["router"]["lr"] == 5e-4
    assert other_ids == {id(layer.expert_scale) for layer in layers}
    assert len(groups["lora_A"]["params"]) == len(layers)
