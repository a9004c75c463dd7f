"""Shared optimizer machinery (riemix.optim.base): torch parity without preconditioning, pairing by identity,
per-group options, state_dict round trip, clipping, missing grads, closures and validation."""

from __future__ import annotations

import copy
import io
import random

import pytest
import torch
from torch import nn

from riemix.optim import RiemannianAdamW, RiemannianSGD, build_optimizer
from tests.helpers import (
    F64,
    SPECS,
    assert_params_close,
    clone_pairs,
    clone_params,
    flat,
    make_pairs,
    moe_stack,
    ref_grads,
    ref_precond,
    set_grads,
)


@pytest.mark.parametrize(
    "kind,kwargs",
    [
        ("sgd", dict(lr=0.05)),
        ("sgd", dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01)),
        ("sgd", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)),
        ("adamw", dict(lr=0.01, weight_decay=0.0)),  # torch's AdamW default weight_decay is 0.01
        ("adamw", dict(lr=0.01, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)),
    ],
)
def test_unpreconditioned_matches_torch(kind, kwargs):
    pairs = make_pairs()
    params = flat(pairs) + [nn.Parameter(torch.randn(4, 5, dtype=F64))]
    ref_params = clone_params(params)
    sgd = kind == "sgd"
    ours_cls, ref_cls = (RiemannianSGD, torch.optim.SGD) if sgd else (RiemannianAdamW, torch.optim.AdamW)
    ours = ours_cls(params, precondition=False, lora_pairs=pairs, **kwargs)
    ref = ref_cls(ref_params, **kwargs)
    for step in range(5):
        set_grads(params, step)
        set_grads(ref_params, step)
        ours.step()
        ref.step()
    assert_params_close(params, ref_params)


@pytest.mark.parametrize("cls", [RiemannianSGD, RiemannianAdamW])
def test_pairing_is_independent_of_order_and_groups(cls):
    runs = []
    for layout in ("natural", "shuffled", "split"):
        pairs = make_pairs()
        params = flat(pairs)
        if layout == "shuffled":
            params = params[::-1]
            random.Random(0).shuffle(params)
            groups = params
        elif layout == "split":
            groups = [{"params": [b for _, b in pairs]}, {"params": [a for a, _ in pairs]}]
        else:
            groups = params
        kwargs = dict(lr=0.01, momentum=0.5) if cls is RiemannianSGD else dict(lr=0.01)
        opt = cls(groups, lora_pairs=pairs[::-1] if layout == "shuffled" else pairs, **kwargs)
        for step in range(3):
            set_grads(flat(pairs), step)
            opt.step()
        runs.append(flat(pairs))
    assert_params_close(runs[0], runs[1], atol=0)
    assert_params_close(runs[0], runs[2], atol=0)


def test_loraplus_lr_scales_only_b():
    pairs, plus = make_pairs(), make_pairs()
    before = [p.detach().clone() for p in flat(pairs)]
    set_grads(flat(pairs), 0)
    set_grads(flat(plus), 0)
    RiemannianSGD(flat(pairs), lr=0.01, lora_pairs=pairs).step()
    groups = [{"params": [a for a, _ in plus]}, {"params": [b for _, b in plus], "lr": 0.16}]
    RiemannianSGD(groups, lr=0.01, lora_pairs=plus).step()
    for (a, b), (pa, pb), b0 in zip(pairs, plus, before[1::2], strict=True):
        torch.testing.assert_close(pa.detach(), a.detach(), atol=1e-14, rtol=0)
        torch.testing.assert_close(pb.detach() - b0, 16 * (b.detach() - b0), atol=1e-12, rtol=0)


def test_reg_comes_from_a_group():
    pairs, ref_pairs = make_pairs(), make_pairs()
    set_grads(flat(pairs), 0)
    set_grads(flat(ref_pairs), 0)
    groups = [{"params": [a for a, _ in pairs], "reg": 0.5}, {"params": [b for _, b in pairs], "reg": 7.0}]
    RiemannianSGD(groups, lr=0.1, lora_pairs=pairs).step()
    with torch.no_grad():
        for p, g in ref_grads(ref_pairs, 0.5).items():
            p -= 0.1 * g
    assert_params_close(flat(pairs), flat(ref_pairs))


