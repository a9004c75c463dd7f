"""``RiemixTrainer``: the recipe's step under ``transformers.Trainer``, its optimizer, logs and validation."""

from __future__ import annotations

import pytest
import torch
from transformers import Trainer, default_data_collator

from riemix import iter_moe_lora_layers
from riemix.core.regularizers import apply_regularizers, scale_anchor_loss
from riemix.core.schedules import linear_schedule, set_training_progress
from riemix.core.tuner import set_record_routing
from riemix.integrations import RiemixCallback, RiemixOptions, RiemixTrainer, riemix_optimizer
from riemix.optim import build_optimizer
from tests.helpers import make_tiny_llama
from tests.integrations.common import (
    adapted_llama,
    adapter_tensors,
    collate,
    scale_factors,
    token_examples,
    train_losses,
    trainer_args,
)

STEPS, BATCH, ACCUM = 6, 2, 2
LR, GATE_LR, LORAPLUS, WARMUP = 1e-2, 5e-3, 2.0, 1
COEFS = {"load_balance": 0.05, "z_loss": 1e-3, "diversity": 0.01}
OPTIMIZER = dict(reg=1e-6, gate_max_grad_norm=1.0)


def reference_run(model, examples, mode: str) -> list[float]:
    """``riemix.training.recipe.train_step`` written out: ``ACCUM`` micro-batches of task loss + regularisers +
    scale anchor, each backward divided by ``ACCUM``; then optimizer, schedule, zero_grad and
    ``set_training_progress(step + 1)``.  Returns the back-propagated loss of each step (task + weighted
    regularisers in loss mode, + anchor), which is what ``Trainer`` logs as ``loss``."""
    opt = build_optimizer(model, "radamw", lr=LR, gate_lr=GATE_LR, loraplus_ratio=LORAPLUS, **OPTIMIZER)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, linear_schedule(WARMUP, STEPS))
    set_record_routing(model)
    model.train()
    set_training_progress(model, 0, STEPS)
    losses = []
    for step in range(STEPS):
        total = 0.0
        for micro in range(ACCUM):
            start = (step * ACCUM + micro) * BATCH
            batch = collate(examples[start : start + BATCH])
            loss = model(**batch).loss
            aux, _ = apply_regularizers(model, COEFS, mode, batch["attention_mask"], ACCUM)
            loss = loss if aux is None else loss + aux
            anchor = scale_anchor_loss(model)
            loss = loss if anchor is None else loss + anchor
            (loss / ACCUM).backward()
            total += loss.item() / ACCUM
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        set_training_progress(model, step + 1, STEPS)
        losses.append(total)
    return losses


def riemix_trainer(model, examples, tmp_path, options: RiemixOptions, **args) -> RiemixTrainer:
    optimizers = riemix_optimizer(
        model, LR, STEPS, gate_lr=GATE_LR, loraplus_ratio=LORAPLUS, warmup_steps=WARMUP, **OPTIMIZER
    )
    return RiemixTrainer(
        model=model,
        args=trainer_args(tmp_path / "out", max_steps=STEPS, gradient_accumulation_steps=ACCUM, **args),
        train_dataset=examples,
        data_collator=default_data_collator,
        optimizers=optimizers,
        riemix_options=options,
    )


# Both runs do the same fp32 operations on the same batches in the same order.  With the task loss as a
# per-micro-batch mean (``token_normalised=False``) Trainer's arithmetic is the reference's op for op; with
# Trainer's default token normalisation a micro-batch's loss is sum / (tokens of the whole step) instead of
# mean / ACCUM: equal in exact arithmetic (equal-length examples), rounded differently by at most an ulp.
# Measured on CPU: the adapters come out bit-identical and the logged losses differ by <= 2e-7 relative, as
# Trainer sums a step's micro-batch losses in an fp32 tensor (the reference in Python floats).  Tolerance:
# 1e-6 relative, an fp32 rounding budget far below any real difference (counting the regularisers ACCUM
# times changes the losses by 1e-2 relative and the adapters by 50%; a missed schedule step by more).
@pytest.mark.parametrize(
    ("mode", "token_normalised"),
    [("loss", True), ("loss", False), ("inject", True)],
    ids=["loss", "loss-mean", "inject"],
)
def test_trainer_matches_the_recipe_step_on_the_same_batches(tmp_path, mode, token_normalised):
    examples = token_examples(STEPS * ACCUM * BATCH)
    reference_model = adapted_llama()
    expected = reference_run(reference_model, examples, mode)

    model = adapted_llama()
    trainer = riemix_trainer(model, examples, tmp_path, RiemixOptions(regularizers=COEFS, regularizer_mode=mode))
    if not token_normalised:
        trainer.model_accepts_loss_kwargs = False  # Trainer then divides a per-micro-batch mean by ACCUM
    trainer.train()

    torch.testing.assert_close(train_losses(trainer), expected, rtol=1e-6, atol=0.0)
    got, want = adapter_tensors(model), adapter_tensors(reference_model)
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-9, msg=key)
    assert scale_factors(model) == scale_factors(reference_model) == {1.0}
    layer = next(layer for _, layer in iter_moe_lora_layers(model))
    assert layer.router_temperature == pytest.approx(0.5)


