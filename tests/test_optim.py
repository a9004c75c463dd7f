"""Tests for riemix.optim: Riemannian preconditioned SGD / AdamW and build_optimizer (fp64 references)."""

from __future__ import annotations

import copy
import io
import random

import pytest
import torch
from torch import nn

import riemix.optim.precondition
from riemix.core.layer import MoELoRALinear
from riemix.optim import OPTIMIZER_NAMES, RiemannianAdamW, RiemannianSGD, build_optimizer
from riemix.optim.precondition import Job, precondition_grads_, precondition_reference

F64 = torch.float64
# (E, r, in, out); E=None means 2-D factors. Two pairs share a shape, several (E, r) buckets.
SPECS = [(3, 2, 5, 7), (3, 2, 5, 7), (3, 2, 6, 4), (2, 3, 5, 5), (None, 2, 4, 3)]


def make_pairs(specs=SPECS, seed=0, dtype=F64):
    """Random (A, B) parameter pairs; B is not zero so both preconditioners are non-trivial."""
    gen = torch.Generator().manual_seed(seed)
    pairs = []
    for e, r, d_in, d_out in specs:
        lead = () if e is None else (e,)
        a = nn.Parameter(torch.randn(*lead, r, d_in, generator=gen, dtype=F64).to(dtype))
        b = nn.Parameter(torch.randn(*lead, d_out, r, generator=gen, dtype=F64).to(dtype))
        pairs.append((a, b))
    return pairs


def set_grads(params, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=F64).to(p.dtype)


def ids(params):
    return [id(p) for p in params]


def clone_params(params):
    return [nn.Parameter(p.detach().clone()) for p in params]


def flat(pairs):
    return [p for pair in pairs for p in pair]


def ref_precond(a, b, ga, gb, reg):
    """Explicit per-expert preconditioned grads with torch.linalg.inv (loop over experts)."""
    a3, b3, ga3, gb3 = (t if t.dim() == 3 else t[None] for t in (a, b, ga, gb))
    eye = torch.eye(a3.shape[1], dtype=a3.dtype)
    pa, pb = torch.empty_like(ga3), torch.empty_like(gb3)
    for e in range(a3.shape[0]):
        pa[e] = torch.linalg.inv(b3[e].T @ b3[e] + reg * eye) @ ga3[e]
        pb[e] = gb3[e] @ torch.linalg.inv(a3[e] @ a3[e].T + reg * eye)
    return pa.reshape(ga.shape), pb.reshape(gb.shape)


def ref_grads(pairs, reg):
    out = {}
    for a, b in pairs:
        out[a], out[b] = ref_precond(a.detach(), b.detach(), a.grad, b.grad, reg)
    return out


def assert_params_close(xs, ys, atol=1e-12, rtol=0.0):
    for x, y in zip(xs, ys, strict=True):
        torch.testing.assert_close(x.detach(), y.detach(), atol=atol, rtol=rtol)


def moe_layer(d_in, d_out, n_experts=3, r=2):
    """A MoELoRALinear (fp64, frozen base, all experts routed) with random non-zero A and B."""
    base = nn.Linear(d_in, d_out, dtype=F64).requires_grad_(False)
    layer = MoELoRALinear(base, num_experts=n_experts, rank=r, alpha=r, top_k=n_experts)
    with torch.no_grad():
        layer.lora_A.copy_(torch.randn(n_experts, r, d_in, dtype=F64) * 0.3)
        layer.lora_B.copy_(torch.randn(n_experts, d_out, r, dtype=F64) * 0.3)
    return layer


def tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(moe_layer(6, 5), nn.LayerNorm(5, dtype=F64), moe_layer(5, 4, n_experts=2, r=3))


# 1. Zhang & Pilanci eq. 7 ---------------------------------------------------------------------------
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


# 2. Explicit per-expert formula -----------------------------------------------------------------
def test_sgd_matches_per_expert_formula_multi_step(matmul_path):
    pairs = make_pairs()
    router = nn.Parameter(torch.randn(4, 5, dtype=F64))
    ref_pairs = [tuple(clone_params(p)) for p in pairs]
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


@pytest.fixture(params=["per_pair", "stacked"])
def matmul_path(request, monkeypatch):
    """Run a test on both the CPU per-pair path and the stacked (accelerator) path."""
    monkeypatch.setattr(riemix.optim.precondition, "_stack_matmuls", lambda device: request.param == "stacked")
    return request.param


def all_jobs(pairs, reg):
    return [Job(a, b, True, reg) for a, b in pairs] + [Job(b, a, False, reg) for a, b in pairs]