@pytest.mark.parametrize(
    "cls,kwargs",
    [(RiemannianSGD, dict(lr=0.02, momentum=0.9, nesterov=True)), (RiemannianAdamW, dict(lr=0.01))],
)
def test_state_dict_round_trip(cls, kwargs):
    pairs = make_pairs()
    groups = [
        {"params": [a for a, _ in pairs], "name": "lora_A"},
        {"params": [b for _, b in pairs], "lr": 0.03},
    ]
    opt = cls(groups, lora_pairs=pairs, **kwargs)
    for step in range(3):
        set_grads(flat(pairs), step)
        opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    resumed_pairs = clone_pairs(pairs)
    new_groups = [{"params": [a for a, _ in resumed_pairs]}, {"params": [b for _, b in resumed_pairs]}]
    resumed = cls(new_groups, lora_pairs=resumed_pairs, **kwargs)
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.param_groups[0]["name"] == "lora_A" and resumed.param_groups[1]["lr"] == 0.03
    for step in range(3, 6):
        set_grads(flat(pairs), step)
        set_grads(flat(resumed_pairs), step)
        opt.step()
        resumed.step()
    assert_params_close(flat(pairs), flat(resumed_pairs), atol=0)
    clone = copy.deepcopy(resumed)  # pairing survives deepcopy / pickling
    assert len(clone._pairs) == len(pairs)


@pytest.mark.parametrize("precondition", [False, True])
def test_group_grad_clipping_matches_clip_grad_norm(precondition):
    pairs, ref_pairs = make_pairs(), make_pairs()
    routers = [nn.Parameter(torch.randn(3, 5, dtype=F64)) for _ in range(2)]
    ref_routers = clone_params(routers)
    params, ref_params = flat(pairs) + routers, flat(ref_pairs) + ref_routers
    set_grads(params, 0)
    set_grads(ref_params, 0)
    grads_before = [p.grad.clone() for p in params]
    kw = dict(lr=0.01, precondition=precondition)
    groups = [{"params": flat(pairs), "max_grad_norm": 0.5}, {"params": routers, "max_grad_norm": 1.0}]
    RiemannianAdamW(groups, lora_pairs=pairs, **kw).step()
    norm = torch.nn.utils.clip_grad_norm_(flat(ref_pairs), 0.5)
    assert norm > 0.5
    torch.nn.utils.clip_grad_norm_(ref_routers, 1.0)
    RiemannianAdamW([{"params": flat(ref_pairs)}, {"params": ref_routers}], lora_pairs=ref_pairs, **kw).step()
    assert_params_close(params, ref_params)
    for p, g in zip(params, grads_before, strict=True):
        assert torch.equal(p.grad, g)  # the optimizer never mutates .grad


def test_missing_grads_are_skipped_and_half_pairs_work():
    pairs = make_pairs(SPECS[:2])
    (a0, b0), (a1, b1) = pairs
    a0.grad, b1.grad = torch.randn_like(a0), torch.randn_like(b1)  # b0 and a1 have no grad
    before = [p.detach().clone() for p in flat(pairs)]
    opt = RiemannianSGD(flat(pairs), lr=0.1, reg=1e-3, lora_pairs=pairs)
    opt.step()
    pa0, _ = ref_precond(a0, b0, a0.grad, torch.zeros_like(b0), 1e-3)
    _, pb1 = ref_precond(a1, b1, torch.zeros_like(a1), b1.grad, 1e-3)
    torch.testing.assert_close(a0.detach(), before[0] - 0.1 * pa0)
    torch.testing.assert_close(b1.detach(), before[3] - 0.1 * pb1)
    assert torch.equal(b0, before[1]) and torch.equal(a1, before[2])
    adam = RiemannianAdamW(flat(pairs), lora_pairs=pairs)
    adam.step()
    assert b0 not in adam.state and a1 not in adam.state and adam.state[a0]["step"] == 1


def test_closure_returns_loss():
    model, twin = moe_stack(), moe_stack()
    opt = build_optimizer(model, "radamw", lr=0.01)
    x = torch.randn(3, 6, dtype=F64)
    returned = []

    def closure():
        opt.zero_grad()
        loss = model(x).pow(2).sum()
        loss.backward()
        returned.append(loss)
        return loss

    loss = opt.step(closure)
    assert len(returned) == 1 and loss is returned[0]  # evaluated once, and its loss handed back
    # the step used the closure's gradients: the same as computing them first and stepping without one
    twin(x).pow(2).sum().backward()
    build_optimizer(twin, "radamw", lr=0.01).step()
    assert_params_close(list(model.parameters()), list(twin.parameters()), atol=0)


# ---------------------------------------------------------------- validation
def _p(*shape):
    return nn.Parameter(torch.zeros(*shape))


