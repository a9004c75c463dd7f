"""MoELoRAConfig validation: every bad value raises a ValueError naming the field and value."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from riemix import MoELoRAConfig
from riemix.core.config import DENSE_MODES, REGULARIZER_MODES, ROUTING_MODES, TOPK_MODES
from riemix.core.fields import allowed_types


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"num_experts": 0}, r"num_experts must be an int >= 1, got 0"),
        ({"num_experts": True}, r"num_experts must be an int, list or callable, got True"),
        ({"num_experts": "8"}, r"num_experts must be an int, list or callable, got '8'"),
        ({"num_experts": []}, r"num_experts: the per-layer list is empty"),
        ({"num_experts": [4, 0]}, r"num_experts\[1\] must be an int >= 1, got 0"),
        ({"num_experts": 4, "top_k": 5}, r"top_k must be in 1..num_experts \(4\), got 5"),
        ({"num_experts": [8, 2], "top_k": 3}, r"top_k must be in 1..num_experts \(2\), got 3"),
        ({"top_k": 0}, r"top_k must be an int >= 1, got 0"),
        ({"rank": 0}, r"rank must be an int >= 1, got 0"),
        ({"rank": 2.5}, r"rank must be an int, list or callable, got 2.5"),
        ({"rank": True}, r"rank must be an int, list or callable, got True"),
        ({"rank": [2, 0]}, r"rank\[1\] must be an int >= 1, got 0"),
        ({"rank": [2, 2.5]}, r"rank: per-layer values must be ints, got 2.5"),
        ({"rank": []}, r"rank: the per-layer list is empty"),
        ({"mature_after_steps": -1}, r"mature_after_steps must be an int >= 0, got -1"),
        ({"mature_after_steps": 1.5}, r"mature_after_steps must be an int, got 1.5"),
        ({"maturity_anneal_steps": -2}, r"maturity_anneal_steps must be an int >= 0, got -2"),
        ({"maturity_temperature": 0.0}, r"maturity_temperature must be > 0 or None, got 0.0"),
        ({"mature_after_steps": 5, "init": "pissa"}, r"mature_after_steps must be 0 with init='pissa'"),
        ({"alpha": 0.0}, r"alpha must be > 0, got 0.0"),
        ({"alpha": -1}, r"alpha must be > 0, got -1"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\), got 1.0"),
        ({"dropout": -0.1}, r"dropout must be in \[0, 1\), got -0.1"),
        ({"routing": "switch"}, r"routing must be one of .*got 'switch'"),
        ({"gate_grad_power": 1.5}, r"gate_grad_power must be in \[0, 1\], got 1.5"),
        ({"gate_grad_power": -0.1}, r"gate_grad_power must be in \[0, 1\], got -0.1"),
        ({"init": "random"}, r"init must be one of .*got 'random'"),
        ({"router_init_std": -1.0}, r"router_init_std must be >= 0, got -1.0"),
        ({"target_modules": []}, r"target_modules must be a regex string or a non-empty list"),
        ({"target_modules": "q_proj("}, r"target_modules: invalid regex 'q_proj\('"),
    ],
)
def test_invalid_values_raise_naming_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MoELoRAConfig(**kwargs)


def test_dense_routing_ignores_top_k_bound():
    MoELoRAConfig(num_experts=2, top_k=4, routing="dense")


def test_scaling_plain_and_rslora():
    assert MoELoRAConfig(rank=4, alpha=16.0).scaling == 4.0
    assert MoELoRAConfig(rank=4, alpha=16.0, use_rslora=True).scaling == 8.0


def test_experts_per_layer_list_and_callable():
    cfg = MoELoRAConfig(num_experts=[2, 4, 8], top_k=2)
    assert [cfg.experts_for_layer(i) for i in range(3)] == [2, 4, 8]
    assert cfg.experts_for_layer(None) == 2
    with pytest.raises(ValueError, match="num_experts has 3 entries but the model has a layer 3"):
        cfg.experts_for_layer(3)
    cfg = MoELoRAConfig(num_experts=lambda i: 2 + 2 * i, top_k=2)
    assert cfg.experts_for_layer(3) == 8
    with pytest.raises(ValueError, match=r"top_k must be in 1..num_experts \(2\) for layer 0, got 3"):
        MoELoRAConfig(num_experts=lambda i: 2, top_k=3).experts_for_layer(0)
    with pytest.raises(ValueError, match=r"num_experts\(0\) must be an int >= 1, got 0"):
        MoELoRAConfig(num_experts=lambda i: 0, top_k=1).experts_for_layer(0)


def test_dict_round_trip_and_unknown_keys():
    cfg = MoELoRAConfig(num_experts=[2, 4], top_k=2, rank=3, target_modules=".*proj")
    assert MoELoRAConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match=r"unknown MoELoRAConfig field\(s\): \['experts'\]"):
        MoELoRAConfig.from_dict({"experts": 3})


def test_mode_groups_are_subsets_of_the_routing_modes():
    assert ROUTING_MODES == ("softmax_topk", "topk_softmax", "dense", "top_p", "global")
    assert TOPK_MODES == ("softmax_topk", "topk_softmax") and DENSE_MODES == ("dense", "global")
    assert set(TOPK_MODES) | set(DENSE_MODES) | {"top_p"} == set(ROUTING_MODES)
    assert not set(TOPK_MODES) & set(DENSE_MODES)
    assert REGULARIZER_MODES == ("loss", "inject")
    for mode in DENSE_MODES:  # no selection: top_k is every expert, noise is refused
        assert MoELoRAConfig(num_experts=3, top_k=5, routing=mode).experts_for_layer(0) == 3
        with pytest.raises(ValueError, match="router_noise_std must be 0"):
            MoELoRAConfig(routing=mode, router_noise_std=0.1)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"init_b_std": 0.0}, r"init_b_std must be > 0, got 0.0"),
        ({"scale_warmup_steps": -1}, r"scale_warmup_steps must be an int >= 0, got -1"),
        ({"scale_warmup_steps": 1.5}, r"scale_warmup_steps must be an int, got 1.5"),
        (
            {"init": "pissa", "scale_warmup_steps": 3},
            r"scale_warmup_steps must be 0 with init='pissa'.*got 3",
        ),
        ({"router_temperature": 0.0}, r"router_temperature must be > 0, got 0.0"),
        ({"router_temperature_final": -1.0}, r"router_temperature_final must be > 0 or None, got -1.0"),
        ({"router_noise_std": -0.1}, r"router_noise_std must be >= 0, got -0.1"),
        ({"routing": "dense", "router_noise_std": 0.1}, r"router_noise_std must be 0 with routing='dense'"),
        ({"routing": "global", "router_noise_std": 0.1}, r"router_noise_std must be 0 with routing='global'"),
        ({"routing": "top_p", "top_p": 0.0}, r"top_p must be in \(0, 1\], got 0.0"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\], got 1.5"),
        ({"expert_scales": 1}, r"expert_scales must be a bool, got 1"),
        ({"scale_anchor_beta": -1.0}, r"scale_anchor_beta must be >= 0, got -1.0"),
        ({"scale_anchor_beta": 0.1}, r"scale_anchor_beta needs expert_scales=True"),
        ({"routing": "top_p", "num_experts": 2, "top_k": 3}, r"top_k must be in 1..num_experts \(2\), got 3"),
        ({"expert_compute": "fast"}, r"expert_compute must be one of \('auto', 'dense', 'sparse'\), got 'fast'"),
        ({"expert_compute": "sparse", "routing": "dense"}, r"expert_compute='sparse' needs .*routing='dense'"),
        ({"expert_compute": "sparse", "routing": "global"}, r"expert_compute='sparse' needs .*routing='global'"),
        ({"recompute_hidden": "yes"}, r"recompute_hidden must be a bool, got 'yes'"),
    ],
)
def test_new_config_fields_are_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MoELoRAConfig(**kwargs)


def test_new_config_fields_round_trip_and_global_ignores_top_k_bound():
    cfg = MoELoRAConfig(
        num_experts=2,
        top_k=4,
        routing="global",
        expert_scales=True,
        scale_anchor_beta=0.1,
        router_temperature=2.0,
        router_temperature_final=0.5,
        init="small_b",
        init_b_std=0.01,
        scale_warmup_steps=5,
        expert_compute="dense",
        recompute_hidden=True,
    )
    assert MoELoRAConfig.from_dict(cfg.to_dict()) == cfg
    assert MoELoRAConfig.from_dict({"routing": "top_p", "expert_compute": "sparse"}).expert_compute == "sparse"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"alpha": "16"}, r"alpha must be a number, got '16'"),
        ({"dropout": True}, r"dropout must be a number, got True"),
        ({"top_k": True}, r"top_k must be an int, got True"),
        ({"use_rslora": "no"}, r"use_rslora must be a bool, got 'no'"),
        ({"routing": 5}, r"routing must be a string, got 5"),
        ({"num_experts": [2.7, 3.2]}, r"num_experts: per-layer counts must be ints, got 2.7"),
    ],
)
def test_python_api_types_are_strict_and_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MoELoRAConfig(**kwargs)


def test_ints_are_numbers_and_lists_of_ints_pass():
    cfg = MoELoRAConfig(alpha=16, num_experts=[2, 3])
    assert cfg.alpha == 16 and cfg.num_experts == [2, 3]


FLOAT_FIELDS = [
    "alpha",
    "dropout",
    "gate_grad_power",
    "router_init_std",
    "init_b_std",
    "router_temperature",
    "router_temperature_final",
    "router_noise_std",
    "top_p",
    "scale_anchor_beta",
    "maturity_temperature",
]


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("name", FLOAT_FIELDS)
def test_non_finite_floats_are_refused_naming_the_field(name, value):
    with pytest.raises(ValueError, match=rf"^{name} must be finite, got {value!r}$"):
        MoELoRAConfig(**{name: value})


def test_every_float_field_is_checked_for_finiteness():
    hints = typing.get_type_hints(MoELoRAConfig)
    floats = [f.name for f in dataclasses.fields(MoELoRAConfig) if float in allowed_types(hints[f.name])]
    assert floats == FLOAT_FIELDS


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"init_b_std": "1e-3"}, r"init_b_std must be a number, got '1e-3'"),
        ({"router_init_std": "0.02"}, r"router_init_std must be a number, got '0.02'"),
        ({"router_temperature_final": "0.5"}, r"router_temperature_final must be a number or null, got '0.5'"),
    ],
)
def test_strings_in_float_fields_are_refused_naming_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MoELoRAConfig(**kwargs)


def test_rank_per_layer_list_and_callable():
    cfg = MoELoRAConfig(rank=[2, 4, 8])
    assert [cfg.rank_for_layer(i) for i in range(3)] == [2, 4, 8]
    assert cfg.rank_for_layer(None) == 2
    with pytest.raises(ValueError, match="rank has 3 entries but the model has a layer 3"):
        cfg.rank_for_layer(3)
    cfg = MoELoRAConfig(rank=lambda i: 2 + i)
    assert cfg.rank_for_layer(4) == 6
    with pytest.raises(ValueError, match=r"rank\(1\) must be an int >= 1, got 0"):
        MoELoRAConfig(rank=lambda i: 1 - i).rank_for_layer(1)
    with pytest.raises(ValueError, match=r"scaling: rank is per layer \(\[2, 4\]\)"):
        _ = MoELoRAConfig(rank=[2, 4]).scaling
    assert MoELoRAConfig(rank=3).rank_for_layer(7) == 3


def test_to_dict_writes_callable_rank_as_none_and_maturity_only_when_set():
    plain = MoELoRAConfig().to_dict()
    assert not {"mature_after_steps", "maturity_temperature", "maturity_anneal_steps"} & set(plain)
    assert MoELoRAConfig(rank=lambda i: 2).to_dict()["rank"] is None
    cfg = MoELoRAConfig(mature_after_steps=10, maturity_temperature=2.0, rank=[2, 3])
    data = cfg.to_dict()
    assert (data["mature_after_steps"], data["maturity_temperature"], data["rank"]) == (10, 2.0, [2, 3])
    assert "maturity_anneal_steps" not in data
    assert MoELoRAConfig.from_dict(data) == cfg


def test_max_experts_and_capacity_policy_are_validated_and_written_only_when_set():
    with pytest.raises(ValueError, match=r"max_experts must be >= num_experts of every layer \(4\) or None, got 3"):
        MoELoRAConfig(num_experts=[2, 4], top_k=1, max_experts=3)
    with pytest.raises(ValueError, match=r"max_experts must be >= num_experts of every layer \(None\) or None, got 0"):
        MoELoRAConfig(num_experts=lambda i: 2, top_k=1, max_experts=0)
    with pytest.raises(ValueError, match=r"max_experts must be an int or null, got 4.0"):
        MoELoRAConfig(max_experts=4.0)
    with pytest.raises(ValueError, match=r"max_experts must be >= num_experts \(5\) of layer 3, got 4"):
        MoELoRAConfig(num_experts=lambda i: 2 + i, top_k=1, max_experts=4).experts_for_layer(3)
    with pytest.raises(ValueError, match=r"capacity_policy must be one of \('error', 'merge', 'evict'\), got 'lru'"):
        MoELoRAConfig(capacity_policy="lru")
    assert not {"max_experts", "capacity_policy"} & set(MoELoRAConfig().to_dict())
    cfg = MoELoRAConfig(num_experts=4, max_experts=6, capacity_policy="merge")
    assert MoELoRAConfig.from_dict(cfg.to_dict()) == cfg and cfg.to_dict()["max_experts"] == 6
