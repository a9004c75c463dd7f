"""The sparse expert path (only the selected token-expert pairs) against the dense path and the per-expert loop.

fp64, every routing mode that selects, p ∈ {1, 0.5, 0}, with and without a dropout input, with temperature,
selection noise and a gradient flowing into the logits; values and the gradients of every tensor input.
"""

from __future__ import annotations

import itertools
from unittest import mock

import pytest
import torch
from torch import nn

from riemix import MoELoRAConfig
from riemix.core import sparse
from riemix.core.functional import RouteSpec, moe_lora_linear, reference_moe_lora_linear
from riemix.core.layer import MoELoRALinear
from riemix.core.sparse import SPARSE_MAX_DENSITY, sparse_moe_lora_linear, use_sparse_experts
from riemix.core.tuner import add_moe_lora

D = torch.float64
N, D_IN, D_OUT, E, R, K = 40, 7, 5, 8, 3, 2
SELECTING = ("softmax_topk", "topk_softmax", "top_p")
INPUTS = ("x", "x_drop", "weight", "bias", "lora_a", "lora_b", "router")
TOL = {"atol": 1e-12, "rtol": 1e-10}


def _inputs(dropout: bool, seed: int = 0) -> dict[str, torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed)

    def leaf(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=D).requires_grad_()

    return {
        "x": leaf(N, D_IN),
        "x_drop": leaf(N, D_IN) if dropout else None,  # an independent leaf: its gradient is checked alone
        "weight": leaf(D_OUT, D_IN),
        "bias": leaf(D_OUT),
        "lora_a": leaf(E, R, D_IN),
        "lora_b": leaf(E, D_OUT, R),
        "router": leaf(E, D_IN),
    }


def _run(fn, t, mode, power, compute, k=K, temperature=1.0, noise=None):
    """Outputs and every input's gradient of a loss reading y and the logits (as an auxiliary loss does)."""
    y, logits, gates = fn(
        t["x"], t["weight"], t["bias"], t["lora_a"], t["lora_b"], t["router"], mode, k, power, 1.3, t["x_drop"],
        temperature=temperature, top_p=0.6, noise=noise, expert_compute=compute,
    )  # fmt: skip
    g = torch.Generator().manual_seed(11)
    loss = (y * torch.randn(y.shape, generator=g, dtype=D)).sum()
    loss = loss + (logits * torch.randn(logits.shape, generator=g, dtype=D)).sum()
    names = [n for n in INPUTS if t[n] is not None]
    grads = torch.autograd.grad(loss, [t[n] for n in names])
    return {"y": y, "logits": logits, "gates": gates, **dict(zip(names, grads, strict=True))}


def _assert_same(got: dict, want: dict, what: str) -> None:
    assert set(got) == set(want)
    for name in got:
        torch.testing.assert_close(got[name], want[name], **TOL, msg=lambda m, n=name: f"{what}, {n}: {m}")


@pytest.mark.parametrize(
    ("mode", "power", "dropout"), list(itertools.product(SELECTING, (1.0, 0.5, 0.0), (False, True)))
)
def test_sparse_equals_dense_and_reference(mode, power, dropout):
    t = _inputs(dropout)
    got = _run(moe_lora_linear, t, mode, power, "sparse")
    _assert_same(got, _run(moe_lora_linear, t, mode, power, "dense"), "dense")
    _assert_same(got, _run(reference_moe_lora_linear, t, mode, power, "auto"), "reference")
    for name in ("lora_a", "lora_b", "router", "x"):
        assert got[name].abs().max() > 0, name  # the case tests something


@pytest.mark.parametrize(("mode", "dropout"), list(itertools.product(SELECTING, (False, True))))
def test_sparse_equals_dense_with_temperature_and_selection_noise(mode, dropout):
    t = _inputs(dropout, seed=3)
    noise = 2.0 * torch.randn(N, E, generator=torch.Generator().manual_seed(4), dtype=D)
    got = _run(moe_lora_linear, t, mode, 0.5, "sparse", temperature=0.6, noise=noise)
    clean = _run(moe_lora_linear, t, mode, 0.5, "sparse", temperature=0.6)
    assert not torch.equal(got["gates"] > 0, clean["gates"] > 0)  # the noise changed some selection
    _assert_same(got, _run(moe_lora_linear, t, mode, 0.5, "dense", temperature=0.6, noise=noise), "dense")
    want = _run(reference_moe_lora_linear, t, mode, 0.5, "auto", temperature=0.6, noise=noise)
    _assert_same(got, want, "reference")