def test_training_logs_hold_regularisers_schedules_and_diagnostics(tmp_path):
    model = adapted_llama()
    options = RiemixOptions(regularizers={"load_balance": 0.05}, diagnostics_every=2)
    trainer = riemix_trainer(model, token_examples(STEPS * ACCUM * BATCH), tmp_path, options)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["riemix/adapter_scale_factor"] for entry in logs] == pytest.approx([0, 1 / 3, 2 / 3, 1, 1, 1])
    assert [entry["riemix/router_temperature"] for entry in logs] == pytest.approx([1 - s / 12 for s in range(6)])
    assert all(entry["aux/load_balance"] >= 1.0 for entry in logs)  # E·Σ f·P >= 1
    with_diag = [entry["step"] for entry in logs if "diag/entropy" in entry]
    assert with_diag == [2, 4, 6]
    assert (tmp_path / "out" / "diagnostics.json").is_file()
    assert trainer.riemix_callback.last_diagnostics["step"] == 6


def test_create_optimizer_builds_the_riemix_groups_from_the_training_arguments(tmp_path):
    model = adapted_llama()
    options = RiemixOptions(optimizer="rsgd", gate_lr=3e-3, loraplus_ratio=4.0, gate_max_grad_norm=None)
    trainer = RiemixTrainer(
        model=model,
        args=trainer_args(tmp_path, max_steps=1, learning_rate=2e-2, weight_decay=0.1),
        train_dataset=token_examples(2),
        data_collator=default_data_collator,
        riemix_options=options,
    )
    opt = trainer.create_optimizer()
    assert type(opt).__name__ == "RiemannianSGD"
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["lora_A"]["lr"] == 2e-2 and groups["lora_B"]["lr"] == pytest.approx(8e-2)
    assert groups["router"]["lr"] == 3e-3 and groups["router"]["max_grad_norm"] is None
    assert {g["weight_decay"] for g in opt.param_groups} == {0.1}
    assert trainer.create_optimizer() is opt


def test_an_optimizer_class_given_to_the_trainer_is_used(tmp_path):
    trainer = RiemixTrainer(
        model=adapted_llama(),
        args=trainer_args(tmp_path, max_steps=1),
        optimizer_cls_and_kwargs=(torch.optim.SGD, {"lr": 0.1}),
    )
    assert type(trainer.create_optimizer()) is torch.optim.SGD


def test_evaluation_adds_no_regulariser(tmp_path):
    model = adapted_llama()
    examples = token_examples(4)
    args = dict(max_steps=1, per_device_eval_batch_size=4)
    plain = Trainer(model=model, args=trainer_args(tmp_path / "a", **args), data_collator=default_data_collator)
    options = RiemixOptions(regularizers={"z_loss": 10.0})
    ours = RiemixTrainer(
        model=model,
        args=trainer_args(tmp_path / "b", **args),
        data_collator=default_data_collator,
        riemix_options=options,
    )
    assert ours.evaluate(examples)["eval_loss"] == pytest.approx(plain.evaluate(examples)["eval_loss"], rel=1e-6)


def test_riemix_trainer_refuses_wrong_options(tmp_path):
    with pytest.raises(ValueError, match="riemix_options must be a RiemixOptions, got dict"):
        RiemixTrainer(model=adapted_llama(), args=trainer_args(tmp_path), riemix_options={"diagnostics_every": 1})


def test_riemix_trainer_refuses_a_model_without_adapters(tmp_path):
    with pytest.raises(ValueError, match="needs a model carrying MoE-LoRA adapters, got LlamaForCausalLM"):
        RiemixTrainer(model=make_tiny_llama(), args=trainer_args(tmp_path))


def test_riemix_trainer_refuses_a_second_riemix_callback(tmp_path):
    with pytest.raises(ValueError, match=r"adds its own RiemixCallback.*diagnostics_every"):
        RiemixTrainer(model=adapted_llama(), args=trainer_args(tmp_path), callbacks=[RiemixCallback(1)])


def test_riemix_trainer_refuses_injected_gradients_with_fp16(tmp_path):
    options = RiemixOptions(regularizers={"z_loss": 1e-3}, regularizer_mode="inject")
    with pytest.raises(ValueError, match="regularizer_mode='inject' cannot train with fp16.*bf16"):
        RiemixTrainer(model=adapted_llama(), args=trainer_args(tmp_path, fp16=True), riemix_options=options)
