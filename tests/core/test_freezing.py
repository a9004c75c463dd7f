"""Frozen experts (riemix.core.freezing, MoELoRALinear.freeze_expert): masks, the rows they select, the
model-level API, its validation and the masks' adapter-format helpers."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import riemix
from riemix import MoELoRAConfig, MoELoRALinear, add_moe_lora
from riemix.core.freezing import (
    FROZEN_SUFFIXES,
    check_experts,
    freeze_experts,
    frozen_expert_map,
    frozen_state_dict,
    load_frozen_state,
    split_frozen_state,
    unfreeze_experts,
)


def tiny_model(routing: str = "softmax_topk", expert_scales: bool = True, num_experts=4) -> nn.Module:
    """Two adapted Linear layers ``"0"`` (8 -> 8) and ``"2"`` (8 -> 6)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 6))
    cfg = MoELoRAConfig(
        num_experts=num_experts, rank=2, top_k=2, routing=routing, target_modules=["0", "2"],
        init="gaussian", expert_scales=expert_scales,
    )  # fmt: skip
    return add_moe_lora(model, cfg)


def test_masks_are_unfrozen_bool_buffers_outside_the_state_dict():
    layer = tiny_model()[0]
    for name in FROZEN_SUFFIXES:
        mask = getattr(layer, name)
        assert mask.dtype == torch.bool and mask.shape == (4,) and not mask.any()
        assert name in dict(layer.named_buffers())
    assert not any(k.startswith("frozen") for k in layer.state_dict())  # old state dicts still load strictly
    assert layer.frozen_parameter_rows() == []


def test_freeze_expert_selects_its_rows_of_a_b_and_the_expert_scale():
    layer = tiny_model()[0]
    layer.freeze_expert(2)
    layer.freeze_expert(0)
    layer.freeze_expert(2)  # again: a no-op
    assert layer.frozen_experts.tolist() == [True, False, True, False]
    assert not layer.frozen_router_rows.any()
    rows = layer.frozen_parameter_rows()
    assert [p for p, _ in rows] == [layer.lora_A, layer.lora_B, layer.expert_scale]
    assert all(index.tolist() == [0, 2] and index.dtype == torch.int64 for _, index in rows)


@pytest.mark.parametrize("routing", ["softmax_topk", "global"])
def test_router_true_also_freezes_the_router_row_or_global_gate_entry(routing):
    layer = tiny_model(routing=routing, expert_scales=False)[0]
    layer.freeze_expert(1, router=True)
    layer.freeze_expert(1)  # router=False never unfreezes a frozen router row
    rows = layer.frozen_parameter_rows()
    assert [p for p, _ in rows] == [layer.lora_A, layer.lora_B, layer.gate_weight]
    assert rows[-1][1].tolist() == [1]
    layer.unfreeze_expert(1)
    assert not layer.frozen_experts.any() and not layer.frozen_router_rows.any()
    assert layer.frozen_parameter_rows() == []


def test_rows_follow_direct_writes_and_loads_of_the_masks():
    layer = tiny_model()[0]
    assert layer.frozen_parameter_rows() == []
    with torch.no_grad():
        layer.frozen_experts[3] = True  # a write the layer did not make: the cache sees the new version
    assert layer.frozen_parameter_rows()[0][1].tolist() == [3]
    layer.frozen_experts = torch.tensor([True, True, False, False])  # a new tensor
    assert layer.frozen_parameter_rows()[0][1].tolist() == [0, 1]


def test_masks_follow_a_change_of_the_expert_count():
    layer = tiny_model()[0]
    layer.freeze_expert(3, router=True)
    layer.num_experts = 6  # what growing experts does to E (new experts start unfrozen)
    assert [index.tolist() for _, index in layer.frozen_parameter_rows()] == [[3], [3], [3], [3]]
    assert layer.frozen_experts.tolist() == [False, False, False, True, False, False]  # padded by the read
    layer.freeze_expert(5)
    assert layer.frozen_experts.tolist() == [False, False, False, True, False, True]
    assert layer.frozen_router_rows.tolist() == [False, False, False, True, False, False]


def test_freeze_survives_deepcopy():
    model = tiny_model()
    freeze_experts(model, {"2": [1]})
    clone = copy.deepcopy(model)
    assert clone[2].frozen_parameter_rows()[0][0] is clone[2].lora_A
    assert frozen_expert_map(clone) == {"2": [1]}


@pytest.mark.parametrize("bad", [4, 7, -1])
def test_freezing_an_index_that_does_not_exist_names_index_and_e(bad):
    layer = tiny_model()[0]
    with pytest.raises(ValueError, match=rf"expert index {bad} does not exist: the layer has num_experts=4"):
        layer.freeze_expert(bad)
    with pytest.raises(ValueError, match=rf"expert index {bad} does not exist"):
        layer.unfreeze_expert(bad)
    assert not layer.frozen_experts.any()


@pytest.mark.parametrize("bad", [True, 1.0, "1", None])
def test_a_non_int_index_is_a_type_error(bad):
    with pytest.raises(TypeError, match=r"expert index must be an int, got"):
        tiny_model()[0].freeze_expert(bad)


def test_router_must_be_a_bool():
    with pytest.raises(TypeError, match=r"router must be a bool, got 1"):
        tiny_model()[0].freeze_expert(0, router=1)
    with pytest.raises(TypeError, match=r"router must be a bool, got 'yes'"):
        freeze_experts(tiny_model(), [0], router="yes")


