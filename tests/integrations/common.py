"""Helpers of the ``riemix.integrations`` tests: tiny adapted Llamas, fixed token data, Trainer arguments."""

from __future__ import annotations

import torch

from riemix import MoELoRAConfig, add_moe_lora, iter_moe_lora_layers
from riemix.core.state import adapter_state_dict
from tests.helpers import make_tiny_llama

#: The adapter the Trainer tests train: scale warm-up, a router temperature schedule and expert scales with
#: their anchor, so every per-step piece of the recipe is exercised.
ADAPTER = dict(
    num_experts=4,
    top_k=2,
    rank=4,
    alpha=8.0,
    target_modules=["q_proj", "v_proj", "o_proj"],
    scale_warmup_steps=3,
    router_temperature=1.0,
    router_temperature_final=0.5,
    expert_scales=True,
    scale_anchor_beta=0.1,
)


def adapted_llama(seed: int = 0, adapter_seed: int = 1, **overrides) -> torch.nn.Module:
    """A tiny Llama (base seed ``seed``) with MoE-LoRA adapters initialised from ``adapter_seed``."""
    model = make_tiny_llama(seed=seed)
    torch.manual_seed(adapter_seed)
    add_moe_lora(model, MoELoRAConfig(**{**ADAPTER, **overrides}))
    return model


def token_examples(n: int, seq: int = 10, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``n`` causal-LM examples of ``seq`` random tokens (labels = inputs, no padding)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 64, (seq,), generator=gen)
        out.append({"input_ids": ids, "attention_mask": torch.ones(seq, dtype=torch.long), "labels": ids.clone()})
    return out


def collate(examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack equal-length examples into a batch (what ``default_data_collator`` does with them)."""
    return {key: torch.stack([ex[key] for ex in examples]) for key in examples[0]}


def trainer_args(output_dir, **overrides):
    """Quiet CPU ``TrainingArguments``: fixed example order, no global clipping (the recipe has none)."""
    from transformers import TrainingArguments

    opts = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        max_grad_norm=0.0,
        train_sampling_strategy="sequential",
        use_cpu=True,
        disable_tqdm=True,
        learning_rate=1e-2,
    )
    return TrainingArguments(**{**opts, **overrides})


def adapter_tensors(model) -> dict[str, torch.Tensor]:
    """A copy of the model's adapter tensors."""
    return {k: v.detach().clone() for k, v in adapter_state_dict(model).items()}


def scale_factors(model) -> set[float]:
    """The distinct ``scale_factor`` values of the model's layers."""
    return {layer.scale_factor for _, layer in iter_moe_lora_layers(model)}


def train_losses(trainer) -> list[float]:
    """The per-step training losses a ``Trainer`` logged (``logging_steps=1``)."""
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
