"""Which base weights an adapter was trained on: a SHA-256 of every wrapped module's original weight.

An adapter's shapes fit every checkpoint of one architecture, but its experts were trained against one
set of base weights (and ``init="pissa"`` rebuilds the residual W − up·down from them). ``save_adapter``
records, per wrapped module, the digest of the weight it wraps (for PiSSA the original W, rebuilt bit
for bit), and ``load_adapter`` refuses a base whose weights differ, naming the modules, unless forced.

The digest is taken over the weight's bytes as stored, in its dtype; a base held in another dtype is
compared after casting to the saved dtype where that is exact (a wider dtype cast down), and otherwise
reported as unverifiable.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from riemix.core.init import bit_pattern, pissa_original

__all__ = ["check_base_weights", "layer_weight_digest", "pin_weight_digests", "weight_digest"]

def weight_digest(weight: torch.Tensor) -> str:
    """SHA-256 of a tensor's bytes (any dtype, bf16 included), with its shape and dtype."""
    t = weight.detach().to("cpu").contiguous()
    digest = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    digest.update(bit_pattern(t).numpy().tobytes())
    return digest.hexdigest()


def layer_weight_digest(layer) -> tuple[str | None, str]:
    """``(sha256, dtype)`` of the original weight a ``MoELoRALinear`` wraps (cached while it is unchanged).

    For ``init="pissa"`` the base holds the residual; the original W is rebuilt exactly from the factors
    and the kept rounding fixes first.  A quantized base (bitsandbytes) is not fingerprinted: its packed
    bytes and scales depend on the quantizer, not only on the checkpoint (``(None, "quantized")``).
    """
    if getattr(layer, "quantized_base", False):
        return None, "quantized"
    pinned = getattr(layer, "base_weight_digest", None)  # fixed before the base was sharded (FSDP2)
    if pinned is not None:
        return pinned
    stored = layer.base_layer.weight
    key = (stored.data_ptr(), stored._version)
    cached = getattr(layer, "_weight_digest_cache", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    weight = stored
    if layer.pissa_down is not None and layer.pissa_fix_index is not None:
        with torch.no_grad():
            original = pissa_original(
                layer.base_weight, layer.pissa_down, layer.pissa_up, layer.pissa_fix_index, layer.pissa_fix_value
            )  # (out, in)
        weight = original.t() if layer.transposed else original  # as stored
    result = (weight_digest(weight), str(weight.dtype).removeprefix("torch."))
    layer._weight_digest_cache = (key, result)
    return result


def pin_weight_digests(model: nn.Module) -> None:
    """Compute every adapted layer's base-weight digest now and keep it fixed (before the base weights are
    sharded across processes, when no process holds them whole any more)."""
    from riemix.core.layer import iter_moe_lora_layers

    for _, layer in iter_moe_lora_layers(model):
        layer.base_weight_digest = layer_weight_digest(layer)


def check_base_weights(model: nn.Module, modules: dict[str, Any], where: Path, force: bool = False) -> None:
    """Compare the base model's wrapped weights with the digests an adapter saved.

    Args:
        model: The plain base model the adapter is about to be loaded onto.
        modules: The adapter config's ``base_model.modules`` (entries without ``weight_sha256``, written
            before digests were recorded, are not checked).
        where: The adapter config file (named in messages).
        force: Load anyway: a difference is a warning instead of an error.

    Raises:
        ValueError: The weights differ (the modules named) and ``force`` is False.
    """
    differ, unverifiable = [], []
    for name, info in modules.items():
        saved = info.get("weight_sha256")
        if saved is None:
            continue
        weight = model.get_submodule(name).weight
        dtype = getattr(torch, info.get("weight_dtype", ""), None)
        if not weight.is_floating_point() or (dtype is not None and not dtype.is_floating_point):
            continue  # a quantized base, here or when saved: packed codes are not comparable (not fingerprinted)
        if dtype is not None and dtype != weight.dtype:
            if torch.finfo(weight.dtype).bits < torch.finfo(dtype).bits:  # cannot recover the wider values
                unverifiable.append(
                    f"{name} ({str(weight.dtype).removeprefix('torch.')} here, {info['weight_dtype']} saved)"
                )
                continue
            weight = weight.to(dtype)
        if weight_digest(weight) != saved:
            differ.append(name)
    if unverifiable:
        warnings.warn(
            f"{where}: cannot verify the base weights of {len(unverifiable)} module(s) held in a narrower dtype "
            f"than when the adapter was saved (e.g. {unverifiable[0]})",
            UserWarning,
            stacklevel=3,
        )
    if not differ:
        return
    text = (
        f"{where}: the base model's weights differ from those the adapter was trained on in {len(differ)} of "
        f"{len(modules)} module(s) (e.g. {', '.join(differ[:3])}): another checkpoint of the same architecture?"
    )
    if not force:
        raise ValueError(f"{text} Pass force=True (--force) to load it anyway")
    warnings.warn(f"{text} Loaded anyway (force)", UserWarning, stacklevel=3)
