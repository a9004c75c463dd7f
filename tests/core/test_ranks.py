"""Per-expert ranks: a mixed-rank layer against a plain loop over experts of their own ranks (fp64)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from riemix.core.init import zero_rank_padding
from riemix.core.layer import MoELoRALinear
from riemix.core.merge import merged_weight

F64 = torch.float64
RANKS = [2, 4, 1, 3, 4]  # E = 5, R = 4
D_IN, D_OUT, ALPHA = 7, 6, 6.0


def plain_gates(logits, mode, k, temp=1.0, top_p=1.0):
    """softmax(l/T) over each token's selected set, written plainly (E·softmax(w/T) for ``"global"``)."""
    n, e = logits.shape
    z = logits / temp
    if mode == "global":
        return e * torch.softmax(z, dim=-1)
    mask = torch.zeros(n, e, dtype=torch.bool)
    for t in range(n):
        if mode == "dense":
            mask[t] = True
        elif mode == "top_p":
            probs = torch.softmax(z[t], dim=-1).tolist()
            mass = 0.0
            for count, i in enumerate(sorted(range(e), key=lambda i: -probs[i])):
                if count >= k or (count >= 1 and mass >= top_p):
                    break
                mask[t, i], mass = True, mass + probs[i]
        else:
            mask[t, z[t].topk(k).indices] = True
    return torch.softmax(z.masked_fill(~mask, float("-inf")), dim=-1)


def per_expert_reference(layer: MoELoRALinear, x, mode, k, p, temp=1.0, top_p=1.0):
    """y = base(x) + Σᵢ [cᵢ·eᵢ + (gᵢ − cᵢ)·stopgrad(eᵢ)] with eᵢ = sᵢ·f·σᵢ ⊙ Bᵢ[:, :rᵢ] Aᵢ[:rᵢ] x, sᵢ = alpha/rᵢ.

    Each expert uses only its own rᵢ rows of A and columns of B (the padding is never read).
    """
    logits = layer.global_gate.expand(x.shape[0], -1) if mode == "global" else x @ layer.router.weight.t()
    g = plain_gates(logits, mode, k, temp, top_p)
    y = layer.base_layer(x)
    for i, r in enumerate(layer.expert_ranks):
        s = layer.alpha / (math.sqrt(r) if layer.use_rslora else r)
        e_i = s * layer.scale_factor * (x @ layer.lora_A[i, :r].t()) @ layer.lora_B[i, :, :r].t()  # (N, out)
        if layer.expert_scale is not None:
            e_i = e_i * layer.expert_scale[i]
        g_i = g[:, i : i + 1]
        c_i = torch.where(g_i > 0, g_i.detach() ** p, torch.zeros_like(g_i))
        y = y + c_i * e_i + (g_i - c_i) * e_i.detach()
    return y


def mixed_layer(routing="softmax_topk", k=2, p=0.5, seed=0, **kw) -> MoELoRALinear:
    torch.manual_seed(seed)
    layer = MoELoRALinear(nn.Linear(D_IN, D_OUT), len(RANKS), RANKS, ALPHA, k, routing, p, **kw).to(F64)
    with torch.no_grad():  # non-trivial B, router / global gate, scales; the padding zeroed again
        layer.lora_B.normal_()
        zero_rank_padding(layer)
        (layer.global_gate if layer.router is None else layer.router.weight).normal_()
        if layer.expert_scale is not None:
            layer.expert_scale.uniform_(0.5, 1.5)
    return layer


MODES = [
    ("softmax_topk", 2, {}),
    ("topk_softmax", 3, {}),
    ("dense", 5, {}),
    ("top_p", 3, {"top_p": 0.6}),
    ("global", 5, {}),
]
CASES = [
    (mode, k, kw, p, compute)
    for (mode, k, kw), p, compute in itertools.product(MODES, [1.0, 0.5, 0.0], ["dense", "sparse"])
    if not (compute == "sparse" and mode in ("dense", "global"))
]


@pytest.mark.parametrize("mode,k,kw,p,compute", CASES)
def test_mixed_ranks_match_per_expert_loop(mode, k, kw, p, compute):
    layer = mixed_layer(mode, k, p, expert_compute=compute, **kw)
    torch.manual_seed(1)
    x = torch.randn(13, D_IN, dtype=F64, requires_grad=True)
    upstream = torch.randn(13, D_OUT, dtype=F64)
    wrt = [x, layer.lora_A, layer.lora_B, layer.gate_weight]

    y = layer(x)
    grads = torch.autograd.grad((y * upstream).sum(), wrt)
    y_ref = per_expert_reference(layer, x, mode, k, p, top_p=kw.get("top_p", 1.0))
    refs = torch.autograd.grad((y_ref * upstream).sum(), wrt)

    tol = {"atol": 1e-12, "rtol": 1e-10}
    torch.testing.assert_close(y, y_ref, **tol)
    for name, got, want in zip(["x", "A", "B", "router"], grads, refs, strict=True):
        assert want.abs().max() > 0, f"reference gradient of {name} is zero; the case tests nothing"
        torch.testing.assert_close(got, want, **tol, msg=lambda m, n=name: f"grad {n}: {m}")
    pad = ~layer.rank_mask()  # (E, R)
    assert torch.equal(grads[1][pad], torch.zeros_like(grads[1][pad]))  # exactly zero, not just small
    assert torch.equal(grads[2].transpose(1, 2)[pad], torch.zeros_like(grads[2].transpose(1, 2)[pad]))