@pytest.mark.parametrize(("mode", "k"), [("softmax_topk", 1), ("topk_softmax", E), ("top_p", 1), ("top_p", E)])
def test_sparse_equals_reference_at_the_extreme_k(mode, k):
    t = _inputs(dropout=False, seed=5)
    got = _run(moe_lora_linear, t, mode, 0.5, "sparse", k=k)
    _assert_same(got, _run(reference_moe_lora_linear, t, mode, 0.5, "auto", k=k), "reference")


def test_an_expert_that_receives_no_token_gets_zero_gradient():
    t = _inputs(dropout=True, seed=6)
    with torch.no_grad():
        t["x"][:, 0] = 1.0  # a constant feature, and a router row that reads it with a large negative weight
        t["router"][3] = 0.0
        t["router"][3, 0] = -100.0
    got = _run(moe_lora_linear, t, "softmax_topk", 0.5, "sparse")
    assert not (got["gates"][:, 3] > 0).any()  # expert 3 is never selected
    for name in ("lora_a", "lora_b"):  # (the router row still gets the loss term that reads the logits)
        assert torch.count_nonzero(got[name][3]) == 0, name
        assert torch.count_nonzero(got[name][4]) > 0, name
    _assert_same(got, _run(moe_lora_linear, t, "softmax_topk", 0.5, "dense"), "dense")


def test_inference_runs_no_autograd_node_and_matches_dense():
    t = _inputs(dropout=False, seed=7)
    args = (t["x"], t["weight"], t["bias"], t["lora_a"], t["lora_b"], t["router"], "topk_softmax", K, 0.5, 1.3)
    with torch.no_grad():
        want = moe_lora_linear(*args, expert_compute="dense")
        with mock.patch.object(sparse._SparseMoELoRAFunction, "apply", side_effect=AssertionError("node built")):
            got = moe_lora_linear(*args, expert_compute="sparse")
    assert got[0].grad_fn is None
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, **TOL)


def test_training_saves_no_pair_by_width_tensor():
    t = _inputs(dropout=True, seed=8)
    inputs = [v for v in t.values() if v is not None]
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        moe_lora_linear(
            t["x"], t["weight"], t["bias"], t["lora_a"], t["lora_b"], t["router"], "softmax_topk", K, 0.5, 1.3,
            t["x_drop"], expert_compute="sparse",
        )  # fmt: skip
    own = [s for s in saved if not any(s is i for i in inputs)]  # what the node allocated and kept
    assert own and max(s.numel() for s in own) <= max(N * E, N * K * R)


@pytest.mark.parametrize(
    ("compute", "routing", "top_k", "experts", "want"),
    [
        ("auto", "softmax_topk", 2, 8, False),  # the default adapter stays dense
        ("auto", "softmax_topk", 2, 16, True),
        ("auto", "topk_softmax", 2, 64, True),
        ("auto", "top_p", 2, 64, True),
        ("auto", "top_p", 4, 16, False),
        ("auto", "dense", 64, 64, False),
        ("auto", "global", 64, 64, False),
        ("dense", "softmax_topk", 2, 64, False),
        ("sparse", "softmax_topk", 4, 4, True),
    ],
)
def test_auto_selection(compute, routing, top_k, experts, want):
    assert use_sparse_experts(compute, routing, top_k, experts) is want


def test_auto_stays_dense_on_accelerators_and_forcing_still_works():
    assert use_sparse_experts("auto", "softmax_topk", 2, 64, "cpu")
    assert not use_sparse_experts("auto", "softmax_topk", 2, 64, "cuda")
    assert use_sparse_experts("sparse", "softmax_topk", 2, 64, "cuda")


def test_auto_threshold_keeps_the_default_adapter_dense():
    cfg = MoELoRAConfig()
    assert cfg.expert_compute == "auto" and cfg.top_k > SPARSE_MAX_DENSITY * cfg.num_experts


