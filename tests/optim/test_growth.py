"""``grow_experts`` with an optimizer: the old experts continue exactly as without the growth."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import riemix
from riemix.core.config import MoELoRAConfig
from riemix.core.schedules import advance_maturity
from riemix.core.tuner import add_moe_lora, iter_moe_lora_layers
from riemix.optim import RiemannianAdamW, build_optimizer, replace_parameters
from tests.helpers import lm_steps, make_tiny_llama

OPTIMIZERS = {
    "adamw": dict(name="adamw", lr=1e-3, weight_decay=0.1),
    "radamw": dict(name="radamw", lr=1e-3, weight_decay=0.1),
    "radamw_compat": dict(name="radamw", lr=1e-3, weight_decay=0.1, reference_compat=True),
    "sgd": dict(name="sgd", lr=1e-2, momentum=0.9, weight_decay=0.1),
    "rsgd": dict(name="rsgd", lr=1e-3, momentum=0.9),
}


def make_optimizer(model, kind):
    if kind == "torch_adamw":
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.1)
    return build_optimizer(model, **OPTIMIZERS[kind])


def adapted(top_k=1, **kw):
    model = make_tiny_llama()
    add_moe_lora(model, MoELoRAConfig(num_experts=3, top_k=top_k, rank=4, expert_scales=True, **kw))
    return model


def layer_tensors(layer):
    return {"lora_A": layer.lora_A, "lora_B": layer.lora_B, "gate": layer.gate_weight, "scale": layer.expert_scale}


def corner(t, like):
    return t[tuple(slice(0, n) for n in like.shape)]


@pytest.mark.parametrize("kind", [*OPTIMIZERS, "torch_adamw"])
def test_after_growth_the_old_experts_continue_bit_identically(kind):
    """Top-1 routing: the new expert (mean router row) is never selected, so it receives no gradient."""
    straight = adapted()
    opt = make_optimizer(straight, kind)
    lm_steps(straight, opt, range(3))
    grown = copy.deepcopy(straight)
    opt_grown = make_optimizer(grown, kind)
    opt_grown.load_state_dict(copy.deepcopy(opt.state_dict()))  # torch's AdamW would share its step tensors
    riemix.grow_experts(grown, opt_grown)
    lm_steps(straight, opt, range(3, 6))
    lm_steps(grown, opt_grown, range(3, 6))
    for (name, old), (_, new) in zip(iter_moe_lora_layers(straight), iter_moe_lora_layers(grown), strict=True):
        assert new.num_experts == 4 and not new.lora_B[3].any()
        for role, p in layer_tensors(old).items():
            q = layer_tensors(new)[role]
            assert torch.equal(corner(q, p), p), f"{name} {role}"
            for key, value in opt.state[p].items():
                got = opt_grown.state[q][key]
                if isinstance(value, torch.Tensor) and value.dim():
                    assert got.shape == q.shape and torch.equal(corner(got, value), value), f"{name} {role} {key}"
                else:
                    assert got == value if not isinstance(value, torch.Tensor) else torch.equal(got, value)


@pytest.mark.parametrize("kind", ["adamw", "radamw"])
def test_growth_to_a_larger_rank_continues_the_old_experts_up_to_rounding(kind):
    straight = adapted()
    opt = make_optimizer(straight, kind)
    lm_steps(straight, opt, range(2))
    grown = copy.deepcopy(straight)
    opt_grown = make_optimizer(grown, kind)
    opt_grown.load_state_dict(copy.deepcopy(opt.state_dict()))  # torch's AdamW would share its step tensors
    riemix.grow_experts(grown, opt_grown, rank=8)
    lm_steps(straight, opt, range(2, 5))
    lm_steps(grown, opt_grown, range(2, 5))
    for (_, old), (_, new) in zip(iter_moe_lora_layers(straight), iter_moe_lora_layers(grown), strict=True):
        assert new.expert_ranks == [4, 4, 4, 8] and new.rank == 8
        for role, p in layer_tensors(old).items():
            torch.testing.assert_close(corner(layer_tensors(new)[role], p), p, atol=1e-6, rtol=1e-5)
        pad = ~new.rank_mask()
        for t in (new.lora_A, opt_grown.state[new.lora_A]["exp_avg"], opt_grown.state[new.lora_A]["exp_avg_sq"]):
            assert not t[pad].any()


@pytest.mark.parametrize("kind", ["radamw", "rsgd"])
def test_a_grown_expert_trains_under_maturity_routing_and_the_padding_stays_zero(kind):
    model = adapted(mature_after_steps=3)
    riemix.core.schedules.set_maturity(model, 3)  # already on: the experts born with the model stay at age 0
    for _, layer in iter_moe_lora_layers(model):
        layer.mark_mature()
    opt = make_optimizer(model, kind)
    lm_steps(model, opt, range(2))
    riemix.grow_experts(model, opt, rank=2)  # a smaller rank: expert 3 uses 2 of the R = 4 slots
    assert advance_maturity(model, 0) == 8  # one immature expert in each of the 8 layers
    for step in range(2, 5):
        lm_steps(model, opt, [step])
        advance_maturity(model, step)
    for _, layer in iter_moe_lora_layers(model):
        assert layer.lora_B[3].abs().sum() > 0  # it was routed to (densely) and learned
        pad = ~layer.rank_mask()
        assert pad[3].tolist() == [False, False, True, True]
        assert not layer.lora_A[pad].any() and not layer.lora_B.transpose(1, 2)[pad].any()
        assert layer.routing_now().mode == "softmax_topk"  # mature after 3 counted steps: top-1 again


def test_replace_parameters_moves_groups_state_pairs_and_drops_plans():
    a, b, w = (nn.Parameter(torch.randn(2, 3, 5)), nn.Parameter(torch.randn(2, 4, 3)), nn.Parameter(torch.randn(2, 5)))
    opt = RiemannianAdamW([{"params": [a, b]}, {"params": [w]}], lr=0.1, lora_pairs=[(a, b)])
    for p in (a, b, w):
        p.grad = torch.randn_like(p)
    opt.step()
    assert opt._plans
    new = {a: torch.zeros(3, 4, 5), b: torch.zeros(3, 4, 4), w: torch.zeros(3, 5)}
    new = {p: nn.Parameter(q) for p, q in new.items()}
    old_state = {p: dict(opt.state[p]) for p in (a, b, w)}
    replace_parameters(opt, new)
    assert opt.param_groups[0]["params"] == [new[a], new[b]] and opt.param_groups[1]["params"] == [new[w]]
    assert opt._pairs == [(new[a], new[b])] and not opt._plans and not opt._scratch
    for p, q in new.items():
        assert p not in opt.state and opt.state[q]["step"] == old_state[p]["step"]
        moment = opt.state[q]["exp_avg"]
        assert moment.shape == q.shape and torch.equal(corner(moment, p), old_state[p]["exp_avg"])
        rest = moment.clone()
        corner(rest, p).zero_()
        assert not rest.any()
    for q in new.values():
        q.grad = torch.randn_like(q)
    opt.step()  # the plans are rebuilt for the new shapes


def test_grow_experts_unwraps_an_optimizer_wrapper():
    model = adapted()
    opt = make_optimizer(model, "adamw")
    lm_steps(model, opt, range(1))

    class Wrapper:  # like accelerate's AcceleratedOptimizer
        def __init__(self, optimizer):
            self.optimizer = optimizer

    riemix.grow_experts(model, Wrapper(opt))
    owned = {p for group in opt.param_groups for p in group["params"]}
    assert all(layer.lora_A in owned for _, layer in iter_moe_lora_layers(model))
