"""The preconditioner (riemix.optim.precondition): batched fast path == reference == explicit inverses, the
identity fallback of a Gram whose Cholesky factorization fails, and the plan kept between calls."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from riemix.optim import RiemannianSGD
from riemix.optim.precondition import Job, precondition_grads_, precondition_reference
from tests.helpers import F64, SPECS, flat, make_pairs, ref_precond, set_grads


def all_jobs(pairs, reg):
    return [Job(a, b, True, reg) for a, b in pairs] + [Job(b, a, False, reg) for a, b in pairs]


@pytest.mark.parametrize("reg", [0.0, 1e-3])
def test_batched_preconditioning_matches_reference(matmul_path, reg):
    pairs = make_pairs()
    set_grads(flat(pairs), 0)
    raw = [p.grad.clone() for p in flat(pairs)]
    scratch = {}
    plans = []
    for _ in range(2):  # the second call reuses the plan and its buffers
        grads = {p: p.grad for p in flat(pairs)}
        precondition_grads_(all_jobs(pairs, reg), grads, scratch)
        plans.append(list(scratch.values()))
        for a, b in pairs:
            ref_a = precondition_reference(a.grad, b.detach(), True, reg)
            ref_b = precondition_reference(b.grad, a.detach(), False, reg)
            oracle_a, oracle_b = ref_precond(a.detach(), b.detach(), a.grad, b.grad, reg)
            for got, ref, oracle in ((grads[a], ref_a, oracle_a), (grads[b], ref_b, oracle_b)):
                assert got.shape == ref.shape and got.dtype == ref.dtype == F64
                torch.testing.assert_close(got, ref, atol=1e-12, rtol=1e-10)
                torch.testing.assert_close(ref, oracle, atol=1e-12, rtol=1e-10)
    assert len(plans[0]) == 1 and plans[0] == plans[1]
    assert all(torch.equal(p.grad, g) for p, g in zip(flat(pairs), raw, strict=True))


# (E, r, in, out): CPU products of B-shaped operands take q rows at once, q·r <= 16 and q | out
KRON_SPECS = [(2, 3, 5, 7), (2, 4, 6, 8), (1, 16, 3, 5), (2, 2, 4, 6), (3, 1, 2, 32)]  # q = 1, 4, 1, 6, 16


@pytest.mark.parametrize("spec", KRON_SPECS)
def test_every_row_grouping_matches_reference(matmul_path, spec):
    pairs = make_pairs([spec, spec])
    set_grads(flat(pairs), 1)
    grads = {p: p.grad for p in flat(pairs)}
    precondition_grads_(all_jobs(pairs, 1e-3), grads, {})
    for a, b in pairs:
        oracle_a, oracle_b = ref_precond(a.detach(), b.detach(), a.grad, b.grad, 1e-3)
        torch.testing.assert_close(grads[a], oracle_a, atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(grads[b], oracle_b, atol=1e-12, rtol=1e-10)


def test_different_regs_share_one_solve_and_strided_grads(matmul_path):
    pairs = make_pairs(SPECS[:2])  # same shapes, so one bucket with two ridge terms
    set_grads(flat(pairs), 2)
    for p in flat(pairs):  # strided grads (transposed storage) reach the products as they are
        p.grad = p.grad.mT.contiguous().mT
    regs = [0.0, 0.5]
    jobs = [
        job for (a, b), reg in zip(pairs, regs, strict=True) for job in (Job(a, b, True, reg), Job(b, a, False, reg))
    ]
    grads = {p: p.grad for p in flat(pairs)}
    precondition_grads_(jobs, grads, {})
    for (a, b), reg in zip(pairs, regs, strict=True):
        oracle_a, oracle_b = ref_precond(a.detach(), b.detach(), a.grad, b.grad, reg)
        torch.testing.assert_close(grads[a], oracle_a, atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(grads[b], oracle_b, atol=1e-12, rtol=1e-10)
        assert grads[a].is_contiguous() and grads[b].is_contiguous()


def test_plan_is_rebuilt_when_a_factor_changes_shape_or_dtype(matmul_path):
    pairs = make_pairs(SPECS[:1])
    (a, b), scratch = pairs[0], {}
    for step in range(3):
        if step == 1:  # new shapes behind the same Parameter objects (e.g. a resized adapter)
            a.data, b.data = torch.randn(4, 2, 6, dtype=F64), torch.randn(4, 3, 2, dtype=F64)
        if step == 2:
            a.data, b.data = a.data.float(), b.data.float()
        set_grads([a, b], step)
        grads = {a: a.grad, b: b.grad}
        precondition_grads_(all_jobs(pairs, 1e-3), grads, scratch)
        oracle_a, oracle_b = ref_precond(a.detach(), b.detach(), a.grad, b.grad, 1e-3)
        tol = dict(atol=1e-12, rtol=1e-10) if a.dtype == F64 else dict(atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(grads[a], oracle_a, **tol)
        torch.testing.assert_close(grads[b], oracle_b, **tol)
    assert len(scratch) <= 3  # old plans are dropped


@pytest.mark.parametrize("dtype", [torch.bfloat16, F64])
def test_batched_and_reference_agree_on_singular_grams_and_half(matmul_path, dtype):
    a = torch.randn(2, 2, 5, dtype=F64).to(dtype)
    b = torch.zeros(2, 4, 2, dtype=dtype)  # B = 0 and reg = 0: BᵀB is singular -> plain gradient for A
    ga, gb = torch.randn_like(a), torch.randn_like(b)
    grads = {a: ga, b: gb}
    precondition_grads_([Job(a, b, True, 0.0), Job(b, a, False, 0.0)], grads, {})
    torch.testing.assert_close(grads[a], ga, atol=0, rtol=0)
    torch.testing.assert_close(precondition_reference(ga, b, True, 0.0), ga, atol=0, rtol=0)
    ref_b = precondition_reference(gb, a, False, 0.0)
    assert grads[b].dtype == ref_b.dtype == dtype
    tol = dict(atol=0.02, rtol=0.02) if dtype == torch.bfloat16 else dict(atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(grads[b], ref_b, **tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_solves_in_fp32(dtype, matmul_path):
    pairs = make_pairs(dtype=dtype)
    ref_pairs = [tuple(nn.Parameter(p.detach().float()) for p in pair) for pair in pairs]
    set_grads(flat(pairs), 0)
    for p, q in zip(flat(pairs), flat(ref_pairs), strict=True):
        q.grad = p.grad.float()
    RiemannianSGD(flat(pairs), lr=0.05, reg=1e-6, lora_pairs=pairs).step()
    RiemannianSGD(flat(ref_pairs), lr=0.05, reg=1e-6, lora_pairs=ref_pairs).step()
    for p, q in zip(flat(pairs), flat(ref_pairs), strict=True):
        assert p.dtype == dtype and torch.isfinite(p).all()
        torch.testing.assert_close(p.float(), q.detach(), atol=0.05, rtol=0.02)
    zero_b = [(nn.Parameter(torch.randn(2, 2, 6).to(dtype)), nn.Parameter(torch.zeros(2, 5, 2, dtype=dtype)))]
    set_grads(flat(zero_b), 1)
    zero_b[0][0].grad.zero_()  # LoRA init: B = 0 -> grad_A = 0
    a0 = zero_b[0][0].detach().clone()
    RiemannianSGD(flat(zero_b), lr=0.01, lora_pairs=zero_b).step()  # (0 + reg*I)^-1 @ 0 stays finite
    (a, b), (ga, gb) = zero_b[0], (p.grad.float() for p in zero_b[0])
    assert torch.equal(a, a0)  # a zero gradient moves nothing (no NaN from the singular BᵀB)
    _, want_b = ref_precond(a0.float(), torch.zeros_like(gb), ga, gb, 1e-6)  # the optimizer's default reg
    torch.testing.assert_close(b.float(), -0.01 * want_b, atol=2e-3, rtol=0.02)


def test_failed_cholesky_gives_that_expert_the_plain_gradient(matmul_path):
    a = torch.randn(3, 2, 5, dtype=F64)
    b = torch.randn(3, 4, 2, dtype=F64)
    b[0] = 1.0  # rank 1: BᵀB = [[4, 4], [4, 4]] is singular, its Cholesky factorization fails exactly
    b[2, 0, 0] = float("inf")  # a non-finite Gram fails too
    ga, gb = torch.randn_like(a), torch.randn_like(b)
    grads = {a: ga, b: gb}
    precondition_grads_([Job(a, b, True, 0.0), Job(b, a, False, 0.0)], grads, {})
    torch.testing.assert_close(grads[a][0], ga[0], atol=0, rtol=0)  # plain gradient, no NaN
    torch.testing.assert_close(grads[a][2], ga[2], atol=0, rtol=0)
    want = torch.linalg.inv(b[1].T @ b[1]) @ ga[1]  # the regular expert in the same batch is preconditioned
    torch.testing.assert_close(grads[a][1], want, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(precondition_reference(ga, b, True, 0.0), grads[a], atol=1e-12, rtol=1e-10)
    assert torch.isfinite(grads[b][:2]).all()


def test_singular_gram_falls_back_to_plain_gradient(matmul_path):
    a = nn.Parameter(torch.randn(2, 2, 5, dtype=F64))
    b = nn.Parameter(torch.zeros(2, 4, 2, dtype=F64))  # B = 0 and reg = 0: B^T B is singular
    a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
    a0 = a.detach().clone()
    RiemannianSGD([a, b], lr=0.1, reg=0.0, lora_pairs=[(a, b)]).step()
    torch.testing.assert_close(a.detach(), a0 - 0.1 * a.grad)  # identity fallback, no NaN
    want_b = torch.stack([b.grad[e] @ torch.linalg.inv(a0[e] @ a0[e].T) for e in range(2)])  # AAᵀ is invertible
    torch.testing.assert_close(b.detach(), -0.1 * want_b)
