"""riemix MoE-LoRA inference model, on torch and transformers alone (no riemix import).

``riemix export`` copies this file into the exported directory as ``modeling_riemix.py``, with
``BASE_MODEL_CLASS`` set to the base architecture; ``config.json`` is the base model's config plus
``auto_map`` (``AutoModelForCausalLM`` -> ``modeling_riemix.RiemixMoELoRAForCausalLM``) and
``riemix_moe_lora``, which lists every adapted linear module with its experts, rank and routing.  So::

    AutoModelForCausalLM.from_pretrained(export_dir, trust_remote_code=True)

builds the base architecture, swaps those modules for ``MoELoRALinear`` below and loads the base
weights and the adapter tensors.  ``MoELoRALinear`` is an inference-only copy of riemix's forward
(``riemix.core.functional``, ``riemix.core.routing``; eval mode: no dropout, no selection noise):

    y = x Wᵀ + b + s · Σᵢ gᵢ(x) · (σᵢ ⊙ Bᵢ) Aᵢ x

with s the adapter scale (times the scale warm-up factor in force at export), σᵢ the optional expert
scales and the gates gᵢ = m · softmax(logits / T) over the selected experts (m = E for ``global``,
else 1), for the routing modes in ``ROUTING_MODES``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import transformers
from torch import nn

__all__ = ["BASE_MODEL_CLASS", "ROUTING_MODES", "SPEC_KEY", "MoELoRALinear", "RiemixMoELoRAForCausalLM", "route"]

BASE_MODEL_CLASS = "LlamaForCausalLM"  # the base architecture (a transformers class name); set by riemix export
#: The routing modes this file implements.
ROUTING_MODES = ("softmax_topk", "topk_softmax", "dense", "top_p", "global")
#: The config.json key that lists the adapted modules.
SPEC_KEY = "riemix_moe_lora"
_TOPK_MODES = ("softmax_topk", "topk_softmax")
_DENSE_MODES = ("dense", "global")


def route(logits: torch.Tensor, mode: str, top_k: int, temperature: float, top_p: float) -> torch.Tensor:
    """Router logits -> gates, zero for the unselected experts (riemix's ``route`` without noise).

    Args:
        logits: ``(N, E)`` router logits (``global``: the gate logits repeated on N rows).
        mode: one of ``ROUTING_MODES``.
        top_k: experts kept per token (the cap of ``top_p``).
        temperature: T > 0.
        top_p: mass threshold of ``top_p``.

    Returns:
        ``(N, E)`` gates in fp32 (fp64 for fp64 logits).
    """
    work = logits if logits.dtype == torch.float64 else logits.float()  # (N, E)
    z = work / temperature if temperature != 1.0 else work  # (N, E)
    num_experts = work.shape[-1]
    if mode in _DENSE_MODES or (mode in _TOPK_MODES and top_k >= num_experts):
        return torch.softmax(z, dim=-1) * (float(num_experts) if mode == "global" else 1.0)  # (N, E)
    if mode == "top_p":
        probs = torch.softmax(z, dim=-1)  # (N, E)
        sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)  # (N, E), (N, E)
        keep = (sorted_p.cumsum(-1) - sorted_p) < top_p  # (N, E): mass before each expert < top_p
        keep[:, 0] = True
        keep[:, top_k:] = False
        selected = torch.zeros_like(keep).scatter(-1, order, keep)  # (N, E)
        kept = torch.softmax(z, dim=-1) * selected  # (N, E)
        return kept / kept.sum(dim=-1, keepdim=True)
    if mode not in _TOPK_MODES:
        raise ValueError(f"unknown routing mode {mode!r}; this file implements {ROUTING_MODES}")
    top_idx = z.sort(dim=-1, descending=True, stable=True).indices[:, :top_k]  # (N, k)
    if mode == "softmax_topk":
        kept = torch.softmax(z, dim=-1).gather(-1, top_idx)  # (N, k)
        kept = kept / kept.sum(dim=-1, keepdim=True)
    else:
        kept = torch.softmax(z.gather(-1, top_idx), dim=-1)  # (N, k)
    return torch.zeros_like(work).scatter(-1, top_idx, kept)  # (N, E)


class MoELoRALinear(nn.Module):
    """A linear layer plus E gated LoRA experts, for inference.

    Attributes:
        base_layer: the base ``nn.Linear``.
        lora_A: ``(E, r, in)`` expert down-projections (fp32; fp64 over an fp64 base).
        lora_B: ``(E, out, r)`` expert up-projections.
        router: ``nn.Linear(in, E, bias=False)``, or None for ``global`` routing.
        global_gate: ``(E,)`` gate logits of ``global`` routing, else None.
        expert_scale: ``(E, out)`` channel-wise expert scales, or None.
    """

    def __init__(self, base_layer: nn.Linear, spec: dict) -> None:
        super().__init__()
        routing = spec["routing"]
        if routing not in ROUTING_MODES:
            raise ValueError(f"unknown routing mode {routing!r}; this file implements {ROUTING_MODES}")
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.num_experts, self.rank = int(spec["num_experts"]), int(spec["rank"])
        self.routing, self.top_k = routing, int(spec["top_k"])
        self.top_p, self.temperature, self.scaling = (
            float(spec["top_p"]),
            float(spec["temperature"]),
            float(spec["scaling"]),
        )
        weight = base_layer.weight
        factory = {"device": weight.device, "dtype": torch.float64 if weight.dtype == torch.float64 else torch.float32}
        e, r = self.num_experts, self.rank
        self.lora_A = nn.Parameter(torch.zeros(e, r, self.in_features, **factory), requires_grad=False)
        self.lora_B = nn.Parameter(torch.zeros(e, self.out_features, r, **factory), requires_grad=False)
        if routing == "global":
            self.router = None
            self.global_gate = nn.Parameter(torch.zeros(e, **factory), requires_grad=False)
        else:
            self.router = nn.Linear(self.in_features, e, bias=False, **factory).requires_grad_(False)
            self.register_parameter("global_gate", None)
        if spec.get("expert_scales"):
            self.expert_scale = nn.Parameter(torch.ones(e, self.out_features, **factory), requires_grad=False)
        else:
            self.register_parameter("expert_scale", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., in)`` -> ``(..., out)``, computed in riemix's dtype (at least the adapter's)."""
        lead = x.shape[:-1]
        device_type = x.device.type
        autocast = torch.is_autocast_enabled(device_type)
        dtype = torch.get_autocast_dtype(device_type) if autocast else torch.promote_types(x.dtype, self.lora_A.dtype)
        x2d = x.reshape(-1, self.in_features).to(dtype)  # (N, in)
        n, e, r = x2d.shape[0], self.num_experts, self.rank
        lora_b = self.lora_B if self.expert_scale is None else self.lora_B * self.expert_scale.unsqueeze(-1)
        with torch.autocast(device_type, enabled=False):
            a_cat = self.lora_A.to(dtype).reshape(e * r, self.in_features)  # (E·r, in)
            b_cat = lora_b.to(dtype).permute(1, 0, 2).reshape(self.out_features, e * r)  # (out, E·r)
            if self.router is None:
                h = x2d @ a_cat.t()  # (N, E·r)
                logits = self.global_gate.to(dtype).unsqueeze(0).expand(n, e).contiguous()  # (N, E)
            else:  # one matmul over x for the experts and the router, as riemix does
                hx = x2d @ torch.cat([a_cat, self.router.weight.to(dtype)], dim=0).t()  # (N, E·r + E)
                h, logits = hx[:, : e * r], hx[:, e * r :].contiguous()  # (N, E·r), (N, E)
            gates = route(logits, self.routing, self.top_k, self.temperature, self.top_p)  # (N, E)
            bias = self.base_layer.bias
            y = F.linear(x2d, self.base_layer.weight.to(dtype), None if bias is None else bias.to(dtype))  # (N, out)
            u = (h.view(n, e, r) * (gates * self.scaling).to(h.dtype).unsqueeze(-1)).view(n, e * r)  # (N, E·r)
            y.addmm_(u, b_cat.t())  # (N, out) += s·Σ g·B A x
        return y.view(*lead, self.out_features).to(dtype if autocast else x.dtype)

    def extra_repr(self) -> str:  # noqa: D102
        return (
            f"in={self.in_features}, out={self.out_features}, experts={self.num_experts}, rank={self.rank}, "
            f"routing={self.routing}, top_k={self.top_k}, scaling={self.scaling:g}"
        )


def _base_class() -> type:
    base = getattr(transformers, BASE_MODEL_CLASS, None)
    if base is None:
        raise ImportError(f"transformers {transformers.__version__} has no {BASE_MODEL_CLASS}; upgrade transformers")
    return base


class RiemixMoELoRAForCausalLM(_base_class()):
    """The base architecture with the modules listed under ``config.riemix_moe_lora`` made MoE-LoRA layers."""

    def __init__(self, config, *args, **kwargs) -> None:
        super().__init__(config, *args, **kwargs)
        spec = getattr(config, SPEC_KEY, None)
        if not isinstance(spec, dict) or not isinstance(spec.get("layers"), dict) or not spec["layers"]:
            raise ValueError(f"config.json has no {SPEC_KEY!r} entry listing the adapted layers; not a riemix export")
        for name, layer_spec in spec["layers"].items():
            base = self.get_submodule(name)
            if not isinstance(base, nn.Linear):
                raise ValueError(f"{SPEC_KEY}: module {name!r} is a {type(base).__name__}, not an nn.Linear")
            parent_name, _, child = name.rpartition(".")
            setattr(self.get_submodule(parent_name) if parent_name else self, child, MoELoRALinear(base, layer_spec))