def test_freeze_experts_by_module_name_and_for_every_layer():
    model = tiny_model()
    assert riemix.freeze_experts is freeze_experts and riemix.unfreeze_experts is unfreeze_experts
    assert freeze_experts(model, {"2": (3, 1, 3)}, router=True) == {"2": [1, 3]}
    assert frozen_expert_map(model) == {"2": [1, 3]}
    assert frozen_expert_map(model, router=True) == {"2": [1, 3]}
    assert freeze_experts(model, [0]) == {"0": [0], "2": [0]}
    assert frozen_expert_map(model) == {"0": [0], "2": [0, 1, 3]}
    assert frozen_expert_map(model, router=True) == {"2": [1, 3]}
    assert unfreeze_experts(model, {"2": [1, 0]}) == {"2": [0, 1]}
    assert frozen_expert_map(model) == {"0": [0], "2": [3]}
    assert frozen_expert_map(model, router=True) == {"2": [3]}
    assert freeze_experts(model, {}) == {} and freeze_experts(model, []) == {"0": [], "2": []}


def test_an_index_out_of_range_in_one_layer_names_the_layer_and_changes_nothing():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 6))
    cfg = MoELoRAConfig(num_experts=4, rank=2, top_k=2, target_modules=["0", "2"])
    add_moe_lora(model, cfg, experts_per_module={"0": 4, "2": 2})
    with pytest.raises(
        ValueError, match=r"layer '2': expert index 3 does not exist: .*num_experts=2 \(valid indices 0\.\.1\)"
    ):
        freeze_experts(model, [1, 3])
    with pytest.raises(ValueError, match=r"layer '0': expert index 9 does not exist"):
        unfreeze_experts(model, {"0": [9]})
    assert frozen_expert_map(model) == {}  # checked before anything changed


def test_an_unknown_module_name_is_named_with_the_adapted_layers():
    model = tiny_model()
    with pytest.raises(
        ValueError, match=r"experts names unknown module '1': not a MoE-LoRA layer .* 2 MoE-LoRA layers: '0', '2'"
    ):
        freeze_experts(model, {"0": [1], "1": [0]})
    assert frozen_expert_map(model) == {}
    with pytest.raises(ValueError, match=r"unknown module 'x'"):
        check_experts(model, {"x": [0]})


@pytest.mark.parametrize(
    "experts,error,message",
    [
        (3, TypeError, r"experts \(a dict of module name -> expert indices, or a list of indices\) must be a list"),
        ("0", TypeError, r"must be a list of expert indices, got '0'"),
        ({0: [1]}, TypeError, r"experts keys must be module names \(str\), got 0"),
        ({"0": 1}, TypeError, r"experts\['0'\] must be a list of expert indices, got 1"),
        ({"0": [0.5]}, TypeError, r"layer '0': expert index must be an int, got 0.5"),
    ],
)
def test_a_malformed_experts_spec_is_refused(experts, error, message):
    with pytest.raises(error, match=message):
        freeze_experts(tiny_model(), experts)


def test_a_model_without_adapters_is_refused():
    with pytest.raises(ValueError, match=r"model has no MoE-LoRA layers"):
        freeze_experts(nn.Linear(3, 3), [0])


def test_frozen_state_dict_round_trip_and_absent_masks_load_unfrozen():
    model = tiny_model()
    assert frozen_state_dict(model) == {}  # nothing frozen: the adapter format gains no key
    freeze_experts(model, {"2": [0, 3]}, router=True)
    freeze_experts(model, {"2": [1]})
    state = frozen_state_dict(model)
    assert set(state) == {"2.frozen_experts", "2.frozen_router_rows"}
    assert state["2.frozen_experts"].tolist() == [True, True, False, True]
    tensors = {"2.lora_A": torch.zeros(1), **state}
    masks = split_frozen_state(tensors, {"0": 4, "2": 4})
    assert set(tensors) == {"2.lora_A"} and set(masks) == {"2"}
    other = tiny_model()
    freeze_experts(other, {"0": [2]})  # not in the saved state: unfrozen by the load
    load_frozen_state(other, masks)
    assert frozen_expert_map(other) == {"2": [0, 1, 3]}
    assert frozen_expert_map(other, router=True) == {"2": [0, 3]}
    load_frozen_state(other, {})
    assert frozen_expert_map(other) == {}


@pytest.mark.parametrize(
    "key,value,message",
    [
        (
            "1.frozen_experts",
            torch.zeros(4, dtype=torch.bool),
            r"1.frozen_experts: frozen mask of module '1', which is not adapted",
        ),
        (
            "0.frozen_experts",
            torch.zeros(3, dtype=torch.bool),
            r"bool tensor of shape \(4,\) \(num_experts=4\), got torch.bool of shape \(3,\)",
        ),
        ("0.frozen_router_rows", torch.zeros(4), r"0.frozen_router_rows: .* got torch.float32 of shape \(4,\)"),
    ],
)
def test_bad_saved_masks_are_named(key, value, message):
    tensors = {key: value}
    with pytest.raises(ValueError, match=message):
        split_frozen_state(tensors, {"0": 4, "2": 4})
    assert set(tensors) == {key}


def test_load_frozen_state_refuses_masks_that_do_not_fit_the_model():
    with pytest.raises(ValueError, match=r"frozen masks of module 'x', which is not a MoE-LoRA layer"):
        load_frozen_state(tiny_model(), {"x": {"frozen_experts": torch.zeros(4, dtype=torch.bool)}})
    with pytest.raises(ValueError, match=r"0.frozen_experts: shape \(5,\), the layer has num_experts=4"):
        load_frozen_state(tiny_model(), {"0": {"frozen_experts": torch.zeros(5, dtype=torch.bool)}})


def test_frozen_experts_do_not_change_the_forward():
    model = tiny_model()
    x = torch.randn(5, 8)
    before = model(x)
    freeze_experts(model, [0, 1], router=True)
    assert torch.equal(model(x), before)
    assert isinstance(model[0], MoELoRALinear)
