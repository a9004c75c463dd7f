"""Frozen experts under every optimizer riemix builds (riemix.optim.base: frozen rows).

Guarantees tested: a frozen expert's A, B and expert-scale rows (and its router row / global gate entry with
``router=True``) stay bit-identical through any number of steps, whatever its gradient, the weight decay or
the momentum / Adam moments; its optimizer-state rows (exp_avg, exp_avg_sq, momentum_buffer) stay those of
the last step before it was frozen (zeros when it was frozen before the state existed); its gradient
neither counts in a group's clipping norm nor changes the other experts' preconditioned update; after
unfreezing it resumes from the preserved state rows, with AdamW's step count of the whole tensor (which kept
advancing), exactly as torch's own optimizer resumes from that state.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from riemix import MoELoRAConfig, add_moe_lora, freeze_experts, unfreeze_experts
from riemix.optim import RiemannianAdamW, build_optimizer
from tests.helpers import F64

# (build_optimizer name, extra options): every optimizer riemix builds, with weight decay on
CASES = [
    ("adamw", {}),
    ("adamw", {"fused": False}),
    ("radamw", {}),
    ("radamw", {"reference_compat": True}),
    ("sgd", {"momentum": 0.9}),
    ("sgd", {"momentum": 0.9, "nesterov": True}),
    ("rsgd", {"momentum": 0.9, "dampening": 0.1}),
    ("rsgd", {"momentum": 0.9, "reference_compat": True}),
]
FROZEN = {"0": [1, 3], "2": [0]}  # layer "0" with its router rows, layer "2" without (see freeze)


def tiny_model(routing: str = "softmax_topk", dtype=torch.float32, seed: int = 0) -> nn.Module:
    """Two adapted Linear layers ``"0"`` (8 -> 8, E=4) and ``"2"`` (8 -> 6, E=4) with expert scales."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 6)).to(dtype)
    cfg = MoELoRAConfig(
        num_experts=4, rank=2, top_k=2, routing=routing, target_modules=["0", "2"], init="gaussian",
        expert_scales=True,
    )  # fmt: skip
    return add_moe_lora(model, cfg)


def freeze(model: nn.Module) -> None:
    freeze_experts(model, {"0": FROZEN["0"]}, router=True)
    freeze_experts(model, {"2": FROZEN["2"]})


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainable(model).items()}