def test_default_config_layers_are_dense_and_a_forced_layer_reports_sparse():
    model = add_moe_lora(nn.Sequential(nn.Linear(6, 6)), MoELoRAConfig(target_modules=["0"]))
    assert not model[0].sparse_experts
    assert "experts_computed=dense" in repr(model[0])
    model = add_moe_lora(nn.Sequential(nn.Linear(6, 6)), MoELoRAConfig(target_modules=["0"], expert_compute="sparse"))
    assert model[0].sparse_experts and model[0].expert_compute == "sparse" and not model[0].recompute_hidden
    cfg = MoELoRAConfig(target_modules=["0"], recompute_hidden=True)
    assert add_moe_lora(nn.Sequential(nn.Linear(6, 6)), cfg)[0].recompute_hidden


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"expert_compute": "fast"}, r"expert_compute must be one of \('auto', 'dense', 'sparse'\), got 'fast'"),
        ({"expert_compute": "sparse", "routing": "dense"}, r"expert_compute='sparse' needs .*routing='dense'"),
        ({"expert_compute": "sparse", "routing": "global"}, r"expert_compute='sparse' needs .*routing='global'"),
    ],
)
def test_the_layer_and_the_function_reject_what_the_config_rejects(kwargs, match):
    routing, compute = kwargs.get("routing", "softmax_topk"), kwargs["expert_compute"]
    with pytest.raises(ValueError, match=match):
        MoELoRALinear(nn.Linear(4, 4), 4, 2, alpha=4.0, top_k=2, routing=routing, expert_compute=compute)
    with pytest.raises(ValueError, match=match):
        _run(moe_lora_linear, _inputs(dropout=False), routing, 0.5, compute)


def test_the_sparse_function_called_directly_rejects_a_routing_that_selects_nothing():
    t = _inputs(dropout=False)
    spec = RouteSpec("dense", E)
    with pytest.raises(ValueError, match=r"the sparse expert path needs a routing that selects experts, got 'dense'"):
        sparse_moe_lora_linear(t["x"], t["weight"], t["bias"], t["lora_a"], t["lora_b"], t["router"], spec, 0.5, 1.0)


def _layer(compute: str, dropout: float = 0.0) -> MoELoRALinear:
    torch.manual_seed(0)
    layer = MoELoRALinear(
        nn.Linear(D_IN, D_OUT), E, R, alpha=6.0, top_k=K, dropout=dropout, expert_compute=compute,
        router_noise_std=0.5, expert_scales=True,
    ).to(D)  # fmt: skip
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.router.weight.normal_()
        layer.expert_scale.uniform_(0.5, 1.5)
    return layer


@pytest.mark.parametrize("train_mode", [True, False])
def test_layer_sparse_equals_dense_with_dropout_noise_scales_and_record_routing(train_mode):
    results = []
    for compute in ("sparse", "dense"):
        layer = _layer(compute, dropout=0.3).train(train_mode)
        layer.record_routing = True
        x = torch.randn(3, 9, D_IN, dtype=D, generator=torch.Generator().manual_seed(1)).requires_grad_()
        torch.manual_seed(2)  # the same dropout mask and selection noise for both paths
        y = layer(x)
        params = [x, layer.lora_A, layer.lora_B, layer.router.weight, layer.expert_scale]
        grads = torch.autograd.grad((y * torch.linspace(-1, 1, D_OUT, dtype=D)).sum(), params)
        results.append((y, layer.last_router_logits, layer.last_gates, *grads))
        assert layer.sparse_experts == (compute == "sparse")
    assert results[0][2].shape == (27, E)
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, **TOL)


def test_bf16_sparse_runs_and_is_close_to_fp32():
    torch.manual_seed(0)
    layer = MoELoRALinear(nn.Linear(16, 12), 16, 4, alpha=8.0, top_k=2, expert_compute="sparse")
    layer.record_routing = True
    with torch.no_grad():
        layer.lora_B.normal_(std=0.1)
    x = torch.randn(32, 16, requires_grad=True)
    y32, sel32 = layer(x), layer.last_gates > 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16 = layer(x)
    y16.float().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32 and torch.isfinite(layer.lora_A.grad).all()
    same = (sel32 == (layer.last_gates > 0)).all(-1)  # bf16 logits may flip a near-tie selection
    assert same.sum() >= 24
    torch.testing.assert_close(y16.float()[same], y32[same], atol=0.1, rtol=0.05)
