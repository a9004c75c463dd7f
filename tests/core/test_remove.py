"""remove_moe_lora (riemix.core.tuner): the original model back, bit for bit, PiSSA included."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import riemix
from riemix import MoELoRAConfig, MoELoRALinear, add_moe_lora, iter_moe_lora_layers, remove_moe_lora
from riemix.core.init import pissa_fixes, pissa_original, pissa_residual, same_bits
from tests.helpers import make_tiny_bert, make_tiny_llama, tiny_inputs

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]
INITS = {
    "zero_b": dict(init="zero_b"),
    "pissa_topk": dict(init="pissa"),
    "pissa_dense_scales": dict(init="pissa", routing="dense", expert_scales=True),
    "pissa_global": dict(init="pissa", routing="global"),
    "small_b_warmup": dict(init="small_b", scale_warmup_steps=3),
}


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_state(model: nn.Module, want: dict[str, torch.Tensor]) -> None:
    got = model.state_dict()
    assert list(got) == list(want)
    bad = [k for k in want if not same_bits(got[k], want[k])]
    assert not bad, bad


@torch.no_grad()
def _perturb(model: nn.Module, seed: int) -> None:
    """A trained adapter: every adapter parameter moved (B no longer zero), the scale warm-up over."""
    g = torch.Generator().manual_seed(seed)
    for _, layer in iter_moe_lora_layers(model):
        layer.scale_factor = 1.0
        for p in layer.parameters(recurse=True):
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("init", list(INITS))
def test_remove_gives_back_the_original_model_bit_for_bit(init, dtype):
    model = make_tiny_llama(dtype=dtype)
    want, grads = _snapshot(model), {n: p.requires_grad for n, p in model.named_parameters()}
    inputs = tiny_inputs()
    with torch.no_grad():
        before = model(**inputs).logits
    cfg = MoELoRAConfig(num_experts=4, top_k=2, rank=2, alpha=8.0, target_modules=TARGETS, **INITS[init])
    add_moe_lora(model, cfg)
    _perturb(model, seed=1)
    with torch.no_grad():
        assert not torch.equal(model(**inputs).logits, before)  # the adapter really changed the model

    assert remove_moe_lora(model) is model
    assert not any(isinstance(m, MoELoRALinear) for m in model.modules())
    assert not hasattr(model, "moe_lora_config") and not hasattr(model, "moe_lora_requires_grad")
    _assert_same_state(model, want)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, before)


def test_remove_after_training_steps_and_load_adapter(tmp_path):
    """A PiSSA adapter trained by the optimizer, saved, loaded on a fresh model, removed from both."""
    model, want = make_tiny_llama(), _snapshot(make_tiny_llama())
    add_moe_lora(model, MoELoRAConfig(num_experts=4, top_k=2, rank=2, alpha=8.0, init="pissa", target_modules=TARGETS))
    opt = riemix.build_optimizer(model, "radamw", lr=1e-2)
    ids = tiny_inputs()["input_ids"]
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    riemix.save_adapter(model, tmp_path / "adapter")
    loaded = riemix.load_adapter(make_tiny_llama(), tmp_path / "adapter")
    for m in (model, loaded):
        remove_moe_lora(m)
        _assert_same_state(m, want)


def test_remove_restores_requires_grad_flags_recorded_by_add():
    model = make_tiny_bert()
    model.bert.embeddings.word_embeddings.weight.requires_grad_(False)  # a user's own choice survives
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    add_moe_lora(model, MoELoRAConfig(num_experts=2, top_k=1, rank=2, target_modules=["query", "value"]))
    model.classifier.weight.requires_grad_(True)  # e.g. the trainer unfreezes the head
    remove_moe_lora(model)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads


def test_remove_on_a_bare_layer_returns_its_base():
    base = nn.Linear(6, 5)
    weight = base.weight.detach().clone()
    layer = MoELoRALinear(base, 3, 2, alpha=4.0, top_k=2, init="pissa")
    assert not torch.equal(base.weight, weight)
    assert remove_moe_lora(layer) is base
    assert same_bits(base.weight.detach(), weight)


def test_remove_without_adapters_is_an_error():
    with pytest.raises(ValueError, match=r"LlamaForCausalLM has no MoE-LoRA adapters \(no MoELoRALinear module\)"):
        remove_moe_lora(make_tiny_llama())


def test_remove_refuses_a_changed_pissa_residual_and_leaves_the_model_alone():
    model = make_tiny_llama()
    add_moe_lora(model, MoELoRAConfig(num_experts=2, top_k=1, rank=2, init="pissa", target_modules=["v_proj"]))
    layer = model.model.layers[1].self_attn.v_proj
    with torch.no_grad():
        layer.base_layer.weight.add_(1.0)  # e.g. the base weight was trained after the init
    with pytest.raises(ValueError, match=r"cannot restore the original weight of 'model.layers.1.self_attn.v_proj' "
                                         r"exactly: its base weight is no longer the PiSSA residual"):
        remove_moe_lora(model)
    assert isinstance(model.model.layers[0].self_attn.v_proj, MoELoRALinear)  # nothing was undone
    assert hasattr(model, "moe_lora_config")


def test_remove_refuses_pissa_factors_without_the_rounding_fixes():
    model = make_tiny_llama()
    add_moe_lora(model, MoELoRAConfig(num_experts=2, top_k=1, rank=2, init="pissa", target_modules=["q_proj"]))
    model.model.layers[0].self_attn.q_proj.pissa_fix_index = None
    with pytest.raises(ValueError, match=r"'model.layers.0.self_attn.q_proj' exactly: its PiSSA factors are set but "
                                         r"the entries needed to undo the residual's rounding are not"):
        remove_moe_lora(model)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_pissa_original_inverts_the_rounded_residual(dtype):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(40, 24, generator=g).to(dtype)
    weight[0, 0], weight[0, 1] = -0.0, 0.0  # signed zeros must come back too
    down = torch.randn(6, 24, generator=g, dtype=torch.float64)
    up = torch.randn(40, 6, generator=g, dtype=torch.float64)
    residual = pissa_residual(weight, down, up)
    index, value = pissa_fixes(weight, residual, down, up)
    assert index.dtype == torch.int32 and 0 < index.numel() < weight.numel()  # rounding does lose entries
    assert same_bits(pissa_original(residual, down, up, index, value), weight)


def test_pissa_down_does_not_alias_lora_a_in_fp64():
    layer = MoELoRALinear(nn.Linear(8, 8, dtype=torch.float64), 2, 2, alpha=4.0, top_k=1, init="pissa")
    down = layer.pissa_down.clone()
    with torch.no_grad():
        layer.lora_A.add_(1.0)
    assert torch.equal(layer.pissa_down, down)


def test_same_bits_is_stricter_than_equal():
    assert torch.equal(torch.tensor([0.0]), torch.tensor([-0.0]))
    assert not same_bits(torch.tensor([0.0]), torch.tensor([-0.0]))
    assert not same_bits(torch.tensor([1.0]), torch.tensor([1.0], dtype=torch.float64))
    assert same_bits(torch.tensor([float("nan")]), torch.tensor([float("nan")]))
