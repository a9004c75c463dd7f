"""TRL's ``SFTTrainer`` with riemix adapters: ``RiemixTrainerMixin`` before ``SFTTrainer``."""

from __future__ import annotations

import math
import random

import pytest
import torch

from riemix import iter_moe_lora_layers, load_adapter
from riemix.integrations import RiemixOptions, RiemixTrainerMixin
from tests.helpers import FILLER, GOOD, make_tiny_llama, tiny_inputs, tiny_tokenizer
from tests.integrations.common import adapted_llama, scale_factors

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")


class RiemixSFTTrainer(RiemixTrainerMixin, trl.SFTTrainer):
    """What a user writes to train riemix adapters with TRL."""


def test_sft_trainer_trains_riemix_adapters(tmp_path):
    rng = random.Random(0)
    texts = [" ".join(rng.sample(FILLER, 4) + [rng.choice(GOOD)]) for _ in range(16)]
    model = adapted_llama(scale_warmup_steps=2)
    before = {name: layer.lora_B.detach().clone() for name, layer in iter_moe_lora_layers(model)}
    args = trl.SFTConfig(
        output_dir=str(tmp_path / "sft"),
        max_steps=4,
        per_device_train_batch_size=4,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        learning_rate=1e-2,
        max_length=16,
        gradient_checkpointing=False,
        bf16=False,  # SFTConfig's default bf16 autocast stays on the trained model's forward: compare in fp32
    )
    trainer = RiemixSFTTrainer(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_dict({"text": texts}),
        processing_class=tiny_tokenizer(),
        riemix_options=RiemixOptions(regularizers={"load_balance": 0.01}, diagnostics_every=2),
    )
    trainer.train()

    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 4 and all(math.isfinite(entry["loss"]) for entry in logs)
    assert [entry["riemix/adapter_scale_factor"] for entry in logs] == [0.0, 0.5, 1.0, 1.0]
    assert all("aux/load_balance" in entry and "mean_token_accuracy" in entry for entry in logs)  # TRL's logs too
    assert [entry["step"] for entry in logs if "diag/entropy" in entry] == [2, 4]
    assert scale_factors(model) == {1.0}
    assert any(not torch.equal(layer.lora_B, before[name]) for name, layer in iter_moe_lora_layers(model))

    trainer.save_model(tmp_path / "adapter")
    assert not (tmp_path / "adapter" / "model.safetensors").exists()
    reloaded = load_adapter(make_tiny_llama(), tmp_path / "adapter").eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**tiny_inputs()).logits, model(**tiny_inputs()).logits, rtol=0, atol=0)
