"""Routing variants (temperature, noisy top-k, top-p, global gate, expert scales) against a plain loop."""

from __future__ import annotations

import pytest
import torch
from tiny import make_tiny_llama, tiny_inputs
from torch import nn

from riemix import (
    MoELoRAConfig,
    MoELoRALinear,
    add_moe_lora,
    build_optimizer,
    iter_moe_lora_layers,
    load_adapter,
    save_adapter,
)
from riemix.core.regularizers import scale_anchor_loss
from riemix.core.routing import route, top_p_select
from riemix.core.schedules import (
    router_temperature_at,
    scale_warmup_factor,
    set_router_temperature,
    set_scale_progress,
    set_training_progress,
)

E, R, D_IN, D_OUT = 5, 3, 7, 6
F64 = torch.float64


def reference_gates(logits, mode, k, temp=1.0, top_p=1.0, noise=None):
    """Plain routing, independent of riemix.core.routing: softmax(l/T) over a selected set."""
    n, e = logits.shape
    if mode == "global":
        return e * torch.softmax(logits / temp, dim=-1)
    if mode == "dense":
        return torch.softmax(logits / temp, dim=-1)
    scores = logits if noise is None else logits + noise
    mask = torch.zeros(n, e, dtype=torch.bool)
    for t in range(n):
        if mode == "top_p":
            probs = torch.softmax(scores[t] / temp, dim=-1).tolist()
            order = sorted(range(e), key=lambda i: -probs[i])
            mass = 0.0
            for count, i in enumerate(order):
                if count >= k or (count >= 1 and mass >= top_p):
                    break
                mask[t, i] = True
                mass += probs[i]
        else:
            for i in scores[t].topk(k).indices.tolist():
                mask[t, i] = True
    return torch.softmax((logits / temp).masked_fill(~mask, float("-inf")), dim=-1)


def reference_forward(layer: MoELoRALinear, x, noise=None):
    """y = base(x) + Σᵢ [cᵢ·eᵢ + (gᵢ − cᵢ)·stopgrad(eᵢ)], eᵢ = s·f·σᵢ ⊙ Bᵢ Aᵢ x, cᵢ = stopgrad(gᵢ^p)."""
    y = layer.base_layer(x)
    if layer.routing == "global":
        logits = layer.global_gate.expand(x.shape[0], -1)
    else:
        logits = x @ layer.router.weight.t()
    g = reference_gates(logits, layer.routing, layer.top_k, layer.router_temperature, layer.top_p, noise)
    for i in range(layer.num_experts):
        e_i = layer.scaling * layer.scale_factor * (x @ layer.lora_A[i].t()) @ layer.lora_B[i].t()
        if layer.expert_scale is not None:
            e_i = e_i * layer.expert_scale[i]
        g_i = g[:, i : i + 1]
        c_i = torch.where(g_i > 0, g_i.detach() ** layer.gate_grad_power, torch.zeros_like(g_i))
        y = y + c_i * e_i + (g_i - c_i) * e_i.detach()
    return y


def make_layer(routing="softmax_topk", k=2, p=0.5, seed=0, **kw) -> MoELoRALinear:
    torch.manual_seed(seed)
    layer = MoELoRALinear(nn.Linear(D_IN, D_OUT), E, R, alpha=6.0, top_k=k, routing=routing, gate_grad_power=p, **kw)
    layer = layer.to(F64)
    with torch.no_grad():  # non-trivial B, router, global gate and scales so every gradient is non-zero
        layer.lora_B.normal_()
        if layer.router is not None:
            layer.router.weight.normal_()
        else:
            layer.global_gate.normal_()
        if layer.expert_scale is not None:
            layer.expert_scale.uniform_(0.5, 1.5)
    return layer


VARIANTS = {
    "temperature_topk": dict(routing="softmax_topk", k=2, router_temperature=0.5),
    "temperature_topk_softmax": dict(routing="topk_softmax", k=3, router_temperature=2.0, p=0.0),
    "temperature_dense": dict(routing="dense", k=E, router_temperature=0.7, p=1.0),
    "noisy_topk": dict(routing="softmax_topk", k=2, router_noise_std=1.0),
    "noisy_topk_temp": dict(routing="topk_softmax", k=2, router_noise_std=0.5, router_temperature=1.5),
    "top_p": dict(routing="top_p", k=4, top_p=0.6),
    "top_p_noisy_temp": dict(routing="top_p", k=3, top_p=0.7, router_noise_std=0.5, router_temperature=0.8),
    "top_p_cap1": dict(routing="top_p", k=1, top_p=0.9),
    "global": dict(routing="global", k=E),
    "global_scales_temp": dict(routing="global", k=E, expert_scales=True, router_temperature=0.6, p=0.0),
    "topk_scales": dict(routing="softmax_topk", k=2, expert_scales=True, p=1.0),
    "dense_scales_half_scale": dict(routing="dense", k=E, expert_scales=True, scale_factor=0.4),
}


