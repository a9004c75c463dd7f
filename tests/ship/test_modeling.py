"""``modeling_riemix.py``, the inference layer of every export: riemix's eval forward on torch + transformers."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from torch import nn

from riemix import MoELoRALinear
from riemix.ship import modeling_riemix
from riemix.ship.export import EXPORT_ROUTING_MODES, MODELING_FILE, export_spec, modeling_source
from tests.helpers import F64

MODELING = Path(modeling_riemix.__file__)


def riemix_layer(routing: str, dtype=F64, experts: int = 4, top_k: int = 2, expert_scales: bool = True, seed: int = 0):
    """A riemix layer with random non-zero parameters, a scale factor and a router temperature."""
    torch.manual_seed(seed)
    base = nn.Linear(12, 10, dtype=dtype).requires_grad_(False)
    layer = MoELoRALinear(base, experts, rank=3, alpha=6.0, top_k=top_k, routing=routing, top_p=0.7,
                          expert_scales=expert_scales, router_temperature=1.3)  # fmt: skip
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, dtype=F64).to(p.dtype) * 0.7)
    layer.scale_factor = 0.8
    return layer.eval()


def inference_copy(layer: MoELoRALinear) -> modeling_riemix.MoELoRALinear:
    """The exported layer built from the spec export writes, with the riemix layer's tensors."""
    holder = nn.Module()
    holder.add_module("proj", layer)
    spec = export_spec(holder)["layers"]["proj"]
    base = nn.Linear(layer.in_features, layer.out_features, dtype=layer.base_layer.weight.dtype)
    copy = modeling_riemix.MoELoRALinear(base, spec)
    state = {k: v for k, v in layer.state_dict().items() if not k.startswith("pissa")}
    copy.load_state_dict(state, strict=True)
    return copy


def test_the_file_implements_exactly_the_modes_export_allows():
    assert modeling_riemix.ROUTING_MODES == EXPORT_ROUTING_MODES


def test_the_file_imports_only_torch_and_transformers():
    tree = ast.parse(MODELING.read_text(encoding="utf-8"))
    found = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    found |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert found == {"__future__", "torch", "transformers"}


@pytest.mark.parametrize("routing", EXPORT_ROUTING_MODES)
def test_the_inference_layer_is_riemix_forward_bit_for_bit(routing):
    for dtype in (F64, torch.float32):
        layer = riemix_layer(routing, dtype=dtype)
        x = torch.randn(2, 7, 12, dtype=dtype)
        with torch.no_grad():
            assert torch.equal(inference_copy(layer)(x), layer(x)), (routing, dtype)


def test_without_expert_scales_and_over_bf16_inputs():
    layer = riemix_layer("softmax_topk", dtype=torch.float32, expert_scales=False)
    layer.base_layer.to(torch.bfloat16)
    x = torch.randn(3, 12).to(torch.bfloat16)
    with torch.no_grad():
        got, want = inference_copy(layer)(x), layer(x)
    assert got.dtype == want.dtype == torch.bfloat16 and torch.equal(got, want)


def test_riemix_sparse_expert_path_agrees_up_to_rounding():
    layer = riemix_layer("topk_softmax", dtype=torch.float32, experts=16, top_k=2)
    assert layer.sparse_experts  # riemix computes only the selected pairs on CPU here
    x = torch.randn(9, 12)
    with torch.no_grad():
        torch.testing.assert_close(inference_copy(layer)(x), layer(x), atol=1e-5, rtol=1e-5)


def test_an_unknown_routing_mode_is_refused():
    with pytest.raises(ValueError, match=r"unknown routing mode 'hash'; this file implements \('softmax_topk'"):
        modeling_riemix.MoELoRALinear(nn.Linear(4, 4), {"routing": "hash"})
    with pytest.raises(ValueError, match="unknown routing mode 'hash'"):
        modeling_riemix.route(torch.zeros(2, 4), "hash", 2, 1.0, 1.0)


def test_the_exported_text_names_the_base_class():
    text = modeling_source("MistralForCausalLM")
    assert 'BASE_MODEL_CLASS = "MistralForCausalLM"' in text and "LlamaForCausalLM" not in text
    assert text.replace("MistralForCausalLM", "LlamaForCausalLM") == MODELING.read_text(encoding="utf-8")
    assert MODELING.name == MODELING_FILE
    with pytest.raises(ValueError, match=r"base_class must be a class name, got 'x; import os'"):
        modeling_source("x; import os")


def test_a_config_without_the_layer_list_is_refused():
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
    with pytest.raises(ValueError, match="config.json has no 'riemix_moe_lora' entry listing the adapted layers"):
        modeling_riemix.RiemixMoELoRAForCausalLM(config)
    config.riemix_moe_lora = {"layers": {"model.norm": {"routing": "dense"}}}
    with pytest.raises(ValueError, match="module 'model.norm' is a LlamaRMSNorm, not an nn.Linear"):
        modeling_riemix.RiemixMoELoRAForCausalLM(config)
