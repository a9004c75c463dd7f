"""A base that is called, not read: the adapter term alone (``weight=None``) plus the base module's output.

Proved in fp64 against the fused path, which reads the weight: output and every gradient (x, x̃, A, B,
router, expert scales) agree.  Then the quantized bases themselves (bitsandbytes ``Linear4bit`` /
``Linear8bitLt``, CPU): detection, shapes, exact outputs at init, gradients through the packed weight,
PiSSA's refusal and the guard against bitsandbytes' CPU repacking.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from riemix.core.config import DENSE_MODES, ROUTING_MODES, MoELoRAConfig
from riemix.core.functional import moe_lora_linear, reference_moe_lora_linear
from riemix.core.layer import MoELoRALinear, guard_quantized_layers, is_linear_like, is_quantized_linear
from riemix.core.tuner import add_moe_lora

D = torch.float64
N, D_IN, D_OUT, E, R, K = 9, 7, 5, 4, 3, 2


def _leaves(mode: str, dropout: bool, seed: int = 0) -> dict[str, torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed)

    def leaf(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=D).requires_grad_()

    return {
        "x": leaf(N, D_IN),
        "x_drop": leaf(N, D_IN) if dropout else None,
        "weight": leaf(D_OUT, D_IN),
        "bias": leaf(D_OUT),
        "lora_a": leaf(E, R, D_IN),
        "lora_b": leaf(E, D_OUT, R),
        "router": leaf(E) if mode == "global" else leaf(E, D_IN),
    }


def _loss_grads(y, logits, t):
    """Gradients of every tensor input of a loss that reads y and the logits (as an auxiliary loss does)."""
    g = torch.Generator().manual_seed(1)
    loss = (y * torch.randn(y.shape, generator=g, dtype=D)).sum() + (logits * logits).sum() * 0.1
    names = [n for n, v in t.items() if v is not None]
    return dict(zip(names, torch.autograd.grad(loss, [t[n] for n in names], allow_unused=True), strict=True))


@pytest.mark.parametrize(
    ("mode", "compute", "dropout", "fn"),
    [
        (m, c, d, f)
        for m, c, d, f in itertools.product(
            ROUTING_MODES, ("dense", "sparse"), (False, True), (moe_lora_linear, reference_moe_lora_linear)
        )
        if c == "dense" or m not in DENSE_MODES
    ],
)
def test_adapter_term_plus_a_called_base_equals_the_fused_layer(mode, compute, dropout, fn):
    t = _leaves(mode, dropout)
    opts = dict(temperature=0.8, top_p=0.7, expert_compute=compute)

    def call(weight, bias):
        return fn(
            t["x"], weight, bias, t["lora_a"], t["lora_b"], t["router"], mode, K, 0.5, 1.3, t["x_drop"], **opts
        )

    y, logits, gates = call(t["weight"], t["bias"])  # (N, out), (N, E), (N, E)
    want = _loss_grads(y, logits, t)
    term, logits2, gates2 = call(None, None)  # the adapter term alone
    y2 = F.linear(t["x"], t["weight"], t["bias"]) + term  # the base through its own autograd
    got = _loss_grads(y2, logits2, t)
    torch.testing.assert_close(y2, y, rtol=0, atol=1e-12)
    assert torch.equal(logits2, logits) and torch.equal(gates2, gates)
    for name, grad in want.items():
        torch.testing.assert_close(got[name], grad, rtol=0, atol=1e-12, msg=f"d{name}")


@pytest.mark.parametrize("compute", ["dense", "sparse"])
def test_the_adapter_term_alone_has_no_base_and_its_x_gradient_is_the_adapters(compute):
    t = _leaves("softmax_topk", dropout=False)
    with torch.no_grad():
        t["lora_b"].zero_()  # adapter term 0; the router still sends ∂L/∂x (through the logits)
    args = (t["x"], None, None, t["lora_a"], t["lora_b"], t["router"], "softmax_topk", K, 0.5, 1.3)
    term, logits, _ = moe_lora_linear(*args, expert_compute=compute)
    assert torch.equal(term, torch.zeros(N, D_OUT, dtype=D))
    (dx,) = torch.autograd.grad((logits * logits).sum(), [t["x"]])
    torch.testing.assert_close(dx, (2 * logits) @ t["router"], rtol=0, atol=1e-12)  # the router's part only


def test_a_bias_without_a_weight_is_refused():
    t = _leaves("softmax_topk", dropout=False)
    args = (t["x"], None, t["bias"], t["lora_a"], t["lora_b"], t["router"], "softmax_topk", K, 0.5, 1.3)
    with pytest.raises(ValueError, match="a bias needs the base weight; with weight=None the caller adds the base"):
        moe_lora_linear(*args)


def _pair(base: nn.Module, **kw) -> tuple[MoELoRALinear, MoELoRALinear]:
    """The same layer twice: reading the base weight, and calling the base module."""
    torch.manual_seed(0)
    fused = MoELoRALinear(base, num_experts=E, rank=R, alpha=4.0, top_k=K, init="gaussian", **kw)
    called = MoELoRALinear(base, num_experts=E, rank=R, alpha=4.0, top_k=K, init="gaussian", call_base=True, **kw)
    with torch.no_grad():
        fused.lora_B.normal_()
        called.load_state_dict(fused.state_dict())
    return fused, called


@pytest.mark.parametrize(
    ("routing", "compute", "dropout", "scales", "conv1d"),
    [
        ("softmax_topk", "dense", 0.0, False, False),
        ("softmax_topk", "sparse", 0.3, True, False),
        ("top_p", "dense", 0.3, False, False),
        ("dense", "dense", 0.0, True, False),
        ("global", "dense", 0.3, False, False),
        ("softmax_topk", "dense", 0.3, True, True),
    ],
)
def test_the_layer_calling_its_base_equals_the_fused_layer_in_fp64(routing, compute, dropout, scales, conv1d):
    if conv1d:
        from transformers.pytorch_utils import Conv1D

        base = Conv1D(D_OUT, D_IN).to(D)
        nn.init.normal_(base.weight)
    else:
        base = nn.Linear(D_IN, D_OUT).to(D)
    base.requires_grad_(False)
    fused, called = _pair(
        base, routing=routing, expert_compute=compute, dropout=dropout, expert_scales=scales, router_noise_std=0.1
    )
    assert called.call_base and not fused.call_base and not called.quantized_base
    assert "base=called" in repr(called) and "base=called" not in repr(fused)
    x = torch.randn(2, N, D_IN, dtype=D)
    results = []
    for layer in (fused, called):
        layer.train()
        xi = x.clone().requires_grad_()
        torch.manual_seed(5)  # the same dropout mask and selection noise
        y = layer(xi)  # (2, N, out)
        g = torch.Generator().manual_seed(1)
        y.backward(torch.randn(y.shape, generator=g, dtype=D))
        grads = {n: p.grad for n, p in layer.named_parameters() if p.requires_grad}
        results.append((y.detach(), xi.grad, grads))
    (y0, dx0, g0), (y1, dx1, g1) = results
    torch.testing.assert_close(y1, y0, rtol=0, atol=1e-12)
    torch.testing.assert_close(dx1, dx0, rtol=0, atol=1e-12)
    assert g1.keys() == g0.keys() and "lora_A" in g0 and "lora_B" in g0
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=0, atol=1e-12, msg=f"d{name}")


# ---------------------------------------------------------------- bitsandbytes bases (CPU)


def _bnb_linear(kind: str, weight: torch.Tensor, bias: torch.Tensor | None = None) -> nn.Module:
    """A bitsandbytes ``Linear4bit`` (``nf4``/``fp4``) or ``Linear8bitLt`` (``int8``) holding ``weight`` quantized."""
    bnb = pytest.importorskip("bitsandbytes")
    out_f, in_f = weight.shape
    if kind == "int8":
        layer = bnb.nn.Linear8bitLt(in_f, out_f, bias=bias is not None, has_fp16_weights=False)
        layer.weight = bnb.nn.Int8Params(weight.clone(), requires_grad=False, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(in_f, out_f, bias=bias is not None, compute_dtype=torch.float32, quant_type=kind)
        layer.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, quant_type=kind)
    if bias is not None:
        layer.bias = nn.Parameter(bias.clone(), requires_grad=False)
    layer = layer.to("cpu")  # quantizes
    guard_quantized_layers(layer)
    return layer.eval()


def _dequantized(layer: nn.Module) -> torch.Tensor:
    """The ``(out, in)`` fp32 weight a 4-bit layer computes with."""
    import bitsandbytes.functional as bf

    return bf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()


def test_quantized_linear_is_recognised_by_class_and_package():
    bnb = pytest.importorskip("bitsandbytes")
    four = bnb.nn.Linear4bit(64, 32, quant_type="nf4")
    assert is_quantized_linear(four) and is_quantized_linear(bnb.nn.LinearNF4(64, 32))
    assert is_quantized_linear(bnb.nn.Linear8bitLt(64, 32)) and is_linear_like(four)
    assert not is_quantized_linear(nn.Linear(4, 4))
    fake = type("Linear4bit", (nn.Linear,), {})(4, 4)  # the name alone, not from bitsandbytes
    assert not is_quantized_linear(fake)


@pytest.mark.parametrize("kind", ["nf4", "fp4", "int8"])
def test_a_quantized_base_is_called_and_its_output_is_unchanged_at_init(kind):
    torch.manual_seed(0)
    base = _bnb_linear(kind, torch.randn(32, 64), torch.randn(32))
    layer = MoELoRALinear(base, num_experts=E, rank=R, alpha=8.0, top_k=K)
    assert (layer.in_features, layer.out_features) == (64, 32)
    assert layer.quantized_base and layer.call_base
    assert layer.lora_A.dtype == torch.float32 and layer.lora_A.shape == (E, R, 64)
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        assert torch.equal(layer(x), base(x))  # B = 0: exactly the quantized base


@pytest.mark.parametrize("kind", ["nf4", "fp4"])
def test_gradients_through_a_4bit_base_equal_the_fused_layer_on_its_dequantized_weight(kind):
    torch.manual_seed(0)
    base = _bnb_linear(kind, torch.randn(32, 64))
    plain = nn.Linear(64, 32, bias=False).requires_grad_(False)
    with torch.no_grad():
        plain.weight.copy_(_dequantized(base))
    layers = []
    for b in (base, plain):
        torch.manual_seed(1)
        layer = MoELoRALinear(b, num_experts=E, rank=R, alpha=8.0, top_k=K, init="gaussian")
        with torch.no_grad():
            layer.lora_B.normal_()
        layers.append(layer.train())
    x = torch.randn(4, 64)
    out = []
    for layer in layers:
        xi = x.clone().requires_grad_()
        y = layer(xi)
        y.backward(torch.ones_like(y))
        out.append((y.detach(), xi.grad, {n: p.grad for n, p in layer.named_parameters() if p.requires_grad}))
    (y0, dx0, g0), (y1, dx1, g1) = out
    torch.testing.assert_close(y0, y1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx0, dx1, rtol=1e-5, atol=1e-5)  # the base's part comes from bitsandbytes
    for name in g1:
        torch.testing.assert_close(g0[name], g1[name], rtol=1e-5, atol=1e-5, msg=f"d{name}")


def test_a_quantized_base_refuses_call_base_false_base_weight_and_pissa():
    base = _bnb_linear("nf4", torch.randn(32, 64))
    with pytest.raises(ValueError, match="call_base=False reads the base weight, but Linear4bit holds it quantized"):
        MoELoRALinear(base, num_experts=E, rank=R, alpha=8.0, top_k=K, call_base=False)
    with pytest.raises(ValueError, match=r"init='pissa' factors the base weight, but .* quantized Linear4bit"):
        MoELoRALinear(base, num_experts=E, rank=R, alpha=8.0, top_k=K, init="pissa")
    layer = MoELoRALinear(base, num_experts=E, rank=R, alpha=8.0, top_k=K)
    with pytest.raises(ValueError, match="the base layer is a bitsandbytes Linear4bit: its weight is stored quantized"):
        layer.base_weight  # noqa: B018


def test_add_moe_lora_refuses_pissa_on_quantized_targets_and_leaves_the_model_alone():
    model = nn.Sequential(_bnb_linear("nf4", torch.randn(64, 64)), nn.Linear(64, 64))
    config = MoELoRAConfig(num_experts=2, top_k=1, rank=2, target_modules=["0", "1"], init="pissa")
    with pytest.raises(ValueError, match=r"init='pissa' factors the base weights, but 1 targeted module\(s\) are "
                       r"quantized \(e\.g\. '0', a bitsandbytes Linear4bit\)"):  # fmt: skip
        add_moe_lora(model, config)
    assert isinstance(model[1], nn.Linear) and model[1].weight.requires_grad


def test_guard_refuses_a_4bit_layer_that_bitsandbytes_repacked_for_cpu():
    model = nn.Sequential(_bnb_linear("nf4", torch.randn(64, 64)))
    model[0].weight.quant_state.packing_format_for_cpu = True  # what an eval-mode forward does on AVX512-BF16
    with pytest.raises(ValueError, match=r"1 bitsandbytes 4-bit layer\(s\) \(e\.g\. 0\) were repacked for CPU"):
        guard_quantized_layers(model)
    config = MoELoRAConfig(num_experts=2, top_k=1, rank=2, target_modules=["0"])
    with pytest.raises(ValueError, match="were repacked for CPU inference"):
        add_moe_lora(model, config)


def test_guarded_4bit_layers_keep_their_input_gradient_after_an_eval_forward():
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(64, 64), requires_grad=False, quant_type="nf4")
    layer = layer.to("cpu").eval()
    assert guard_quantized_layers(nn.Sequential(layer)) == ["0"]
    assert not getattr(layer, "support_avx512bf16_for_cpu", False)
    x = torch.randn(5, 64)
    with torch.no_grad():
        y_eval = layer(x)  # would repack on an AVX512-BF16 CPU without the guard
    xi = x.clone().requires_grad_()
    y = layer(xi)
    y.sum().backward()
    assert torch.equal(y.detach(), y_eval)  # training and evaluation compute the same numbers
    torch.testing.assert_close(xi.grad, torch.ones(5, 64) @ _dequantized(layer), rtol=0, atol=1e-5)


def test_remove_moe_lora_gives_the_quantized_base_back():
    from riemix.core.tuner import remove_moe_lora

    base = _bnb_linear("nf4", torch.randn(64, 64))
    model = nn.Sequential(base)
    x = torch.randn(3, 64)
    with torch.no_grad():
        want = model(x)
    add_moe_lora(model, MoELoRAConfig(num_experts=2, top_k=1, rank=2, target_modules=["0"]))
    assert isinstance(model[0], MoELoRALinear) and model[0].base_layer is base
    remove_moe_lora(model)
    assert model[0] is base
    with torch.no_grad():
        assert torch.equal(model(x), want)


def test_merging_into_a_quantized_base_is_refused():
    from riemix import merge_adapter

    torch.manual_seed(0)
    base = nn.Sequential(_bnb_linear("nf4", torch.randn(32, 64)))
    add_moe_lora(base, MoELoRAConfig(num_experts=1, top_k=1, rank=2, routing="global", target_modules=["0"]))
    with pytest.raises(ValueError, match=r"cannot merge into a quantized base \(1 layer\(s\), e.g. '0'\)"):
        merge_adapter(base)
