"""Regularisers: values on hand-made inputs, gradients that move the statistic the right way, injection."""

from __future__ import annotations

import math

import pytest
import torch

from riemix import MoELoRAConfig, add_moe_lora, iter_moe_lora_layers
from riemix.core.geometry import cosine_similarity_ba, expert_gram_ba
from riemix.core.layer import MoELoRALinear
from riemix.core.regularizers import (
    apply_regularizers,
    expert_diversity_loss,
    inject_gradients,
    load_balancing_loss,
    orthogonality_loss,
    router_z_loss,
    scale_anchor_loss,
    uniform_prior_loss,
)
from tests.helpers import make_tiny_llama

D = torch.float64


def collapsed_logits(n=6, e=4, big=50.0):
    logits = torch.zeros(n, e, dtype=D)
    logits[:, 0] = big  # every token: softmax ≈ one-hot on expert 0
    return logits


# ---------------------------------------------------------------- load balancing
@pytest.mark.parametrize("routing,top_k", [("dense", 4), ("softmax_topk", 4), ("topk_softmax", 4)])
def test_load_balancing_uniform_is_one(routing, top_k):
    # equal logits: every expert selected by every token -> f = 1/4, P = 1/4, 4·Σ 1/16 = 1
    assert load_balancing_loss(torch.zeros(5, 4, dtype=D), top_k, routing).item() == pytest.approx(1.0)


def test_load_balancing_collapsed_is_e():
    # top-1 all on expert 0: f = (1,0,0,0), P ≈ (1,0,0,0) -> E·1·1 = 4
    assert load_balancing_loss(collapsed_logits(), 1).item() == pytest.approx(4.0, rel=1e-12)


def test_load_balancing_hand_value_and_mask():
    # 2 experts, top-1. Token 1 logits (log 3, 0) -> p = (.75, .25), picks 0;
    # token 2 logits (0, log 3) -> p = (.25, .75), picks 1; token 3 (padding) picks 0.
    logits = torch.tensor([[math.log(3), 0.0], [0.0, math.log(3)], [5.0, 0.0]], dtype=D)
    mask = torch.tensor([1, 1, 0])
    # real tokens only: f = (.5,.5), P = (.5,.5) -> 2·(.25+.25) = 1
    assert load_balancing_loss(logits, 1, mask=mask).item() == pytest.approx(1.0)
    # with padding: f = (2/3, 1/3), P = ((.75+.25+σ(5))/3, (.25+.75+1-σ(5))/3)
    p0 = (0.75 + 0.25 + 1 / (1 + math.exp(-5))) / 3
    want = 2 * (2 / 3 * p0 + 1 / 3 * (1 - p0))
    assert load_balancing_loss(logits, 1).item() == pytest.approx(want)
    # a 2-D (batch, seq) mask with N elements is accepted
    assert load_balancing_loss(logits, 1, mask=mask.view(1, 3)).item() == pytest.approx(1.0)


def test_load_balancing_gradient_step_balances():
    torch.manual_seed(0)
    x = torch.cat([torch.randn(64, 7, dtype=D), torch.ones(64, 1, dtype=D)], 1)  # last feature constant
    w = 0.1 * torch.randn(4, 8, dtype=D)
    w[0, 7] = 3.0  # every token routes top-1 to expert 0: f = (1, 0, 0, 0), loss = 4·P₀
    w.requires_grad_(True)
    before = load_balancing_loss(x @ w.t(), 1)
    before.backward()
    with torch.no_grad():
        w2 = w - 0.1 * w.grad
        p_before = torch.softmax(x @ w.t(), -1).mean(0)[0]
        p_after = torch.softmax(x @ w2.t(), -1).mean(0)[0]
    assert load_balancing_loss(x @ w2.t(), 1) < before
    assert p_after < p_before  # the overloaded expert's mean probability goes down


# ---------------------------------------------------------------- z-loss
def test_router_z_loss_values():
    # zero logits over 4 experts: logsumexp = log 4 -> (log 4)²
    assert router_z_loss(torch.zeros(3, 4, dtype=D)).item() == pytest.approx(math.log(4) ** 2)
    # one token with logits (0, 0) and one masked token with huge logits
    logits = torch.tensor([[0.0, 0.0], [30.0, 30.0]], dtype=D)
    assert router_z_loss(logits, torch.tensor([1, 0])).item() == pytest.approx(math.log(2) ** 2)


