"""Riemannian steps on a layer with mixed expert ranks: each expert preconditioned as a rank-rᵢ expert.

The stacked factors hold expert i at the largest rank R with zero padding; its ridge Gram is then
block-diagonal, diag(BᵢᵀBᵢ + reg·I_rᵢ, reg·I_{R−rᵢ}), so the inverse preconditions the used block exactly as a
rank-rᵢ expert's and multiplies the padding's zero gradient (docs/math.md, "Per-expert ranks").
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from riemix.core.init import zero_rank_padding
from riemix.core.layer import MoELoRALinear
from riemix.optim import build_optimizer
from tests.helpers import ref_precond

F64 = torch.float64
RANKS = [2, 4, 1, 3]  # R = 4
LR, REG, WD = 0.05, 1e-3, 0.1


def layer_with_grads(seed=0) -> MoELoRALinear:
    torch.manual_seed(seed)
    layer = MoELoRALinear(nn.Linear(8, 6), 4, RANKS, 4.0, 4, "dense", 0.5).to(F64)
    with torch.no_grad():
        layer.lora_B.normal_()
        zero_rank_padding(layer)
        layer.router.weight.normal_()
    layer(torch.randn(10, 8, dtype=F64)).pow(2).sum().backward()
    return layer


def preconditioned(layer: MoELoRALinear, reg: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per expert, the rank-rᵢ preconditioned grads of its used block (helpers.ref_precond), zero-padded."""
    pa, pb = torch.zeros_like(layer.lora_A), torch.zeros_like(layer.lora_B)
    for i, r in enumerate(layer.expert_ranks):
        a, b = layer.lora_A[i, :r].detach(), layer.lora_B[i, :, :r].detach()
        pa[i, :r], pb[i, :, :r] = ref_precond(a, b, layer.lora_A.grad[i, :r], layer.lora_B.grad[i, :, :r], reg)
    return pa, pb


def assert_padding_zero(layer: MoELoRALinear, *tensors) -> None:
    pad = ~layer.rank_mask()
    for a, b in [(layer.lora_A, layer.lora_B), *tensors]:
        assert not a[pad].any() and not b.transpose(1, 2)[pad].any()


def test_rsgd_step_matches_per_expert_rank_r_preconditioning(matmul_path):
    layer = layer_with_grads()
    pa, pb = preconditioned(layer, REG)
    want_a, want_b = layer.lora_A.detach() - LR * pa, layer.lora_B.detach() - LR * pb
    assert layer.lora_A.grad[1].abs().sum() > 0 and pa[0].abs().sum() > 0  # both kinds of experts tested
    build_optimizer(layer, "rsgd", lr=LR, reg=REG).step()
    torch.testing.assert_close(layer.lora_A.detach(), want_a, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(layer.lora_B.detach(), want_b, atol=1e-12, rtol=1e-10)
    assert_padding_zero(layer)


def test_radamw_steps_match_adamw_on_the_per_expert_preconditioned_grads(matmul_path):
    layer = layer_with_grads()
    twin = [nn.Parameter(p.detach().clone()) for p in (layer.lora_A, layer.lora_B)]
    ref = torch.optim.AdamW(twin, lr=LR, weight_decay=WD)
    opt = build_optimizer(layer, "radamw", lr=LR, reg=REG, weight_decay=WD)
    for step in range(3):
        if step:  # new gradients at the new point
            layer.zero_grad()
            layer(torch.randn(10, 8, dtype=F64)).pow(2).sum().backward()
        twin[0].grad, twin[1].grad = preconditioned(layer, REG)
        opt.step()
        ref.step()
        for p, q in zip((layer.lora_A, layer.lora_B), twin, strict=True):
            torch.testing.assert_close(p.detach(), q.detach(), atol=1e-12, rtol=1e-10)
            torch.testing.assert_close(opt.state[p]["exp_avg"], ref.state[q]["exp_avg"], atol=1e-12, rtol=1e-10)
        assert_padding_zero(layer, (opt.state[layer.lora_A]["exp_avg_sq"], opt.state[layer.lora_B]["exp_avg_sq"]))


def test_with_reg_zero_a_padded_expert_falls_back_to_its_plain_gradient():
    """reg = 0 makes the padding's Gram block singular: that expert gets the documented identity fallback."""
    layer = layer_with_grads()
    pa, _ = preconditioned(layer, 0.0)
    grad = layer.lora_A.grad.clone()
    before = layer.lora_A.detach().clone()
    build_optimizer(layer, "rsgd", lr=LR, reg=0.0).step()
    step = (before - layer.lora_A.detach()) / LR
    for i, r in enumerate(RANKS):
        want = pa[i] if r == layer.rank else grad[i]  # full-rank experts: preconditioned; padded ones: plain
        torch.testing.assert_close(step[i], want, atol=1e-9, rtol=1e-8)
    assert_padding_zero(layer)


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_plain_optimizers_keep_the_padding_zero_with_weight_decay_and_momentum(name):
    layer = layer_with_grads()
    opt = build_optimizer(layer, name, lr=LR, weight_decay=WD, momentum=0.9)
    for _ in range(3):
        opt.step()
    assert_padding_zero(layer)
