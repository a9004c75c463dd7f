"""Gate rescaling + Riemannian SGD: the first-order weight change identity of docs/math.md, section 2.

    ΔW_eff = −η·s²·Σᵢ gᵢ^(1+p)·[Bᵢ(BᵢᵀBᵢ+δI)⁻¹Bᵢᵀ·G + G·Aᵢᵀ(AᵢAᵢᵀ+δI)⁻¹Aᵢ] + O(η²)

checked numerically in fp64 for p ∈ {1, 0.5, 0}: p = 0 weights each expert by gᵢ (the paper's eq. 12).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from riemix import MoELoRALinear, RiemannianSGD

E, R, D_IN, D_OUT, N = 3, 2, 6, 5, 16
DELTA = 1e-6
LR = 1e-7


def make_layer(power: float) -> tuple[MoELoRALinear, torch.Tensor, torch.Tensor]:
    """A fp64 layer whose router sees only a constant feature, so every token has the same gates."""
    torch.manual_seed(0)
    layer = MoELoRALinear(
        nn.Linear(D_IN, D_OUT).double(), E, R, alpha=4.0, top_k=E, routing="dense", gate_grad_power=power
    ).double()
    with torch.no_grad():
        layer.lora_A.normal_()
        layer.lora_B.normal_()
        layer.router.weight.zero_()
        layer.router.weight[:, 0] = torch.tensor([1.2, -0.3, 0.4], dtype=torch.float64)  # non-uniform gates
    layer.router.weight.requires_grad_(False)  # gates held fixed
    x = torch.randn(N, D_IN, dtype=torch.float64)
    x[:, 0] = 1.0  # the constant feature the router reads
    target = torch.randn(N, D_OUT, dtype=torch.float64)
    return layer, x, target


def effective_weight(layer: MoELoRALinear, gates: torch.Tensor) -> torch.Tensor:
    return layer.base_layer.weight + layer.delta_weight(gates)


@pytest.mark.parametrize("power", [1.0, 0.5, 0.0])
def test_first_order_weight_change(power):
    layer, x, target = make_layer(power)
    gates = torch.softmax(layer.router.weight[:, 0], dim=0)  # (E,) the same for every token
    assert torch.allclose(layer.compute_gates(x)[1], gates.expand(N, E))

    # G = ∂L/∂W_eff from a plain linear model with W_eff.
    w_eff = effective_weight(layer, gates).detach().requires_grad_(True)
    loss_fn = lambda y: ((y - target) ** 2).sum()  # noqa: E731
    (grad_w,) = torch.autograd.grad(loss_fn(x @ w_eff.t() + layer.base_layer.bias), [w_eff])
    # Sanity: the layer computes the same function.
    torch.testing.assert_close(layer(x), x @ w_eff.t() + layer.base_layer.bias)

    opt = RiemannianSGD([layer.lora_A, layer.lora_B], lr=LR, reg=DELTA, lora_pairs=[(layer.lora_A, layer.lora_B)])
    loss_fn(layer(x)).backward()
    opt.step()
    delta_w = (effective_weight(layer, gates) - w_eff).detach()

    s = layer.scaling
    want = torch.zeros_like(grad_w)
    a0, b0 = make_layer(power)[0].lora_A.detach(), make_layer(power)[0].lora_B.detach()  # pre-step values
    eye = torch.eye(R, dtype=torch.float64)
    for i in range(E):
        a, b = a0[i], b0[i]
        proj_b = b @ torch.linalg.inv(b.t() @ b + DELTA * eye) @ b.t()
        proj_a = a.t() @ torch.linalg.inv(a @ a.t() + DELTA * eye) @ a
        want += gates[i] ** (1 + power) * (proj_b @ grad_w + grad_w @ proj_a)
    want *= -LR * s**2
    torch.testing.assert_close(delta_w, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_powers_give_different_updates():
    """The identity distinguishes the three powers (the test above is not vacuous)."""
    deltas = []
    for power in (1.0, 0.5, 0.0):
        layer, x, target = make_layer(power)
        gates = torch.softmax(layer.router.weight[:, 0], dim=0)
        before = effective_weight(layer, gates).detach()
        opt = RiemannianSGD([layer.lora_A, layer.lora_B], lr=LR, reg=DELTA, lora_pairs=[(layer.lora_A, layer.lora_B)])
        ((layer(x) - target) ** 2).sum().backward()
        opt.step()
        deltas.append((effective_weight(layer, gates) - before).detach())
    for i in range(3):
        for j in range(i + 1, 3):
            assert (deltas[i] - deltas[j]).abs().max() > 1e-3 * deltas[i].abs().max()