def test_router_z_loss_gradient_shrinks_logits():
    logits = torch.full((4, 3), 2.0, dtype=D, requires_grad=True)
    z = router_z_loss(logits)
    z.backward()
    assert router_z_loss(logits.detach() - 0.1 * logits.grad) < z


# ---------------------------------------------------------------- uniform prior
def test_uniform_prior_values():
    assert uniform_prior_loss(torch.zeros(3, 4, dtype=D)).item() == pytest.approx(0.0, abs=1e-15)
    # collapsed: p̄ = one-hot -> KL = 1·log(1·4) = log 4
    assert uniform_prior_loss(collapsed_logits()).item() == pytest.approx(math.log(4), rel=1e-12)
    # two tokens, p = (1, 0) and (.5, .5): p̄ = (.75, .25); KL = .75·log(1.5) + .25·log(.5)
    logits = torch.tensor([[60.0, 0.0], [0.0, 0.0]], dtype=D)
    want = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert uniform_prior_loss(logits).item() == pytest.approx(want, rel=1e-12)
    # masking the first token leaves p̄ = (.5, .5)
    assert uniform_prior_loss(logits, torch.tensor([0, 1])).item() == pytest.approx(0.0, abs=1e-15)


def test_uniform_prior_gradient_raises_usage_entropy():
    logits = torch.tensor([[2.0, 0.0, -1.0], [1.0, 0.5, 0.0]], dtype=D, requires_grad=True)

    def usage_entropy(lg):
        p = torch.softmax(lg, -1).mean(0)
        return -(p * p.log()).sum()

    loss = uniform_prior_loss(logits)
    loss.backward()
    new = logits.detach() - 0.2 * logits.grad
    assert uniform_prior_loss(new) < loss
    assert usage_entropy(new) > usage_entropy(logits.detach())


def test_router_losses_validation():
    with pytest.raises(ValueError, match=r"mask has 2 elements for 3 tokens"):
        load_balancing_loss(torch.zeros(3, 4), 1, mask=torch.ones(2))
    with pytest.raises(ValueError, match=r"logits must be 2-D \(N, E\), got shape \(3,\)"):
        uniform_prior_loss(torch.zeros(3))
    with pytest.raises(ValueError, match=r"mask has 5 elements for 3 tokens"):
        router_z_loss(torch.zeros(3, 4), torch.ones(5))


def test_router_losses_all_masked_are_zero():
    logits = torch.randn(3, 4, requires_grad=True)
    mask = torch.zeros(3)
    for value in (
        load_balancing_loss(logits, 2, mask=mask),
        router_z_loss(logits, mask),
        uniform_prior_loss(logits, mask),
    ):
        assert value.item() == 0.0


# ---------------------------------------------------------------- diversity
def test_diversity_values():
    # A_1 = A_2 (cos 1) and A_3 orthogonal to both (cos 0): off-diagonal cos² = (1,1,0,0,0,0)/6 = 1/3
    a = torch.zeros(3, 1, 4, dtype=D)
    a[0, 0, 0] = a[1, 0, 0] = 1.0
    a[2, 0, 1] = 2.0
    assert expert_diversity_loss(a).item() == pytest.approx(1 / 3)
    # B equal for all experts: B₁A₁ = B₂A₂ and B₃A₃ ⊥ both -> BA term also 1/3
    b = torch.ones(3, 2, 1, dtype=D)
    assert expert_diversity_loss(a, b).item() == pytest.approx(2 / 3)
    # zero B (the default init): BA term is 0, not NaN
    assert expert_diversity_loss(a, torch.zeros(3, 2, 1, dtype=D)).item() == pytest.approx(1 / 3)
    # one expert: nothing to compare
    assert expert_diversity_loss(a[:1]).item() == 0.0


def test_diversity_gradient_step_decorrelates_experts():
    torch.manual_seed(2)
    shared = torch.randn(1, 2, 6, dtype=D)
    a = (shared + 0.1 * torch.randn(4, 2, 6, dtype=D)).requires_grad_(True)
    b = (torch.randn(1, 5, 2, dtype=D) + 0.1 * torch.randn(4, 5, 2, dtype=D)).requires_grad_(True)
    loss = expert_diversity_loss(a, b)
    loss.backward()
    with torch.no_grad():
        a2, b2 = a - 0.05 * a.grad, b - 0.05 * b.grad
    assert expert_diversity_loss(a2, b2) < loss
    off = ~torch.eye(4, dtype=torch.bool)
    before_sim = cosine_similarity_ba(a, b).detach()[off].abs().mean()
    assert cosine_similarity_ba(a2, b2)[off].abs().mean() < before_sim


