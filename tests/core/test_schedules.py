"""Schedules as pure functions of the step: learning rate, adapter scale warm-up, router temperature."""

from __future__ import annotations

from riemix import MoELoRAConfig, add_moe_lora, iter_moe_lora_layers
from riemix.core.schedules import (
    linear_schedule,
    router_temperature_at,
    scale_warmup_factor,
    set_router_temperature,
    set_scale_progress,
    set_training_progress,
)
from tests.helpers import make_tiny_llama


def test_linear_schedule():
    f = linear_schedule(2, 10)
    assert [f(s) for s in (0, 1, 2, 6, 10)] == [0.5, 1.0, 1.0, 0.5, 0.0]
    assert linear_schedule(0, 10, "constant")(9) == 1.0


def test_schedule_values():
    assert [scale_warmup_factor(s, 4) for s in (0, 1, 2, 4, 9)] == [0.0, 0.25, 0.5, 1.0, 1.0]
    assert scale_warmup_factor(0, 0) == 1.0
    assert [router_temperature_at(s, 10, 2.0, 0.5) for s in (0, 5, 10, 15)] == [2.0, 1.25, 0.5, 0.5]
    assert router_temperature_at(7, 10, 2.0, None) == 2.0
    model = add_moe_lora(
        make_tiny_llama(),
        MoELoRAConfig(
            num_experts=2,
            top_k=1,
            rank=2,
            scale_warmup_steps=4,
            router_temperature=2.0,
            router_temperature_final=0.5,
        ),
    )
    layers = [layer for _, layer in iter_moe_lora_layers(model)]
    assert all(layer.scale_factor == 0.0 and layer.router_temperature == 2.0 for layer in layers)
    assert set_scale_progress(model, 2) == 0.5 and all(layer.scale_factor == 0.5 for layer in layers)
    assert set_router_temperature(model, 4, 8) == 1.25 and all(layer.router_temperature == 1.25 for layer in layers)
    assert set_training_progress(model, 8, 8) == {"adapter_scale_factor": 1.0, "router_temperature": 0.5}
