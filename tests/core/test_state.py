"""The adapter tensor table: the state dict a model carries is exactly what the table predicts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from riemix import MoELoRAConfig, add_moe_lora, iter_moe_lora_layers
from riemix.core.state import ADAPTER_TENSORS, BUFFER_SUFFIXES, adapter_state_dict, adapter_tensor_shapes


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(6, 5)
        self.o_proj = nn.Linear(5, 7, bias=False)


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_Block(), _Block()])


VARIANTS = {
    "plain": {},
    "global": {"routing": "global"},
    "scales": {"expert_scales": True},
    "pissa": {"init": "pissa"},
    "global_scales_pissa": {"routing": "global", "expert_scales": True, "init": "pissa"},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_state_dict_keys_and_shapes_follow_the_table(variant):
    torch.manual_seed(0)
    cfg = MoELoRAConfig(num_experts=[3, 2], top_k=1, rank=2, target_modules=["q_proj", "o_proj"], **VARIANTS[variant])
    model = add_moe_lora(_Tiny(), cfg)
    state = adapter_state_dict(model)
    expected = {}
    for name, layer in iter_moe_lora_layers(model):
        expected.update(
            adapter_tensor_shapes(cfg, name, layer.num_experts, layer.rank, layer.in_features, layer.out_features)
        )
    assert list(state) == list(expected)  # same keys, same order (the table's)
    assert {k: tuple(v.shape) for k, v in state.items()} == expected
    suffixes = {k.split(".", 3)[-1] for k in state}
    assert suffixes == {t.suffix for t in ADAPTER_TENSORS if t.in_config(cfg)}
    assert ("router.weight" in suffixes) == (cfg.routing != "global")
    assert ("pissa_down" in suffixes) == (cfg.init == "pissa")
    # parameters are exactly the trainable tensors; the buffers are the PiSSA factors
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {k for k in state if not k.endswith(BUFFER_SUFFIXES)} == trainable
    assert all(not v.requires_grad for v in state.values())


def test_state_dict_shares_storage_with_the_layers():
    cfg = MoELoRAConfig(num_experts=2, top_k=1, rank=2, target_modules=["q_proj"])
    model = add_moe_lora(_Tiny(), cfg)
    state = adapter_state_dict(model)
    with torch.no_grad():
        state["layers.0.q_proj.lora_B"].fill_(0.5)
    assert torch.all(model.layers[0].q_proj.lora_B == 0.5)
    assert BUFFER_SUFFIXES == ("pissa_down", "pissa_up")
