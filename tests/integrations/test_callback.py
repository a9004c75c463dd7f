"""``RiemixCallback`` on a plain ``transformers.Trainer``: schedules advance, diagnostics are logged."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import Trainer, TrainerCallback, default_data_collator

from riemix import iter_moe_lora_layers
from riemix.integrations import RiemixCallback, flat_diagnostics, protect_save_pretrained, riemix_optimizer
from tests.helpers import make_tiny_llama
from tests.integrations.common import adapted_llama, scale_factors, token_examples, trainer_args

STEPS = 4


class ScaleProbe(TrainerCallback):
    """Records the layers' scale factor at the start of every optimizer step (what that step trains with)."""

    def __init__(self) -> None:
        self.seen: list[float] = []

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.seen.append(next(layer for _, layer in iter_moe_lora_layers(model)).scale_factor)


def plain_trainer(model, tmp_path, callbacks, **args) -> Trainer:
    return Trainer(
        model=model,
        args=trainer_args(tmp_path / "out", max_steps=STEPS, **args),
        train_dataset=token_examples(2 * STEPS),
        data_collator=default_data_collator,
        optimizers=riemix_optimizer(model, 1e-2, STEPS),
        callbacks=callbacks,
    )


def lora_b(model) -> torch.Tensor:
    return torch.cat([layer.lora_B.detach().flatten() for _, layer in iter_moe_lora_layers(model)])


def test_without_the_callback_scale_warm_up_trains_nothing(tmp_path):
    """The bug: only riemix.train advanced the schedule, so under Trainer scale_factor stayed 0."""
    model = adapted_llama(scale_warmup_steps=2)
    before = lora_b(model)
    plain_trainer(model, tmp_path, []).train()
    assert scale_factors(model) == {0.0}
    assert torch.equal(lora_b(model), before)  # zero-B experts behind a zero scale get no gradient


def test_the_callback_advances_scale_warm_up_every_optimizer_step(tmp_path):
    model = adapted_llama(scale_warmup_steps=2)
    before = lora_b(model)
    probe = ScaleProbe()
    plain_trainer(model, tmp_path, [RiemixCallback(), probe]).train()
    assert probe.seen == [0.0, 0.5, 1.0, 1.0]  # f(step) = min(1, step / 2) before each step
    assert scale_factors(model) == {1.0}
    assert not torch.equal(lora_b(model), before)


def test_the_callback_counts_expert_ages_so_maturity_routing_turns_sparse(tmp_path):
    model = adapted_llama(mature_after_steps=3)
    plain_trainer(model, tmp_path, [RiemixCallback()]).train()
    for _, layer in iter_moe_lora_layers(model):
        assert layer.expert_ages == [STEPS] * layer.num_experts and layer.routing_now().immature == 0


def test_the_callback_logs_diagnostics_through_the_trainer(tmp_path):
    model = adapted_llama()
    trainer = plain_trainer(model, tmp_path, [RiemixCallback(diagnostics_every=2)])
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logs if "diag/entropy" in entry] == [2, 4]
    assert [entry["riemix/adapter_scale_factor"] for entry in logs] == [0.0, 1 / 3, 2 / 3, 1.0]
    saved = json.loads((tmp_path / "out" / "diagnostics.json").read_text())
    assert saved["step"] == 4 and set(saved["layers"]) == {name for name, _ in iter_moe_lora_layers(model)}
    assert logs[-1]["diag/entropy"] == pytest.approx(flat_diagnostics(saved)["diag/entropy"])


def test_callback_refuses_a_bad_diagnostics_period():
    with pytest.raises(ValueError, match="diagnostics_every must be an int >= 0, got -1"):
        RiemixCallback(-1)


def test_callback_refuses_a_model_without_adapters(tmp_path):
    model = make_tiny_llama()
    trainer = Trainer(
        model=model,
        args=trainer_args(tmp_path, max_steps=1),
        train_dataset=token_examples(2),
        data_collator=default_data_collator,
        callbacks=[RiemixCallback()],
    )
    with pytest.raises(ValueError, match="RiemixCallback needs a model carrying MoE-LoRA adapters"):
        trainer.train()


def test_callback_refuses_plain_trainer_checkpoints_of_a_protected_model(tmp_path):
    model = protect_save_pretrained(adapted_llama())
    trainer = plain_trainer(model, tmp_path, [RiemixCallback()], save_strategy="steps", save_steps=2)
    with pytest.raises(ValueError, match=r"save_strategy='steps'.*RiemixTrainer.*save_strategy='no'"):
        trainer.train()