@pytest.mark.parametrize("reg", [0.0, 1e-3])
def test_batched_preconditioning_matches_reference(matmul_path, reg):
    pairs = make_pairs()
    set_grads(flat(pairs), 0)
    raw = [p.grad.clone() for p in flat(pairs)]
    scratch = {}
    for _ in range(2):  # the second call reuses the CPU scratch buffers
        grads = {p: p.grad for p in flat(pairs)}
        precondition_grads_(all_jobs(pairs, reg), grads, scratch)
        for a, b in pairs:
            ref_a = precondition_reference(a.grad, b.detach(), True, reg)
            ref_b = precondition_reference(b.grad, a.detach(), False, reg)
            oracle_a, oracle_b = ref_precond(a.detach(), b.detach(), a.grad, b.grad, reg)
            for got, ref, oracle in ((grads[a], ref_a, oracle_a), (grads[b], ref_b, oracle_b)):
                assert got.shape == ref.shape and got.dtype == ref.dtype == F64
                torch.testing.assert_close(got, ref, atol=1e-12, rtol=1e-10)
                torch.testing.assert_close(ref, oracle, atol=1e-12, rtol=1e-10)
    assert bool(scratch) == (matmul_path == "per_pair")
    assert all(torch.equal(p.grad, g) for p, g in zip(flat(pairs), raw, strict=True))


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


@pytest.mark.parametrize("fused", [None, False])
def test_adamw_matches_per_expert_formula_multi_step(matmul_path, fused):
    pairs = make_pairs()
    ref_pairs = [tuple(clone_params(p)) for p in pairs]
    lr, (b1, b2), eps, wd, reg = 0.01, (0.8, 0.9), 1e-8, 0.1, 1e-4
    kw = dict(lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, reg=reg, fused=fused)
    opt = RiemannianAdamW(flat(pairs), lora_pairs=pairs, **kw)
    m, v = {}, {}
    for step in range(1, 4):
        set_grads(flat(pairs), seed=step)
        set_grads(flat(ref_pairs), seed=step)
        opt.step()
        with torch.no_grad():
            for p, g in ref_grads(ref_pairs, reg).items():
                m[p] = b1 * m.get(p, 0) + (1 - b1) * g
                v[p] = b2 * v.get(p, 0) + (1 - b2) * g * g
                p.mul_(1 - lr * wd)
                p -= lr * (m[p] / (1 - b1**step)) / ((v[p] / (1 - b2**step)).sqrt() + eps)
    assert_params_close(flat(pairs), flat(ref_pairs), atol=1e-11)


def test_fused_and_foreach_adamw_agree_with_strided_grads_and_mixed_steps():
    pairs = make_pairs()
    router = nn.Parameter(torch.randn(3, 6, dtype=F64))
    runs = {}
    for fused in (True, False):
        ps = clone_params(flat(pairs) + [router])
        ab = [tuple(ps[i : i + 2]) for i in range(0, len(ps) - 1, 2)]
        opt = RiemannianAdamW(ps, lr=0.01, weight_decay=0.1, fused=fused, lora_pairs=ab)
        for step in range(4):
            for i, p in enumerate(ps):  # strided (transposed) grads; the router skips step 1
                g = torch.randn(p.shape[::-1], dtype=F64, generator=torch.Generator().manual_seed(10 * step + i))
                p.grad = None if (p is ps[-1] and step == 1) else g.permute(*reversed(range(g.dim())))
            opt.step()
        assert opt.state[ps[-1]]["step"] == 3 and opt.state[ps[0]]["step"] == 4
        runs[fused] = ps
    assert_params_close(runs[True], runs[False], atol=1e-13)


def test_adamw_loads_a_state_dict_saved_without_fused():
    pairs = make_pairs(SPECS[:1])
    set_grads(flat(pairs), seed=0)
    opt = RiemannianAdamW(flat(pairs), lr=0.01, lora_pairs=pairs)
    opt.step()
    saved = opt.state_dict()
    for group in saved["param_groups"]:
        del group["fused"]
    fresh = RiemannianAdamW(flat(pairs), lr=0.01, lora_pairs=pairs)
    fresh.load_state_dict(saved)
    assert all(group["fused"] is None for group in fresh.param_groups)
    fresh.step()
    assert fresh.state[pairs[0][0]]["step"] == 2


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


# 3. precondition=False == torch.optim -----------------------------------------------------------
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