def test_orthogonality_values():
    # rows e₁, e₂ (expert 0) and e₃, e₄ (expert 1) of R⁴: orthonormal -> 0
    a = torch.eye(4, dtype=D).reshape(2, 2, 4)
    assert orthogonality_loss(a).item() == 0.0
    # double every row: Gram = 4I, ‖4I − I‖² = 4·9 = 36
    assert orthogonality_loss(2 * a).item() == pytest.approx(36.0)
    # two identical unit rows: Gram = [[1,1],[1,1]], minus I leaves two off-diagonal ones -> 2
    same = torch.tensor([[[1.0, 0.0]], [[1.0, 0.0]]], dtype=D)
    assert orthogonality_loss(same).item() == pytest.approx(2.0)


def test_orthogonality_gradient_step_reduces_penalty():
    torch.manual_seed(3)
    a = torch.randn(3, 2, 8, dtype=D, requires_grad=True)
    loss = orthogonality_loss(a)
    loss.backward()
    assert orthogonality_loss(a.detach() - 0.01 * a.grad) < loss


def test_factor_validation():
    with pytest.raises(ValueError, match=r"lora_a must be \(E, r, in\), got shape \(2, 3\)"):
        orthogonality_loss(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"lora_b must be \(E, out, r\) matching lora_a \(2, 3, 4\)"):
        expert_diversity_loss(torch.zeros(2, 3, 4), torch.zeros(2, 5, 2))
    with pytest.raises(ValueError, match=r"lora_b must be"):
        expert_gram_ba(torch.zeros(2, 3, 4), torch.zeros(3, 5, 3))


# ---------------------------------------------------------------- injection
def test_inject_gradients_adds_only_to_listed_params():
    a = torch.randn(2, 1, 3, dtype=D, requires_grad=True)
    other = torch.randn(3, dtype=D, requires_grad=True)
    loss = orthogonality_loss(a * other.sum())
    ref = torch.autograd.grad(orthogonality_loss(a * other.sum()), a)[0]
    a.grad = torch.ones_like(a)
    grads = inject_gradients(loss, [a])
    torch.testing.assert_close(a.grad, 1 + ref)
    torch.testing.assert_close(grads[0], ref)
    assert other.grad is None  # nothing flows anywhere else
    b = torch.randn(2, 4, 1, dtype=D, requires_grad=True)  # grad None and not used by the loss
    grads = inject_gradients(orthogonality_loss(a), [a, b])
    assert grads[1] is None and b.grad is None


def test_inject_gradients_validation():
    with pytest.raises(ValueError, match=r"loss must be a scalar, got shape \(2,\)"):
        inject_gradients(torch.zeros(2, requires_grad=True), [])


def _two_layer_grads(mode, router_coefs, param_coefs, routing="softmax_topk"):
    """Gradients of a two-layer fp64 MoE-LoRA stack under the trainer's regulariser handling."""
    torch.manual_seed(0)
    layers = torch.nn.Sequential(
        *[
            MoELoRALinear(torch.nn.Linear(6, 6).double(), 3, 2, 2.0, 2, routing=routing, gate_grad_power=0.5)
            for _ in range(2)
        ]
    )
    for layer in layers:
        torch.nn.init.normal_(layer.lora_B, std=0.3)
        torch.nn.init.normal_(layer.gate_weight, std=0.5)
        layer.record_routing = True
    x = torch.randn(5, 6, dtype=D)
    task = layers(x).pow(2).sum()
    aux, logs = apply_regularizers(layers, {**router_coefs, **param_coefs}, mode, torch.ones(5), grad_accum=1)
    (task if aux is None else task + aux).backward()
    return {n: p.grad.clone() for n, p in layers.named_parameters() if p.requires_grad}, logs


