"""RiemannianAdamW: the explicit per-expert formula, fused == foreach, old state dicts, reference_compat."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import riemix.optim.radamw
from riemix.optim import RiemannianAdamW
from tests.helpers import (
    F64,
    SPECS,
    assert_params_close,
    clone_pairs,
    clone_params,
    flat,
    make_pairs,
    ref_grads,
    ref_precond,
    set_grads,
)


@pytest.mark.parametrize("fused,chunk", [(None, 1 << 20), (None, 1), (None, 300), (False, 1 << 20)])
def test_adamw_matches_per_expert_formula_multi_step(matmul_path, monkeypatch, fused, chunk):
    """Also with the fused kernel called per factor (chunk 1 byte) and on chunks of a few factors."""
    monkeypatch.setattr(riemix.optim.radamw, "_CHUNK_BYTES", chunk)
    pairs = make_pairs()
    ref_pairs = clone_pairs(pairs)
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


def test_reference_compat_adamw_uses_updated_a_and_no_bias_correction(matmul_path):
    pairs = make_pairs(SPECS[:1] + SPECS[-1:])
    ref_pairs = clone_pairs(pairs)
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
    twin = clone_pairs(pairs)
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
