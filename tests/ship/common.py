"""Helpers of the ship tests (export, generate, loading) and of their CLI tests: a tiny model directory
and a random adapter on it that changes its outputs."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from riemix import MoELoRAConfig, add_moe_lora, iter_moe_lora_layers, save_adapter
from riemix.hub.loading import load_model
from tests.helpers import F64, tiny_inputs

TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]


def randomize_adapter(model, seed: int = 0) -> None:
    """Random non-zero B, router (or global gate) and expert scales, so that the adapter matters."""
    gen = torch.Generator().manual_seed(seed)
    for _, layer in iter_moe_lora_layers(model):
        with torch.no_grad():
            for p in (layer.lora_B, layer.gate_weight):
                p.copy_(torch.randn(p.shape, generator=gen, dtype=F64).to(p.dtype) * 0.5)
            if layer.expert_scale is not None:
                layer.expert_scale.copy_(torch.rand(layer.expert_scale.shape, generator=gen, dtype=F64) + 0.5)


def adapted_tiny(model_dir: str, routing: str = "softmax_topk", seed: int = 0, **adapter):
    """``(model, tokenizer)``: the tiny Llama of ``model_dir`` with a random 4-expert adapter, in eval mode."""
    model, tokenizer = load_model(model_dir)
    torch.manual_seed(seed)
    opts = {"num_experts": 4, "top_k": 2, "rank": 2, "routing": routing, **adapter}
    add_moe_lora(model, MoELoRAConfig(target_modules=TARGETS, **opts))
    randomize_adapter(model, seed)
    return model.eval(), tokenizer


def write_run(run_dir: Path, model_dir: str, model) -> Path:
    """A minimal run directory: ``config.yaml`` naming ``model_dir`` and the model's adapter in ``adapter/``."""
    save_adapter(model, run_dir / "adapter")
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"model": model_dir, "model_kind": "causal_lm"}))
    return run_dir


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(**tiny_inputs()).logits  # (B, T, V)


def greedy_ids(model, new: int = 5) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(tiny_inputs()["input_ids"][:1], max_new_tokens=new, do_sample=False, pad_token_id=0)
