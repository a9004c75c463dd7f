"""The fused MoE-LoRA function against its plain per-expert reference (fp64): values and every gradient."""

from __future__ import annotations

import itertools

import pytest
import torch

from riemix.core.config import DENSE_MODES, ROUTING_MODES
from riemix.core.functional import moe_lora_linear, reference_moe_lora_linear

D = torch.float64
N, D_IN, D_OUT, E, R, K = 9, 7, 5, 4, 3, 2
INPUTS = ("x", "x_drop", "weight", "bias", "lora_a", "lora_b", "router")


def _inputs(mode: str, dropout: bool, bias: bool, seed: int = 0) -> dict[str, torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed)

    def leaf(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=D).requires_grad_()

    x = leaf(N, D_IN)
    return {
        "x": x,
        # an independent leaf, so that its gradient is checked on its own (the layer feeds dropout(x))
        "x_drop": leaf(N, D_IN) if dropout else None,
        "weight": leaf(D_OUT, D_IN),
        "bias": leaf(D_OUT) if bias else None,
        "lora_a": leaf(E, R, D_IN),
        "lora_b": leaf(E, D_OUT, R),
        "router": leaf(E) if mode == "global" else leaf(E, D_IN),
    }


def _run(fn, t, mode, power, temperature=1.0, noise=None, logit_weight=None, seed=1):
    """Outputs and the gradients of every tensor input of a loss that reads both y and the logits."""
    y, logits, gates = fn(
        t["x"], t["weight"], t["bias"], t["lora_a"], t["lora_b"], t["router"], mode, K, power, 1.3,
        t["x_drop"], temperature=temperature, top_p=0.7, noise=noise,
    )  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    loss = (y * torch.randn(y.shape, generator=g, dtype=D)).sum()
    if logit_weight is not None:  # a gradient flowing into the logits (as from an auxiliary loss)
        loss = loss + (logits * logit_weight).sum()
    names = [n for n in INPUTS if t[n] is not None]
    grads = torch.autograd.grad(loss, [t[n] for n in names])
    return (y, logits, gates), dict(zip(names, grads, strict=True))


@pytest.mark.parametrize(
    ("mode", "compute", "power", "dropout"),
    [
        (m, c, p, d)
        for m, c, p, d in itertools.product(ROUTING_MODES, ("dense", "sparse"), (1.0, 0.5, 0.0), (False, True))
        if c == "dense" or m not in DENSE_MODES
    ],
)
def test_recompute_hidden_equals_the_reference(mode, compute, power, dropout):
    """Both paths, with h recomputed in the backward, give the per-expert loop's values and gradients."""
    t = _inputs(mode, dropout, bias=True)

    def recomputing(*args, **kw):
        return moe_lora_linear(*args, **kw, expert_compute=compute, recompute_hidden=True)

    out, grads = _run(recomputing, t, mode, power, logit_weight=0.3)
    ref, ref_grads = _run(reference_moe_lora_linear, t, mode, power, logit_weight=0.3)
    for name, a, b in zip(("y", "logits", "gates"), out, ref, strict=True):
        torch.testing.assert_close(a, b, msg=name)
    assert set(grads) == set(ref_grads)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], msg=name)


@pytest.mark.parametrize(
    ("mode", "power", "dropout"), list(itertools.product(ROUTING_MODES, (1.0, 0.5, 0.0), (False, True)))
)
def test_fused_equals_reference(mode, power, dropout):
    t = _inputs(mode, dropout, bias=True)
    fused, fused_grads = _run(moe_lora_linear, t, mode, power)
    ref, ref_grads = _run(reference_moe_lora_linear, t, mode, power)
    for name, a, b in zip(("y", "logits", "gates"), fused, ref, strict=True):
        torch.testing.assert_close(a, b, msg=name)
    assert set(fused_grads) == set(INPUTS) - ({"x_drop"} if not dropout else set())
    for name in fused_grads:
        torch.testing.assert_close(fused_grads[name], ref_grads[name], msg=name)
    assert fused_grads["router"].abs().max() > 0  # the gates really receive a gradient


@pytest.mark.parametrize(("mode", "dropout"), list(itertools.product(ROUTING_MODES, (False, True))))
def test_fused_equals_reference_with_temperature_logit_gradient_and_no_bias(mode, dropout):
    t = _inputs(mode, dropout, bias=False, seed=3)
    logit_weight = torch.randn(N, E, generator=torch.Generator().manual_seed(4), dtype=D)
    fused, fused_grads = _run(moe_lora_linear, t, mode, 0.5, temperature=0.6, logit_weight=logit_weight)
    ref, ref_grads = _run(reference_moe_lora_linear, t, mode, 0.5, temperature=0.6, logit_weight=logit_weight)
    for name, a, b in zip(("y", "logits", "gates"), fused, ref, strict=True):
        torch.testing.assert_close(a, b, msg=name)
    for name in fused_grads:
        torch.testing.assert_close(fused_grads[name], ref_grads[name], msg=name)


