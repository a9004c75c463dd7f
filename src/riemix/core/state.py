"""The adapter's tensors, listed once: what a ``MoELoRALinear`` saves, under which key, with which shape.

``ADAPTER_TENSORS`` is the single table; everything that lists adapter tensors reads it:

- ``adapter_state_dict(model)``: the tensors a model carries (keyed ``<module>.<suffix>``), as saved by
  ``riemix.io.adapter.save_adapter``;
- ``adapter_tensor_shapes(config, ...)``: the keys and shapes one module must have under a config, as
  checked by ``load_adapter``;
- ``BUFFER_SUFFIXES``: the non-parameter entries (the PiSSA factors, rebuilt on load rather than copied).

With E experts of rank r on an ``in -> out`` Linear:

    lora_A          (E, r, in)     always
    lora_B          (E, out, r)    always
    router.weight   (E, in)        per-token routing
    global_gate     (E,)           routing="global"
    expert_scale    (E, out)       expert_scales=True
    pissa_down      (E·r, in)      init="pissa" (fp64 buffer)
    pissa_up        (out, E·r)     init="pissa" (fp64 buffer)
    expert_age      (E,)           mature_after_steps > 0 (int64 buffer: each expert's age in steps)

r is the stacked rank R (the largest expert rank, ``MoELoRALinear.expert_ranks``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from riemix.core.config import MoELoRAConfig
from riemix.core.layer import MoELoRALinear, iter_moe_lora_layers

__all__ = ["AdapterTensor", "ADAPTER_TENSORS", "BUFFER_SUFFIXES", "adapter_state_dict", "adapter_tensor_shapes"]


class AdapterTensor(NamedTuple):
    """One kind of adapter tensor.

    Attributes:
        suffix: key relative to the module (``"<module>.<suffix>"``).
        in_config: whether an adapter with this config has it (for every adapted module).
        shape: ``(E, r, in, out) -> shape``.
        get: the layer's tensor, or None when the layer has none.
        parameter: True for trainable parameters, False for buffers.
        rebuilt: True for buffers rebuilt on load (the PiSSA factors) rather than copied.
    """

    suffix: str
    in_config: Callable[[MoELoRAConfig], bool]
    shape: Callable[[int, int, int, int], tuple[int, ...]]
    get: Callable[[MoELoRALinear], torch.Tensor | None]
    parameter: bool = True
    rebuilt: bool = False


def _always(config: MoELoRAConfig) -> bool:
    return True


#: Every adapter tensor, in the order of ``adapter_state_dict``.
ADAPTER_TENSORS: tuple[AdapterTensor, ...] = (
    AdapterTensor("lora_A", _always, lambda e, r, i, o: (e, r, i), lambda layer: layer.lora_A),
    AdapterTensor("lora_B", _always, lambda e, r, i, o: (e, o, r), lambda layer: layer.lora_B),
    AdapterTensor(
        "router.weight",
        lambda c: c.routing != "global",
        lambda e, r, i, o: (e, i),
        lambda layer: None if layer.router is None else layer.router.weight,
    ),
    AdapterTensor(
        "global_gate", lambda c: c.routing == "global", lambda e, r, i, o: (e,), lambda layer: layer.global_gate
    ),
    AdapterTensor(
        "expert_scale", lambda c: c.expert_scales, lambda e, r, i, o: (e, o), lambda layer: layer.expert_scale
    ),
    AdapterTensor(
        "pissa_down",
        lambda c: c.init == "pissa",
        lambda e, r, i, o: (e * r, i),
        lambda layer: layer.pissa_down,
        False,
        True,
    ),
    AdapterTensor(
        "pissa_up",
        lambda c: c.init == "pissa",
        lambda e, r, i, o: (o, e * r),
        lambda layer: layer.pissa_up,
        False,
        True,
    ),
    AdapterTensor(
        "expert_age",
        lambda c: c.mature_after_steps > 0,
        lambda e, r, i, o: (e,),
        lambda layer: layer.expert_age if layer.maturity.after_steps > 0 else None,
        False,
    ),
)

#: Suffixes of the entries that are rebuilt on load (by ``riemix.core.init.restore_pissa``), not copied.
BUFFER_SUFFIXES: tuple[str, ...] = tuple(t.suffix for t in ADAPTER_TENSORS if t.rebuilt)


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors only, keyed ``<module>.<suffix>`` (see ``ADAPTER_TENSORS``), detached.

    Always ``lora_A`` and ``lora_B``; ``router.weight`` (per-token routing) or ``global_gate``
    (``routing="global"``); ``expert_scale`` with ``expert_scales``; ``pissa_down``/``pissa_up`` (the part
    of the base weight that ``init="pissa"`` moved into the experts) for PiSSA layers; ``expert_age`` for
    layers with maturity routing (``MoELoRALinear.maturity``).  The tensors share
    storage with the layers (copying into a value writes the parameter).
    """
    state = {}
    for name, layer in iter_moe_lora_layers(model):
        for entry in ADAPTER_TENSORS:
            tensor = entry.get(layer)
            if tensor is not None:
                state[f"{name}.{entry.suffix}"] = tensor.detach()
    return state


def adapter_tensor_shapes(
    config: MoELoRAConfig, name: str, num_experts: int, rank: int, in_features: int, out_features: int
) -> dict[str, tuple[int, ...]]:
    """Expected ``adapter_state_dict`` keys and shapes of one module under ``config``.

    Args:
        config: the adapter configuration.
        name: the module's full name.
        num_experts: E of that module.
        rank: r.
        in_features: the wrapped Linear's input width.
        out_features: its output width.

    Returns:
        ``{"<name>.<suffix>": shape}`` in the order of ``ADAPTER_TENSORS``.
    """
    dims = (num_experts, rank, in_features, out_features)
    return {f"{name}.{t.suffix}": t.shape(*dims) for t in ADAPTER_TENSORS if t.in_config(config)}