@pytest.mark.parametrize("train_mode", [True, False])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_matches_per_expert_loop(name, train_mode):
    kw = dict(VARIANTS[name])
    scale_factor = kw.pop("scale_factor", 1.0)
    layer = make_layer(**kw)
    layer.scale_factor = scale_factor
    layer.train(train_mode)
    torch.manual_seed(1)
    x = torch.randn(13, D_IN, dtype=F64, requires_grad=True)
    upstream = torch.randn(13, D_OUT, dtype=F64)
    params = [x, layer.lora_A, layer.lora_B, layer.gate_weight]
    names = ["x", "A", "B", "gate"]
    if layer.expert_scale is not None:
        params.append(layer.expert_scale)
        names.append("scale")

    torch.manual_seed(7)
    y = layer(x)
    got = torch.autograd.grad((y * upstream).sum(), params)
    noise = None
    if train_mode and layer.router_noise_std > 0:
        torch.manual_seed(7)  # the layer's only random draw is the selection noise
        noise = torch.randn(13, E, dtype=F64) * layer.router_noise_std
    y_ref = reference_forward(layer, x, noise)
    want = torch.autograd.grad((y_ref * upstream).sum(), params)

    tol = {"atol": 1e-12, "rtol": 1e-10}
    torch.testing.assert_close(y, y_ref, **tol)
    for n, a, b in zip(names, got, want, strict=True):
        if n == "gate" and kw.get("k") == 1:
            torch.testing.assert_close(a, torch.zeros_like(a), **tol)  # one gate ≡ 1: nothing to learn
            continue
        assert b.abs().max() > 0, f"reference gradient of {n} is zero; the case tests nothing"
        torch.testing.assert_close(a, b, **tol, msg=lambda m, n=n: f"grad {n}: {m}")


def test_noise_changes_selection_but_gate_values_stay_clean():
    layer = make_layer(routing="softmax_topk", k=2, router_noise_std=3.0)
    x = torch.randn(64, D_IN, dtype=F64)
    logits = x @ layer.router.weight.t()
    clean_gates, clean_sel = route(logits, "softmax_topk", 2)
    noise = torch.randn(64, E, dtype=F64) * 3.0
    gates, sel = route(logits, "softmax_topk", 2, noise=noise)
    assert (sel != clean_sel).any(), "noise this large must change some selections"
    probs = torch.softmax(logits, -1)
    want = probs * sel / (probs * sel).sum(-1, keepdim=True)  # clean softmax renormalised on noisy set
    torch.testing.assert_close(gates, want)
    layer.record_routing = True
    layer.eval()  # no noise outside training
    layer(x)
    torch.testing.assert_close(layer.last_gates, clean_gates)


def test_top_p_selection_on_hand_made_probabilities():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5], [0.25, 0.25, 0.25, 0.25]], dtype=F64)
    assert top_p_select(probs, 0.45, 4).tolist()[0] == [True, False, False, False]
    assert top_p_select(probs, 0.79, 4).tolist()[0] == [True, True, False, False]
    assert top_p_select(probs, 0.81, 4).tolist()[1] == [False, True, True, True]
    assert top_p_select(probs, 0.99, 2).tolist()[0] == [True, True, False, False]  # capped at top_k
    assert top_p_select(probs, 1e-9, 4).sum(-1).tolist() == [1, 1, 1]  # at least one
    assert top_p_select(probs, 0.6, 4)[2].sum() == 3  # uniform: ceil(0.6·4) experts
    gates, sel = route(probs.log(), "top_p", 4, top_p=0.79)
    torch.testing.assert_close(gates[0], torch.tensor([0.625, 0.375, 0.0, 0.0], dtype=F64))
    assert sel.sum(-1).tolist() == [2, 2, 4]


def test_global_gates_average_one_and_are_input_independent():
    layer = make_layer(routing="global", k=E)
    layer.record_routing = True
    layer(torch.randn(9, D_IN, dtype=F64))
    g = layer.last_gates
    torch.testing.assert_close(g.mean(-1), torch.ones(9, dtype=F64))
    assert torch.equal(g, g[:1].expand_as(g))
    fresh = MoELoRALinear(nn.Linear(D_IN, D_OUT), E, R, alpha=6.0, top_k=2, routing="global")
    assert fresh.router is None and torch.count_nonzero(fresh.global_gate) == 0  # gᵢ = 1 at init


