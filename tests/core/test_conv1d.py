"""GPT-2-style ``Conv1D`` targets (weight stored ``(in, out)``) and ``re:`` regex targets."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

from riemix import MoELoRAConfig, add_moe_lora, iter_moe_lora_layers, load_adapter, remove_moe_lora, save_adapter
from riemix.core.layer import MoELoRALinear, is_conv1d


def _tiny_gpt2(seed: int = 0, dtype=torch.float32) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=2, n_head=2)
    return GPT2LMHeadModel(cfg).to(dtype).eval()


def _ids() -> torch.Tensor:
    return torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))


def test_a_conv1d_layer_equals_the_same_map_as_an_nn_linear_in_value_and_gradients():
    torch.manual_seed(0)
    conv = Conv1D(5, 3).double()  # nf=5 outputs, nx=3 inputs: weight (3, 5)
    nn.init.normal_(conv.weight)
    nn.init.normal_(conv.bias)
    linear = nn.Linear(3, 5).double()
    with torch.no_grad():
        linear.weight.copy_(conv.weight.t())
        linear.bias.copy_(conv.bias)
    assert is_conv1d(conv) and not is_conv1d(linear)
    kw = dict(num_experts=3, rank=2, alpha=4.0, top_k=2, init="gaussian")
    a, b = MoELoRALinear(conv, **kw), MoELoRALinear(linear, **kw)
    assert (a.in_features, a.out_features, a.transposed) == (3, 5, True)
    with torch.no_grad():
        for name in ("lora_A", "lora_B"):
            getattr(b, name).copy_(torch.randn_like(getattr(a, name)))
            getattr(a, name).copy_(getattr(b, name))
        b.router.weight.copy_(a.router.weight)
    x = torch.randn(4, 6, 3, dtype=torch.float64)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = a(xa), b(xb)
    torch.testing.assert_close(ya, yb, rtol=0, atol=1e-12)
    ya.square().sum().backward()
    yb.square().sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=0, atol=1e-12)
    for name in ("lora_A", "lora_B"):
        torch.testing.assert_close(getattr(a, name).grad, getattr(b, name).grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(a.router.weight.grad, b.router.weight.grad, rtol=0, atol=1e-12)


@pytest.mark.parametrize("init", ["zero_b", "pissa"])
def test_gpt2_adapts_its_conv1d_modules_without_changing_outputs_and_round_trips(tmp_path, init):
    model = _tiny_gpt2(dtype=torch.float64)
    with torch.no_grad():
        before = model(_ids()).logits
    cfg = MoELoRAConfig(num_experts=2, top_k=1, rank=2, target_modules=["c_attn", "c_proj", "c_fc"], init=init)
    add_moe_lora(model, cfg)
    layers = dict(iter_moe_lora_layers(model))
    assert len(layers) == 8 and layers["transformer.h.0.attn.c_attn"].out_features == 48
    with torch.no_grad():
        torch.testing.assert_close(model(_ids()).logits, before, rtol=0, atol=1e-10)
        for layer in layers.values():
            layer.lora_B.normal_()
        adapted = model(_ids()).logits
    save_adapter(model, tmp_path / "a")
    restored = load_adapter(_tiny_gpt2(dtype=torch.float64), tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(restored(_ids()).logits, adapted)
    remove_moe_lora(model)
    original = _tiny_gpt2(dtype=torch.float64)
    for (name, p), (_, q) in zip(model.state_dict().items(), original.state_dict().items(), strict=True):
        assert torch.equal(p, q), name  # PiSSA's residual undone bit for bit on the transposed weight


def test_regex_items_in_a_target_list():
    model = _tiny_gpt2()
    add_moe_lora(model, MoELoRAConfig(num_experts=2, top_k=1, rank=2, target_modules=[r"re:.*\.h\.1\.attn\.c_.*"]))
    assert [n for n, _ in iter_moe_lora_layers(model)] == ["transformer.h.1.attn.c_attn", "transformer.h.1.attn.c_proj"]
    with pytest.raises(ValueError, match=r"target_modules: invalid regex in 're:\(': missing \)"):
        MoELoRAConfig(target_modules=["q_proj", "re:("])
    with pytest.raises(
        ValueError, match=r"matched 'transformer.wte', which is a Embedding, not an nn.Linear or Conv1D"
    ):
        add_moe_lora(_tiny_gpt2(), MoELoRAConfig(target_modules=["re:transformer.wte"]))


def test_a_gpt2_adapter_with_global_routing_merges_into_its_conv1d_weights():
    from riemix import merge_adapter

    model = _tiny_gpt2(dtype=torch.float64)
    cfg = MoELoRAConfig(num_experts=2, top_k=1, rank=2, routing="global", target_modules=["c_attn", "c_fc"])
    add_moe_lora(model, cfg)
    with torch.no_grad():
        for _, layer in iter_moe_lora_layers(model):
            layer.lora_B.normal_()
            layer.global_gate.normal_()
        adapted = model(_ids()).logits
    merge_adapter(model)
    assert not list(iter_moe_lora_layers(model))
    assert all(isinstance(model.get_submodule(f"transformer.h.{i}.attn.c_attn"), Conv1D) for i in range(2))
    with torch.no_grad():
        torch.testing.assert_close(model(_ids()).logits, adapted, rtol=0, atol=1e-10)
