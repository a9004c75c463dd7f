"""``grow_experts`` at ``max_experts``: merge / evict reset the slots' optimizer state and keep every other's."""

from __future__ import annotations

import pytest
import torch

from riemix.core.config import MoELoRAConfig
from riemix.core.tuner import add_moe_lora, iter_moe_lora_layers
from riemix.optim import build_optimizer, grow_experts
from tests.helpers import lm_steps, make_tiny_llama

OPTIMIZERS = {
    "adamw": dict(name="adamw", lr=1e-3, weight_decay=0.1),
    "radamw": dict(name="radamw", lr=1e-3, weight_decay=0.1),
}


def adapted(policy, **kw):
    model = make_tiny_llama().double()
    cfg = MoELoRAConfig(num_experts=3, top_k=2, rank=2, expert_scales=True, max_experts=3, capacity_policy=policy)
    add_moe_lora(model, cfg, **kw)
    return model


def stacked(layer):
    return [layer.lora_A, layer.lora_B, layer.gate_weight, layer.expert_scale]


def moments(optimizer, layer):
    return [
        {k: v.clone() for k, v in optimizer.state[p].items() if torch.is_tensor(v) and v.dim()} for p in stacked(layer)
    ]


def corner(t, like):
    return t[tuple(slice(0, n) for n in like.shape)]


@pytest.mark.parametrize("kind", list(OPTIMIZERS))
@pytest.mark.parametrize(("policy", "rank"), [("merge", None), ("evict", None), ("evict", 3)])
def test_capacity_actions_reset_only_the_slots_involved(kind, policy, rank):
    model = adapted(policy)
    opt = build_optimizer(model, **OPTIMIZERS[kind])
    lm_steps(model, opt, range(2))
    layers = dict(iter_moe_lora_layers(model))
    before = {n: (moments(opt, m), [p.detach().clone() for p in stacked(m)]) for n, m in layers.items()}
    usage = {n: torch.tensor([0.3, 0.2, 0.1], dtype=torch.float64) for n in layers}  # low: {1, 2}
    log = []
    added = grow_experts(model, opt, rank=rank, usage=usage, capacity_log=log)
    touched = (1, 2) if policy == "merge" else (2,)
    assert added == {n: 2 for n in layers}  # the freed / evicted slot
    assert [(r.layer, r.action, r.experts, r.slot) for r in log] == [(n, policy, touched, 2) for n in layers]
    for name, layer in layers.items():
        assert layer.num_experts == 3
        old_state, old_params = before[name]
        for p, old_p, state, old in zip(stacked(layer), old_params, moments(opt, layer), old_state, strict=True):
            assert p in opt.state and any(p is q for g in opt.param_groups for q in g["params"])
            assert set(state) == set(old) and state
            for key, value in state.items():
                assert value.shape == p.shape
                kept = [i for i in range(3) if i not in touched]
                assert torch.equal(corner(value, old[key])[kept], old[key][kept]), (name, key)  # bit for bit
                assert not value[list(touched)].any(), (name, key)  # reset
            kept = [i for i in range(3) if i not in touched]
            assert torch.equal(corner(p.detach(), old_p)[kept], old_p[kept])
    lm_steps(model, opt, range(2, 3))  # training continues on the updated optimizer


def test_a_refusal_changes_nothing():
    model = adapted("merge")
    opt = build_optimizer(model, **OPTIMIZERS["adamw"])
    layers = dict(iter_moe_lora_layers(model))
    last = list(layers)[-1]
    for i in (0, 1):
        layers[last].freeze_expert(i)
    params = [p for layer in layers.values() for p in stacked(layer)]
    with pytest.raises(ValueError, match=rf"layer '{last}' is at max_experts=3 .*only 1 of 3 are unfrozen"):
        grow_experts(model, opt)
    assert all(a is b for a, b in zip(params, [p for layer in layers.values() for p in stacked(layer)], strict=True))
    assert all(layer.num_experts == 3 for layer in layers.values())


def test_policy_error_and_bad_usage_are_named():
    model = adapted("error")
    name = next(iter(dict(iter_moe_lora_layers(model))))
    with pytest.raises(ValueError, match=rf"layer '{name}' has num_experts=3 = max_experts=3; capacity_policy='error'"):
        grow_experts(model)
    with pytest.raises(ValueError, match=r"usage names 'nope', which is not a MoE-LoRA layer being grown"):
        grow_experts(model, usage={"nope": torch.ones(3)})
    with pytest.raises(TypeError, match=r"usage must map module names to \(E,\) tensors, got list"):
        grow_experts(model, usage=[torch.ones(3)])
