"""RiemannianSGD: Zhang & Pilanci's eq. 7, the explicit per-expert formula, torch parity, and the gate-rescaled
first-order weight change identity of docs/math.md, section 2:

    ΔW_eff = −η·s²·Σᵢ gᵢ^(1+p)·[Bᵢ(BᵢᵀBᵢ+δI)⁻¹Bᵢᵀ·G + G·Aᵢᵀ(AᵢAᵢᵀ+δI)⁻¹Aᵢ] + O(η²)

checked numerically in fp64 for p ∈ {1, 0.5, 0}: p = 0 weights each expert by gᵢ (the paper's eq. 12).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from riemix import MoELoRALinear, RiemannianSGD
from tests.helpers import (
    F64,
    SPECS,
    assert_params_close,
    clone_pairs,
    clone_params,
    flat,
    make_pairs,
    ref_grads,
    set_grads,
)

E, R, D_IN, D_OUT, N = 3, 2, 6, 5, 16
DELTA = 1e-6
LR = 1e-7


@pytest.mark.parametrize("reg", [0.0, 1e-3])
def test_eq7_first_order_update_of_w(reg):
    gen = torch.Generator().manual_seed(1)
    a = nn.Parameter(torch.randn(3, 8, generator=gen, dtype=F64))
    b = nn.Parameter(torch.randn(6, 3, generator=gen, dtype=F64))
    x, t = torch.randn(8, 10, generator=gen, dtype=F64), torch.randn(6, 10, generator=gen, dtype=F64)
    w = b.detach() @ a.detach()
    w_leaf = w.clone().requires_grad_(True)
    ((w_leaf @ x - t) ** 2).sum().backward()
    g = w_leaf.grad  # dL/dW
    ((b @ a @ x - t) ** 2).sum().backward()
    lr = 1e-6
    RiemannianSGD([a, b], lr=lr, reg=reg, lora_pairs=[(a, b)]).step()
    direction = (b.detach() @ a.detach() - w) / (-lr)
    bd, ad = b.detach(), a.detach()
    eye = torch.eye(3, dtype=F64)
    expected = bd @ torch.linalg.inv(bd.T @ bd + reg * eye) @ bd.T @ g
    expected = expected + g @ ad.T @ torch.linalg.inv(ad @ ad.T + reg * eye) @ ad
    if reg == 0.0:  # Proj_col(B) G + G Proj_row(A)
        torch.testing.assert_close(bd @ torch.linalg.pinv(bd) @ g + g @ torch.linalg.pinv(ad) @ ad, expected)
    assert ((direction - expected).norm() / expected.norm()).item() < 1e-4


def test_sgd_matches_per_expert_formula_multi_step(matmul_path):
    pairs = make_pairs()
    router = nn.Parameter(torch.randn(4, 5, dtype=F64))
    ref_pairs = clone_pairs(pairs)
    ref_router = clone_params([router])[0]
    lr, mom, wd, reg = 0.01, 0.9, 0.05, 1e-3
    kw = dict(lr=lr, momentum=mom, weight_decay=wd, reg=reg)
    opt = RiemannianSGD(flat(pairs) + [router], lora_pairs=pairs, **kw)
    bufs = {}
    for step in range(3):
        set_grads(flat(pairs) + [router], seed=step)
        set_grads(flat(ref_pairs) + [ref_router], seed=step)
        opt.step()
        with torch.no_grad():
            for p in flat(ref_pairs) + [ref_router]:
                p.grad = p.grad + wd * p  # coupled weight decay, before preconditioning
            new = ref_grads(ref_pairs, reg)
            new[ref_router] = ref_router.grad
            for p, g in new.items():
                bufs[p] = g.clone() if p not in bufs else bufs[p] * mom + g
                p -= lr * bufs[p]
    assert_params_close(flat(pairs) + [router], flat(ref_pairs) + [ref_router])


@pytest.mark.parametrize(
    "kw",
    [
        dict(lr=0.05),  # no momentum: the product writes into the parameter
        dict(lr=0.05, momentum=0.9, dampening=0.3, weight_decay=0.01),  # into the momentum buffer
        dict(lr=0.05, momentum=0.9, nesterov=True),  # Nesterov needs the preconditioned gradient itself
    ],
)
def test_sgd_equals_torch_sgd_on_preconditioned_grads(matmul_path, kw):
    """Every momentum variant, with a strided factor and a factor that first gets a grad at step 1."""
    pairs = make_pairs()
    a0, b0 = pairs[1]
    pairs[1] = (nn.Parameter(a0.detach().mT.contiguous().mT), b0)  # a strided A: no product into it
    ref_pairs = clone_pairs(pairs)
    opt = RiemannianSGD(flat(pairs), lora_pairs=pairs, reg=1e-3, **kw)
    ref = torch.optim.SGD(flat(ref_pairs), **{**kw, "weight_decay": 0.0})
    wd = kw.get("weight_decay", 0.0)
    for step in range(3):
        set_grads(flat(pairs), step)
        set_grads(flat(ref_pairs), step)
        if step == 0:  # the last pair joins late: its momentum buffers start at step 1
            pairs[-1][0].grad = pairs[-1][1].grad = ref_pairs[-1][0].grad = ref_pairs[-1][1].grad = None
        before = [None if p.grad is None else p.grad.clone() for p in flat(pairs)]
        opt.step()
        assert all(g is None or torch.equal(p.grad, g) for p, g in zip(flat(pairs), before, strict=True))
        with torch.no_grad():
            live = [pair for pair in ref_pairs if pair[0].grad is not None]
            for p in flat(live):
                p.grad = p.grad + wd * p  # coupled weight decay, before preconditioning
            for p, g in ref_grads(live, 1e-3).items():
                p.grad = g
        ref.step()
    assert not pairs[1][0].is_contiguous()
    assert_params_close(flat(pairs), flat(ref_pairs), atol=1e-12)


def test_sgd_momentum_with_params_that_join_late_matches_torch():
    params = [nn.Parameter(torch.randn(3, 4, dtype=F64)) for _ in range(3)]
    ref_params = clone_params(params)
    kw = dict(lr=0.05, momentum=0.9, dampening=0.2)
    ours, ref = RiemannianSGD(params, precondition=False, **kw), torch.optim.SGD(ref_params, **kw)
    for step in range(4):  # param i first gets a grad at step i: new and old momentum buffers mix
        for ps in (params, ref_params):
            set_grads(ps, step)
            for i, p in enumerate(ps):
                p.grad = p.grad if i <= step else None
        ours.step()
        ref.step()
    assert_params_close(params, ref_params)


def test_reference_compat_sgd_decoupled_weight_decay():
    pairs = make_pairs(SPECS[:1])
    ref_pairs = clone_pairs(pairs)
    set_grads(flat(pairs), 0)
    set_grads(flat(ref_pairs), 0)
    kw = dict(lr=0.1, weight_decay=0.2, reg=1e-3, reference_compat=True)
    RiemannianSGD(flat(pairs), lora_pairs=pairs, **kw).step()
    with torch.no_grad():
        for p, g in ref_grads(ref_pairs, 1e-3).items():
            p.mul_(1 - 0.1 * 0.2).sub_(0.1 * g)
    assert_params_close(flat(pairs), flat(ref_pairs))


# ---------------------------------------------------------------- gate rescaling (docs/math.md, section 2)
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