@pytest.mark.parametrize("variant", ["rslora", "expert_scales", "scale_factor"])
def test_mixed_rank_variants_match_per_expert_loop(variant):
    kw = {"use_rslora": True} if variant == "rslora" else {"expert_scales": True} if variant == "expert_scales" else {}
    layer = mixed_layer("softmax_topk", 2, 0.5, **kw)
    if variant == "scale_factor":
        layer.scale_factor = 0.3
    torch.manual_seed(2)
    x = torch.randn(9, D_IN, dtype=F64, requires_grad=True)
    y_ref = per_expert_reference(layer, x, "softmax_topk", 2, 0.5)
    torch.testing.assert_close(layer(x), y_ref, atol=1e-12, rtol=1e-10)
    if variant == "rslora":
        assert layer.expert_scaling == [ALPHA / math.sqrt(r) for r in RANKS]


def test_scaling_is_expert_zeros_and_ratios_fold_into_b():
    layer = mixed_layer()
    assert (layer.rank, layer.expert_ranks, layer.scaling) == (4, RANKS, ALPHA / 2)
    assert layer.expert_scaling == [ALPHA / r for r in RANKS]
    assert layer.rank_scale.tolist() == [1.0, 0.5, 2.0, 2 / 3, 0.5]
    torch.testing.assert_close(layer.effective_lora_b(), layer.lora_B * layer.rank_scale.view(-1, 1, 1))
    assert "expert_ranks=[2, 4, 1, 3, 4]" in repr(layer)


def test_uniform_rank_list_is_the_plain_layer():
    torch.manual_seed(0)
    plain = MoELoRALinear(nn.Linear(D_IN, D_OUT), 3, 2, ALPHA, 2)
    torch.manual_seed(0)
    listed = MoELoRALinear(nn.Linear(D_IN, D_OUT), 3, [2, 2, 2], ALPHA, 2)
    assert listed.rank_scale is None and listed.effective_lora_b() is listed.lora_B
    assert (listed.rank, listed.scaling) == (plain.rank, plain.scaling)
    x = torch.randn(5, D_IN)
    assert torch.equal(listed(x), plain(x))


@pytest.mark.parametrize("init", ["zero_b", "gaussian", "orthogonal", "small_b"])
def test_every_init_leaves_the_rank_padding_zero(init):
    torch.manual_seed(0)
    layer = MoELoRALinear(nn.Linear(16, 9), 5, RANKS, ALPHA, 2, init=init)
    pad = ~layer.rank_mask()
    assert torch.equal(layer.lora_A[pad], torch.zeros_like(layer.lora_A[pad]))
    assert torch.equal(layer.lora_B.transpose(1, 2)[pad], torch.zeros_like(layer.lora_B.transpose(1, 2)[pad]))
    assert (layer.lora_A[~pad] != 0).all()  # every used row was drawn
    if init == "orthogonal":  # the used rows stay orthonormal jointly (E·R = 20 > 16: per expert here)
        for i, r in enumerate(RANKS):
            gram = layer.lora_A[i, :r] @ layer.lora_A[i, :r].t()
            torch.testing.assert_close(gram, torch.eye(r), atol=1e-5, rtol=0)


def test_gaussian_init_draws_expert_i_with_std_one_over_its_rank():
    torch.manual_seed(0)
    layer = MoELoRALinear(nn.Linear(4000, 3), 2, [1, 8], ALPHA, 1, init="gaussian")
    assert layer.lora_A[0, 0].std().item() == pytest.approx(1.0, rel=0.05)
    assert layer.lora_A[1].std().item() == pytest.approx(1 / 8, rel=0.05)


@pytest.mark.parametrize(
    "rank,match",
    [
        ([2, 3], r"rank: a per-expert list needs num_experts=3 entries, got \[2, 3\]"),
        ([2, 0, 1], r"rank must be an int >= 1 or a list of them, got \[2, 0, 1\]"),
        (True, r"rank must be an int >= 1 or a list of them, got True"),
        ("4", r"rank must be an int >= 1 or a list of them, got '4'"),
    ],
)
def test_bad_expert_ranks_are_refused(rank, match):
    with pytest.raises(ValueError, match=match):
        MoELoRALinear(nn.Linear(D_IN, D_OUT), 3, rank, ALPHA, 2)


def test_pissa_refuses_mixed_ranks_and_maturity_routing():
    with pytest.raises(ValueError, match=r"init='pissa' needs experts of one rank, got expert_ranks=\[2, 4\]"):
        MoELoRALinear(nn.Linear(D_IN, D_OUT), 2, [2, 4], ALPHA, 1, init="pissa")
    with pytest.raises(ValueError, match=r"init='pissa' .* it needs mature_after_steps=0, got 3"):
        MoELoRALinear(nn.Linear(D_IN, D_OUT), 2, 2, ALPHA, 1, init="pissa", mature_after_steps=3)


def test_merged_weight_of_a_global_mixed_rank_layer_matches_its_forward():
    layer = mixed_layer("global", 5, 1.0).eval()
    x = torch.randn(4, D_IN, dtype=F64)
    merged = merged_weight(layer)
    torch.testing.assert_close(x @ merged.t() + layer.base_layer.bias, layer(x), atol=1e-12, rtol=1e-10)