@pytest.mark.parametrize("mode", ["softmax_topk", "topk_softmax", "top_p"])
def test_fused_equals_reference_with_selection_noise(mode):
    t = _inputs(mode, dropout=False, bias=True, seed=5)
    noise = 2.0 * torch.randn(N, E, generator=torch.Generator().manual_seed(6), dtype=D)
    fused, fused_grads = _run(moe_lora_linear, t, mode, 0.5, noise=noise)
    ref, ref_grads = _run(reference_moe_lora_linear, t, mode, 0.5, noise=noise)
    clean, _ = _run(moe_lora_linear, t, mode, 0.5)
    assert not torch.equal(fused[2] > 0, clean[2] > 0)  # the noise changed some token's selection
    for name, a, b in zip(("y", "logits", "gates"), fused, ref, strict=True):
        torch.testing.assert_close(a, b, msg=name)
    for name in fused_grads:
        torch.testing.assert_close(fused_grads[name], ref_grads[name], msg=name)


def test_gate_rescaling_changes_expert_gradients_but_not_values_or_gate_gradients():
    t = _inputs("softmax_topk", dropout=False, bias=True, seed=7)
    (y1, _, _), g1 = _run(reference_moe_lora_linear, t, "softmax_topk", 1.0)
    (y0, _, _), g0 = _run(reference_moe_lora_linear, t, "softmax_topk", 0.0)
    torch.testing.assert_close(y1, y0)
    torch.testing.assert_close(g1["router"], g0["router"])
    torch.testing.assert_close(g1["weight"], g0["weight"])
    for name in ("lora_a", "lora_b", "x"):
        assert not torch.allclose(g1[name], g0[name]), name


def test_fused_skips_gradients_of_inputs_that_do_not_need_them():
    t = _inputs("softmax_topk", dropout=True, bias=True, seed=8)
    for name in ("x", "x_drop", "weight", "bias", "lora_b"):
        t[name] = t[name].detach()
    y, logits, _ = moe_lora_linear(
        t["x"], t["weight"], t["bias"], t["lora_a"], t["lora_b"], t["router"], "softmax_topk", K, 0.5, 1.3,
        t["x_drop"],
    )  # fmt: skip
    ga, gr = torch.autograd.grad(y.sum() + logits.sum(), [t["lora_a"], t["router"]])
    y_ref, logits_ref, _ = reference_moe_lora_linear(
        t["x"], t["weight"], t["bias"], t["lora_a"], t["lora_b"], t["router"], "softmax_topk", K, 0.5, 1.3,
        t["x_drop"],
    )  # fmt: skip
    ga_ref, gr_ref = torch.autograd.grad(y_ref.sum() + logits_ref.sum(), [t["lora_a"], t["router"]])
    torch.testing.assert_close(ga, ga_ref)
    torch.testing.assert_close(gr, gr_ref)


def _saved_bytes_beyond_inputs(fn, x: torch.Tensor, params: list[torch.Tensor]) -> tuple[int, list]:
    """Bytes of the distinct storages a forward saves for backward, other than x's and the params'."""
    skip = {t.untyped_storage().data_ptr() for t in (x, *params)}
    seen: dict[int, tuple] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen.setdefault(storage.data_ptr(), (tuple(t.shape), t.dtype, storage.nbytes()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(v[2] for v in seen.values()), list(seen.values())


@pytest.mark.parametrize("expert_compute", ["dense", "sparse"])
@pytest.mark.parametrize("recompute", [True, False])
def test_training_forward_keeps_the_gates_and_h_unless_recomputed(expert_compute, recompute):
    """Beyond x and the parameters a top-k layer keeps k gates and k indices per token (dense path: fp32
    values + uint8 indices, 5 bytes; sparse path: fp32 gate + int32 token index per pair, 8 bytes), and
    on the dense path unless ``recompute_hidden`` the selected experts' h, (N, k, r): as much as a LoRA of
    rank k·r keeps, its (N, k·r) hidden. Recomputing h, it keeps less than that LoRA."""
    n, d, e, k, r = 64, 32, 8, 2, 4
    torch.manual_seed(0)
    x = torch.randn(n, d, requires_grad=True)
    weight, a, b, router = torch.randn(d, d), torch.randn(e, r, d), torch.randn(e, d, r), torch.randn(e, d)
    params = [weight, *(t.requires_grad_() for t in (a, b, router))]

    def run():
        return moe_lora_linear(
            x, weight, None, a, b, router, "softmax_topk", k, 0.5, 2.0, expert_compute=expert_compute,
            recompute_hidden=recompute,
        )  # fmt: skip

    got, storages = _saved_bytes_beyond_inputs(run, x, params)
    gates = n * k * (5 if expert_compute == "dense" else 8)
    # Unless recomputed, the dense path keeps the selected experts' h, what the LoRA keeps too; the
    # sparse path always recomputes it.
    hidden = 0 if recompute or expert_compute == "sparse" else 4 * n * k * r
    assert got == gates + hidden, storages
    lora_rank_kr = n * k * r * x.element_size()  # what a LoRA of rank k·r saves beyond x
    assert (got < lora_rank_kr) is (recompute or expert_compute == "sparse")
