"""The CUDA cases (skipped without a GPU; ``benchmarks/gpu_check.sh`` runs them on one): the layer, the
sparse path and the Riemannian optimizers on the GPU agree with the CPU."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from riemix import MoELoRAConfig, add_moe_lora, build_optimizer, iter_moe_lora_layers

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def _model(expert_compute: str = "dense") -> nn.Module:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
    cfg = MoELoRAConfig(num_experts=16, top_k=2, rank=4, target_modules=["0", "2"], init="gaussian",
                        expert_compute=expert_compute)  # fmt: skip
    model = add_moe_lora(base, cfg)
    with torch.no_grad():
        for _, layer in iter_moe_lora_layers(model):
            layer.lora_B.normal_(std=0.1)
    return model


@pytest.mark.parametrize("expert_compute", ["dense", "sparse"])
def test_layer_values_and_gradients_on_cuda_match_the_cpu(expert_compute):
    cpu = _model(expert_compute).double()
    gpu = copy.deepcopy(cpu).cuda()
    x = torch.randn(256, 64, dtype=torch.float64)
    outs = []
    for model, xs in ((cpu, x), (gpu, x.cuda())):
        y = model(xs)
        y.square().sum().backward()
        outs.append((y.cpu(), {n: p.grad.cpu() for n, p in model.named_parameters() if p.requires_grad}))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-10, atol=1e-10)
    for name, grad in outs[0][1].items():
        torch.testing.assert_close(grad, outs[1][1][name], rtol=1e-9, atol=1e-10, msg=name)


@pytest.mark.parametrize("optimizer", ["radamw", "rsgd"])
def test_riemannian_steps_on_cuda_match_the_cpu(optimizer):
    cpu = _model().double()
    gpu = copy.deepcopy(cpu).cuda()
    x = torch.randn(128, 64, dtype=torch.float64)
    for model, xs in ((cpu, x), (gpu, x.cuda())):
        opt = build_optimizer(model, optimizer, lr=1e-2)
        for _ in range(3):
            model(xs).square().mean().backward()
            opt.step()
            opt.zero_grad()
    for (name, a), (_, b) in zip(cpu.named_parameters(), gpu.named_parameters(), strict=True):
        torch.testing.assert_close(a, b.cpu(), rtol=1e-8, atol=1e-10, msg=name)


def test_bf16_autocast_training_step_runs_and_stays_finite():
    model = _model().cuda()
    opt = build_optimizer(model, "radamw", lr=1e-3)
    x = torch.randn(512, 64, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(x).float().square().mean()
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and all(torch.isfinite(p).all() for p in model.parameters())
