"""The MoE-LoRA layer: a frozen ``nn.Linear`` plus E fused low-rank experts and a per-token router.

    y = base(x) + s · Σᵢ gᵢ(x) · Bᵢ Aᵢ dropout(x)

All experts are computed at once from stacked tensors: h = x̃·A_catᵀ has width E·r, is gate-weighted
per expert block and multiplied by B_catᵀ.  A custom autograd function implements *gate rescaling*
(Sun et al., ICML 2025): the forward value is gᵢ·eᵢ, the gradient reaching Aᵢ, Bᵢ and x is weighted by
cᵢ = stopgrad(gᵢ^p) instead of gᵢ, and the router receives the ordinary ∂L/∂gᵢ = s·<∂L/∂y, Bᵢ Aᵢ x̃>.
Equivalently wᵢ = cᵢ·eᵢ + (gᵢ − cᵢ)·stopgrad(eᵢ); the fused function computes that without a second
pass over B.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .routing import gate_grad_coefficients, route

__all__ = ["MoELoRALinear", "fused_moe_lora"]


class _FusedMoELoRA(torch.autograd.Function):
    """Fused expert computation with gate-rescaled backward. See ``fused_moe_lora``."""

    @staticmethod
    def forward(ctx, x, lora_a, lora_b, gates, coef, scaling):  # noqa: D102
        n, _ = x.shape  # x: (N, in)
        e, r, d_in = lora_a.shape  # lora_a: (E, r, in)
        d_out = lora_b.shape[1]  # lora_b: (E, out, r)
        a_cat = lora_a.reshape(e * r, d_in)  # (E·r, in)
        b_cat = lora_b.permute(1, 0, 2).reshape(d_out, e * r)  # (out, E·r)
        h = x @ a_cat.t()  # (N, E·r)
        u = (h.view(n, e, r) * (gates * scaling).unsqueeze(-1)).view(n, e * r)  # (N, E·r)
        y = u @ b_cat.t()  # (N, out)
        ctx.save_for_backward(x, a_cat, b_cat, h, coef)
        ctx.scaling = scaling
        ctx.shape = (e, r, d_in, d_out)
        return y

    @staticmethod
    def backward(ctx, grad_y):  # noqa: D102
        x, a_cat, b_cat, h, coef = ctx.saved_tensors
        e, r, d_in, d_out = ctx.shape
        n = x.shape[0]
        s = ctx.scaling
        need_x, need_a, need_b, need_g = ctx.needs_input_grad[:4]
        grad_x = grad_a = grad_b = grad_g = None
        du = grad_y @ b_cat  # (N, E·r): ∂L/∂(g-weighted h) / s
        if need_g:
            grad_g = (du.view(n, e, r) * h.view(n, e, r)).sum(-1) * s  # (N, E)
        if need_x or need_a:
            dh = (du.view(n, e, r) * (coef * s).unsqueeze(-1)).view(n, e * r)  # (N, E·r)
            if need_x:
                grad_x = dh @ a_cat  # (N, in)
            if need_a:
                grad_a = (dh.t() @ x).view(e, r, d_in)  # (E, r, in)
        if need_b:
            hc = (h.view(n, e, r) * (coef * s).unsqueeze(-1)).view(n, e * r)  # (N, E·r)
            grad_b = (grad_y.t() @ hc).view(d_out, e, r).permute(1, 0, 2).contiguous()  # (E, out, r)
        return grad_x, grad_a, grad_b, grad_g, None, None


def fused_moe_lora(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    gates: torch.Tensor,
    coef: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """Compute s·Σᵢ gᵢ·Bᵢ Aᵢ x for all tokens at once, with gate-rescaled gradients.

    Args:
        x: ``(N, in)`` expert input (after dropout).
        lora_a: ``(E, r, in)`` stacked A matrices.
        lora_b: ``(E, out, r)`` stacked B matrices.
        gates: ``(N, E)`` gates g (differentiable; receives the ordinary gradient).
        coef: ``(N, E)`` detached gradient weights c replacing g in the gradients of x, A and B.
        scaling: the adapter scaling s.

    Returns:
        ``(N, out)`` adapter output.
    """
    return _FusedMoELoRA.apply(x, lora_a, lora_b, gates, coef.detach(), float(scaling))


class MoELoRALinear(nn.Module):
    """A frozen ``nn.Linear`` with a mixture of LoRA experts and a per-token router.

    Attributes:
        base_layer: the wrapped, frozen ``nn.Linear``.
        lora_A: ``(E, r, in_features)`` expert down-projections.
        lora_B: ``(E, out_features, r)`` expert up-projections.
        router: ``nn.Linear(in_features, E, bias=False)``.
        scaling: adapter scale s (``alpha/r`` or ``alpha/sqrt(r)``).
        record_routing: when True, ``last_router_logits`` ``(N, E)`` and ``last_gates`` ``(N, E)`` keep the
            latest forward's routing (used by auxiliary losses and diagnostics).
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        num_experts: int,
        rank: int,
        alpha: float,
        top_k: int,
        routing: str = "softmax_topk",
        gate_grad_power: float = 0.5,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "zero_b",
        router_init_std: float = 0.02,
    ) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"MoELoRALinear wraps an nn.Linear, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.num_experts = num_experts
        self.rank = rank
        self.alpha = alpha
        self.top_k = num_experts if routing == "dense" else top_k
        self.routing = routing
        self.gate_grad_power = gate_grad_power
        self.scaling = alpha / (math.sqrt(rank) if use_rslora else rank)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        weight = base_layer.weight
        dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
        factory = {"device": weight.device, "dtype": dtype}
        self.lora_A = nn.Parameter(torch.empty(num_experts, rank, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(num_experts, self.out_features, rank, **factory))
        self.router = nn.Linear(self.in_features, num_experts, bias=False, **factory)
        self.record_routing = False
        self.last_router_logits: torch.Tensor | None = None
        self.last_gates: torch.Tensor | None = None
        self.reset_adapter_parameters(init, router_init_std)

    @torch.no_grad()
    def reset_adapter_parameters(self, init: str = "zero_b", router_init_std: float = 0.02) -> None:
        """(Re)initialise experts and router; every supported init leaves the layer output unchanged.

        Args:
            init: ``"zero_b"`` (Kaiming-uniform A as in PEFT, zero B) or ``"gaussian"`` (A ~ N(0, 1/r²),
                zero B).
            router_init_std: std of the router's normal init.

        Raises:
            ValueError: for an unknown init.
        """
        a2d = self.lora_A.view(-1, self.in_features)  # (E·r, in): fan_in = in per expert row
        if init == "zero_b":
            nn.init.kaiming_uniform_(a2d, a=math.sqrt(5))
        elif init == "gaussian":
            nn.init.normal_(a2d, std=1.0 / self.rank)
        else:
            raise ValueError(f"init must be 'zero_b' or 'gaussian', got {init!r}")
        self.lora_B.zero_()
        nn.init.normal_(self.router.weight, std=router_init_std)

    def compute_gates(self, x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Router logits and gates for flattened tokens.

        Args:
            x2d: ``(N, in)`` layer input.

        Returns:
            ``(logits, gates)``, both ``(N, E)``; gates are fp32 (fp64 for fp64 inputs).
        """
        logits = self.router(x2d.to(self.router.weight.dtype))  # (N, E)
        gates, _ = route(logits, self.routing, self.top_k)  # (N, E)
        return logits, gates

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the base layer and the gated experts.

        Args:
            x: ``(..., in_features)``.

        Returns:
            ``(..., out_features)``.
        """
        base_out = self.base_layer(x)  # (..., out)
        lead = x.shape[:-1]
        x2d = x.reshape(-1, self.in_features)  # (N, in)
        logits, gates = self.compute_gates(x2d)  # (N, E), (N, E)
        if self.record_routing:
            self.last_router_logits, self.last_gates = logits, gates
        coef = gate_grad_coefficients(gates, self.gate_grad_power)  # (N, E)
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            compute_dtype = torch.get_autocast_dtype(device_type)
        else:
            compute_dtype = self.lora_A.dtype
        x_drop = self.dropout(x2d).to(compute_dtype)  # (N, in)
        with torch.autocast(device_type, enabled=False):
            delta = fused_moe_lora(
                x_drop,
                self.lora_A.to(compute_dtype),
                self.lora_B.to(compute_dtype),
                gates.to(compute_dtype),
                coef.to(compute_dtype),
                self.scaling,
            )  # (N, out)
        return base_out + delta.view(*lead, self.out_features).to(base_out.dtype)

    def delta_weight(self, gates: torch.Tensor) -> torch.Tensor:
        """The effective weight update s·Σᵢ gᵢ·Bᵢ Aᵢ for one fixed gate vector.

        Args:
            gates: ``(E,)`` gate values.

        Returns:
            ``(out, in)`` weight delta.
        """
        return self.scaling * torch.einsum("e,eor,eri->oi", gates.to(self.lora_A.dtype), self.lora_B, self.lora_A)

    def extra_repr(self) -> str:  # noqa: D102
        return (
            f"in={self.in_features}, out={self.out_features}, experts={self.num_experts}, top_k={self.top_k}, "
            f"rank={self.rank}, scaling={self.scaling:g}, routing={self.routing}, p={self.gate_grad_power}"
        )

