"""The fused MoE-LoRA layer against a plain per-expert loop (the paper's pseudocode)."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from riemix.core.layer import MoELoRALinear
from riemix.core.routing import gate_grad_coefficients, route

E, R, D_IN, D_OUT = 5, 3, 7, 6


def reference_gates(logits: torch.Tensor, mode: str, k: int) -> torch.Tensor:
    """Plain routing: written independently of riemix.core.routing."""
    probs = torch.softmax(logits, dim=-1)
    if mode == "dense":
        return probs
    idx = logits.topk(k, dim=-1).indices
    mask = torch.zeros_like(logits).scatter(-1, idx, 1.0)
    if mode == "softmax_topk":
        kept = probs * mask
        return kept / kept.sum(-1, keepdim=True)
    masked = logits.masked_fill(mask == 0, float("-inf"))
    return torch.softmax(masked, dim=-1)


def reference_forward(layer: MoELoRALinear, x: torch.Tensor, mode: str, k: int, p: float) -> torch.Tensor:
    """Per-expert loop: y = base(x) + Σᵢ [cᵢ·eᵢ + (gᵢ − cᵢ)·stopgrad(eᵢ)] with cᵢ = stopgrad(gᵢ^p)."""
    y = layer.base_layer(x)
    logits = x @ layer.router.weight.t()
    g = reference_gates(logits, mode, k)
    for i in range(layer.num_experts):
        e_i = layer.scaling * (x @ layer.lora_A[i].t()) @ layer.lora_B[i].t()
        g_i = g[..., i : i + 1]
        c_i = torch.where(g_i > 0, g_i.detach() ** p, torch.zeros_like(g_i))
        y = y + c_i * e_i + (g_i - c_i) * e_i.detach()
    return y


def make_layer(mode: str, k: int, p: float, dtype: torch.dtype, seed: int = 0) -> MoELoRALinear:
    torch.manual_seed(seed)
    layer = MoELoRALinear(nn.Linear(D_IN, D_OUT).to(dtype), E, R, alpha=6.0, top_k=k, routing=mode, gate_grad_power=p)
    with torch.no_grad():  # non-zero B and a sharp router so every gradient is non-trivial
        layer.lora_B.normal_()
        layer.router.weight.normal_()
    return layer.to(dtype)


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


def test_unselected_experts_get_no_gradient():
    layer = make_layer("softmax_topk", 1, 0.0, torch.float64)
    x = torch.randn(1, D_IN, dtype=torch.float64)  # one token: exactly one expert selected
    layer(x).sum().backward()
    gates = route(x @ layer.router.weight.t(), "softmax_topk", 1)[0][0]
    for i in range(E):
        active = gates[i] > 0
        assert bool(layer.lora_A.grad[i].abs().sum() > 0) == bool(active)
        assert bool(layer.lora_B.grad[i].abs().sum() > 0) == bool(active)


def test_gate_grad_coefficients_values():
    g = torch.tensor([[0.0, 0.25, 0.75]], dtype=torch.float64)
    torch.testing.assert_close(gate_grad_coefficients(g, 1.0), g)
    torch.testing.assert_close(
        gate_grad_coefficients(g, 0.5), torch.tensor([[0.0, 0.5, 0.75**0.5]], dtype=torch.float64)
    )
    torch.testing.assert_close(gate_grad_coefficients(g, 0.0), torch.tensor([[0.0, 1.0, 1.0]], dtype=torch.float64))


@pytest.mark.parametrize("mode", ["softmax_topk", "topk_softmax", "dense"])
def test_gates_sum_to_one_and_respect_top_k(mode):
    logits = torch.randn(13, 6)
    gates, selected = route(logits, mode, 3)
    torch.testing.assert_close(gates.sum(-1), torch.ones(13))
    expected = 6 if mode == "dense" else 3
    assert (selected.sum(-1) == expected).all()
    assert ((gates > 0) == selected).all()


def test_route_rejects_unknown_mode():
    with pytest.raises(ValueError, match="unknown routing mode 'nope'"):
        route(torch.randn(2, 4), "nope", 2)


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
    with pytest.raises(TypeError, match="wraps an nn.Linear, got Conv1d"):
        MoELoRALinear(nn.Conv1d(4, 4, 1), 2, 4, alpha=8.0, top_k=1)
    with pytest.raises(ValueError, match=r"init must be one of .*, got 'bogus'"):
        layer.reset_adapter_parameters("bogus")