# 4. reference_compat ----------------------------------------------------------------------------
def test_reference_compat_adamw_uses_updated_a_and_no_bias_correction(matmul_path):
    pairs = make_pairs(SPECS[:1] + SPECS[-1:])
    ref_pairs = [tuple(clone_params(p)) for p in pairs]
    lr, (b1, b2), wd, reg = 0.01, (0.9, 0.999), 0.1, 1e-3
    kw = dict(lr=lr, weight_decay=wd, reg=reg, reference_compat=True)
    opt = RiemannianAdamW(flat(pairs), lora_pairs=pairs, **kw)
    assert opt.param_groups[0]["eps"] is None  # resolved to 1e-6 inside step
    state = {}

    def adam(p, g):  # reference AdamWr: no bias correction, eps 1e-6, weight decay after the step
        m, v = state.get(p, (0, 0))
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        state[p] = (m, v)
        p -= lr * m / (v.sqrt() + 1e-6)
        p.mul_(1 - lr * wd)

    for step in range(2):
        set_grads(flat(pairs), step)
        set_grads(flat(ref_pairs), step)
        opt.step()
        with torch.no_grad():
            for a, b in ref_pairs:
                adam(a, ref_precond(a, b, a.grad, b.grad, reg)[0])  # A with the pre-step B
                adam(b, ref_precond(a, b, a.grad, b.grad, reg)[1])  # B with the *updated* A
    assert_params_close(flat(pairs), flat(ref_pairs))


def test_reference_compat_explicit_eps_and_b_order_matters():
    pairs = make_pairs(SPECS[:1])
    twin = [tuple(clone_params(p)) for p in pairs]
    set_grads(flat(pairs), 0)
    set_grads(flat(twin), 0)
    RiemannianAdamW(flat(pairs), lr=0.1, eps=1e-3, reference_compat=True, lora_pairs=pairs).step()
    # Same but B not deferred (its group is not reference_compat): B differs, A is identical.
    (a, b), (ta, tb) = pairs[0], twin[0]
    groups = [{"params": [ta]}, {"params": [tb], "reference_compat": False}]
    RiemannianAdamW(groups, lr=0.1, eps=1e-3, reference_compat=True, lora_pairs=twin).step()
    torch.testing.assert_close(a, ta, atol=1e-12, rtol=0)
    assert not torch.allclose(b, tb)
    # With an explicit eps the first compat step is lr * g / (|g| + eps) (no bias correction).
    p0 = nn.Parameter(torch.ones(3, dtype=F64))
    p0.grad = torch.full((3,), 2.0, dtype=F64)
    RiemannianAdamW([p0], lr=1.0, eps=1e-3, reference_compat=True).step()
    expected = 1 - 0.1 * 2.0 / ((0.001 * 4.0) ** 0.5 + 1e-3)
    torch.testing.assert_close(p0.detach(), torch.full((3,), expected, dtype=F64))


def test_reference_compat_sgd_decoupled_weight_decay():
    pairs = make_pairs(SPECS[:1])
    ref_pairs = [tuple(clone_params(p)) for p in pairs]
    set_grads(flat(pairs), 0)
    set_grads(flat(ref_pairs), 0)
    kw = dict(lr=0.1, weight_decay=0.2, reg=1e-3, reference_compat=True)
    RiemannianSGD(flat(pairs), lora_pairs=pairs, **kw).step()
    with torch.no_grad():
        for p, g in ref_grads(ref_pairs, 1e-3).items():
            p.mul_(1 - 0.1 * 0.2).sub_(0.1 * g)
    assert_params_close(flat(pairs), flat(ref_pairs))


# 5. Pairing by identity ---------------------------------------------------------------------------
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


# 6. state_dict round trip -----------------------------------------------------------------------
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
    resumed_pairs = [tuple(clone_params(p)) for p in pairs]
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


# 7. max_grad_norm ---------------------------------------------------------------------------------
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


# 8. Low precision -------------------------------------------------------------------------------
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
    RiemannianSGD(flat(zero_b), lr=0.01, lora_pairs=zero_b).step()  # (0 + reg*I)^-1 @ 0 stays finite
    assert all(torch.isfinite(p).all() for p in flat(zero_b))


def test_singular_gram_falls_back_to_plain_gradient(matmul_path):
    a = nn.Parameter(torch.randn(2, 2, 5, dtype=F64))
    b = nn.Parameter(torch.zeros(2, 4, 2, dtype=F64))  # B = 0 and reg = 0: B^T B is singular
    a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
    a0 = a.detach().clone()
    RiemannianSGD([a, b], lr=0.1, reg=0.0, lora_pairs=[(a, b)]).step()
    torch.testing.assert_close(a.detach(), a0 - 0.1 * a.grad)  # identity fallback, no NaN
    assert torch.isfinite(b).all()


