"""Tiny randomly initialised Hugging Face models and inputs shared by the tests."""

from __future__ import annotations

import torch


def make_tiny_llama(seed: int = 0, hidden: int = 32, layers: int = 2, dtype=torch.float32):
    """A 2-layer LlamaForCausalLM with hidden size 32 and vocabulary 64."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).to(dtype).eval()


def make_tiny_bert(seed: int = 0, num_labels: int = 2):
    """A 2-layer BertForSequenceClassification with hidden size 32."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        num_labels=num_labels,
    )
    return BertForSequenceClassification(cfg).eval()


TINY_MODELS = {
    "llama": (make_tiny_llama, ["q_proj", "k_proj", "v_proj", "o_proj"]),
    "bert": (make_tiny_bert, ["query", "key", "value", "attention.output.dense"]),
}


def tiny_inputs(seed: int = 1, batch: int = 2, seq: int = 7) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
