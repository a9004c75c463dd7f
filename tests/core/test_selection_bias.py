"""``MoELoRALinear.selection_bias``: a per-token or per-example bias on the router's selection, checked in
fp64 against a per-expert reference (value and gradients)."""

import pytest
import torch

from tests.helpers import F64, moe_layer

EXCLUDED = -1e9


def reference(layer, x, allowed):
    """base(x) + s·B_e A_e x with e the router's best expert among ``allowed[b]`` (top-1: gate 1)."""
    logits = x @ layer.router.weight.T  # (B, T, E)
    out = layer.base_layer(x)
    rows = []
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            choice = max(allowed[b], key=lambda e: logits[b, t, e].item())
            delta = layer.lora_B[choice] @ (layer.lora_A[choice] @ x[b, t])  # (out,)
            rows.append(out[b, t] + layer.scaling * delta)
    return torch.stack(rows).view_as(out)


@pytest.mark.parametrize("routing", ["softmax_topk", "topk_softmax"])
@pytest.mark.parametrize("expert_compute", ["dense", "sparse"])
def test_each_example_picks_only_among_its_allowed_experts(routing, expert_compute):
    torch.manual_seed(0)
    layer = moe_layer(6, 5, n_experts=3, r=2)
    layer.top_k, layer.routing, layer.expert_compute = 1, routing, expert_compute
    allowed = [[2], [0, 1]]
    bias = torch.full((2, 3), EXCLUDED, dtype=F64)
    for b, experts in enumerate(allowed):
        bias[b, experts] = 0.0
    layer.selection_bias = bias
    x = torch.randn(2, 4, 6, dtype=F64, requires_grad=True)
    y = layer(x)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = reference(layer, x_ref, allowed)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-12)
    upstream = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, layer.lora_A, layer.lora_B], upstream)
    grads_ref = torch.autograd.grad(y_ref, [x_ref, layer.lora_A, layer.lora_B], upstream)
    for got, want in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_one_row_applies_to_every_token_and_none_restores_the_router():
    torch.manual_seed(1)
    layer = moe_layer(6, 5, n_experts=3, r=2)
    layer.top_k = 1
    x = torch.randn(2, 4, 6, dtype=F64)
    free = layer(x)
    layer.selection_bias = torch.tensor([EXCLUDED, 0.0, EXCLUDED], dtype=F64)
    torch.testing.assert_close(layer(x), reference(layer, x, [[1], [1]]), rtol=0, atol=1e-12)
    layer.selection_bias = None
    torch.testing.assert_close(layer(x), free, rtol=0, atol=0)


def test_a_bias_of_the_wrong_shape_is_named():
    layer = moe_layer(6, 5, n_experts=3, r=2)
    layer.top_k = 1
    layer.selection_bias = torch.zeros(3, 3)
    with pytest.raises(
        ValueError, match=r"selection_bias has shape \(3, 3\): expected \(3,\) or \(B, 3\) for an input"
    ):
        layer(torch.randn(2, 4, 6, dtype=F64))
