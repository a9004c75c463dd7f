"""Text embeddings for novelty detection: the mean of a model's final hidden state over each text's tokens."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["adapters_off", "embed_texts"]


@contextlib.contextmanager
def adapters_off(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` as its base inside the block: each MoE-LoRA layer calls only its ``base_layer``.

    The novelty detector embeds every skill with the same frozen base, so centroids stored early stay
    comparable with data embedded after the adapters have trained.
    """
    layers = [m for m in model.modules() if hasattr(m, "base_layer") and hasattr(m, "expert_ranks")]
    for layer in layers:
        layer.forward = layer.base_layer.forward  # an instance attribute shadows the class's forward
    try:
        yield model
    finally:
        for layer in layers:
            del layer.forward


@torch.no_grad()
def embed_texts(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    batch_size: int = 16,
    max_length: int = 128,
) -> torch.Tensor:
    """Embed texts by the mean of the model's final hidden state over their non-padding tokens.

    The final hidden state is ``model.base_model(input_ids, attention_mask).last_hidden_state``:
    after the final norm for a Hugging Face causal LM (``LlamaModel``'s ``norm``), the last
    encoder layer's output for an encoder. The model is run in eval mode (its mode is restored).

    Args:
        model: A Hugging Face model (its ``base_model`` is used; a bare base model works too).
        tokenizer: Its tokenizer; needs a pad token.
        texts: The texts, at least one.
        batch_size: Texts per forward pass (>= 1).
        max_length: Tokens kept per text (>= 1); longer texts are truncated.

    Returns:
        A float32 CPU tensor ``(len(texts), H)``.

    Raises:
        ValueError: If ``texts`` is empty or holds a non-string, ``batch_size`` or ``max_length``
            is not a positive int, or the tokenizer has no pad token.
    """
    if isinstance(texts, str) or not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError("texts must be a non-empty sequence of strings")
    for name, value in (("batch_size", batch_size), ("max_length", max_length)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if getattr(tokenizer, "pad_token", None) is None:
        raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token first")
    base = getattr(model, "base_model", model)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(
                list(texts[start : start + batch_size]),
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)  # (b, T)
            hidden = base(input_ids=ids, attention_mask=mask).last_hidden_state.float()  # (b, T, H)
            weights = mask.unsqueeze(-1).float()  # (b, T, 1)
            out.append(((hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)).cpu())  # (b, H)
    finally:
        model.train(was_training)
    return torch.cat(out)  # (n, H)