def test_schedule_values():
    assert [scale_warmup_factor(s, 4) for s in (0, 1, 2, 4, 9)] == [0.0, 0.25, 0.5, 1.0, 1.0]
    assert scale_warmup_factor(0, 0) == 1.0
    assert [router_temperature_at(s, 10, 2.0, 0.5) for s in (0, 5, 10, 15)] == [2.0, 1.25, 0.5, 0.5]
    assert router_temperature_at(7, 10, 2.0, None) == 2.0
    model = add_moe_lora(
        make_tiny_llama(),
        MoELoRAConfig(
            num_experts=2,
            top_k=1,
            rank=2,
            scale_warmup_steps=4,
            router_temperature=2.0,
            router_temperature_final=0.5,
        ),
    )
    layers = [layer for _, layer in iter_moe_lora_layers(model)]
    assert all(layer.scale_factor == 0.0 and layer.router_temperature == 2.0 for layer in layers)
    assert set_scale_progress(model, 2) == 0.5 and all(layer.scale_factor == 0.5 for layer in layers)
    assert set_router_temperature(model, 4, 8) == 1.25 and all(layer.router_temperature == 1.25 for layer in layers)
    assert set_training_progress(model, 8, 8) == {"adapter_scale_factor": 1.0, "router_temperature": 0.5}


def test_scale_anchor_loss_value_and_gradient_direction():
    cfg = MoELoRAConfig(
        num_experts=2,
        top_k=1,
        rank=2,
        routing="global",
        expert_scales=True,
        scale_anchor_beta=0.3,
        target_modules=["q_proj"],
    )
    model = add_moe_lora(make_tiny_llama(), cfg)
    layers = [layer for _, layer in iter_moe_lora_layers(model)]
    assert scale_anchor_loss(model).item() == 0.0
    with torch.no_grad():
        layers[0].expert_scale[0, 0] = 1.5
        layers[1].expert_scale[1, 3] = 0.0
    loss = scale_anchor_loss(model)
    assert loss.item() == pytest.approx(0.3 * (0.25 + 1.0))
    loss.backward()
    assert layers[0].expert_scale.grad[0, 0] > 0 and layers[1].expert_scale.grad[1, 3] < 0  # descent -> 1
    model.moe_lora_config.scale_anchor_beta = 0.0
    assert scale_anchor_loss(model) is None


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


@pytest.mark.parametrize(
    "extra",
    [
        dict(routing="global", expert_scales=True, router_temperature=0.7),
        dict(routing="top_p", top_p=0.5, top_k=3, router_noise_std=0.1),
        dict(routing="softmax_topk", expert_scales=True, scale_warmup_steps=3),
    ],
)
def test_save_load_round_trips_new_parameters_and_state(tmp_path, extra):
    cfg = MoELoRAConfig(**{"num_experts": 3, "top_k": 2, "rank": 2, "target_modules": ["q_proj", "v_proj"], **extra})
    model = add_moe_lora(make_tiny_llama(), cfg)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    set_scale_progress(model, 2)
    for _, layer in iter_moe_lora_layers(model):
        layer.router_temperature = 0.9
    save_adapter(model, tmp_path / "a")
    restored = load_adapter(make_tiny_llama(), tmp_path / "a")
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    loaded = {n: p for n, p in restored.named_parameters() if p.requires_grad}
    assert trained.keys() == loaded.keys()
    assert all(torch.equal(trained[n], loaded[n]) for n in trained)
    for (_, a), (_, b) in zip(iter_moe_lora_layers(model), iter_moe_lora_layers(restored), strict=True):
        assert (a.scale_factor, a.router_temperature) == (b.scale_factor, b.router_temperature)
    torch.testing.assert_close(restored(**tiny_inputs()).logits, model(**tiny_inputs()).logits, atol=0, rtol=0)


@pytest.mark.parametrize("mode", ["softmax_topk", "topk_softmax", "top_p"])
def test_exact_ties_select_the_lowest_indices(mode):
    gates, selected = route(torch.zeros(1000, 6), mode, 2, top_p=0.3)
    assert selected[:, :2].all() and not selected[:, 2:].any()
    torch.testing.assert_close(gates[:, :2], torch.full((1000, 2), 0.5))
