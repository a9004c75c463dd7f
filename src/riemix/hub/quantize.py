"""Quantized and low-precision bases: the ``quantization`` and ``base_dtype`` options of ``load_model``.

``quantization`` (one of :data:`QUANTIZATIONS`) loads the base through bitsandbytes, by way of
transformers' ``BitsAndBytesConfig`` (``pip install riemix[quant]``):

* ``"nf4"`` / ``"fp4"``: 4-bit weights (``load_in_4bit`` with ``bnb_4bit_quant_type``), computed in the
  base dtype (``bnb_4bit_compute_dtype``), in ``bitsandbytes.nn.Linear4bit`` modules;
* ``"int8"``: LLM.int8() weights (``load_in_8bit``) in ``bitsandbytes.nn.Linear8bitLt`` modules.

transformers keeps the output embeddings (``lm_head``) unquantized, and riemix adds a classification
head's modules (``HEAD_NAMES``: they train).  Quantization happens while the checkpoint is read, so a
directory, a hub id and a built-in name (whose GGUF file is dequantised into a cached directory first)
are quantized the same way; a lone ``.gguf`` file, which transformers dequantises itself and cannot
quantize in the same call, is dequantised, written to a temporary directory and loaded from there.

``base_dtype`` (one of :data:`BASE_DTYPES`) is the dtype of the unquantized base weights and the 4-bit
compute dtype: ``"fp32"`` or ``"bf16"`` (half the memory of every unquantized weight).

On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit layer for inference the first time it runs in eval
mode without gradients, after which the layer passes no gradient back to its input; a quantized model is
returned with that repacking turned off (:func:`keep_differentiable`; ``riemix.core.layer`` explains).

transformers leaves the unquantized weights (embeddings, norms, ``lm_head``) as views of the memory-mapped
checkpoint, which keeps every page read while quantizing resident (about the full-precision size of the
quantized weights: 405 MiB for SmolLM2-135M); :func:`own_unquantized_weights` copies them out so that the
mapping is released.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

from riemix.hub.resolve import ModelLoadError

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "BASE_DTYPES",
    "QUANTIZATIONS",
    "bitsandbytes_config",
    "check_quantization",
    "finish_quantized",
    "keep_differentiable",
    "load_dtype",
    "own_unquantized_weights",
]

logger = logging.getLogger(__name__)

#: The ``quantization`` values ``load_model`` and ``TrainConfig`` accept (None: no quantization).
QUANTIZATIONS: tuple[str, ...] = ("nf4", "fp4", "int8")

#: The ``base_dtype`` values ``load_model`` and ``TrainConfig`` accept (None: ``load_model``'s ``dtype``).
BASE_DTYPES: tuple[str, ...] = ("fp32", "bf16")

_TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def check_quantization(quantization: str | None, base_dtype: str | None) -> None:
    """Validate the two options, before anything is loaded.

    Args:
        quantization: One of :data:`QUANTIZATIONS`, or None.
        base_dtype: One of :data:`BASE_DTYPES`, or None.

    Raises:
        ValueError: an unknown value, named with the valid ones.
    """
    if quantization is not None and quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantization!r}; expected one of {QUANTIZATIONS} or None")
    if base_dtype is not None and base_dtype not in BASE_DTYPES:
        raise ValueError(f"unknown base_dtype {base_dtype!r}; expected one of {BASE_DTYPES} or None")


def load_dtype(base_dtype: str | None, dtype: torch.dtype | str) -> torch.dtype | str:
    """The ``dtype`` to load with: ``base_dtype``'s when given, else ``dtype`` unchanged."""
    return dtype if base_dtype is None else _TORCH_DTYPES[base_dtype]


def _compute_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """The 4-bit compute dtype for a load ``dtype``: that dtype when it names a floating one, else fp32."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def _require_bitsandbytes(quantization: str) -> None:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise ModelLoadError(
            f"quantization={quantization!r} needs bitsandbytes, which is not installed ({err}): "
            "pip install riemix[quant]"
        ) from err


def bitsandbytes_config(
    quantization: str, dtype: torch.dtype | str, skip_modules: list[str] | None = None
) -> Any:
    """The ``BitsAndBytesConfig`` of one of :data:`QUANTIZATIONS`.

    Args:
        quantization: ``"nf4"``, ``"fp4"`` or ``"int8"``.
        dtype: The load dtype (4-bit layers compute in it when it is a floating dtype, else in fp32).
        skip_modules: Module names left unquantized instead of transformers' defaults (the output
            embeddings and the last module); None keeps the defaults.

    Returns:
        A ``transformers.BitsAndBytesConfig``.

    Raises:
        ValueError: an unknown quantization.
        ModelLoadError: bitsandbytes is not installed (``pip install riemix[quant]``).
    """
    check_quantization(quantization, None)
    _require_bitsandbytes(quantization)
    from transformers import BitsAndBytesConfig

    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip_modules)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantization,
        bnb_4bit_compute_dtype=_compute_dtype(dtype),
        llm_int8_skip_modules=skip_modules,
    )


def keep_differentiable(model: nn.Module) -> int:
    """Turn off bitsandbytes' CPU repacking of every 4-bit layer of ``model`` (see the module docstring).

    Args:
        model: A model quantized by bitsandbytes (before any forward).

    Returns:
        The number of 4-bit layers.
    """
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for module in layers:
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
    return len(layers)


def own_unquantized_weights(model: nn.Module) -> int:
    """Copy every unquantized parameter and buffer of a freshly quantized ``model`` into its own memory.

    Tensors that shared storage (tied weights) keep sharing their copy; the quantized weights
    (bitsandbytes' own parameter classes, built while loading) are left alone.

    Args:
        model: A model just loaded with a ``BitsAndBytesConfig``.

    Returns:
        The number of storages copied.
    """
    import bitsandbytes as bnb

    quantized = (bnb.nn.Params4bit, bnb.nn.Int8Params)
    copies: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        tensors = [p for p in model.parameters() if not isinstance(p, quantized)]
        tensors += [b for b in model.buffers() if b is not None]
        for tensor in tensors:
            key = tensor.untyped_storage().data_ptr()
            if key not in copies:
                copies[key] = tensor.untyped_storage().clone()
            view = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
            view.set_(copies[key], tensor.storage_offset(), tensor.shape, tensor.stride())
            tensor.data = view
    return len(copies)


def finish_quantized(model: nn.Module, label: str, quantization: str | None) -> nn.Module:
    """What ``load_model`` does to a model it loaded with ``quantization`` (nothing when it is None).

    :func:`keep_differentiable` and :func:`own_unquantized_weights`, then one INFO line.

    Args:
        model: The loaded model.
        label: Its name, for the log.
        quantization: The quantization it was loaded with, or None.

    Returns:
        ``model`` itself.
    """
    if quantization is not None:
        count = keep_differentiable(model)
        own_unquantized_weights(model)
        logger.info("%s: quantized to %s by bitsandbytes (%d 4-bit layers)", label, quantization, count)
    return model