# 9. Validation ------------------------------------------------------------------------------------
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


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(name="adam", lr=0.1), "valid names: adamw, radamw, rsgd, sgd"),
        (dict(name="radamw", lr=-0.1), "Invalid lr"),
        (dict(name="radamw", lr=0.1, gate_lr=-1.0), "Invalid gate_lr"),
        (dict(name="radamw", lr=0.1, loraplus_ratio=0.0), "Invalid loraplus_ratio"),
        (dict(name="rsgd", lr=0.1, gate_max_grad_norm=0.0), "Invalid max_grad_norm"),
    ],
)
def test_build_optimizer_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_optimizer(tiny_model(), **kwargs)


def test_build_optimizer_rejects_frozen_model():
    with pytest.raises(ValueError, match="no trainable parameters; call add_moe_lora first"):
        build_optimizer(tiny_model().requires_grad_(False), "radamw", lr=0.1)


# 10. build_optimizer ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["RAdamW", "adamw", "rsgd", "SGD"])
def test_build_optimizer_groups(name):
    model = tiny_model()
    opt = build_optimizer(
        model, name, lr=0.01, gate_lr=0.002, loraplus_ratio=4.0, gate_max_grad_norm=1.0, weight_decay=0.1,
        momentum=0.9, reg=1e-4,
    )  # fmt: skip
    assert type(opt) is (RiemannianAdamW if "adam" in name.lower() else RiemannianSGD)
    groups = {g["name"]: g for g in opt.param_groups}
    assert list(groups) == ["lora_A", "lora_B", "router", "other"]
    layers = [model[0], model[2]]
    assert ids(groups["lora_A"]["params"]) == ids(m.lora_A for m in layers)
    assert ids(groups["lora_B"]["params"]) == ids(m.lora_B for m in layers)
    assert ids(groups["router"]["params"]) == ids(m.router.weight for m in layers)
    assert ids(groups["other"]["params"]) == ids(model[1].parameters())
    assert [groups[k]["lr"] for k in groups] == [0.01, 0.04, 0.002, 0.01]
    assert groups["router"]["max_grad_norm"] == 1.0 and groups["lora_A"]["max_grad_norm"] is None
    assert all(g["weight_decay"] == 0.1 and g["reg"] == 1e-4 for g in opt.param_groups)
    assert all(g["precondition"] == name.lower().startswith("r") for g in opt.param_groups)
    if isinstance(opt, RiemannianSGD):
        assert groups["lora_A"]["momentum"] == 0.9
    assert {(id(a), id(b)) for a, b in opt._pairs} == {(id(m.lora_A), id(m.lora_B)) for m in layers}
    x = torch.randn(7, 6, dtype=F64)
    model(x).pow(2).sum().backward()
    opt.step()  # runs end to end on the tiny model
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_build_optimizer_matches_manual_preconditioned_step():
    model = tiny_model()
    x = torch.randn(7, 6, dtype=F64)
    model(x).pow(2).sum().backward()
    layers = [model[0], model[2]]
    before = {m: (m.lora_A.detach().clone(), m.lora_B.detach().clone()) for m in layers}
    build_optimizer(model, "rsgd", lr=0.1, loraplus_ratio=2.0, reg=1e-3).step()
    for m in layers:
        a0, b0 = before[m]
        pa, pb = ref_precond(a0, b0, m.lora_A.grad, m.lora_B.grad, 1e-3)
        torch.testing.assert_close(m.lora_A.detach(), a0 - 0.1 * pa, atol=1e-12, rtol=0)
        torch.testing.assert_close(m.lora_B.detach(), b0 - 0.2 * pb, atol=1e-12, rtol=0)


def test_build_optimizer_frozen_b_and_omitted_groups():
    model = nn.Sequential(moe_layer(4, 3), moe_layer(3, 3))
    model[1].lora_B.requires_grad_(False)
    model[0].router.requires_grad_(False)
    model[1].router.requires_grad_(False)
    opt = build_optimizer(model, "radamw", lr=0.01, eps=1e-7, betas=(0.8, 0.9))
    assert [g["name"] for g in opt.param_groups] == ["lora_A", "lora_B"]
    assert [len(g["params"]) for g in opt.param_groups] == [2, 1]
    assert opt.param_groups[0]["eps"] == 1e-7 and opt.param_groups[0]["betas"] == (0.8, 0.9)
    assert len(opt._pairs) == 1  # layer 1's A is unpaired: its B is frozen
    assert sorted(OPTIMIZER_NAMES) == ["adamw", "radamw", "rsgd", "sgd"]


def test_closure_returns_loss():
    model = tiny_model()
    opt = build_optimizer(model, "radamw", lr=0.01)
    x = torch.randn(3, 6, dtype=F64)

    def closure():
        opt.zero_grad()
        loss = model(x).pow(2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert torch.is_tensor(loss) and loss.requires_grad
