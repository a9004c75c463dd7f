"""AutoFreezer (riemix.continual.freezing): patience and min_delta per skill, the freeze it triggers, its log,
its state_dict round trip and its validation, on a tiny adapted model."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from torch import nn

from riemix import MoELoRAConfig, add_moe_lora, build_optimizer, unfreeze_experts
from riemix.continual import FREEZE_REASONS, AutoFreezer
from riemix.core.freezing import frozen_expert_map


def tiny_model() -> nn.Module:
    """Two adapted Linear layers ``"0"`` (8 -> 8) and ``"2"`` (8 -> 6), 4 experts each."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 6))
    return add_moe_lora(model, MoELoRAConfig(num_experts=4, rank=2, top_k=2, target_modules=["0", "2"]))


def test_freezes_after_patience_evaluations_without_an_improvement_above_min_delta():
    model = tiny_model()
    freezer = AutoFreezer(2, 0.01, model=model)
    experts = {"0": [1], "2": [1, 3]}
    results = [freezer.update("sst2", experts, v) for v in (0.50, 0.60, 0.605, 0.62, 0.625, 0.61)]
    # first, improved, +0.005 is not > 0.01, improved (resets), no improvement, no improvement -> frozen
    assert results == [False, False, False, False, False, True]
    reasons = ["first", "improved", "no_improvement", "improved", "no_improvement", "frozen"]
    assert [r["reason"] for r in freezer.log] == reasons
    assert [r["stale"] for r in freezer.log] == [0, 0, 1, 0, 1, 2]
    assert freezer.best("sst2") == 0.62 and freezer.best("unknown") is None
    assert frozen_expert_map(model) == experts and frozen_expert_map(model, router=True) == {}
    assert freezer.frozen_skills == ["sst2"]
    assert freezer.update("sst2", experts, 0.1) is False  # frozen skills stay frozen, nothing changes
    assert freezer.log[-1]["reason"] == "already_frozen"
    assert {r["reason"] for r in freezer.log} <= set(FREEZE_REASONS)


def test_min_mode_router_rows_a_list_for_every_layer_and_independent_skills():
    model = tiny_model()
    freezer = AutoFreezer(1, model=model, mode="min", router=True)
    assert freezer.update("loss_a", [0], 2.0) is False
    assert freezer.update("loss_b", [2], 1.0) is False
    assert freezer.update("loss_a", [0], 1.5) is False  # lower is better: an improvement
    assert freezer.update("loss_b", [2], 1.0) is True  # equal is no improvement; patience 1
    assert frozen_expert_map(model) == {"0": [2], "2": [2]} == frozen_expert_map(model, router=True)
    assert freezer.frozen_skills == ["loss_b"]


def test_the_freeze_is_logged_and_passed_to_on_decision(caplog):
    seen = []
    freezer = AutoFreezer(1, model=tiny_model(), on_decision=seen.append)
    with caplog.at_level(logging.INFO, logger="riemix.continual.freezing"):
        freezer.update("arc", {"2": [0]}, 0.3)
        assert not caplog.records
        freezer.update("arc", {"2": [0]}, 0.3)
    assert "froze the experts of skill 'arc' after 1 evaluations" in caplog.text and "{'2': [0]}" in caplog.text
    assert seen == freezer.log and seen[-1]["froze"] is True and seen[-1]["experts"] == {"2": [0]}


def test_frozen_experts_stay_fixed_under_training_and_can_be_unfrozen():
    model = tiny_model()
    opt = build_optimizer(model, "radamw", lr=0.05, weight_decay=0.1)
    freezer = AutoFreezer(1, model=model)
    freezer.update("task", {"0": [3]}, 1.0)
    assert freezer.update("task", {"0": [3]}, 1.0)
    layer = model[0]
    before = layer.lora_A[3].detach().clone()
    x = torch.randn(16, 8)
    for _ in range(5):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    assert torch.equal(layer.lora_A[3], before) and not torch.equal(layer.lora_A[0], before)
    unfreeze_experts(model, {"0": [3]})
    assert frozen_expert_map(model) == {}