@pytest.mark.parametrize(
    "factory,match",
    [
        (lambda: RiemannianAdamW([_p(2)], lr=-1.0), "Invalid lr"),
        (lambda: RiemannianAdamW([_p(2)], betas=(1.0, 0.9)), "Invalid betas"),
        (lambda: RiemannianAdamW([_p(2)], betas=(0.9, -0.1)), "Invalid betas"),
        (lambda: RiemannianAdamW([_p(2)], eps=-1e-8), "Invalid eps"),
        (lambda: RiemannianAdamW([_p(2)], weight_decay=-0.1), "Invalid weight_decay"),
        (lambda: RiemannianAdamW([_p(2)], reg=-1e-6), "Invalid reg"),
        (lambda: RiemannianAdamW([_p(2)], max_grad_norm=0.0), "Invalid max_grad_norm"),
        (lambda: RiemannianAdamW([_p(2)], precondition="yes"), "Invalid precondition"),
        (lambda: RiemannianAdamW([_p(2)], reference_compat=1), "Invalid reference_compat"),
        (lambda: RiemannianAdamW([_p(2)], fused="yes"), "Invalid fused"),
        (lambda: RiemannianAdamW([_p(2)], fused=True, reference_compat=True), "Invalid fused: True is not"),
        (
            lambda: RiemannianAdamW([nn.Parameter(torch.zeros(2, device="meta"))], fused=True),
            "Invalid fused: True needs floating-point",
        ),
        (lambda: RiemannianAdamW([{"params": [_p(2)], "lr": -0.5}]), "Invalid lr"),
        (lambda: RiemannianAdamW([{"params": [_p(2)], "reg": float("nan")}]), "Invalid reg"),
        (lambda: RiemannianSGD([_p(2)], lr=-0.1), "Invalid lr"),
        (lambda: RiemannianSGD([_p(2)], lr=0.1, momentum=-0.9), "Invalid momentum"),
        (lambda: RiemannianSGD([_p(2)], lr=0.1, momentum=0.9, dampening=1.5), "Invalid dampening"),
        (lambda: RiemannianSGD([_p(2)], lr=0.1, nesterov=True), "Nesterov momentum requires"),
        (lambda: RiemannianSGD([_p(2)], lr=0.1, momentum=0.9, dampening=0.1, nesterov=True), "Nesterov"),
        (lambda: RiemannianSGD([_p(2)], lr=0.1, weight_decay=-1.0), "Invalid weight_decay"),
        (lambda: RiemannianSGD([_p(2)], lr=0.1, max_grad_norm=-1.0), "Invalid max_grad_norm"),
    ],
)
def test_invalid_hyperparameters(factory, match):
    with pytest.raises(ValueError, match=match):
        factory()


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda a, b, x: [(a, x)], "B is not among the optimizer's parameters"),
        (lambda a, b, x: [(a, b), (a, x)], "appears in more than one pair"),
        (lambda a, b, x: [a], r"must be an \(A, B\) tuple"),
        (lambda a, b, x: [(a, _p(2, 5, 2))], "not among"),
    ],
)
def test_invalid_pair_membership(make, match):
    a, b, x = _p(2, 2, 4), _p(2, 3, 2), _p(2, 3, 2)
    params = [a, b] if match != "appears in more than one pair" else [a, b, x]
    with pytest.raises(ValueError, match=match):
        RiemannianSGD(params, lr=0.1, lora_pairs=make(a, b, x))


@pytest.mark.parametrize(
    "a_shape,b_shape,match",
    [
        ((2, 2, 4), (3, 3, 2), "number of experts differs"),
        ((2, 2, 4), (2, 3, 3), "rank mismatch"),
        ((2, 4), (3, 3), "rank mismatch"),
        ((2, 2, 4), (3, 2), "both be 2-D or both 3-D"),
        ((2,), (2,), "both be 2-D or both 3-D"),
    ],
)
def test_invalid_pair_shapes(a_shape, b_shape, match):
    a, b = _p(*a_shape), _p(*b_shape)
    with pytest.raises(ValueError, match=match):
        RiemannianAdamW([a, b], lora_pairs=[(a, b)])


def test_invalid_pair_dtype():
    a, b = _p(2, 2, 4), nn.Parameter(torch.zeros(2, 3, 2, dtype=F64))
    with pytest.raises(ValueError, match="share dtype and device"):
        RiemannianAdamW([a, b], lora_pairs=[(a, b)])
