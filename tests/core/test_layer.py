"""MoELoRALinear against a plain per-expert loop (the paper's pseudocode), in every routing variant."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from riemix.core.layer import MoELoRALinear
from riemix.core.routing import route

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


def reference_forward(layer: MoELoRALinear, x, mode, k, p, temp=1.0, top_p=1.0, noise=None):
    """y = base(x) + Σᵢ [cᵢ·eᵢ + (gᵢ − cᵢ)·stopgrad(eᵢ)], eᵢ = s·f·σᵢ ⊙ Bᵢ Aᵢ x, cᵢ = stopgrad(gᵢ^p).

    The routing (mode, k, p, temperature, top_p) is given, not read from the layer; ``x`` may have any
    leading dimensions.
    """
    lead, x = x.shape[:-1], x.reshape(-1, x.shape[-1])
    y = layer.base_layer(x)
    if mode == "global":
        logits = layer.global_gate.expand(x.shape[0], -1)
    else:
        logits = x @ layer.router.weight.t()
    g = reference_gates(logits, mode, k, temp, top_p, noise)
    for i in range(layer.num_experts):
        e_i = layer.scaling * layer.scale_factor * (x @ layer.lora_A[i].t()) @ layer.lora_B[i].t()
        if layer.expert_scale is not None:
            e_i = e_i * layer.expert_scale[i]
        g_i = g[:, i : i + 1]
        c_i = torch.where(g_i > 0, g_i.detach() ** p, torch.zeros_like(g_i))
        y = y + c_i * e_i + (g_i - c_i) * e_i.detach()
    return y.reshape(*lead, -1)


def make_layer(routing="softmax_topk", k=2, p=0.5, dtype=F64, seed=0, **kw) -> MoELoRALinear:
    torch.manual_seed(seed)
    layer = MoELoRALinear(nn.Linear(D_IN, D_OUT), E, R, alpha=6.0, top_k=k, routing=routing, gate_grad_power=p, **kw)
    layer = layer.to(dtype)
    with torch.no_grad():  # non-trivial B, router, global gate and scales so every gradient is non-zero
        layer.lora_B.normal_()
        if layer.router is not None:
            layer.router.weight.normal_()
        else:
            layer.global_gate.normal_()
        if layer.expert_scale is not None:
            layer.expert_scale.uniform_(0.5, 1.5)
    return layer


CASES = [
    (mode, k, p, dtype, ndim)
    for mode, k, p, dtype, ndim in itertools.product(
        ["softmax_topk", "topk_softmax", "dense"],
        [1, 2, E],
        [1.0, 0.5, 0.0],
        [torch.float64, torch.float32],
        [2, 3],
    )
    if not (mode == "dense" and k != E)
]


@pytest.mark.parametrize("mode,k,p,dtype,ndim", CASES)
def test_fused_matches_per_expert_loop(mode, k, p, dtype, ndim):
    layer = make_layer(mode, k, p, dtype)
    shape = (11, D_IN) if ndim == 2 else (3, 4, D_IN)
    torch.manual_seed(1)
    x = torch.randn(*shape, dtype=dtype, requires_grad=True)
    upstream = torch.randn(*shape[:-1], D_OUT, dtype=dtype)

    y = layer(x)
    grads = torch.autograd.grad((y * upstream).sum(), [x, layer.lora_A, layer.lora_B, layer.router.weight])
    y_ref = reference_forward(layer, x, mode, k, p)
    refs = torch.autograd.grad((y_ref * upstream).sum(), [x, layer.lora_A, layer.lora_B, layer.router.weight])

    tol = {"atol": 1e-12, "rtol": 1e-10} if dtype == torch.float64 else {"atol": 2e-5, "rtol": 2e-5}
    assert y.shape == y_ref.shape
    torch.testing.assert_close(y, y_ref, **tol)
    for name, got, want in zip(["x", "A", "B", "router"], grads, refs, strict=True):
        if name == "router" and k == 1 and mode != "dense":
            # One renormalised gate is identically 1: nothing for the router to learn.
            torch.testing.assert_close(got, torch.zeros_like(got), **tol)
            continue
        assert want.abs().max() > 0, f"reference gradient of {name} is zero; the case tests nothing"
        torch.testing.assert_close(got, want, **tol, msg=lambda m, n=name: f"grad {n}: {m}")


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
    if train_mode and kw.get("router_noise_std", 0.0) > 0:
        torch.manual_seed(7)  # the layer's only random draw is the selection noise
        noise = torch.randn(13, E, dtype=F64) * kw["router_noise_std"]
    routing = (kw["routing"], kw["k"], kw.get("p", 0.5), kw.get("router_temperature", 1.0), kw.get("top_p", 1.0))
    y_ref = reference_forward(layer, x, *routing, noise=noise)
    want = torch.autograd.grad((y_ref * upstream).sum(), params)

    tol = {"atol": 1e-12, "rtol": 1e-10}
    torch.testing.assert_close(y, y_ref, **tol)
    for n, a, b in zip(names, got, want, strict=True):
        if n == "gate" and kw.get("k") == 1:
            torch.testing.assert_close(a, torch.zeros_like(a), **tol)  # one gate ≡ 1: nothing to learn
            continue
        assert b.abs().max() > 0, f"reference gradient of {n} is zero; the case tests nothing"
        torch.testing.assert_close(a, b, **tol, msg=lambda m, n=n: f"grad {n}: {m}")


def test_unselected_experts_get_no_gradient():
    layer = make_layer("softmax_topk", 1, 0.0, torch.float64)
    x = torch.randn(1, D_IN, dtype=torch.float64)  # one token: exactly one expert selected
    layer(x).sum().backward()
    gates = route(x @ layer.router.weight.t(), "softmax_topk", 1)[0][0]
    for i in range(E):
        active = gates[i] > 0
        assert bool(layer.lora_A.grad[i].abs().sum() > 0) == bool(active)
        assert bool(layer.lora_B.grad[i].abs().sum() > 0) == bool(active)


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


def test_global_gates_average_one_and_are_input_independent():
    layer = make_layer(routing="global", k=E)
    layer.record_routing = True
    layer(torch.randn(9, D_IN, dtype=F64))
    g = layer.last_gates
    torch.testing.assert_close(g.mean(-1), torch.ones(9, dtype=F64))
    assert torch.equal(g, g[:1].expand_as(g))
    fresh = MoELoRALinear(nn.Linear(D_IN, D_OUT), E, R, alpha=6.0, top_k=2, routing="global")
    assert fresh.router is None and torch.count_nonzero(fresh.global_gate) == 0  # gᵢ = 1 at init


def test_zero_b_init_leaves_output_unchanged_exactly():
    torch.manual_seed(0)
    base = nn.Linear(D_IN, D_OUT)
    layer = MoELoRALinear(base, E, R, alpha=16.0, top_k=2)
    x = torch.randn(4, 5, D_IN)
    assert torch.equal(layer(x), base(x))
    # Kaiming-uniform A (bound 1/sqrt(in) per expert row, as PEFT) and zero B.
    assert layer.lora_A.abs().max() <= 1 / D_IN**0.5 and layer.lora_A.abs().max() > 0
    assert torch.count_nonzero(layer.lora_B) == 0


def test_dropout_applies_to_expert_input_only():
    layer = make_layer("softmax_topk", 2, 1.0, torch.float64)
    layer.dropout = nn.Dropout(0.5)
    layer.train()
    x = torch.randn(6, D_IN, dtype=torch.float64)
    torch.manual_seed(5)
    y = layer(x)
    torch.manual_seed(5)
    x_drop = nn.functional.dropout(x, 0.5)
    g = reference_gates(x @ layer.router.weight.t(), "softmax_topk", 2)  # router sees undropped x
    want = layer.base_layer(x) + layer.scaling * sum(
        g[:, i : i + 1] * (x_drop @ layer.lora_A[i].t()) @ layer.lora_B[i].t() for i in range(E)
    )
    torch.testing.assert_close(y, want)
    layer.eval()
    torch.testing.assert_close(layer(x), reference_forward(layer, x, "softmax_topk", 2, 1.0))


def test_bf16_autocast_runs_and_is_close_to_fp32():
    layer = make_layer("softmax_topk", 2, 0.5, torch.float32)
    x = torch.randn(8, D_IN, requires_grad=True)
    y32 = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16 = layer(x)
    y16.float().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32 and torch.isfinite(layer.lora_A.grad).all()
    torch.testing.assert_close(y16.float(), y32, atol=0.1, rtol=0.05)


def test_delta_weight_matches_forward_for_fixed_gates():
    layer = make_layer("dense", E, 1.0, torch.float64)
    with torch.no_grad():
        layer.router.weight.zero_()  # uniform gates 1/E for every token
    x = torch.randn(4, D_IN, dtype=torch.float64)
    gates = torch.full((E,), 1.0 / E, dtype=torch.float64)
    want = layer.base_layer(x) + x @ layer.delta_weight(gates).t()
    torch.testing.assert_close(layer(x), want)


def test_rslora_scaling_and_non_linear_rejected():
    layer = MoELoRALinear(nn.Linear(4, 4), 2, 4, alpha=8.0, top_k=1, use_rslora=True)
    assert layer.scaling == pytest.approx(8.0 / 2.0)
    with pytest.raises(TypeError, match="wraps an nn.Linear or a Conv1D, got Conv1d"):
        MoELoRALinear(nn.Conv1d(4, 4, 1), 2, 4, alpha=8.0, top_k=1)
    with pytest.raises(ValueError, match=r"init must be one of .*, got 'bogus'"):
        layer.reset_adapter_parameters("bogus")
