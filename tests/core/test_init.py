"""Initialisations (zero_b, gaussian, orthogonal, pissa, small_b + warm-up) on layers and a tiny Llama."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from riemix import MoELoRAConfig, MoELoRALinear, add_moe_lora, iter_moe_lora_layers
from riemix.core.init import initial_gates
from riemix.core.schedules import set_scale_progress
from tests.helpers import make_tiny_llama, tiny_inputs

F64 = torch.float64
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]


def logits(model):
    return model(**tiny_inputs()).logits


@pytest.mark.parametrize("init", ["zero_b", "gaussian", "orthogonal"])
def test_zero_b_like_inits_leave_outputs_unchanged_exactly(init):
    model = make_tiny_llama()
    before = logits(model)
    add_moe_lora(model, MoELoRAConfig(num_experts=3, top_k=2, rank=2, init=init, target_modules=TARGETS))
    assert torch.equal(logits(model), before)
    for _, layer in iter_moe_lora_layers(model):
        assert torch.count_nonzero(layer.lora_B) == 0 and layer.lora_A.abs().max() > 0


def test_orthogonal_joint_rows_are_mutually_orthonormal():
    torch.manual_seed(0)
    layer = MoELoRALinear(nn.Linear(16, 8).double(), 4, 3, alpha=8.0, top_k=2, init="orthogonal")
    a_all = layer.lora_A.reshape(12, 16)  # E·r = 12 <= in = 16
    assert layer.init_info == "joint"
    torch.testing.assert_close(a_all @ a_all.t(), torch.eye(12, dtype=F64), atol=1e-12, rtol=0)


def test_orthogonal_falls_back_per_expert_and_says_so(caplog):
    torch.manual_seed(0)
    layer = MoELoRALinear(nn.Linear(8, 8).double(), 4, 3, alpha=8.0, top_k=2, init="orthogonal")
    assert layer.init_info == "per_expert"  # E·r = 12 > in = 8
    for i in range(4):
        torch.testing.assert_close(layer.lora_A[i] @ layer.lora_A[i].t(), torch.eye(3, dtype=F64), atol=1e-12, rtol=0)
    with caplog.at_level(logging.WARNING, logger="riemix"):
        add_moe_lora(make_tiny_llama(), MoELoRAConfig(num_experts=8, top_k=2, rank=8, init="orthogonal"))
    assert sum("orthonormal per expert only" in r.message for r in caplog.records) == 1  # once per call


PISSA_ROUTINGS = {
    "dense": dict(routing="dense", num_experts=3, top_k=3),
    "softmax_topk": dict(routing="softmax_topk", num_experts=4, top_k=2),
    "topk_softmax_k1": dict(routing="topk_softmax", num_experts=3, top_k=1),
    "top_p": dict(routing="top_p", num_experts=4, top_k=3, top_p=0.6),
    "global_scales": dict(routing="global", num_experts=3, top_k=1, expert_scales=True),
}


@pytest.mark.parametrize("name", list(PISSA_ROUTINGS))
def test_pissa_preserves_outputs_at_step_0(name):
    model = make_tiny_llama(dtype=F64)
    before = logits(model)
    cfg = MoELoRAConfig(rank=2, alpha=8.0, init="pissa", target_modules=TARGETS, **PISSA_ROUTINGS[name])
    add_moe_lora(model, cfg)
    torch.testing.assert_close(logits(model), before, atol=1e-11, rtol=1e-11)
    model.train()  # no dropout, no noise: training mode is preserved too
    torch.testing.assert_close(logits(model), before, atol=1e-11, rtol=1e-11)


def test_pissa_factors_are_the_principal_directions():
    torch.manual_seed(0)
    base = nn.Linear(10, 9).double()
    w = base.weight.detach().clone()
    layer = MoELoRALinear(base, 4, 2, alpha=6.0, top_k=2, routing="softmax_topk", init="pissa")
    g0 = initial_gates(layer)
    assert g0.tolist() == [0.5, 0.5, 0.0, 0.0]  # zero router: ties go to the lowest indices
    assert torch.count_nonzero(layer.router.weight) == 0
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    selected = [i for i in range(4) if g0[i] > 0]
    # the selected experts hold the top k·r = 4 directions: s·g⁰·Σ BᵢAᵢ = U₄S₄V₄ᵀ
    delta = sum(layer.scaling * g0[i] * layer.lora_B[i] @ layer.lora_A[i] for i in selected)
    torch.testing.assert_close(delta, u[:, :4] @ torch.diag(s[:4]) @ vh[:4], atol=1e-12, rtol=0)
    torch.testing.assert_close(layer.base_layer.weight, w - delta, atol=1e-12, rtol=0)
    # unselected experts: B = 0, A = the next principal directions (their span), which stay in W
    others = [i for i in range(4) if g0[i] == 0]
    for i in others:
        assert torch.count_nonzero(layer.lora_B[i]) == 0
    a_rest = torch.cat([layer.lora_A[i] for i in others])  # (4, in)
    proj = vh[4:8].t() @ vh[4:8]
    torch.testing.assert_close(a_rest @ proj, a_rest, atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="already carries a PiSSA residual"):
        layer.reset_adapter_parameters("pissa")


def test_pissa_with_more_directions_than_rank_keeps_every_expert_trainable():
    torch.manual_seed(0)
    base = nn.Linear(4, 3).double()
    w = base.weight.detach().clone()
    x = torch.randn(5, 4, dtype=F64)
    want = base(x)
    layer = MoELoRALinear(base, 3, 2, alpha=4.0, top_k=3, routing="dense", init="pissa")  # E·r = 6 > 3
    torch.testing.assert_close(layer(x), want, atol=1e-12, rtol=0)
    assert all(layer.lora_A[i].abs().sum() > 0 for i in range(3))
    torch.testing.assert_close(layer.base_layer.weight, torch.zeros_like(w), atol=1e-12, rtol=0)  # full rank moved


def test_small_b_with_scale_warmup_starts_at_the_base_model():
    model = make_tiny_llama()
    before = logits(model)
    cfg = MoELoRAConfig(
        num_experts=3,
        top_k=2,
        rank=2,
        init="small_b",
        init_b_std=0.05,
        scale_warmup_steps=4,
        target_modules=TARGETS,
    )
    add_moe_lora(model, cfg)
    stds = torch.cat([layer.lora_B.flatten() for _, layer in iter_moe_lora_layers(model)]).std()
    assert 0.04 < stds < 0.06
    assert torch.equal(logits(model), before)  # factor 0 at step 0
    set_scale_progress(model, 2)
    half = logits(model)
    assert not torch.allclose(half, before)
    set_scale_progress(model, 0)
    assert torch.equal(logits(model), before)  # a pure function of the step
