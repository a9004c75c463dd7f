"""trainable_parameters (riemix.core.summary): counts by kind on a tiny Llama, computed by hand."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import riemix
from riemix import MoELoRAConfig, add_moe_lora, trainable_parameters
from riemix.core.state import ADAPTER_TENSORS
from riemix.core.summary import _KIND_OF_SUFFIX, PARAMETER_KINDS, logical_numel
from tests.helpers import make_tiny_llama

# The tiny Llama (tests/helpers.py): hidden 32, MLP 64, vocabulary 64, 2 blocks, 4 heads of 8, 2 KV heads.
HIDDEN, MLP, VOCAB = 32, 64, 64
Q_OUT, V_OUT = 32, 16  # q_proj: 32 -> 4·8, v_proj: 32 -> 2·8
BLOCK = (
    HIDDEN * Q_OUT
    + HIDDEN * 16
    + HIDDEN * V_OUT
    + Q_OUT * HIDDEN  # q, k, v, o (no biases)
    + 3 * HIDDEN * MLP  # gate, up, down
    + 2 * HIDDEN  # two RMSNorm weights
)
BASE = VOCAB * HIDDEN + 2 * BLOCK + HIDDEN + VOCAB * HIDDEN  # embeddings, blocks, final norm, lm_head
E, R = 4, 2


def test_base_model_without_adapters_counts_everything_as_other():
    model = make_tiny_llama()
    assert BASE == 22688
    assert trainable_parameters(model) == {
        "lora_A": 0, "lora_B": 0, "router": 0, "expert_scale": 0, "other": BASE, "total": BASE, "all": BASE
    }  # fmt: skip


def test_router_adapter_with_an_unfrozen_head():
    model = make_tiny_llama()
    add_moe_lora(model, MoELoRAConfig(num_experts=E, top_k=2, rank=R, target_modules=["q_proj", "v_proj"]))
    model.lm_head.weight.requires_grad_(True)  # e.g. a task head that trains too
    lora_a = 2 * (E * R * HIDDEN + E * R * HIDDEN)  # two blocks x (q, v): (E, r, in)
    lora_b = 2 * (E * Q_OUT * R + E * V_OUT * R)  # (E, out, r)
    router = 2 * 2 * E * HIDDEN  # (E, in) per adapted module
    assert (lora_a, lora_b, router) == (1024, 768, 512)
    head = VOCAB * HIDDEN
    assert trainable_parameters(model) == {
        "lora_A": lora_a,
        "lora_B": lora_b,
        "router": router,
        "expert_scale": 0,
        "other": head,
        "total": lora_a + lora_b + router + head,
        "all": BASE + lora_a + lora_b + router,
    }


def test_global_gates_and_expert_scales():
    model = make_tiny_llama()
    cfg = MoELoRAConfig(num_experts=E, top_k=2, rank=R, routing="global", expert_scales=True, target_modules=["v_proj"])
    add_moe_lora(model, cfg)
    lora_a, lora_b = 2 * E * R * HIDDEN, 2 * E * V_OUT * R
    gates, scales = 2 * E, 2 * E * V_OUT  # (E,) logits and (E, out) scales per adapted module
    counts = trainable_parameters(model)
    assert counts == {
        "lora_A": lora_a,
        "lora_B": lora_b,
        "router": gates,
        "expert_scale": scales,
        "other": 0,
        "total": lora_a + lora_b + gates + scales,
        "all": BASE + lora_a + lora_b + gates + scales,
    }
    for _, layer in riemix.iter_moe_lora_layers(model):  # frozen adapter parts are not trainable
        layer.lora_A.requires_grad_(False)
    assert trainable_parameters(model)["lora_A"] == 0 and trainable_parameters(model)["all"] == counts["all"]


def test_tied_parameters_count_once():
    model = nn.Sequential(nn.Linear(3, 3, bias=False), nn.Linear(3, 3, bias=False))
    model[1].weight = model[0].weight
    assert trainable_parameters(model) == {**dict.fromkeys(PARAMETER_KINDS, 0), "other": 9, "total": 9, "all": 9}


def test_every_adapter_parameter_has_a_kind():
    suffixes = {t.suffix for t in ADAPTER_TENSORS if t.parameter}
    assert set(_KIND_OF_SUFFIX) == suffixes
    assert set(_KIND_OF_SUFFIX.values()) | {"other"} == set(PARAMETER_KINDS)


def test_counts_fp64_and_bf16_alike():
    counts = [
        trainable_parameters(add_moe_lora(make_tiny_llama(dtype=d), MoELoRAConfig(target_modules=["q_proj"])))
        for d in (torch.float64, torch.bfloat16)
    ]
    assert counts[0] == counts[1]


def test_a_4bit_base_weight_counts_by_its_logical_shape_not_its_packed_bytes():
    bnb = pytest.importorskip("bitsandbytes")
    layer = bnb.nn.Linear4bit(64, 32, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(32, 64), requires_grad=False, quant_type="nf4")
    layer = layer.to("cpu")  # quantizes: the data becomes (1024, 1) uint8
    assert layer.weight.numel() == 32 * 64 // 2
    assert logical_numel(layer.weight) == 32 * 64
    assert trainable_parameters(nn.Sequential(layer))["all"] == 32 * 64
