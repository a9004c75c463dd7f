"""``RiemixTrainer`` saving: adapter-only ``save_model`` and checkpoints, resume, best-model reload."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import default_data_collator

from riemix import load_adapter
from riemix.core.state import adapter_state_dict
from riemix.integrations import RiemixOptions, RiemixTrainer, riemix_optimizer
from tests.helpers import make_tiny_llama, tiny_inputs, tiny_tokenizer
from tests.integrations.common import adapted_llama, adapter_tensors, scale_factors, token_examples, trainer_args

STEPS = 4
OPTIONS = RiemixOptions(regularizers={"load_balance": 0.05})


def make_trainer(model, output_dir, eval_dataset=None, **args) -> RiemixTrainer:
    steps = args.pop("max_steps", STEPS)
    return RiemixTrainer(
        model=model,
        args=trainer_args(output_dir, max_steps=steps, **args),
        train_dataset=token_examples(2 * steps),
        eval_dataset=eval_dataset,
        data_collator=default_data_collator,
        processing_class=tiny_tokenizer(),
        optimizers=riemix_optimizer(model, 1e-2, steps, warmup_steps=1),
        riemix_options=OPTIONS,
    )


def logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**tiny_inputs()).logits


def test_save_model_writes_only_the_adapter_which_loads_onto_a_fresh_base(tmp_path):
    model = adapted_llama()
    trainer = make_trainer(model, tmp_path / "run")
    trainer.train()
    trainer.save_model(tmp_path / "final")
    names = {p.name for p in (tmp_path / "final").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "training_args.bin", "tokenizer.json"} <= names
    assert not names & {"model.safetensors", "config.json", "riemix_trainable.safetensors"}
    adapter_bytes = sum(t.numel() * t.element_size() for t in adapter_state_dict(model).values())
    size = (tmp_path / "final" / "adapter_model.safetensors").stat().st_size
    assert adapter_bytes <= size < adapter_bytes + 4096  # the adapter and a header, nothing else
    reloaded = load_adapter(make_tiny_llama(), tmp_path / "final")
    assert scale_factors(reloaded) == {1.0}
    torch.testing.assert_close(logits(reloaded), logits(model), rtol=0, atol=0)


def test_save_model_into_the_run_directory_keeps_its_checkpoints(tmp_path):
    model = adapted_llama()
    trainer = make_trainer(model, tmp_path / "run", save_strategy="steps", save_steps=2)
    trainer.train()
    trainer.save_model()  # args.output_dir, which holds checkpoint-2 and checkpoint-4
    assert {"checkpoint-2", "checkpoint-4", "adapter_config.json"} <= {p.name for p in (tmp_path / "run").iterdir()}
    torch.testing.assert_close(logits(load_adapter(make_tiny_llama(), tmp_path / "run")), logits(model))


def test_checkpoints_hold_the_adapter_and_trainer_state(tmp_path):
    make_trainer(adapted_llama(), tmp_path / "run", save_strategy="steps", save_steps=2).train()
    names = {p.name for p in (tmp_path / "run" / "checkpoint-2").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "scheduler.pt"} <= names
    assert {"trainer_state.json", "rng_state.pth"} <= names and "model.safetensors" not in names


def test_resume_restores_the_adapter_and_continues_like_the_straight_run(tmp_path):
    straight = adapted_llama()
    make_trainer(straight, tmp_path / "straight", save_strategy="steps", save_steps=2).train()
    shutil.copytree(tmp_path / "straight" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")

    resumed = adapted_llama(adapter_seed=99)  # other adapter values: only the checkpoint can make them right
    before = adapter_tensors(resumed)
    trainer = make_trainer(resumed, tmp_path / "resumed", save_strategy="steps", save_steps=2)
    trainer.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-2"))

    assert trainer.state.global_step == STEPS
    assert [e["step"] for e in trainer.state.log_history if "loss" in e] == [1, 2, 3, 4]  # 1-2 from the checkpoint
    got, want = adapter_tensors(resumed), adapter_tensors(straight)
    assert any(not torch.equal(before[k], got[k]) for k in got)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, msg=key)
    assert scale_factors(resumed) == {1.0}


def test_resume_restores_trainable_tensors_outside_the_adapter(tmp_path):
    def with_trainable_norm(adapter_seed: int):
        model = adapted_llama(adapter_seed=adapter_seed)
        model.model.norm.weight.requires_grad_(True)  # as a new task head would be
        return model

    straight = with_trainable_norm(1)
    make_trainer(straight, tmp_path / "straight", save_strategy="steps", save_steps=2).train()
    ckpt = tmp_path / "straight" / "checkpoint-2"
    saved = load_file(str(ckpt / "riemix_trainable.safetensors"))
    assert set(saved) == {"model.norm.weight"}

    resumed = with_trainable_norm(99)
    make_trainer(resumed, tmp_path / "resumed").train(resume_from_checkpoint=str(ckpt))
    torch.testing.assert_close(resumed.model.norm.weight, straight.model.norm.weight, rtol=0, atol=0)


def test_resume_refuses_a_checkpoint_of_another_adapter(tmp_path):
    make_trainer(adapted_llama(), tmp_path / "a", save_strategy="steps", save_steps=2).train()
    other = adapted_llama(target_modules=["q_proj", "v_proj"])
    with pytest.raises(ValueError, match="adapts other modules than this model"):
        make_trainer(other, tmp_path / "b").train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))


def test_load_best_model_at_end_restores_the_best_checkpoints_adapter(tmp_path):
    model = adapted_llama()
    trainer = make_trainer(
        model,
        tmp_path / "run",
        save_strategy="steps",
        save_steps=1,
        eval_strategy="steps",
        eval_steps=1,
        load_best_model_at_end=True,
        metric_for_best_model="loss",
        greater_is_better=True,  # the highest loss: the first checkpoint, not the last model
        eval_dataset=token_examples(2 * STEPS),  # the training examples: training lowers their loss
    )
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and not best.endswith(f"checkpoint-{STEPS}")
    saved = load_file(f"{best}/adapter_model.safetensors")
    got = adapter_tensors(model)
    for key, value in saved.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=0, msg=key)