def test_state_dict_round_trip_continues_like_an_uninterrupted_run():
    values = [0.5, 0.7, 0.69, 0.71, 0.705, 0.70]
    full = AutoFreezer(2, 0.005, model=tiny_model())
    results = [full.update("s", [1], v) for v in values]
    first = AutoFreezer(2, 0.005, model=tiny_model())
    for v in values[:3]:
        first.update("s", [1], v)
    state = json.loads(json.dumps(first.state_dict(), allow_nan=False))  # plain JSON
    model = tiny_model()
    resumed = AutoFreezer(9, 0.5, model=model, mode="min")  # the settings come from the state
    resumed.load_state_dict(state)
    assert (resumed.patience, resumed.min_delta, resumed.mode) == (2, 0.005, "max")
    assert resumed.state_dict() == first.state_dict()
    assert results[3:] == [resumed.update("s", [1], v) for v in values[3:]] == [False, False, True]
    assert resumed.state_dict() == full.state_dict() and frozen_expert_map(model) == {"0": [1], "2": [1]}


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        (dict(patience=0), ValueError, r"patience must be an int >= 1, got 0"),
        (dict(patience=True), ValueError, r"patience must be an int >= 1, got True"),
        (dict(patience=1.5), ValueError, r"patience must be an int >= 1, got 1.5"),
        (dict(min_delta=-0.1), ValueError, r"min_delta must be a finite number >= 0, got -0.1"),
        (dict(min_delta=float("nan")), ValueError, r"min_delta must be a finite number >= 0, got nan"),
        (dict(mode="avg"), ValueError, r"mode must be one of \('max', 'min'\), got 'avg'"),
        (dict(router="yes"), ValueError, r"router must be a bool, got 'yes'"),
        (dict(model="model"), TypeError, r"model must be an nn.Module, got str"),
    ],
)
def test_bad_settings_are_named(kwargs, error, message):
    args = {"patience": 2, "min_delta": 0.0, "model": tiny_model(), **kwargs}
    with pytest.raises(error, match=message):
        AutoFreezer(args.pop("patience"), args.pop("min_delta"), **args)


@pytest.mark.parametrize(
    "skill,experts,value,error,message",
    [
        ("", [0], 1.0, ValueError, r"skill must be a non-empty str, got ''"),
        (3, [0], 1.0, ValueError, r"skill must be a non-empty str, got 3"),
        ("s", [0], float("nan"), ValueError, r"value must be a finite number, got nan"),
        ("s", [0], "0.5", ValueError, r"value must be a finite number, got '0.5'"),
        ("s", {"1": [0]}, 1.0, ValueError, r"experts names unknown module '1'"),
        ("s", {"2": [4]}, 1.0, ValueError, r"layer '2': expert index 4 does not exist: the layer has num_experts=4"),
        ("s", 0, 1.0, TypeError, r"must be a list of expert indices, got 0"),
    ],
)
def test_a_bad_update_is_refused_before_anything_changes(skill, experts, value, error, message):
    freezer = AutoFreezer(1, model=tiny_model())
    with pytest.raises(error, match=message):
        freezer.update(skill, experts, value)
    assert freezer.log == [] and freezer.state_dict()["skills"] == {}


def test_a_bad_state_is_refused():
    freezer = AutoFreezer(1, model=tiny_model())
    freezer.update("s", [0], 1.0)
    state = freezer.state_dict()
    with pytest.raises(ValueError, match=r"state is missing \['log', 'mode'\]"):
        freezer.load_state_dict({k: v for k, v in state.items() if k not in ("log", "mode")})
    with pytest.raises(ValueError, match=r"patience must be an int >= 1, got 0"):
        freezer.load_state_dict({**state, "patience": 0})
    with pytest.raises(ValueError, match=r"skills\['s'\] must be a dict with keys"):
        freezer.load_state_dict({**state, "skills": {"s": {"best": 1.0}}})
    bad = {**state["skills"]["s"], "best": float("inf")}
    with pytest.raises(ValueError, match=r"skills\['s'\].best must be a finite number or None, got inf"):
        freezer.load_state_dict({**state, "skills": {"s": bad}})
    assert freezer.state_dict() == state  # unchanged by the refused loads