def set_grads(model: nn.Module, seed: int, zero_frozen: bool = False) -> None:
    """Random gradients; with ``zero_frozen`` the frozen rows get exact zeros (Adam's moments alone move)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in trainable(model).items():
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
        module, _, what = name.partition(".")
        if zero_frozen and what != "router.weight" and what != "global_gate":
            p.grad[FROZEN[module]] = 0


def frozen_rows(name: str) -> list[int]:
    """The rows of parameter ``name`` that ``freeze`` holds fixed."""
    module, _, what = name.partition(".")
    if what in ("router.weight", "global_gate"):
        return FROZEN["0"] if module == "0" else []
    return FROZEN[module]


def make_optimizer(model, name, extra):
    return build_optimizer(model, name, lr=0.05, gate_lr=0.03, weight_decay=0.1, **extra)


@pytest.mark.parametrize(
    "name,extra,routing",
    [(n, e, "softmax_topk") for n, e in CASES] + [("adamw", {}, "global"), ("rsgd", {"momentum": 0.9}, "global")],
)
def test_frozen_experts_stay_bit_identical_for_50_steps(name, extra, routing, matmul_path):
    model = tiny_model(routing)
    opt = make_optimizer(model, name, extra)
    for step in range(3):  # moments / momentum buffers are non-zero when the experts get frozen
        set_grads(model, step)
        opt.step()
    freeze(model)
    before = snapshot(model)
    state_before = {
        n: {k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v)} for n, p in trainable(model).items()
    }
    for step in range(3, 53):
        set_grads(model, step, zero_frozen=step % 2 == 1)
        grads = {n: p.grad.clone() for n, p in trainable(model).items()}
        opt.step()
        assert all(torch.equal(p.grad, grads[n]) for n, p in trainable(model).items())  # .grad untouched
    for n, p in trainable(model).items():
        rows = frozen_rows(n)
        free = [i for i in range(p.shape[0]) if i not in rows]
        assert torch.equal(p[rows], before[n][rows]), n  # bit-identical
        assert not torch.equal(p[free], before[n][free]), n  # the others trained
        for key, value in state_before[n].items():
            if value.shape == p.shape:
                assert torch.equal(opt.state[p][key][rows], value[rows]), (n, key)
    unfreeze_experts(model, [0, 1, 2, 3])
    resumed = snapshot(model)
    for step in range(53, 56):
        set_grads(model, step)
        opt.step()
    for n, p in trainable(model).items():
        assert all(not torch.equal(p[i], resumed[n][i]) for i in range(p.shape[0])), n  # every expert trains


@pytest.mark.parametrize(
    "name,extra", [("adamw", {}), ("radamw", {}), ("sgd", {"momentum": 0.9}), ("rsgd", {"momentum": 0.9})]
)
def test_state_rows_created_while_frozen_stay_zero(name, extra):
    model = tiny_model()
    freeze(model)  # before the optimizer exists and before its first step
    before = snapshot(model)
    opt = make_optimizer(model, name, extra)
    for step in range(4):
        set_grads(model, step)
        opt.step()
    layer = model[0]
    for p in (layer.lora_A, layer.lora_B, layer.expert_scale, layer.router.weight):
        state = [v for v in opt.state[p].values() if torch.is_tensor(v) and v.shape == p.shape]
        assert state and all(not v[FROZEN["0"]].any() and v[[0, 2]].abs().sum() > 0 for v in state)
    assert torch.equal(layer.lora_A[FROZEN["0"]], before["0.lora_A"][FROZEN["0"]])


def test_unfreezing_resumes_adamw_from_the_moments_at_freeze_time():
    """Precisely: the expert's rows continue as torch.optim.AdamW from (value, exp_avg, exp_avg_sq) at freeze
    time with the tensor's current step count (3 steps before, 4 frozen, then steps 8 and 9)."""
    model = tiny_model(dtype=F64)
    opt = build_optimizer(model, "adamw", lr=0.05, weight_decay=0.1, betas=(0.8, 0.95))
    a = model[0].lora_A
    for step in range(3):
        set_grads(model, step)
        opt.step()
    at_freeze = (a[1].detach().clone(), opt.state[a]["exp_avg"][1].clone(), opt.state[a]["exp_avg_sq"][1].clone())
    freeze(model)
    for step in range(3, 7):
        set_grads(model, step)
        opt.step()
    assert opt.state[a]["step"] == 7  # one count per tensor: it advanced while expert 1 was frozen
    unfreeze_experts(model, {"0": [1]})
    ref = nn.Parameter(at_freeze[0].clone())
    torch_opt = torch.optim.AdamW([ref], lr=0.05, weight_decay=0.1, betas=(0.8, 0.95))
    step_t = torch.tensor(7.0, dtype=torch.float32)
    torch_opt.state[ref] = {"step": step_t, "exp_avg": at_freeze[1].clone(), "exp_avg_sq": at_freeze[2].clone()}
    for step in range(7, 9):
        set_grads(model, step)
        ref.grad = a.grad[1].clone()
        opt.step()
        torch_opt.step()
    torch.testing.assert_close(a[1].detach(), ref.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(opt.state[a]["exp_avg"][1], torch_opt.state[ref]["exp_avg"], rtol=1e-12, atol=1e-14)


def test_unfreezing_resumes_sgd_from_the_momentum_buffer_at_freeze_time():
    model = tiny_model(dtype=F64)
    opt = build_optimizer(model, "sgd", lr=0.05, weight_decay=0.1, momentum=0.9, dampening=0.2)
    b = model[2].lora_B
    for step in range(3):
        set_grads(model, step)
        opt.step()
    at_freeze = (b[0].detach().clone(), opt.state[b]["momentum_buffer"][0].clone())
    freeze(model)
    for step in range(3, 7):
        set_grads(model, step)
        opt.step()
    unfreeze_experts(model, {"2": [0]})
    ref = nn.Parameter(at_freeze[0].clone())
    torch_opt = torch.optim.SGD([ref], lr=0.05, weight_decay=0.1, momentum=0.9, dampening=0.2)
    torch_opt.state[ref] = {"momentum_buffer": at_freeze[1].clone()}
    for step in range(7, 9):
        set_grads(model, step)
        ref.grad = b.grad[0].clone()
        opt.step()
        torch_opt.step()
    torch.testing.assert_close(b[0].detach(), ref.detach(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", ["radamw", "rsgd"])
def test_a_frozen_expert_does_not_reach_the_other_experts_updates(name, matmul_path):
    """Clipping (max_grad_norm on every group) and the per-expert preconditioner: the unfrozen experts' steps
    are the same whatever the frozen experts' gradients and values."""
    runs = []
    for variant in range(2):
        model = tiny_model(dtype=F64)
        freeze(model)
        if variant:  # other values of the frozen experts
            with torch.no_grad():
                for layer, rows in ((model[0], FROZEN["0"]), (model[2], FROZEN["2"])):
                    layer.lora_A[rows] *= 3.0
                    layer.lora_B[rows] *= -0.5
        extra = {"momentum": 0.9} if name == "rsgd" else {}
        opt = build_optimizer(
            model, name, lr=0.05, weight_decay=0.1, max_grad_norm=0.5, gate_max_grad_norm=0.5, **extra
        )
        for step in range(5):
            set_grads(model, step, zero_frozen=variant == 0)
            if variant:  # huge gradients on the frozen rows
                for n, p in trainable(model).items():
                    p.grad[frozen_rows(n)] *= 1e6
            opt.step()
        runs.append(snapshot(model))
    for n, value in runs[0].items():
        free = [i for i in range(value.shape[0]) if i not in frozen_rows(n)]
        assert torch.equal(value[free], runs[1][n][free]), n


def test_track_frozen_on_a_hand_built_optimizer():
    model = tiny_model()
    layer = model[0]
    opt = RiemannianAdamW(layer.parameters(), lr=0.1, weight_decay=0.1, lora_pairs=[(layer.lora_A, layer.lora_B)])
    opt.track_frozen(layer, layer, model[2])  # model[2]'s parameters are not the optimizer's: ignored
    assert len(opt._frozen_sources) == 2
    layer.freeze_expert(0, router=True)
    model[2].freeze_expert(0)
    before = snapshot(model)
    for step in range(3):
        set_grads(model, step)
        opt.step()
    assert torch.equal(layer.lora_A[0], before["0.lora_A"][0])
    assert torch.equal(layer.router.weight[0], before["0.router.weight"][0])
    assert not torch.equal(layer.lora_A[1], before["0.lora_A"][1])
    clone = copy.deepcopy(opt)  # tracking survives deepcopy / pickling, on the copied layer
    assert len(clone._frozen_sources) == 2 and clone._frozen_sources[0] is not layer


def test_an_untracked_optimizer_trains_frozen_experts_and_a_bad_source_is_refused():
    model = tiny_model()
    layer = model[0]
    layer.freeze_expert(0)
    before = layer.lora_A[0].detach().clone()
    opt = RiemannianAdamW(layer.parameters(), lr=0.1)
    set_grads(model, 0)
    opt.step()
    assert not torch.equal(layer.lora_A[0], before)  # only tracked sources are held (build_optimizer tracks all)
    with pytest.raises(
        TypeError, match=r"track_frozen needs objects with a frozen_parameter_rows\(\) method .* got Linear"
    ):
        opt.track_frozen(nn.Linear(2, 2))


def test_optimizer_state_dict_round_trip_keeps_holding_frozen_experts():
    model = tiny_model()
    opt = make_optimizer(model, "radamw", {})
    set_grads(model, 0)
    opt.step()
    freeze(model)
    saved = copy.deepcopy(opt.state_dict())
    opt = make_optimizer(model, "radamw", {})
    opt.load_state_dict(saved)
    before = snapshot(model)
    for step in range(1, 4):
        set_grads(model, step)
        opt.step()
    assert torch.equal(model[0].lora_B[FROZEN["0"]], before["0.lora_B"][FROZEN["0"]])