def test_loss_and_inject_modes_agree_for_parameter_regularisers():
    coefs = {"diversity": 0.3, "orthogonality": 0.1}
    loss_mode, logs = _two_layer_grads("loss", {}, coefs)
    inject_mode, _ = _two_layer_grads("inject", {}, coefs)
    assert set(logs) == {"diversity", "orthogonality"}
    for name in loss_mode:
        torch.testing.assert_close(loss_mode[name], inject_mode[name], msg=name)


def test_inject_mode_keeps_router_regulariser_off_the_experts():
    coefs = {"load_balance": 0.5, "uniform_prior": 0.5, "z_loss": 0.1}
    plain, _ = _two_layer_grads("loss", {}, {})
    loss_mode, _ = _two_layer_grads("loss", coefs, {})
    inject_mode, logs = _two_layer_grads("inject", coefs, {})
    assert set(logs) == {"load_balance", "uniform_prior", "z_loss"}
    # inject: A and B see only the task gradient; loss mode: layer 1's experts also get the router
    # regularisers of layer 2 through its input (a gate-rescaled path)
    for name in plain:
        if "lora_" in name:
            torch.testing.assert_close(inject_mode[name], plain[name], msg=name)
    assert not torch.allclose(loss_mode["0.lora_A"], plain["0.lora_A"])
    for name in ("0.router.weight", "1.router.weight"):
        assert not torch.allclose(inject_mode[name], plain[name])
    # the last router has no downstream path: both modes give the same gradient
    torch.testing.assert_close(inject_mode["1.router.weight"], loss_mode["1.router.weight"])


def test_inject_mode_with_global_routing_reaches_the_global_gates():
    # Regression: inject mode read layer.router.weight, which global layers do not have (AttributeError).
    coefs = {"load_balance": 0.5, "uniform_prior": 0.5, "z_loss": 0.1}
    plain, _ = _two_layer_grads("loss", {}, {}, routing="global")
    loss_mode, _ = _two_layer_grads("loss", coefs, {}, routing="global")
    inject_mode, logs = _two_layer_grads("inject", coefs, {}, routing="global")
    assert set(logs) == {"load_balance", "uniform_prior", "z_loss"}
    assert {"0.global_gate", "1.global_gate"} <= set(inject_mode) and "0.router.weight" not in inject_mode
    # global gates do not depend on the input: the router terms reach nothing but the gates, in both modes
    for name in plain:
        torch.testing.assert_close(inject_mode[name], loss_mode[name], msg=name)
        if name.endswith("global_gate"):
            assert not torch.allclose(inject_mode[name], plain[name]), name
        else:
            torch.testing.assert_close(inject_mode[name], plain[name], msg=name)


def test_apply_regularizers_loss_is_coefficient_times_mean_over_layers():
    torch.manual_seed(1)
    layers = torch.nn.Sequential(*[MoELoRALinear(torch.nn.Linear(5, 5).double(), 3, 2, 2.0, 2) for _ in range(2)])
    for layer in layers:
        torch.nn.init.normal_(layer.lora_B, std=0.3)
        layer.record_routing = True
    layers(torch.randn(4, 5, dtype=D))
    mask = torch.tensor([1, 1, 0, 1])
    coefs = {"z_loss": 0.2, "diversity": 0.3, "load_balance": 0.0}
    loss, logs = apply_regularizers(layers, coefs, "loss", mask)
    z = [router_z_loss(layer.last_router_logits, mask).item() for layer in layers]
    div = [expert_diversity_loss(layer.lora_A, layer.lora_B).item() for layer in layers]
    assert logs == pytest.approx({"z_loss": sum(z) / 2, "diversity": sum(div) / 2})
    assert loss.item() == pytest.approx(0.2 * sum(z) / 2 + 0.3 * sum(div) / 2)
    assert apply_regularizers(layers, {"z_loss": 0.0}, "loss") == (None, {})
    with pytest.raises(ValueError, match=r"unknown regulariser\(s\) \['z_loss_coef'\]"):
        apply_regularizers(layers, {"z_loss_coef": 1.0}, "loss")
    with pytest.raises(ValueError, match=r"mode must be one of \('loss', 'inject'\), got 'grad'"):
        apply_regularizers(layers, coefs, "grad")
    layers[0].last_router_logits = None
    with pytest.raises(ValueError, match=r"record_routing = True"):
        apply_regularizers(layers, coefs, "loss")


# ---------------------------------------------------------------- scale anchor
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
