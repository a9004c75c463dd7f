"""Text generation with a model and its adapter, streamed as it is produced: ``generate``, ``generate_text``.

The prompt goes through the tokenizer's chat template (one user message, generation prompt added) when
the tokenizer has one, unless ``chat_template=False``.  Temperature 0 decodes greedily (deterministic);
above 0 it samples, seeded.  The new text is written to a stream (stdout for ``riemix generate``) as the
tokens arrive (``transformers.TextStreamer``), and nothing else is.
"""

from __future__ import annotations

import math
import os
from typing import Any, TextIO

import torch

from riemix.ship.loading import load_adapted

__all__ = ["build_prompt", "generate", "generate_text"]


def build_prompt(tokenizer: Any, prompt: str, chat_template: bool = True) -> tuple[str, bool]:
    """The text given to the model, and whether the chat template made it.

    Args:
        tokenizer: the model's tokenizer.
        prompt: the user's text.
        chat_template: apply the tokenizer's chat template when it has one.

    Returns:
        ``(text, templated)``.
    """
    if chat_template and getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), True
    return prompt, False


def _check_options(max_new_tokens: int, temperature: float) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be >= 0 and finite, got {temperature!r}")


def generate_text(
    model: Any,
    tokenizer: Any,
    prompt: str,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    chat_template: bool = True,
    seed: int = 0,
    stream: TextIO | None = None,
) -> str:
    """Continue ``prompt`` with ``model``; optionally write the new text to ``stream`` as it comes.

    Args:
        model: a causal LM (with or without MoE-LoRA adapters).
        tokenizer: its tokenizer.
        prompt: the user's text (non-empty).
        max_new_tokens: most tokens to generate.
        temperature: 0 for greedy decoding, else the sampling temperature.
        chat_template: apply the tokenizer's chat template when it has one.
        seed: sampling seed (temperature > 0).
        stream: where the new text is written token by token (None: nowhere); a newline ends it.

    Returns:
        The generated text (special tokens removed).

    Raises:
        ValueError: an empty prompt, ``max_new_tokens`` < 1, a negative or non-finite temperature.
    """
    from transformers import TextStreamer

    if not prompt.strip():
        raise ValueError("the prompt is empty")
    _check_options(max_new_tokens, temperature)
    text, templated = build_prompt(tokenizer, prompt, chat_template)
    device = next(model.parameters()).device
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=not templated).to(device)
    streamer = None
    if stream is not None:

        class _Streamer(TextStreamer):
            def on_finalized_text(self, piece: str, stream_end: bool = False) -> None:
                stream.write(piece + ("\n" if stream_end else ""))
                stream.flush()

        streamer = _Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    sampling: dict[str, Any] = {"do_sample": False}
    if temperature > 0:
        torch.manual_seed(seed)
        sampling = {"do_sample": True, "temperature": float(temperature)}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        ids = model.generate(
            **enc, max_new_tokens=max_new_tokens, streamer=streamer, pad_token_id=pad, **sampling
        )  # (1, prompt + new)
    return tokenizer.decode(ids[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def generate(
    prompt: str,
    model: str | None = None,
    adapter: str | None = None,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    chat_template: bool = True,
    seed: int = 0,
    dtype: str = "float32",
    quantization: str | None = None,
    stream: TextIO | None = None,
) -> str:
    """Load a model (and adapter) and continue a prompt, streaming the new text.

    Args:
        prompt: The user's text.
        model: Base model (built-in name, local directory or hub id); default: the run directory's.
        adapter: A run directory or an adapter directory (none: the base model alone).
        max_new_tokens: Most tokens to generate.
        temperature: 0 for greedy (deterministic) decoding, else the sampling temperature.
        chat_template: Apply the tokenizer's chat template when it has one.
        seed: Sampling seed (temperature > 0).
        dtype: Weight dtype of the base model.
        quantization: Load the base quantized by bitsandbytes (nf4, fp4, int8); none: full precision.
        stream: Where the new text is written as it comes (None: nowhere; the command passes stdout).

    Returns:
        The generated text.

    Raises:
        ValueError: bad options (checked before loading), no base model named, a model without a tokenizer.
        riemix.hub.ModelLoadError, riemix.AdapterError: the model or adapter cannot be loaded.
    """
    if not prompt.strip():
        raise ValueError("the prompt is empty")
    _check_options(max_new_tokens, temperature)
    lm, tokenizer = load_adapted(model, None if adapter is None else os.fspath(adapter), dtype, quantization)
    if tokenizer is None:
        raise ValueError(f"model {model!r} has no tokenizer files; generate needs one")
    return generate_text(lm, tokenizer, prompt, max_new_tokens, temperature, chat_template, seed, stream)
